"""A run's start-up, in the order `Trainer.__init__` calls it: the patch store (the sample, a file, or a bucket
object fetched once per server), --compile, --resume (every rank from the checkpoint rank 0 chose) and --init-from.
Each takes the Trainer being built."""

from __future__ import annotations

import sys
from pathlib import Path

from edsr_dist.data.sample_store import default_sample_store_path, ensure_sample_store
from edsr_dist.data.store import PatchStore, verify_store
from edsr_dist.errors import UserError
from edsr_dist.inference.weights import load_matching
from edsr_dist.locations import is_url
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.state.inputs import STORE, WEIGHTS, local_input
from edsr_dist.state.run_folder import check_nothing_to_resume
from edsr_dist.train.reporting import drop_metrics_after, module_groups


def open_store(trainer) -> PatchStore:
    path = trainer.cfg.data
    if not path:
        # Rank 0 builds (or repairs) the cached sample store while the others wait.
        cached = default_sample_store_path(trainer.cfg.cache_dir)
        path = ensure_sample_store(cached) if trainer.is_main else None
        if trainer.is_main:
            print(f"sample store: {path} (cached; EDSR_DIST_CACHE sets the folder)", flush=True)
        trainer.engine.barrier()
        path = path or ensure_sample_store(cached)
    elif is_url(path):
        # Every rank asks; one process per server (cache folder) downloads while the others wait on its lock.
        path = local_input(path, STORE, trainer.cfg.cache_dir, trainer.cfg.endpoint_url, verify_store=verify_store)
    elif not Path(path).exists():
        raise UserError(f"store {path} does not exist; build one with `edsr-dist build-store` or omit --data for the sample")
    return PatchStore(path, trainer.cfg.scale)


def resume_run(trainer) -> str | None:
    if not trainer.cfg.resume:
        return None
    if trainer.cfg.resume == "auto":
        where = trainer.out
    else:  # a checkpoint in a bucket is fetched (and verified) by rank 0; the others get its state below
        where = Path(local_input(trainer.cfg.resume, WEIGHTS, trainer.cfg.cache_dir, trainer.cfg.endpoint_url)
                     if trainer.is_main else trainer.cfg.resume)
    # Rank 0 chooses (and reports skipped damaged files once); everyone resumes from the same file.
    path = trainer.engine.broadcast_object(find_checkpoint(where) if trainer.is_main else None)
    if path is None:
        if trainer.cfg.resume == "auto":
            if trainer.is_main:
                check_nothing_to_resume(trainer.out)
                drop_metrics_after(trainer.out, 0)  # records of an attempt stopped before its first checkpoint
            return None  # nothing yet: a fresh start, so the same command line works for the first run too
        raise UserError(f"no valid checkpoint at {trainer.cfg.resume}; pass --resume auto or an existing .ckpt file")
    if trainer.any_rank(not Path(path).exists()):
        # Another server without a shared file system: rank 0 sends the state.
        state = trainer.engine.broadcast_object(load_checkpoint(path) if trainer.is_main else None)
    else:
        state = load_checkpoint(path)
    saved = state["config"]
    for key in ("scale", "num_blocks", "num_filters"):
        if saved[key] != getattr(trainer.cfg, key):
            raise UserError(f"checkpoint {path} has {key}={saved[key]} but this run has {getattr(trainer.cfg, key)}; "
                            f"pass --{key.replace('_', '-')} {saved[key]} or start a new --out")
    trainer.load_state_dict(state)
    if trainer.is_main:
        drop_metrics_after(trainer.out, trainer.step)
    return str(path)


def compile_model(trainer) -> bool:
    """--compile: torch.compile of the network's forward, in place (Module.compile: parameter names and
    checkpoints unchanged), before DDP wraps it. CUDA only: elsewhere one note and the eager model."""
    if not trainer.cfg.compile:
        return False
    if trainer.device.type != "cuda":
        if trainer.is_main:
            print(f"edsr-dist train: note: --compile applies to CUDA only; ignored on {trainer.device.type}",
                  file=sys.stderr, flush=True)
        return False
    trainer.model.compile()
    return True


def init_weights(trainer) -> str | None:
    """Fresh optimizer, schedule and step count; weights whose name and shape match come from the file."""
    if not trainer.cfg.init_from:
        return None
    loaded, left, skipped = load_matching(
        trainer.model, local_input(trainer.cfg.init_from, WEIGHTS, trainer.cfg.cache_dir, trainer.cfg.endpoint_url))
    if trainer.ema is not None:
        trainer.ema.reset(trainer.model)
    if trainer.is_main:
        unused = f"; not loaded from the file: {', '.join(skipped)}" if skipped else ""
        print(f"init from {trainer.cfg.init_from}: loaded {len(loaded)} of {len(loaded) + len(left)} tensors "
              f"({', '.join(module_groups(loaded))}); left at their initial values: {', '.join(left) or 'none'}"
              f"{unused}", flush=True)
    return trainer.cfg.init_from
