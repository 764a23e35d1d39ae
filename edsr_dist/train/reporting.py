"""What a run reports: the loss meter, metrics.jsonl and TensorBoard, sample images and the Result line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from edsr_dist import __version__
from edsr_dist.config import Config, describe_split
from edsr_dist.data.store import PatchStore
from edsr_dist.evaluation.metrics import psnr_y
from edsr_dist.model.schedules import PAPER_BATCH, base_lr
from edsr_dist.parallel.world import World
from edsr_dist.state.atomic import atomic_write_text

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
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        taken = skipped <= 0
        self.sum += torch.where(taken, loss, torch.zeros_like(loss))  # a skipped step's loss may be NaN
        self.count += taken.float()

    @property
    def steps(self) -> int:
        """Steps counted so far, read on the host (a device sync): at log and epoch boundaries only."""
        return int(self.count)


class MetricsLog:
    """metrics.jsonl, and TensorBoard when asked for, on rank 0 only; the folder and files are created with the
    first entry, so a run stopped by bad input writes nothing."""

    def __init__(self, out: Path, is_main: bool, tensorboard: bool):
        self.out, self.is_main, self.tensorboard = out, is_main, tensorboard
        self.file = None
        self.tb = None

    def record(self, entry: dict, step: int) -> None:
        if not self.is_main:
            return
        if self.file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / "metrics.jsonl", "a")
            self._open_tensorboard()
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in entry.items():
                if key not in ("type", "step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{entry['type']}/{key}", value, entry.get("step", step))

    def _open_tensorboard(self) -> None:
        if not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra
            return
        self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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
        except ValueError:  # a line cut short by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
