"""What a figure is measured on (CPU model, bf16 support, torch, device) and the small measuring helpers."""

from __future__ import annotations

import math
import os
import platform
import statistics

import torch

from edsr_dist.config import Config
from edsr_dist.model.edsr import flops_per_image
from edsr_dist.model.precision import cpu_has_native_bf16


def synchronizer(device):
    """Waits for queued device work, so that host timestamps mean something; nothing to do on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "npu":
        return lambda: torch.npu.synchronize()
    return lambda: None


def train_flops_per_image(cfg: Config) -> int:
    """Forward + backward FLOPs of one LR patch: backward costs about twice the forward (input and weight grads)."""
    return 3 * flops_per_image(cfg, cfg.patch_size, cfg.patch_size)


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(ordered: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of a sorted sample: (x_k, x_(n+1-k)) for the largest
    k whose two binomial tails, P(Bin(n, 1/2) < k) each, leave at least `confidence` (the sign test's interval; no
    assumption about the spread of the values). With too few values for that, (min, max)."""
    n = len(ordered)
    if not n:
        return float("nan"), float("nan")
    def tail(k: int) -> float:  # P(Bin(n, 1/2) <= k)
        return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n

    k = 1  # the interval (x_k, x_(n+1-k)) covers the median with probability 1 - 2 * tail(k - 1)
    while k + 1 <= (n + 1) // 2 and 1 - 2 * tail(k) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k]


def peak_memory(device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": cpu_model(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    elif device.type == "npu":
        info["device_name"] = torch.npu.get_device_name(device.index)
    return info
