"""The training loop: one worker, whatever started it (run_1p.sh, the launcher, torchrun, horovodrun, mpirun).

Reading order: `main` -> `Trainer.__init__` (world, engine, data, model, resume) -> `Trainer.fit`
(`_train_epoch`: `train_step` per batch; `_end_epoch`: validation and checkpoint, each when its `should_*`
says so) -> the `Result:` line. `state_dict`/`load_state_dict` are what checkpoints hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edsr_dist import __version__
from edsr_dist.config import Config, check_batch_divides
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.evaluation.benchmark_sets import score_shards, validation_source
from edsr_dist.evaluation.metrics import bicubic_upscale
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.locations import is_url, staging_folder
from edsr_dist.model.edsr import build_model
from edsr_dist.model.ema import WeightEMA
from edsr_dist.model.optim import clear_gradients, fit_state_to, make_optimizer, skips_on_device
from edsr_dist.model.precision import LossScaler, autocast, resolve_device_and_precision
from edsr_dist.model.schedules import learning_rate
from edsr_dist.parallel import ascend_env, npu
from edsr_dist.parallel.factory import make_engine, resolve_engine_name
from edsr_dist.parallel.world import World, discover_world
from edsr_dist.state.checkpoint import list_checkpoints, save_checkpoint
from edsr_dist.state.inputs import FOLDER, local_input
from edsr_dist.state.mirror import RunMirror, claim_out, pull_run
from edsr_dist.state.run_folder import check_output_folder, recorded_result
from edsr_dist.train.prefetch import Prefetcher
from edsr_dist.train.reporting import (
    LossMeter,
    MetricsLog,
    banner,
    hms,
    recipe_warnings,
    result_line,
    write_sample_image,
)
from edsr_dist.train.start import compile_model, init_weights, open_store, resume_run
from edsr_dist.train.step_timer import StepTimer

CHECKPOINT_FORMAT = 1
# Consecutive steps with a non-finite loss or gradient before the run is declared diverged. fp16 needs
# more room: the loss scaler legitimately overflows a few times while it finds its scale.
MAX_BAD_STEPS = {"fp16": 30, "bf16": 5, "fp32": 5}


class TrainingDiverged(Exception):
    """Loss or gradients stayed NaN/inf beyond what loss scaling recovers from."""


class Interrupted(Exception):
    """SIGTERM/SIGINT (preemption): stopped at a step boundary after writing a checkpoint."""


def set_threads(cfg: Config) -> int:
    threads = cfg.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


class Trainer:
    def __init__(self, cfg: Config, world: World | None = None, timer: StepTimer | None = None):
        self.cfg = cfg
        self.world = world or discover_world()
        self.timer = timer or StepTimer()
        check_batch_divides(cfg.batch_size, self.world.size)
        self.out = staging_folder(cfg.out, cfg.cache_dir)  # the run folder itself, or a bucket run's local stage
        self.device, self.precision = resolve_device_and_precision(cfg.device, cfg.precision,
                                                                   self.world.device_index, self.world.physical_device)
        if self.device.type == "npu" and self.world.size > 1:
            physical = self.world.physical_device
            ascend_env.claim_card(self.world.device_index if physical is None else physical, self.world.device_index,
                                  self.world.rank, f"{self.world.master_addr}:{self.world.master_port}")
        # Training shapes never change, so cuDNN's autotuner pays off; validation turns it off (every image differs).
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        self.threads = set_threads(cfg)
        self.engine_name = resolve_engine_name(cfg.engine, self.world)
        self.engine = make_engine(self.engine_name, self.world, self.device, cfg.dist_timeout, cfg.grad_comm)
        self.is_main = self.world.is_main

        self.owner = None  # rank 0's hold on the run folder, from before anything is written until close()
        self.mirror: RunMirror | None = None  # rank 0's upload thread when --out is a bucket
        self.upload_problem: str | None = None  # set by close() when the bucket lacks part of the run
        if self.is_main:
            check_output_folder(self.out)
            self.owner = claim_out(cfg.out, cfg.cache_dir, cfg.resume, cfg.overwrite, cfg.take_over, cfg.endpoint_url)
        try:
            self._set_up()
        except BaseException:
            if self.owner is not None:
                self.owner.release()
            raise

    def _set_up(self) -> None:
        """Data, model, resume: everything after the run folder is ours."""
        cfg = self.cfg
        self.store = open_store(self)
        # The store's validation images or cfg.val_benchmark's; refuses a run with nothing to validate on.
        benchmark = local_input(cfg.val_benchmark, FOLDER, cfg.cache_dir, cfg.endpoint_url)
        self.validation = validation_source(dataclasses.replace(cfg, val_benchmark=benchmark), self.store)
        self.sampler = TrainSampler(self.store, cfg.batch_size, cfg.patch_size, cfg.seed, cfg.steps_per_epoch,
                                    rank=self.world.rank, world_size=self.world.size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.schedule_steps = self.total_steps  # the schedule's horizon: not cut by max_steps, so a resume continues it
        if self.is_main:
            for warning in recipe_warnings(cfg, self.steps_per_epoch, self.store):
                print(f"edsr-dist train: warning: {warning}", file=sys.stderr, flush=True)
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, before DDP's broadcast makes sure
        self.memory_format = npu.memory_format(self.device, cfg.channels_last)
        # The chip's overflow mode does not change during a run: asked once, not every step.
        self._saturation_mode = npu.saturation_mode(self.device)
        # Ascend: precompiled operator kernels, so that no operator is compiled just in time (docs/ASCEND.md).
        self.kernels = npu.use_binary_kernels() if self.device.type == "npu" else ""
        self.model = build_model(cfg).to(self.device, memory_format=self.memory_format)  # the bare network
        self.compiled = compile_model(self)
        self.optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg, self.device)
        # Where the optimizer takes the overflow flag as a tensor (fused Adam on CUDA), the skip is decided on the
        # device and no step waits for the device; elsewhere the host reads the flag (free on the CPU).
        self.skip_on_device = skips_on_device(self.optimizer, self.device)
        self.scaler = LossScaler(enabled=self.precision == "fp16", device=self.device)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_psnr: float | None = None
        if self.is_main and is_url(cfg.out):
            # A fresh server after preemption: its stage is empty, the bucket holds the run.
            pulled = (pull_run(cfg.out, self.out, cfg.endpoint_url)
                      if cfg.resume == "auto" and not list_checkpoints(self.out) else set())
            self.mirror = RunMirror(cfg.out, self.out, cfg.endpoint_url, known=pulled)
        self.resumed_from = resume_run(self)
        # --init-from applies to a fresh start only: with --resume auto the same command line continues the run.
        self.initialized_from = None if self.resumed_from else init_weights(self)
        # After resume: Horovod's optimizer wrapper broadcasts the loaded state from rank 0.
        self.train_model, self.optimizer = self.engine.wrap(self.model, self.optimizer)
        self.metrics = MetricsLog(self.out, self.is_main, cfg.tensorboard)
        self._bar = None  # tqdm on rank 0 while fit() runs
        self._bad_steps = 0  # consecutive skipped (non-finite) steps, as far as the host has read the flags
        self._save_due = False  # a step-cadence checkpoint waiting for a finite step
        # Each step's all-reduced flags (overflow, stop, timed save) on their way to the host: those of step k are
        # read during step k+1 (or at once where a save or the epoch's end needs them), so the host never waits
        # for the step it has just queued. Every rank reads them at the same steps, so every rank acts alike.
        self._pending_flags: list[tuple[int, torch.Tensor, object]] = []
        self._stop_requested = False  # set by a signal, on this rank, at any moment
        self.stop_signal: int | None = None  # which signal, when this rank got one (for the exit code)
        self._stop_agreed = False  # set in a step, on every rank at once: the only one the loop acts on
        self._last_save = time.monotonic()  # rank 0's clock decides when a --save-every-minutes checkpoint is due
        self._minutes_due_agreed = False  # that decision, as every rank received it with the step's flags
        self._fit_start, self._fit_start_step = time.perf_counter(), self.step  # for the log's elapsed time and ETA

    # ---- state ----------------------------------------------------------------------------------------------

    def _stateful(self) -> dict:
        """The parts with their own state_dict/load_state_dict."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}
        return {**parts, "ema": self.ema} if self.ema is not None else parts

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; what `save` writes and `_resume` reads."""
        return {
            **{name: part.state_dict() for name, part in self._stateful().items()},
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_psnr": self.best_psnr,
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, part in self._stateful().items():
            if name == "ema" and name not in state:  # EMA switched on when resuming: it starts from the weights
                part.reset(self.model)
                continue
            part.load_state_dict(fit_state_to(part, state[name]) if name == "optimizer" else state[name])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best_psnr = state.get("best_psnr")
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        torch.set_rng_state(state["rng"]["torch"])

    # ---- set-up ---------------------------------------------------------------------------------------------

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.device)
        return self.engine.all_reduce_max(value).item() > 0

    # ---- reporting ------------------------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if self.is_main:
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def record(self, **entry) -> None:
        self.metrics.record(entry, self.step)

    def _log_window(self, window: LossMeter) -> None:
        mean = window.sum.item() / window.steps
        rate = window.steps * self.cfg.batch_size / max(time.perf_counter() - window.start, 1e-9)
        lr = learning_rate(self.cfg, self.step - 1, self.schedule_steps)
        line = f"Step nr: [{self.step}/{self.total_steps}] - Loss: {mean:.5f} - Lr: {lr:.3e}"
        if self._bar is None:  # the bar shows time and rate itself
            line += " - " + self._elapsed_and_eta()
        self.log(line)
        self.record(type="step", step=self.step, epoch=self.epoch + 1, loss=mean, lr=lr, images_per_s=rate,
                    loss_scale=self.scaler.scale)

    def _elapsed_and_eta(self) -> str:
        """Time since this process started training, and the rest of the steps at the rate seen so far
        (validations and checkpoints included in that rate, so the estimate settles after the first of them)."""
        elapsed = time.perf_counter() - self._fit_start
        done = self.step - self._fit_start_step
        eta = elapsed / done * (self.total_steps - self.step) if done else 0.0
        return f"elapsed {hms(elapsed)} - ETA {hms(eta)}"

    def _log_epoch(self, number: int, mean_loss: float, report: dict) -> None:
        line = f"Epoch nr: [{number}/{self.cfg.epochs}] - Loss: {mean_loss:.5f}"
        if report:
            line += f" - val PSNR: {report['psnr_y']:.3f} - val SSIM: {report['ssim_y']:.4f}"
        self.log(line)
        self.record(type="epoch", step=self.step, epoch=number, loss=mean_loss, **report)

    def _log_result(self, report: dict) -> None:
        self.log(result_line(report))
        self.record(type="result", step=self.step, **report)

    # ---- one step -------------------------------------------------------------------------------------------

    def to_device(self, batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 NHWC batch (an array, or a page-locked tensor from the prefetcher) as float on the device."""
        x = batch_uint8 if torch.is_tensor(batch_uint8) else torch.from_numpy(batch_uint8)
        x = x.to(self.device, non_blocking=True)
        # NHWC uint8 -> logical NCHW float; permute keeps the NHWC storage, i.e. channels_last, for free.
        x = x.permute(0, 3, 1, 2).float()
        return x.contiguous(memory_format=self.memory_format)

    def train_step(self, lr_batch: np.ndarray, hr_batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; returns the loss and the step's global skip flag, both device tensors (> 0: skipped).

        Nothing here waits for the device where the skip is decided on it: the overflow flag goes to the fused
        optimizer as a tensor, the loss scale and the EMA are updated by tensor arithmetic, and the flags of the
        previous step are read from the host copy made then."""
        timer = self.timer
        timer.begin_step()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step, self.schedule_steps)
        with timer.phase("to_device"):
            lr_t, hr_t = self.to_device(lr_batch), self.to_device(hr_batch)
        if self._saturation_mode:
            npu.clear_overflow_flag()
        with autocast(self.device, self.precision):
            sr = self.train_model(lr_t)
        loss = F.l1_loss(sr.float(), hr_t)
        self.scaler.scale_loss(loss).backward()
        with timer.phase("finish_gradients"):
            self.engine.finish_gradients(self.optimizer)
        bad = self.scaler.unscale_(self.model.parameters()) if self.scaler.enabled else (~torch.isfinite(loss.detach())).float()
        bad = bad.reshape(())
        if self.cfg.grad_clip_norm:
            # The gradients are the all-reduced (and unscaled) ones, identical on every rank, so is their norm.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).float().to(bad.device))
        # One small all-reduce carries the overflow flag, a pending stop request and rank 0's "a timed checkpoint
        # is due", so all ranks skip the same steps, stop at the same step boundary and save at the same step.
        # new_full fills on the device: torch.tensor(list, device=...) would be a blocking host-to-device copy.
        timed_save = self.is_main and self._minutes_elapsed()
        if timed_save:  # rank 0's clock restarts at the request: the save it asks for comes a step later
            self._last_save = time.monotonic()
        flags = torch.stack([bad, bad.new_full((), float(self._stop_requested)), bad.new_full((), float(timed_save))])
        with timer.phase("overflow_check"):
            flags = self.engine.all_reduce_max(flags)
        found_inf = flags[0]
        if self.skip_on_device:
            self._pending_flags.append((self.step + 1, *self._copy_to_host(flags)))
            with timer.phase("optimizer"):
                if self.cfg.grad_clip_norm:
                    torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.grad_clip_norm, grad_norm)
                # The fused kernel leaves parameters and moments alone, and takes back its step count, when the
                # flag is 1 (torch/optim/adam.py _fused_adam; as torch.amp.GradScaler.step passes it).
                self.optimizer.found_inf = found_inf
                try:
                    self.engine.step(self.optimizer)
                finally:
                    del self.optimizer.found_inf
                if self.ema is not None:
                    self.ema.update(self.model, skipped=found_inf)
        else:
            host = flags.tolist()  # the skip is a host decision here: on the CPU a read, not a wait
            self._pending_flags.append((self.step + 1, host, None))
            if not host[0] > 0:
                with timer.phase("optimizer"):
                    if self.cfg.grad_clip_norm:
                        torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.grad_clip_norm,
                                                             grad_norm)
                    self.engine.step(self.optimizer)
                    if self.ema is not None:
                        self.ema.update(self.model)
        self.scaler.update(found_inf)
        clear_gradients(self.optimizer)
        # Never act on the local flag directly: a signal landing between this all-reduce and the loop's check
        # would stop this rank one step before the others, leaving them waiting in the next step's collectives.
        # The previous step's flags, copied while this step was queued: by now they are on the host.
        self._read_flags(through_step=self.step)
        skipped = found_inf > 0
        timer.end_step(skipped)
        return loss.detach(), skipped

    def _copy_to_host(self, flags: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying the flags to the host without waiting; an event tells when they have arrived. The host
        buffer is page-locked: a copy into pageable memory would make the host wait."""
        if self.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return host, ready
        return flags.to("cpu", non_blocking=True), None

    def _read_flags(self, through_step: int) -> None:
        """Act on the flags of every step up to `through_step` not read yet, oldest first: count non-finite
        steps (divergence is declared after MAX_BAD_STEPS of them, so it may be seen one step after the last of
        them), and take up agreed stop and timed-save requests."""
        while self._pending_flags and self._pending_flags[0][0] <= through_step:
            step, host, ready = self._pending_flags.pop(0)
            if ready is not None:
                ready.synchronize()
            bad, stop, minutes = host.tolist() if torch.is_tensor(host) else host
            if stop > 0:
                self._stop_agreed = True
            if minutes > 0:
                self._minutes_due_agreed = True
            self._count_bad_step(bad > 0, step)

    def _read_all_flags(self) -> None:
        """At a step boundary every rank reaches together (a save, the end of an epoch): read this step's too."""
        self._read_flags(through_step=self.step)

    # ---- validation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, write_samples: bool = False) -> dict:
        """Each rank takes every world-size-th image; sums are reduced so rank 0 reports the whole set."""
        source = self.validation
        network = self.ema.model if self.ema is not None else self.model  # what eval, sr and export will use

        def score_one(index: int) -> dict:
            name, lr, hr = source.load(index)
            sr = super_resolve(network, lr, self.device, tile=self.cfg.val_tile or None,
                               precision=self.precision)
            if write_samples:
                self._write_sample(name, bicubic_upscale(lr, hr.shape), sr, hr)
            return source.score(sr, lr, hr)

        self.model.eval()
        autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        report = score_shards(source.count, self.world.rank, self.world.size, score_one, source.keys,
                              self.engine.all_reduce_sum, self.device)
        self.model.train()
        torch.backends.cudnn.benchmark = autotune
        return {**report, **source.labels}

    def _write_sample(self, name: str, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> None:
        write_sample_image(self.out / "samples" / f"{name}_bicubic_edsr_gt.png", bicubic, sr, hr, self.cfg.scale)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save(self, psnr: float | None = None) -> Path | None:
        self._last_save = time.monotonic()
        if not self.is_main:
            return None
        if psnr is not None and (self.best_psnr is None or psnr > self.best_psnr):
            self.best_psnr = psnr
        state = {
            **self.state_dict(),
            "config": self.cfg.to_dict(),
            "meta": {"format_version": CHECKPOINT_FORMAT, "world_size": self.world.size, "engine": self.engine_name,
                     "precision": self.precision, "package_version": __version__, "time": time.time()},
        }
        path = save_checkpoint(self.out, state, step=self.step, keep_last=self.cfg.keep_last, psnr=psnr)
        if self.mirror is not None:
            self.mirror.checkpoint_saved(path)  # queued for the upload thread; the step goes on at once
        return path

    # ---- cadences: each concern decides when it is due ------------------------------------------------------

    def should_log(self, window: LossMeter) -> bool:
        return self.step % self.cfg.log_every == 0 and window.steps > 0

    def should_save_step(self) -> bool:
        """A step-cadence checkpoint, held back during a run of non-finite steps: the weights may be the ones that
        blew up, and retention would delete the good checkpoints before divergence is declared."""
        if (self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0) or self.should_save_minutes():
            self._save_due = True
        if self._save_due:
            # This save answers the timed-save requests read so far; reading this very step's flags (whether it was
            # finite: a read at save steps only) may bring a new one, which the next step's save answers.
            self._minutes_due_agreed = False
            self._read_all_flags()
        return self._save_due and not self._bad_steps

    def should_save_minutes(self) -> bool:
        """--save-every-minutes: rank 0's clock decided in a step's flags all-reduce, read by every rank at the same
        later step, so every rank agrees."""
        return self._minutes_due_agreed

    def _minutes_elapsed(self) -> bool:
        minutes = self.cfg.save_every_minutes
        return bool(minutes) and time.monotonic() - self._last_save >= minutes * 60

    def should_validate(self, epoch_number: int, last: bool) -> bool:
        return epoch_number % self.cfg.validate_every == 0 or last

    def should_save_epoch(self, epoch_number: int, last: bool) -> bool:
        return epoch_number % self.cfg.save_every == 0 or last

    def _count_bad_step(self, skipped: bool, step: int) -> None:
        self._bad_steps = self._bad_steps + 1 if skipped else 0
        if self._bad_steps >= MAX_BAD_STEPS[self.precision]:
            raise TrainingDiverged(step)

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        if self.resumed_from and not (self.epoch < self.cfg.epochs and self.step < self.total_steps):
            return self._report_finished()
        self.log(banner(self))
        self._fit_start, self._fit_start_step = time.perf_counter(), self.step
        report: dict = {}
        with self._progress_bar(), self._stop_on_signals():
            try:
                while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                    epoch_loss = self._train_epoch()
                    report = self._end_epoch(epoch_loss) or report
            except Interrupted:
                path = self.save()
                self.log(f"Interrupted at step {self.step}; checkpoint {path}. Resume with --resume auto.")
                raise
        if report:
            self._log_result(report)
        return report

    def _train_epoch(self) -> LossMeter:
        """Steps from step_in_epoch to the end of the epoch (or of the run); returns the epoch's losses."""
        epoch_loss, window = LossMeter(self.device), LossMeter(self.device)
        batches = Prefetcher(lambda s: self.sampler.batch(self.epoch, s),
                             range(self.step_in_epoch, self.steps_per_epoch), self.timer,
                             pin=self.device.type in ("cuda", "npu"))
        try:
            for step_in_epoch, (lr_batch, hr_batch) in batches:
                loss, skipped = self.train_step(lr_batch, hr_batch)
                self.step += 1
                self.step_in_epoch = step_in_epoch + 1
                if self._bar is not None:
                    self._bar.update(1)
                epoch_loss.add(loss, skipped)
                window.add(loss, skipped)
                if self.should_log(window):
                    self._log_window(window)
                    window = LossMeter(self.device)
                if self.should_save_step():
                    self.save()
                    self._save_due = False
                if self._stop_agreed:
                    raise Interrupted()
                if self.step >= self.total_steps:
                    break
            self._read_all_flags()  # the last step's flags, before validation and the epoch's checkpoint
            if self._stop_agreed:
                raise Interrupted()
        finally:
            batches.close()
        return epoch_loss

    def _end_epoch(self, epoch_loss: LossMeter) -> dict:
        """Close the epoch (or the run, cut short by max_steps): loss, validation, checkpoint as their cadences say."""
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        last = self.step >= self.total_steps or (epoch_done and self.epoch + 1 >= self.cfg.epochs)
        number = self.epoch + 1
        mean_loss = self._mean_over_ranks(epoch_loss)
        if epoch_done:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        validated = self.should_validate(number, last)
        report = self.validate(write_samples=last and self.cfg.samples_png) if validated else {}
        self._log_epoch(number, mean_loss, report)
        if self.should_save_epoch(number, last):
            self.save(psnr=report.get("psnr_y"))
        return report

    def _mean_over_ranks(self, meter: LossMeter) -> float:
        both = torch.stack([meter.sum.detach().float(), meter.count.float()])
        both = self.engine.all_reduce_sum(both).cpu()
        return both[0].item() / max(both[1].item(), 1.0)

    @contextlib.contextmanager
    def _progress_bar(self):
        if self.is_main and self.cfg.progress and sys.stderr.isatty():
            self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT only ask for a stop; the next step's all-reduce makes every rank agree on it."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _report_finished(self) -> dict:
        """Resuming a run that already reached its last step: say so and repeat its Result line."""
        self.log(banner(self))
        self.log(f"The run is already complete (step {self.step} of {self.total_steps}); nothing to train.")
        report = self.engine.broadcast_object(recorded_result(self.out, self.step) if self.is_main else None)
        if report is None:  # stopped after its last checkpoint, before writing the result
            report = self.validate()
            self.record(type="result", step=self.step, **report)
        self.log(result_line(report))
        return report

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True
        self.stop_signal = signum

    def close(self, clean: bool = True) -> None:
        self.metrics.close()
        if self.mirror is not None:
            self.upload_problem = self.mirror.close()  # the final checkpoint and the records reach the bucket
        self.store.close()
        if self.owner is not None:
            self.owner.release()
        self.engine.shutdown(clean)
