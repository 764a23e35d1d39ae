"""The run folder and its checkpoints: rank 0's claim on the folder, the bucket mirror, --resume, --init-from,
save with its cadences (step, epoch, --save-every-minutes) and retention (--keep-last)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from edsr_dist.config import Config
from edsr_dist.errors import UserError
from edsr_dist.inference.weights import load_matching
from edsr_dist.locations import is_url
from edsr_dist.model.ema import WeightEMA
from edsr_dist.parallel.engine import Engine
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from edsr_dist.state.checkpoint_files import list_checkpoints
from edsr_dist.state.claim import claim_out
from edsr_dist.state.inputs import WEIGHTS, local_input
from edsr_dist.state.mirror import RunMirror, pull_run
from edsr_dist.state.run_folder import check_nothing_to_resume, check_output_folder
from edsr_dist.train.agreement import StepAgreement
from edsr_dist.train.reporting import drop_metrics_after, module_groups

CHECKPOINT_FORMAT = 1


class Checkpointer:
    """Owns where a run's state goes and when. The state itself is the Trainer's `state_dict`, handed to `save`
    and `resume` as callables, so the checkpoint format has one description."""

    def __init__(self, cfg: Config, out: Path, is_main: bool, engine: Engine, device: torch.device, meta: dict):
        self.cfg, self.out, self.is_main, self.engine, self.device = cfg, out, is_main, engine, device
        self.meta = {"format_version": CHECKPOINT_FORMAT, **meta}  # written with every checkpoint, plus the time
        self.best_psnr: float | None = None  # part of the run's state (Trainer.state_dict)
        self.resumed_from: str | None = None
        self.initialized_from: str | None = None
        self.mirror: RunMirror | None = None  # rank 0's upload thread when --out is a bucket
        self.upload_problem: str | None = None  # set by close() when the bucket lacks part of the run
        self._save_due = False  # a step-cadence checkpoint waiting for a finite step
        self._last_save = time.monotonic()  # rank 0's clock decides when a --save-every-minutes checkpoint is due
        self.owner = None  # rank 0's hold on the run folder, from before anything is written until close()
        if is_main:
            check_output_folder(out)
            self.owner = claim_out(cfg.out, cfg.cache_dir, cfg.resume, cfg.overwrite, cfg.take_over, cfg.endpoint_url)

    # ---- start: mirror, resume, --init-from -----------------------------------------------------------------

    def start(self, load_state_dict: Callable[[dict], None], model: torch.nn.Module, ema: WeightEMA | None) -> None:
        """Before training: the bucket mirror, then --resume (the whole state) or else --init-from (weights)."""
        cfg = self.cfg
        if self.is_main and is_url(cfg.out):
            # A fresh server after preemption: its stage is empty, the bucket holds the run.
            pulled = (pull_run(cfg.out, self.out, cfg.endpoint_url)
                      if cfg.resume == "auto" and not list_checkpoints(self.out) else set())
            self.mirror = RunMirror(cfg.out, self.out, cfg.endpoint_url, known=pulled)
        self.resumed_from = self._resume(load_state_dict)
        # --init-from applies to a fresh start only: with --resume auto the same command line continues the run.
        self.initialized_from = None if self.resumed_from else self._init_weights(model, ema)

    def _resume(self, load_state_dict: Callable[[dict], None]) -> str | None:
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume == "auto":
            where = self.out
        else:  # a checkpoint in a bucket is fetched (and verified) by rank 0; the others get its state below
            where = Path(local_input(cfg.resume, WEIGHTS, cfg.cache_dir, cfg.endpoint_url)
                         if self.is_main else cfg.resume)
        # Rank 0 chooses (and reports skipped damaged files once); everyone resumes from the same file.
        path = self.engine.broadcast_object(find_checkpoint(where) if self.is_main else None)
        if path is None:
            if cfg.resume == "auto":
                if self.is_main:
                    check_nothing_to_resume(self.out)
                    drop_metrics_after(self.out, 0)  # records of an attempt stopped before its first checkpoint
                return None  # nothing yet: a fresh start, so the same command line works for the first run too
            raise UserError(f"no valid checkpoint at {cfg.resume}; pass --resume auto or an existing .ckpt file")
        missing = torch.tensor([float(not Path(path).exists())], device=self.device)
        if self.engine.all_reduce_max(missing).item() > 0:
            # Another server without a shared file system: rank 0 sends the state.
            state = self.engine.broadcast_object(load_checkpoint(path) if self.is_main else None)
        else:
            state = load_checkpoint(path)
        saved = state["config"]
        for key in ("scale", "num_blocks", "num_filters"):
            if saved[key] != getattr(cfg, key):
                raise UserError(f"checkpoint {path} has {key}={saved[key]} but this run has {getattr(cfg, key)}; "
                                f"pass --{key.replace('_', '-')} {saved[key]} or start a new --out")
        load_state_dict(state)
        if self.is_main:
            drop_metrics_after(self.out, state["step"])
        return str(path)

    def _init_weights(self, model: torch.nn.Module, ema: WeightEMA | None) -> str | None:
        """Fresh optimizer, schedule and step count; weights whose name and shape match come from the file."""
        cfg = self.cfg
        if not cfg.init_from:
            return None
        loaded, left, skipped = load_matching(model, local_input(cfg.init_from, WEIGHTS, cfg.cache_dir,
                                                                 cfg.endpoint_url))
        if ema is not None:
            ema.reset(model)
        if self.is_main:
            unused = f"; not loaded from the file: {', '.join(skipped)}" if skipped else ""
            print(f"init from {cfg.init_from}: loaded {len(loaded)} of {len(loaded) + len(left)} tensors "
                  f"({', '.join(module_groups(loaded))}); left at their initial values: {', '.join(left) or 'none'}"
                  f"{unused}", flush=True)
        return cfg.init_from

    def describe_start(self, step: int) -> str:
        """For the banner: fresh, resumed (from which file, at which step), and the weights it began from."""
        where = f"resumed from {self.resumed_from} at step {step}" if self.resumed_from else "fresh start"
        if self.initialized_from:
            where += f" from the weights of {self.initialized_from}"
        elif self.resumed_from and self.cfg.init_from:
            where += f" (--init-from {self.cfg.init_from} applies to a fresh start only)"
        return where

    # ---- cadences -------------------------------------------------------------------------------------------

    def timed_save_due(self) -> bool:
        """Asked every step: rank 0's clock says a --save-every-minutes checkpoint is due. The clock restarts at
        the request; the agreement carries it to every rank and the save comes a step later (should_save_step)."""
        minutes = self.cfg.save_every_minutes
        due = self.is_main and bool(minutes) and time.monotonic() - self._last_save >= minutes * 60
        if due:
            self._last_save = time.monotonic()
        return due

    def should_save_step(self, step: int, agreement: StepAgreement) -> bool:
        """A step-cadence or agreed timed checkpoint, held back during a run of non-finite steps: the weights may
        be the ones that blew up, and retention would delete the good checkpoints before divergence is declared."""
        every = self.cfg.save_every_steps
        if (every and step % every == 0) or agreement.timed_save_agreed:
            self._save_due = True
        if self._save_due:
            # This save answers the timed-save requests read so far; reading this very step's flags (whether it was
            # finite: a read at save steps only) may bring a new one, which the next step's save answers.
            agreement.timed_save_agreed = False
            agreement.read(through_step=step)
        return self._save_due and not agreement.bad_steps

    def should_save_epoch(self, epoch_number: int, last: bool) -> bool:
        return epoch_number % self.cfg.save_every == 0 or last

    # ---- saving ---------------------------------------------------------------------------------------------

    def save_at_step(self, step: int, agreement: StepAgreement, state: Callable[[], dict]) -> None:
        """After each step: a checkpoint when should_save_step says one is due."""
        if self.should_save_step(step, agreement):
            self.save(step, state)
            self._save_due = False

    def save(self, step: int, state: Callable[[], dict], psnr: float | None = None) -> Path | None:
        """Every rank calls it (the clock restarts everywhere); rank 0 writes `state()` with the config and meta,
        keeps the newest --keep-last (and the best), and queues the file for the bucket."""
        self._last_save = time.monotonic()
        if not self.is_main:
            return None
        if psnr is not None and (self.best_psnr is None or psnr > self.best_psnr):
            self.best_psnr = psnr
        full = {**state(), "config": self.cfg.to_dict(), "meta": {**self.meta, "time": time.time()}}
        path = save_checkpoint(self.out, full, step=step, keep_last=self.cfg.keep_last, psnr=psnr)
        if self.mirror is not None:
            self.mirror.checkpoint_saved(path)  # queued for the upload thread; the step goes on at once
        return path

    def close(self) -> None:
        try:
            if self.mirror is not None:
                self.upload_problem = self.mirror.close()  # the final checkpoint and the records reach the bucket
        finally:  # a signal during the final upload still leaves no owner record behind
            self.release()

    def release(self) -> None:
        if self.owner is not None:
            self.owner.release()
