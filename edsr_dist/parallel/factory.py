"""Which engine a run gets: the one the user named, else Horovod when horovodrun (or mpirun with Horovod's
variables) started the job, else DDP (or the local engine for a world of one)."""

from __future__ import annotations

import os

import torch

from edsr_dist.errors import UserError
from edsr_dist.parallel.engine import DDPEngine, Engine
from edsr_dist.parallel.horovod_engine import HorovodEngine
from edsr_dist.parallel.world import World


def resolve_engine_name(requested: str, world: World, env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if requested != "auto":
        return requested
    started_by_horovod = world.launcher == "horovod" or (
        world.launcher == "mpi" and any(key.startswith("HOROVOD_") for key in env))
    return "horovod" if started_by_horovod else "ddp"


def make_engine(name: str, world: World, device: torch.device, timeout_s: int, grad_comm: str = "none") -> Engine:
    """grad_comm: the gradient all-reduce's dtype (config.GRAD_COMMS); a world of one has nothing to send."""
    if name == "horovod":
        if grad_comm != "none":
            raise UserError(f"--grad-comm {grad_comm} is a DDP comm hook; Horovod has its own compression: "
                            "use --engine ddp or --grad-comm none")
        return HorovodEngine(world, device)
    if world.size == 1:
        return Engine(world, device)
    return DDPEngine(world, device, timeout_s, grad_comm)
