"""Where and how this worker computes: its device and number format, its CPU threads, its Ascend card, and
--compile of the network."""

from __future__ import annotations

import os
import sys

import torch

from edsr_dist.config import Config
from edsr_dist.model.precision import resolve_device_and_precision
from edsr_dist.parallel import ascend_env
from edsr_dist.parallel.world import World


def set_threads(cfg: Config) -> int:
    threads = cfg.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def place_worker(cfg: Config, world: World) -> tuple[torch.device, str, int]:
    """This worker's device, precision and thread count; with several workers on Ascend, claims its card."""
    device, precision = resolve_device_and_precision(cfg.device, cfg.precision, world.device_index,
                                                     world.physical_device)
    if device.type == "npu" and world.size > 1:
        physical = world.physical_device
        ascend_env.claim_card(world.device_index if physical is None else physical, world.device_index,
                              world.rank, f"{world.master_addr}:{world.master_port}")
    # Training shapes never change, so cuDNN's autotuner pays off; validation turns it off (every image differs).
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device, precision, set_threads(cfg)


def compile_network(model: torch.nn.Module, cfg: Config, device: torch.device, is_main: bool) -> bool:
    """--compile: torch.compile of the network's forward, in place (Module.compile: parameter names and
    checkpoints unchanged), before DDP wraps it. CUDA only: elsewhere one note and the eager model."""
    if not cfg.compile:
        return False
    if device.type != "cuda":
        if is_main:
            print(f"edsr-dist train: note: --compile applies to CUDA only; ignored on {device.type}",
                  file=sys.stderr, flush=True)
        return False
    model.compile()
    return True
