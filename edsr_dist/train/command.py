"""`edsr-dist train`: parse the flags into a Config, run the Trainer, and turn how it ended into an exit code."""

from __future__ import annotations

import os
import sys

from edsr_dist.config import Config, parse_train_args
from edsr_dist.errors import EXIT_COLLECTIVE_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_UPLOAD_FAILED
from edsr_dist.parallel.engine import describe_collective_failure
from edsr_dist.state.checkpoint import find_checkpoint
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
        print(f"edsr-dist train: interrupted at step {trainer.step}; checkpoint saved, continue with --resume auto",
              file=sys.stderr)
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
    except RuntimeError as exc:
        code = _collective_failure_exit(exc, cfg, trainer.world.rank)
    finally:
        trainer.close(clean)
    if trainer.checkpointer.upload_problem:
        print(f"edsr-dist train: error: {trainer.checkpointer.upload_problem}", file=sys.stderr, flush=True)
        code = code or EXIT_UPLOAD_FAILED
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
