"""`edsr-dist train`: parse the flags into a Config, run the Trainer, and turn how it ended into an exit code."""

from __future__ import annotations

import errno
import os
import sys

from edsr_dist.config import Config, parse_train_args
from edsr_dist.errors import (
    EXIT_COLLECTIVE_FAILED,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_UPLOAD_FAILED,
    EXIT_USER_ERROR,
    DiskFull,
    UserError,
)
from edsr_dist.parallel.engine import describe_collective_failure
from edsr_dist.state.checkpoint import find_checkpoint
from edsr_dist.state.checkpoint_files import newest_checkpoint_quick
from edsr_dist.train.agreement import MAX_BAD_STEPS, TrainingDiverged
from edsr_dist.train.trainer import Interrupted, Trainer


def _collective_failure_exit(exc: RuntimeError, cfg: Config, rank: int | None) -> int:
    """Another rank died or hung: one line instead of a traceback from deep inside the backend."""
    message = describe_collective_failure(exc, cfg.dist_timeout)
    if message is None:
        raise exc
    where = f"rank {rank}: " if rank is not None else ""
    print(f"edsr-dist train: error: {where}{message}", file=sys.stderr, flush=True)
    return EXIT_COLLECTIVE_FAILED


def stopped_by_owner(trainer: Trainer) -> bool:
    """The owner record's heartbeat stopped the run (record taken over, or not refreshed within the bound)."""
    return trainer.checkpointer.owner is not None and trainer.checkpointer.owner.stopped_job is not None


def _disk_full_exit(trainer: Trainer, exc: Exception) -> int:
    """A write during training found the disk full: try a last checkpoint where space allows (it is refused before
    writing when it cannot fit), then say in one line which step the folder holds."""
    cause = str(exc) if isinstance(exc, UserError) else f"cannot write {exc.filename or 'an output file'}: {exc.strerror}"
    if trainer.is_main:
        saved = ""
        if not cause.startswith("cannot write a checkpoint"):  # another write failed: is there room for one?
            try:
                trainer.checkpointer.save(trainer.step, trainer.state_dict)
                saved = f"saved a last checkpoint at step {trainer.step}; "
            except (UserError, OSError):
                pass
        newest = newest_checkpoint_quick(trainer.out)
        held = (f"the folder holds step {newest[1]} ({newest[0]})" if newest else "no checkpoint was written yet")
        print(f"edsr-dist train: error: {cause}; {saved}{held}; free space there and continue with --resume auto",
              file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def main(argv: list[str]) -> int:
    cfg = parse_train_args(argv)
    try:
        trainer = Trainer(cfg)
    except RuntimeError as exc:  # a collective during set-up (DDP's first broadcast, resume) lost a peer
        return _collective_failure_exit(exc, cfg, None)
    clean = False  # all ranks reached the same point; after an error a peer may be stuck in a collective
    code = 0
    try:
        trainer.fit()
        clean = True
    except Interrupted:
        clean = True
        if not stopped_by_owner(trainer):  # else the heartbeat said why, in its one line
            print(f"edsr-dist train: interrupted at step {trainer.step}; checkpoint saved, continue with --resume "
                  "auto", file=sys.stderr)
        # 128 + the signal, as a shell reports a process the signal ended (130 for Ctrl-C); a rank that stopped
        # only because another rank was signalled says 143, as for the launcher's SIGTERM.
        stop_signal = trainer.agreement.stop_signal
        code = 128 + stop_signal if stop_signal else EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        clean = True  # every rank saw the same flags and stops at the same step
        if trainer.is_main:
            last = find_checkpoint(trainer.out)
            kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written yet"
        else:
            kept = f"rank 0 keeps the last good checkpoint in {trainer.out}"
        fix = "lower --lr" + (" or use --precision fp32" if trainer.precision != "fp32" else "")
        print(f"edsr-dist train: error: loss became NaN/inf for {MAX_BAD_STEPS[trainer.precision]} consecutive steps "
              f"(at step {exc.args[0]}); {kept}; {fix}, then --resume auto or start again", file=sys.stderr)
        code = EXIT_DIVERGED
    except (DiskFull, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        code = _disk_full_exit(trainer, exc)
    except RuntimeError as exc:
        code = _collective_failure_exit(exc, cfg, trainer.world.rank)
    finally:
        if trainer.checkpointer.owner is not None:
            trainer.checkpointer.owner.on_lost = None  # training is over: a lost record no longer stops anything
        trainer.close(clean)
    if trainer.checkpointer.upload_problem:
        print(f"edsr-dist train: error: {trainer.checkpointer.upload_problem}", file=sys.stderr, flush=True)
        # A run the lost endpoint stopped is complete locally up to its last step, not in the bucket: exit 5.
        code = EXIT_UPLOAD_FAILED if not code or stopped_by_owner(trainer) else code
    if trainer.world.distributed:
        _exit_before_interpreter_teardown(code)
    return code


def _exit_before_interpreter_teardown(code: int) -> None:
    """End a distributed worker without Python's finalization. The process group's C++ worker threads release
    the last collectives' tensors a moment after the collective returns; doing so needs the GIL, and a thread
    that asks for it while the interpreter finalizes is torn down mid-destructor: std::terminate, SIGABRT (seen
    at exit of workers pinned to one busy core). Everything of ours is closed and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
