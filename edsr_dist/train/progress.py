"""What the loop tells the user and the records: log lines (through the progress bar when there is one),
metrics.jsonl/TensorBoard entries, and the log's cadence, elapsed time and ETA."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from edsr_dist.config import Config
from edsr_dist.train.reporting import LossMeter, MetricsLog, hms, result_line


class Progress:
    """Rank 0 speaks; every rank may call. `total_steps` is the run's last step."""

    def __init__(self, cfg: Config, out: Path, is_main: bool, total_steps: int):
        self.cfg, self.is_main, self.total_steps = cfg, is_main, total_steps
        self.metrics = MetricsLog(out, is_main, cfg.tensorboard)
        self.bar = None  # tqdm on rank 0 while the loop runs
        self._start, self._start_step = time.perf_counter(), 0  # for the elapsed time and ETA

    def log(self, line: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def record(self, **entry) -> None:
        """One metrics entry; every entry names its step."""
        self.metrics.record(entry, entry["step"])

    @contextlib.contextmanager
    def running(self, step: int):
        """The loop from `step` on: the clock for elapsed time and ETA, and a progress bar on a terminal."""
        self._start, self._start_step = time.perf_counter(), step
        if self.is_main and self.cfg.progress and sys.stderr.isatty():
            self.bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def should_log(self, step: int, window: LossMeter) -> bool:
        return step % self.cfg.log_every == 0 and window.steps > 0

    def log_window(self, window: LossMeter, step: int, epoch: int, lr: float, loss_scale) -> None:
        mean = window.sum.item() / window.steps
        rate = window.steps * self.cfg.batch_size / max(time.perf_counter() - window.start, 1e-9)
        line = f"Step nr: [{step}/{self.total_steps}] - Loss: {mean:.5f} - Lr: {lr:.3e}"
        if self.bar is None:  # the bar shows time and rate itself
            line += " - " + self._elapsed_and_eta(step)
        self.log(line)
        self.record(type="step", step=step, epoch=epoch + 1, loss=mean, lr=lr, images_per_s=rate,
                    loss_scale=loss_scale)

    def _elapsed_and_eta(self, step: int) -> str:
        """Time since this process started training, and the rest of the steps at the rate seen so far
        (validations and checkpoints included in that rate, so the estimate settles after the first of them)."""
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done else 0.0
        return f"elapsed {hms(elapsed)} - ETA {hms(eta)}"

    def log_epoch(self, number: int, step: int, mean_loss: float, report: dict) -> None:
        line = f"Epoch nr: [{number}/{self.cfg.epochs}] - Loss: {mean_loss:.5f}"
        if report:
            line += f" - val PSNR: {report['psnr_y']:.3f} - val SSIM: {report['ssim_y']:.4f}"
        self.log(line)
        self.record(type="epoch", step=step, epoch=number, loss=mean_loss, **report)

    def log_result(self, report: dict, step: int) -> None:
        self.log(result_line(report))
        self.record(type="result", step=step, **report)

    def close(self) -> None:
        self.metrics.close()
