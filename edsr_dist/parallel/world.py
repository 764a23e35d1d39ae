"""Who am I in the job? Read from the environment of whatever started this process.

Order: this project's launcher, torchrun, horovodrun, Open MPI, a single process (the variables of each:
docs/ARCHITECTURE.md, "Environment contract").
Only this module knows those variable names; everything else uses `World`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edsr_dist.parallel.ascend_env import logical_device
from edsr_dist.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device_index: int = 0  # logical device on this host (what set_device takes; LOCAL_RANK outside Ascend)
    launcher: str = "single"  # edsr-dist | torchrun | horovod | mpi | single
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    physical_device: int | None = None  # Ascend: the card's own number (rank table, DEVICE_ID), for messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int(env: dict, name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; fix the launch script") from None


def _check(world: World) -> World:
    if not 0 <= world.rank < world.size:
        raise UserError(f"rank {world.rank} is outside the world of size {world.size}; check RANK/RANK_ID and WORLD_SIZE/RANK_SIZE")
    if not 0 <= world.local_rank < max(world.local_size, 1):
        raise UserError(f"local rank {world.local_rank} is outside {world.local_size} local workers; check LOCAL_RANK")
    return world


# Variables only another launcher sets: their presence means RANK_ID/RANK_SIZE are leftovers (ModelZoo scripts and
# Kubernetes images export those globally) and must not override that launcher's own.
_OTHER_LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK")


def discover_world(env: dict | None = None) -> World:
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 29500

    ascend_style = "RANK_ID" in env and "RANK_SIZE" in env and not any(name in env for name in _OTHER_LAUNCHERS)
    if env.get("EDSR_DIST_LAUNCHER") == "1" or ascend_style:
        size = _int(env, "RANK_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        physical = _int(env, "DEVICE_ID") if "DEVICE_ID" in env else local_rank
        # Our launcher computes the logical index itself (and prints it in --dry-run); other Ascend-style
        # scripts give only the physical DEVICE_ID.
        logical = _int(env, "ASCEND_DEVICE_ID") if "ASCEND_DEVICE_ID" in env else logical_device(physical, env)
        local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else size
        return _check(World(_int(env, "RANK_ID"), size, local_rank, local_size, logical, "edsr-dist", addr, port,
                            physical))

    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
        local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else _int(env, "WORLD_SIZE")
        return _check(World(_int(env, "RANK"), _int(env, "WORLD_SIZE"), local_rank, local_size, local_rank,
                            "torchrun", addr, port))

    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        local_rank = _int(env, "HOROVOD_LOCAL_RANK") if "HOROVOD_LOCAL_RANK" in env else 0
        local_size = _int(env, "HOROVOD_LOCAL_SIZE") if "HOROVOD_LOCAL_SIZE" in env else _int(env, "HOROVOD_SIZE")
        return _check(World(_int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE"), local_rank, local_size, local_rank,
                            "horovod", addr, port))

    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        local_size = (_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env
                      else _int(env, "OMPI_COMM_WORLD_SIZE"))
        # mpirun gives no rendezvous address: the job's first host (or MASTER_ADDR when set) hosts the store.
        return _check(World(_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"), local_rank,
                            local_size, local_rank, "mpi", addr, port))

    return World()
