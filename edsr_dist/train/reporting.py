"""What a run reports: the loss meter, metrics.jsonl and TensorBoard, sample images and the Result line."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from edsr_dist import __version__
from edsr_dist.config import Config, describe_split, tracker_names
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import DiskFull
from edsr_dist.evaluation.metrics import psnr_y
from edsr_dist.model.schedules import PAPER_BATCH, base_lr
from edsr_dist.parallel.world import World
from edsr_dist.state.atomic import atomic_write_text
from edsr_dist.state.checkpoint_files import BEST, CHECKPOINT_DIR, follow_pointer
from edsr_dist.state.run_folder import TRACKER_FILE
from edsr_dist.tracking.channel import CLOSE_WAIT_S, RunIds, TrackerChannel, metrics_of, open_channels, run_name

# Fewer steps than this per epoch (when the store decides the epoch's length) means checkpoints and validation
# every few steps: the README's `--epochs 300` on a small store once gave one step per epoch.
MIN_STEPS_PER_EPOCH = 20
# Sample PNGs: white pixels between the three crops, and the height of the label strip above them.
SAMPLE_GAP = 4
SAMPLE_LABEL_HEIGHT = 16


class LossMeter:
    """Sum and count of the losses of the steps that were not skipped, kept on the device (no sync per step):
    whether a step was skipped is a device-side flag the host does not read."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.seen = 0  # steps added, skipped ones included (a host count: no sync)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        taken = skipped <= 0
        self.sum += torch.where(taken, loss, torch.zeros_like(loss))  # a skipped step's loss may be NaN
        self.count += taken.float()
        self.seen += 1

    @property
    def steps(self) -> int:
        """Steps counted so far, read on the host (a device sync): at log and epoch boundaries only."""
        return int(self.count)

    def mean_over_ranks(self, engine, local_batch: int, global_batch: int) -> float:
        """The mean loss over all ranks' counted steps (one all-reduce). Each rank's steps count by its share of
        the batch (weight 1 for an even split): with uneven shares the mean is still over the samples, as one
        worker reports it."""
        weight = engine.gradient_weight(local_batch, global_batch)
        both = torch.stack([self.sum.detach().float(), self.count.float()]) * weight
        both = engine.all_reduce_sum(both).cpu()
        return both[0].item() / max(both[1].item(), 1.0)


class MetricsLog:
    """metrics.jsonl, TensorBoard and the experiment trackers of cfg.tracker (tracking/channel.py), on rank 0 only;
    the folder, files and tracker runs are created with the first entry, so a run stopped by bad input writes
    nothing. Each entry is one write of one whole line; a write that fails (a full disk) is cut back to where it
    began, so the file holds whole lines only. The trackers get each entry through their own queue: none of them
    can hold up a step."""

    def __init__(self, out: Path, is_main: bool, cfg: Config):
        self.out, self.is_main, self.cfg = out, is_main, cfg
        trackers = tracker_names(cfg.tracker)
        self.tensorboard = cfg.tensorboard and "tensorboard" in trackers
        self.tracker_names = [name for name in trackers if name != "tensorboard"]
        self.fd: int | None = None
        self.tb = None
        self.channels: list[TrackerChannel] = []
        self.completed = False  # a Result entry was recorded: the tracker runs end as finished

    @property
    def path(self) -> Path:
        return self.out / "metrics.jsonl"

    def record(self, entry: dict, step: int) -> None:
        if not self.is_main:
            return
        if self.fd is None:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self._open_trackers()
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _cannot_write(self.path, exc) from None
            self._open_tensorboard()
        self._append((json.dumps(entry) + "\n").encode())
        values, at = metrics_of(entry), entry.get("step", step)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, at)
        files = self._result_files() if entry.get("type") == "result" else ()
        self.completed = self.completed or entry.get("type") == "result"
        for channel in self.channels:
            channel.metrics(values, at, files)

    def _open_trackers(self) -> None:
        """Continue the tracker runs of earlier attempts (TRACKER_FILE), handing them first what metrics.jsonl holds
        from those attempts: records a killed attempt still had queued reach the tracker now; what the tracker
        acknowledged before is not sent again."""
        self.channels = open_channels(self.tracker_names, self.cfg.tracker_project, run_name(self.cfg.out),
                                      self.out, RunIds(self.out / TRACKER_FILE), self.cfg.to_dict())
        if not self.channels:
            return
        for earlier in read_entries(self.out / "metrics.jsonl"):
            for channel in self.channels:
                channel.metrics(metrics_of(earlier), earlier.get("step", 0))

    def _result_files(self) -> tuple[tuple[Path, str], ...]:
        """What the trackers get with the Result: the sample images and, when asked, the best checkpoint."""
        files = [(path, "samples") for path in sorted((self.out / "samples").glob("*.png"))]
        best = self.out / CHECKPOINT_DIR / BEST
        if self.cfg.track_checkpoint and best.is_file():
            files.append((follow_pointer(best), "checkpoint"))
        return tuple(files)

    def _append(self, line: bytes) -> None:
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)  # no torn line for a resume or a reader to trip over
            except OSError:
                pass
            raise _cannot_write(self.path, exc) from None

    def _open_tensorboard(self) -> None:
        if not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra
            return
        self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:
                pass  # its last events on a full disk; metrics.jsonl holds the same numbers
        deadline = time.monotonic() + CLOSE_WAIT_S  # one wait for all the trackers, which drain side by side
        for channel in self.channels:  # rank 0 only: the channels open with the first entry
            problem = channel.close(self.completed, wait_s=max(0.0, deadline - time.monotonic()))
            if problem:
                print(f"edsr-dist train: warning: {problem}", file=sys.stderr, flush=True)


def _cannot_write(path: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFull(f"cannot write {path}: {exc.strerror or exc}")
    return exc


def write_sample_image(path: Path, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int) -> None:
    """bicubic | EDSR | ground truth, a centre crop of each side by side, over a strip naming each panel with
    its Y-PSNR against the ground truth (whole image, border shaved: the validation's numbers)."""
    side = min(256, hr.shape[0], hr.shape[1])
    top, left = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
    crops = [img[top:top + side, left:left + side] for img in (bicubic, sr, hr)]
    gap = np.full((side, SAMPLE_GAP, 3), 255, np.uint8)
    row = np.concatenate([crops[0], gap, crops[1], gap, crops[2]], axis=1)
    labels = sample_labels(bicubic, sr, hr, scale)
    strip = Image.new("RGB", (row.shape[1], SAMPLE_LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    for index, label in enumerate(labels):
        draw.text((index * (side + SAMPLE_GAP) + 3, 3), label, fill="black")
    image = Image.new("RGB", (row.shape[1], SAMPLE_LABEL_HEIGHT + side), "white")
    image.paste(strip, (0, 0))
    image.paste(Image.fromarray(row), (0, SAMPLE_LABEL_HEIGHT))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def sample_labels(bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int) -> list[str]:
    return [f"bicubic {psnr_y(bicubic, hr, scale):.2f} dB", f"EDSR {psnr_y(sr, hr, scale):.2f} dB", "ground truth"]


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def result_line(report: dict) -> str:
    return (f"Result: EDSR {report['psnr_y']:.2f} dB, bicubic {report['bicubic_psnr_y']:.2f} dB "
            f"(Y-PSNR, {report['images']} held-out images)")


def module_groups(names: list[str]) -> list[str]:
    """Parameter names -> the top-level parts they belong to, in order: head, body, tail.0.0, tail.1 ..."""
    groups: list[str] = []
    for name in names:
        parts = name.split(".")
        group = ".".join(parts[:-1]) if parts[0] == "tail" else parts[0]
        if group not in groups:
            groups.append(group)
    return groups


def recipe_warnings(cfg: Config, steps_per_epoch: int, store: PatchStore) -> list[str]:
    """Settings that run but probably not as meant, each with the flag that fixes it."""
    warnings = []
    if not cfg.steps_per_epoch and steps_per_epoch < MIN_STEPS_PER_EPOCH:
        warnings.append(f"an epoch is only {steps_per_epoch} step(s) ({store.num_train_tiles} tiles / batch "
                        f"{cfg.batch_size}), so validation and checkpoints come every few steps; pass "
                        f"--steps-per-epoch (the paper's code uses 1000) and fewer --epochs")
    if cfg.scale_lr and cfg.batch_size > PAPER_BATCH and not cfg.warmup_steps:
        warnings.append(f"--scale-lr raises lr to {cfg.lr * cfg.batch_size / PAPER_BATCH:.2e} from the first step; "
                        "linear scaling needs a warm-up: pass --warmup-steps (e.g. 5 epochs' worth)")
    return warnings


def banner(cfg: Config, world: World, *, engine: str, device: torch.device, precision: str,
           memory_format: torch.memory_format, speed: list[str], threads: int, steps_per_epoch: int,
           total_steps: int, start: str) -> str:
    """The run's first line: model, world, device and number formats, speed settings (`speed`: the optimizer
    first), the recipe, and where it starts (`start`: Checkpointer.describe_start)."""
    recipe = f"lr {cfg.lr_schedule}, peak {base_lr(cfg):.3e}" + (
        f" after {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
    if cfg.ema_decay:
        recipe += f", EMA {cfg.ema_decay}"
    if cfg.grad_clip_norm:
        recipe += f", grad clip {cfg.grad_clip_norm}"
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    if device.type == "npu" and cfg.channels_last:
        layout += " (NPU tensors are contiguous only; channels_last ignored)"
    if cfg.grad_comm != "none" and world.size > 1:
        speed = [speed[0], f"{cfg.grad_comm} gradient all-reduce", *speed[1:]]
    return (f"edsr-dist {__version__}: EDSR x{cfg.scale} {cfg.num_blocks}x{cfg.num_filters}, "
            f"{world.size} worker(s) via {world.launcher}, engine {engine}, device {device}, "
            f"{precision}, {layout}, {', '.join(speed)}, {threads} thread(s)/worker, "
            f"global batch {cfg.batch_size}{_split(cfg, world)}, "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps, {recipe}; {start}"
            f"{_unused_devices_note(world, device)}")


def _split(cfg: Config, world: World) -> str:
    """How the global batch is shared, where it is not simply one even share per worker."""
    parts = []
    split = describe_split(cfg.batch_size, world.size)
    if world.size > 1 and "each" not in split:
        parts.append(f"{split} per worker")
    if cfg.accumulate > 1:
        parts.append(f"{cfg.accumulate} micro-batches per step")
    return f" ({', '.join(parts)})" if parts else ""


def _unused_devices_note(world: World, device: torch.device) -> str:
    """One process per pod (RANK/WORLD_SIZE only) uses one device; say so where the pod has more."""
    if world.launcher != "env" or device.type not in ("npu", "cuda"):
        return ""
    count = torch.npu.device_count() if device.type == "npu" else torch.cuda.device_count()
    if count <= 1:
        return ""
    kind = "NPUs" if device.type == "npu" else "GPUs"
    return (f"; this process uses 1 of the {count} {kind} it sees (one process per pod, from RANK/WORLD_SIZE): "
            "run `edsr-dist launch` in the pod to use all of them")


def read_entries(path: Path) -> list[dict]:
    """The entries of a metrics.jsonl (none where it does not exist), without a line cut short by a kill."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:  # a line cut short by the kill
            continue
    return found


def drop_metrics_after(out: Path, step: int) -> None:
    """A killed run logged steps past its last checkpoint; the resumed run logs them again."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, RecursionError):  # a line cut short by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
