"""The training loop: one worker, whatever started it (run_1p.sh, the launcher, torchrun, horovodrun, mpirun).

The Trainer holds what a step needs (world, engine, model, optimizer, loss scaler, EMA, counters) and is composed
of parts, each with its own state and cadence: TrainingData (store, sampler, prefetch), Checkpointer (run folder,
mirror, resume, --init-from, saves), Validator, MicroSteps (forward and backward of the rank's share), StepAgreement
(the flags every rank agrees on after a step) and Progress (log lines and records). Reading order: `__init__` ->
`fit` (`_train_epoch`: `train_step` per batch; `_end_epoch`) -> the `Result:` line. `state_dict`/`load_state_dict` are what checkpoints hold.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from edsr_dist.config import Config, check_batch_splits
from edsr_dist.locations import staging_folder
from edsr_dist.model.edsr import build_model
from edsr_dist.model.ema import WeightEMA
from edsr_dist.model.optim import clear_gradients, fit_state_to, make_optimizer, skips_on_device
from edsr_dist.model.precision import LossScaler
from edsr_dist.model.schedules import learning_rate
from edsr_dist.parallel import npu
from edsr_dist.parallel.factory import make_engine, resolve_engine_name
from edsr_dist.parallel.world import World, discover_world
from edsr_dist.state.run_folder import recorded_result
from edsr_dist.train.agreement import MAX_BAD_STEPS, StepAgreement
from edsr_dist.train.checkpointer import Checkpointer
from edsr_dist.train.data import TrainingData, open_store
from edsr_dist.train.device import compile_network, place_worker
from edsr_dist.train.micro_steps import MicroSteps
from edsr_dist.train.progress import Progress
from edsr_dist.train.reporting import LossMeter, banner, recipe_warnings, result_line
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.validator import Validator, open_validation


class Interrupted(Exception):
    """SIGTERM/SIGINT (preemption): stopped at a step boundary after writing a checkpoint."""


class Trainer:
    def __init__(self, cfg: Config, world: World | None = None, timer: StepTimer | None = None):
        self.cfg = cfg
        self.world = world or discover_world()
        self.timer = timer or StepTimer()
        check_batch_splits(cfg.batch_size, self.world.size, cfg.accumulate)
        self.out = staging_folder(cfg.out, cfg.cache_dir)  # the run folder itself, or a bucket run's local stage
        self.device, self.precision, self.threads = place_worker(cfg, self.world)
        self.engine_name = resolve_engine_name(cfg.engine, self.world)
        self.engine = make_engine(self.engine_name, self.world, self.device, cfg.dist_timeout, cfg.grad_comm)
        self.is_main = self.world.is_main
        # Rank 0 claims the run folder here, before anything is written, and holds it until close().
        self.checkpointer = Checkpointer(cfg, self.out, self.is_main, self.engine, self.device, meta={
            "world_size": self.world.size, "engine": self.engine_name, "precision": self.precision})
        try:
            self._set_up()
        except BaseException:
            self.checkpointer.release()
            raise

    def _set_up(self) -> None:
        """Data, model, resume: everything after the run folder is ours."""
        cfg = self.cfg
        self.memory_format = npu.memory_format(self.device, cfg.channels_last)
        store = open_store(cfg, self.is_main, self.engine)
        validation = open_validation(cfg, store)
        self.data = TrainingData(store, cfg, self.world, self.device, self.memory_format)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.schedule_steps = cfg.epochs * self.steps_per_epoch  # not cut by max_steps, so a resume continues it
        self.total_steps = min(self.schedule_steps, cfg.max_steps or self.schedule_steps)
        if self.is_main:
            for warning in recipe_warnings(cfg, self.steps_per_epoch, store):
                print(f"edsr-dist train: warning: {warning}", file=sys.stderr, flush=True)
        self._build_model()
        self.step = self.epoch = self.step_in_epoch = 0
        self.checkpointer.start(self.load_state_dict, self.model, self.ema)
        # After resume: Horovod's optimizer wrapper broadcasts the loaded state from rank 0.
        self.train_model, self.optimizer = self.engine.wrap(self.model, self.optimizer, cfg.accumulate)
        self.validator = Validator(cfg, validation, self.model, self.ema, self.device, self.precision, self.world,
                                   self.engine, self.out)
        self.agreement = StepAgreement(MAX_BAD_STEPS[self.precision])
        self.progress = Progress(cfg, self.out, self.is_main, self.total_steps)
        self.micro_steps = MicroSteps(self.engine, self.scaler, self.data, self.timer, self.device, self.precision,
                                      cfg.batch_size)

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, before DDP's broadcast makes sure
        # The chip's overflow mode does not change during a run: asked once, not every step.
        self._saturation_mode = npu.saturation_mode(self.device)
        # Ascend: precompiled operator kernels, so that no operator is compiled just in time (docs/ASCEND.md).
        self.kernels = npu.use_binary_kernels() if self.device.type == "npu" else ""
        self.model = build_model(cfg).to(self.device, memory_format=self.memory_format)  # the bare network
        self.compiled = compile_network(self.model, cfg, self.device, self.is_main)
        self.optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg, self.device)
        # Where the optimizer takes the overflow flag as a tensor (fused Adam on CUDA), the skip is decided on the
        # device and no step waits for the device; elsewhere the host reads the flag (free on the CPU).
        self.skip_on_device = skips_on_device(self.optimizer, self.device)
        self.scaler = LossScaler(enabled=self.precision == "fp16", device=self.device)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None

    # ---- state ----------------------------------------------------------------------------------------------

    def _stateful(self) -> dict:
        """The parts with their own state_dict/load_state_dict."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}
        return {**parts, "ema": self.ema} if self.ema is not None else parts

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; what the Checkpointer saves and resumes from."""
        return {
            **{name: part.state_dict() for name, part in self._stateful().items()},
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_psnr": self.checkpointer.best_psnr,
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, part in self._stateful().items():
            if name == "ema" and name not in state:  # EMA switched on when resuming: it starts from the weights
                part.reset(self.model)
                continue
            part.load_state_dict(fit_state_to(part, state[name]) if name == "optimizer" else state[name])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.checkpointer.best_psnr = state.get("best_psnr")
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        torch.set_rng_state(state["rng"]["torch"])

    # ---- one step -------------------------------------------------------------------------------------------

    def train_step(self, lr_batch: np.ndarray, hr_batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; returns the loss and the step's global skip flag, both device tensors (> 0: skipped).

        Nothing here waits for the device where the skip is decided on it: the overflow flag goes to the fused
        optimizer as a tensor, the loss scale and the EMA are updated by tensor arithmetic, and the flags of the
        previous step are read from the host copy made then."""
        timer = self.timer
        timer.begin_step()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step, self.schedule_steps)
        if self._saturation_mode:  # once per optimizer step: an overflow in any micro-step stays flagged
            npu.clear_overflow_flag()
        loss = self.micro_steps.run(self.train_model, self.data.sampler.micro_batches(lr_batch, hr_batch))
        with timer.phase("finish_gradients"):
            self.engine.finish_gradients(self.optimizer)
        bad, grad_norm = self._non_finite(loss)
        # One small all-reduce carries the overflow flag, a pending stop request and rank 0's "a timed checkpoint
        # is due", so all ranks skip the same steps, stop at the same step boundary and save at the same step.
        flags = self.agreement.flags(bad, self.checkpointer.timed_save_due())
        with timer.phase("overflow_check"):
            flags = self.engine.all_reduce_max(flags)
        found_inf = flags[0]
        device_skip = found_inf if self.skip_on_device else None  # else the host reads the flag in post()
        if not self.agreement.post(self.step + 1, flags, host_decides=device_skip is None):
            with timer.phase("optimizer"):
                self._optimizer_step(grad_norm, device_skip)
        self.scaler.update(found_inf)
        clear_gradients(self.optimizer)
        # Never act on the local flag directly: a signal landing between this all-reduce and the loop's check
        # would stop this rank one step before the others, leaving them waiting in the next step's collectives.
        # The previous step's flags, copied while this step was queued: by now they are on the host.
        self.agreement.read(through_step=self.step)
        skipped = found_inf > 0
        timer.end_step(skipped)
        return loss.detach(), skipped

    def _non_finite(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's "the step is not finite" flag (a 0-d device tensor), and the gradient norm when clipping."""
        bad = self.scaler.unscale_(self.model.parameters()) if self.scaler.enabled else (~torch.isfinite(loss.detach())).float()
        bad = bad.reshape(())
        grad_norm = None
        if self.cfg.grad_clip_norm:
            # The gradients are the all-reduced (and unscaled) ones, identical on every rank, so is their norm.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).float().to(bad.device))
        return bad, grad_norm

    def _optimizer_step(self, grad_norm: torch.Tensor | None, device_skip: torch.Tensor | None) -> None:
        """Clip, step, EMA. `device_skip`: the global overflow flag where the device decides the skip (the step
        then runs whatever the flag says, and the flag makes it a no-op), None where the host already has."""
        if self.cfg.grad_clip_norm:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.grad_clip_norm, grad_norm)
        if device_skip is not None:
            # The fused kernel leaves parameters and moments alone, and takes back its step count, when the flag is
            # 1 (torch/optim/adam.py _fused_adam; as torch.amp.GradScaler.step passes it).
            self.optimizer.found_inf = device_skip
        try:
            self.engine.step(self.optimizer)
        finally:
            if device_skip is not None:
                del self.optimizer.found_inf
        if self.ema is not None:
            self.ema.update(self.model, skipped=device_skip)

    # ---- the loop -------------------------------------------------------------------------------------------

    def _steps_left(self) -> bool:
        return self.epoch < self.cfg.epochs and self.step < self.total_steps

    def fit(self) -> dict:
        if self.checkpointer.resumed_from and not self._steps_left():
            return self._report_finished()
        self.progress.log(self._banner())
        report: dict = {}
        with self.progress.running(self.step), self.agreement.stop_on_signals():
            try:
                while self._steps_left():
                    epoch_loss = self._train_epoch()
                    report = self._end_epoch(epoch_loss) or report
            except Interrupted:
                path = self.checkpointer.save(self.step, self.state_dict)
                self.progress.log(f"Interrupted at step {self.step}; checkpoint {path}. Resume with --resume auto.")
                raise
        if report:
            self.progress.log_result(report, self.step)
        return report

    def _train_epoch(self) -> LossMeter:
        """Steps from step_in_epoch to the end of the epoch (or of the run); returns the epoch's losses."""
        epoch_loss, window = LossMeter(self.device), LossMeter(self.device)
        batches = self.data.batches(self.epoch, self.step_in_epoch, self.timer)
        try:
            for step_in_epoch, (lr_batch, hr_batch) in batches:
                loss, skipped = self.train_step(lr_batch, hr_batch)
                self.step, self.step_in_epoch = self.step + 1, step_in_epoch + 1
                self.progress.advance()
                epoch_loss.add(loss, skipped)
                window.add(loss, skipped)
                if self.progress.should_log(self.step, window):
                    lr = learning_rate(self.cfg, self.step - 1, self.schedule_steps)
                    self.progress.log_window(window, self.step, self.epoch, lr, self.scaler.scale)
                    window = LossMeter(self.device)
                self.checkpointer.save_at_step(self.step, self.agreement, self.state_dict)
                self._stop_if_agreed()
                if self.step >= self.total_steps:
                    break
            self.agreement.read(through_step=self.step)  # the last step's flags, before validation and checkpoint
            self._stop_if_agreed()
        finally:
            batches.close()
        return epoch_loss

    def _stop_if_agreed(self) -> None:
        if self.agreement.stop_agreed:
            raise Interrupted()

    def _end_epoch(self, epoch_loss: LossMeter) -> dict:
        """Close the epoch (or the run, cut short by max_steps): loss, validation, checkpoint as their cadences say."""
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        last = self.step >= self.total_steps or (epoch_done and self.epoch + 1 >= self.cfg.epochs)
        number = self.epoch + 1
        mean_loss = epoch_loss.mean_over_ranks(self.engine, self.data.sampler.local_batch_size, self.cfg.batch_size)
        if epoch_done:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        validated = self.validator.should_validate(number, last)
        report = self.validator.validate(write_samples=last and self.cfg.samples_png) if validated else {}
        self.progress.log_epoch(number, self.step, mean_loss, report)
        if self.checkpointer.should_save_epoch(number, last):
            self.checkpointer.save(self.step, self.state_dict, psnr=report.get("psnr_y"))
        return report

    def _report_finished(self) -> dict:
        """Resuming a run that already reached its last step: say so and repeat its Result line."""
        self.progress.log(self._banner())
        self.progress.log(f"The run is already complete (step {self.step} of {self.total_steps}); nothing to train.")
        report = self.engine.broadcast_object(recorded_result(self.out, self.step) if self.is_main else None)
        if report is None:  # stopped after its last checkpoint, before writing the result
            report = self.validator.validate()
            self.progress.record(type="result", step=self.step, **report)
        self.progress.log(result_line(report))
        return report

    def _banner(self) -> str:
        speed = [self.optimizer_name, *(["torch.compile"] if self.compiled else []), *([self.kernels] if self.kernels else [])]
        return banner(self.cfg, self.world, engine=self.engine_name, device=self.device, precision=self.precision,
                      memory_format=self.memory_format, speed=speed, threads=self.threads,
                      steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                      start=self.checkpointer.describe_start(self.step))

    def close(self, clean: bool = True) -> None:
        self.progress.close()
        self.checkpointer.close()  # the final checkpoint and the records reach the bucket; the folder is let go
        self.data.close()
        self.engine.shutdown(clean)
