"""Who am I in the job? Read from the environment of whatever started this process.

The one place that decides what a worker is (rank, size, local rank, card): the trainer and `edsr-dist world`
both call `discover_world`, so the two cannot disagree. Order, first match wins:
  this project's launcher; torch elastic (torchrun, torch_npu_run; an AscendJob pod's variables); horovodrun;
  Open MPI; Ascend per-device scripts (RANK_ID/RANK_SIZE/DEVICE_ID: ModelZoo loops, mindxdl's train_start.sh);
  plain env:// variables (RANK/WORLD_SIZE: one process per Kubernetes pod); else a single process.
A partial or contradictory environment is a one-line UserError naming the variables and the fix, never a silent
single process. docs/ASCEND.md ("Launch styles") and docs/ARCHITECTURE.md ("Environment contract") give the
upstream source behind each rule. Only this module knows these variable names; everything else uses `World`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edsr_dist.errors import UserError
from edsr_dist.parallel.ascend_env import logical_device, physical_device, visible_devices
from edsr_dist.parallel.rank_table import load_rank_table, select_server


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device_index: int = 0  # logical device on this host (what set_device takes)
    # edsr-dist | torchrun | torch_npu_run | mindxdl | ascend-script | env | horovod | mpi | single
    launcher: str = "single"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    physical_device: int | None = None  # Ascend: the card's own number (rank table, DEVICE_ID), for messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def as_dict(self) -> dict:
        """What `edsr-dist world --json` prints: device is the logical index given to set_device."""
        return {"rank": self.rank, "size": self.size, "local_rank": self.local_rank, "local_size": self.local_size,
                "launcher": self.launcher, "device": self.device_index, "physical_device": self.physical_device,
                "master_addr": self.master_addr, "master_port": self.master_port}


LAUNCH_FIX = "run `edsr-dist launch` in the pod (one worker per NPU) instead of `edsr-dist train`"


def _int(env: dict, name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; fix the launch script") from None


def _opt(env: dict, name: str) -> int | None:
    return _int(env, name) if name in env else None


def _check_sizes(rank: int, size: int, local_rank: int, local_size: int, names: tuple[str, str, str, str]) -> None:
    """Contradictions no launcher means: refused before any process group starts."""
    rank_name, size_name, local_name, local_size_name = names
    if size < 1:
        raise UserError(f"{size_name}={size}: a job needs at least one process; fix the launch script")
    if not 0 <= rank < size:
        raise UserError(f"{rank_name}={rank} is not below {size_name}={size} (ranks run 0..{size - 1}); fix the "
                        f"launch script, or the job's replica count")
    if local_size < 1 or size % local_size:
        raise UserError(f"{local_size_name}={local_size} does not divide {size_name}={size}: every server runs the "
                        f"same number of workers; fix {local_size_name} or {size_name}")
    if not 0 <= local_rank < local_size:
        raise UserError(f"{local_name}={local_rank} is not below {local_size_name}={local_size}; fix the launch "
                        "script")


def _physical_or_none(logical: int, env: dict) -> int | None:
    """The card's own number where the environment names the visible cards; None (unknown) otherwise, and for
    a malformed list, which only matters (and is reported) when an NPU is used."""
    try:
        visible = visible_devices(env)
        return physical_device(logical, env) if visible is not None else None
    except UserError:
        return None


def _address(env: dict) -> tuple[str, int]:
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 29500
    return env.get("MASTER_ADDR", "127.0.0.1"), port


def discover_world(env: dict | None = None) -> World:
    env = dict(os.environ if env is None else env)
    if env.get("EDSR_DIST_LAUNCHER") == "1":
        return _our_launcher(env)
    if "TORCHELASTIC_RUN_ID" in env or all(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _torch_elastic(env)
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return _horovod(env)
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return _mpi(env)
    if any(name in env for name in ("RANK_ID", "RANK_SIZE", "DEVICE_ID")):
        return _ascend_script(env)
    _check_kubeflow_pod(env)
    if any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _env_style(env)
    return World()


KUBEFLOW_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK")


def _check_kubeflow_pod(env: dict) -> None:
    """Kubeflow writes torchrun's flags as PET_* variables (kubeflow/trainer pkg/runtime/framework/plugins/torch/
    torch.go L110-176; training-operator v1.9 pkg/controller.v1/pytorch/envvar.go L99-123, where WORLD_SIZE = pods x
    nprocPerNode but RANK stays the pod's index). Past torchrun's branch above nobody read them: a process started
    directly is one process of a pod meant to run PET_NPROC_PER_NODE, or a pod with no rank at all."""
    present = [name for name in KUBEFLOW_VARS if name in env]
    if not present:
        return
    fix = ("make the container's command `edsr-dist launch -- <train arguments>` (it reads the pod's variables and "
           "starts one worker per device), or torchrun")
    if "RANK" not in env or "WORLD_SIZE" not in env:
        shown = " ".join(f"{name}={env[name]}" for name in present)
        raise UserError(f"{shown}: Kubeflow sets these for torchrun, which did not start this process; {fix}")
    nproc = env.get("PET_NPROC_PER_NODE", "")
    if nproc.isdigit() and int(nproc) > 1:
        raise UserError(f"PET_NPROC_PER_NODE={nproc}: this pod is meant to run {nproc} workers, but a process started "
                        f"alone is only one of them (RANK={env['RANK']} of WORLD_SIZE={env['WORLD_SIZE']} would wait "
                        f"for the others); {fix}")


def _our_launcher(env: dict) -> World:
    """edsr-dist launch (launcher/plan.py) sets every variable itself, the logical card as ASCEND_DEVICE_ID."""
    size = _int(env, "RANK_SIZE")
    local_rank = _opt(env, "LOCAL_RANK") or 0
    physical = _opt(env, "DEVICE_ID")
    physical = local_rank if physical is None else physical
    logical = _opt(env, "ASCEND_DEVICE_ID")
    logical = logical_device(physical, env, "DEVICE_ID") if logical is None else logical
    local_size = _opt(env, "LOCAL_WORLD_SIZE") or size
    rank = _int(env, "RANK_ID")
    _check_sizes(rank, size, local_rank, local_size, ("RANK_ID", "RANK_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    return World(rank, size, local_rank, local_size, logical, "edsr-dist", *_address(env), physical)


def _torch_elastic(env: dict) -> World:
    """torchrun / torch_npu_run (torch/distributed/elastic/agent/server/local_elastic_agent.py _start_workers:
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT), or a script exporting all of
    RANK, WORLD_SIZE and LOCAL_RANK."""
    raw_local = env.get("LOCAL_RANK", "")
    if "," in raw_local:
        return _ascend_job(env, raw_local)
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in env]
    if missing:
        raise UserError(f"TORCHELASTIC_RUN_ID is set but {', '.join(missing)} not: this is not a torchrun worker's "
                        "environment; start the job with torchrun, or unset TORCHELASTIC_RUN_ID")
    rank, size, local_rank = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    local_size = _opt(env, "LOCAL_WORLD_SIZE") or size
    _check_sizes(rank, size, local_rank, local_size, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    # torch_npu_run's agent sets this for its workers (torch_npu/distributed/rendezvous.py:200).
    launcher = "torch_npu_run" if env.get("TORCH_NPU_USE_PARALLEL_TCPSTORE") == "True" else "torchrun"
    if env.get("RANK_TABLE_FILE"):
        return _torch_elastic_with_table(env, rank, size, local_rank, local_size, launcher)
    return World(rank, size, local_rank, local_size, local_rank, launcher, *_address(env),
                 _physical_or_none(local_rank, env))


def _torch_elastic_with_table(env: dict, rank: int, size: int, local_rank: int, local_size: int,
                              launcher: str) -> World:
    """HCCL builds its communicator from the table with the process-group rank as the table's rank_id
    (torch_npu ProcessGroupHCCL.cpp createHCCLCommEx, `getRank() * devices.size() + i`): the card is the table's
    entry for (this server, LOCAL_RANK), and torchrun's rank must be that entry's rank_id."""
    path = env["RANK_TABLE_FILE"]
    table = load_rank_table(path)
    try:
        index = select_server(table)
    except UserError:
        if "GROUP_RANK" not in env:
            raise
        index = _int(env, "GROUP_RANK")  # torchrun's node rank, when the host's address does not pick one entry
        if not 0 <= index < len(table.servers):
            raise UserError(f"GROUP_RANK={index} but {path} lists {len(table.servers)} server(s), and no entry is "
                            "this host's address; pass torchrun --node-rank below that, or fix the table") from None
    server = table.servers[index]
    devices = sorted(server.devices, key=lambda d: d.rank_id)
    if size != table.rank_size or local_size != len(devices):
        raise UserError(f"{launcher} starts {size} worker(s), {local_size} on this server, but {path} lists "
                        f"{table.rank_size} device(s), {len(devices)} on server {index} ({server.server_id}); "
                        f"pass --nnodes {len(table.servers)} --nproc-per-node {len(devices)}, or fix the table")
    entry = devices[local_rank]
    if entry.rank_id != rank:
        raise UserError(f"{launcher} gave local rank {local_rank} of server {index} ({server.server_id}) rank {rank}, "
                        f"but {path} gives that card (device {entry.device_id}) rank_id {entry.rank_id}, and HCCL "
                        f"needs the two equal; start it with --node-rank {index} (static rendezvous, as torch_npu_run "
                        "does), or use `edsr-dist launch --rank-table`")
    logical = logical_device(entry.device_id, env, path)
    return World(rank, size, local_rank, local_size, logical, launcher, *_address(env), entry.device_id)


def _ascend_job(env: dict, raw_local: str) -> World:
    """ascend-operator's AscendJob pod (mind-cluster component/ascend-operator/pkg/controllers/v1/env.go
    setPytorchEnv): RANK = pod index, WORLD_SIZE = NPUs of the job, LOCAL_WORLD_SIZE = NPUs of the pod, LOCAL_RANK =
    their list "0,1,...". Meant for one process that starts a worker per NPU; mindxdl's without-ranktable
    train_start.sh (L174-189) is such a loop and adds ASCEND_DEVICE_ID = the card's index in the pod and
    DEVICE_INDEX = RANK * LOCAL_WORLD_SIZE + that index, which make a worker."""
    if "ASCEND_DEVICE_ID" not in env or "DEVICE_INDEX" not in env:
        raise UserError(f"LOCAL_RANK={raw_local!r} is a list: this is an AscendJob pod's environment (ascend-operator "
                        f"gives the pod's local ranks in one variable), which starts one process per pod; {LAUNCH_FIX}")
    local_rank, rank = _int(env, "ASCEND_DEVICE_ID"), _int(env, "DEVICE_INDEX")
    size, local_size, pod = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE"), _int(env, "RANK")
    _check_sizes(rank, size, local_rank, local_size, ("DEVICE_INDEX", "WORLD_SIZE", "ASCEND_DEVICE_ID",
                                                      "LOCAL_WORLD_SIZE"))
    if rank != pod * local_size + local_rank:
        raise UserError(f"DEVICE_INDEX={rank} is not RANK*LOCAL_WORLD_SIZE+ASCEND_DEVICE_ID ({pod}*{local_size}+"
                        f"{local_rank}) as mindxdl's train_start.sh exports it; fix the loop, or {LAUNCH_FIX}")
    # ASCEND_DEVICE_ID is the container-local index: the runtime numbers the pod's cards 0.. (logical).
    return World(rank, size, local_rank, local_size, local_rank, "mindxdl", *_address(env),
                 _physical_or_none(local_rank, env))


def _horovod(env: dict) -> World:
    local_rank = _opt(env, "HOROVOD_LOCAL_RANK") or 0
    local_size = _opt(env, "HOROVOD_LOCAL_SIZE") or _int(env, "HOROVOD_SIZE")
    rank, size = _int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE")
    _check_sizes(rank, size, local_rank, local_size, ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK",
                                                      "HOROVOD_LOCAL_SIZE"))
    return World(rank, size, local_rank, local_size, local_rank, "horovod", *_address(env))


def _mpi(env: dict) -> World:
    local_rank = _opt(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0
    local_size = _opt(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or _int(env, "OMPI_COMM_WORLD_SIZE")
    rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    _check_sizes(rank, size, local_rank, local_size, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                                      "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    # mpirun gives no rendezvous address: the job's first host (or MASTER_ADDR when set) hosts the store.
    return World(rank, size, local_rank, local_size, local_rank, "mpi", *_address(env))


def _ascend_script(env: dict) -> World:
    """Ascend's per-device loops: ModelZoo's test/train_full_8p.sh (RANK_ID loop, RANK_SIZE, ASCEND_DEVICE_ID
    exported once = 0, the card on the command line), mindxdl's ranktable train_start.sh (RANK_ID global,
    RANK_SIZE per server, RANK = server index, WORLD_SIZE = server count, RANK_TABLE_FILE). The card: DEVICE_ID,
    else the table's entry for RANK_ID, else the rank's position on its server. ASCEND_DEVICE_ID is not read:
    those scripts export it once for every rank."""
    if "RANK_ID" not in env:
        size = _opt(env, "RANK_SIZE")
        if size is not None and size > 1:
            raise UserError(f"RANK_SIZE={size} without RANK_ID: each process of a per-device loop needs its own "
                            "RANK_ID (0..RANK_SIZE-1); export RANK_ID inside the loop, or use `edsr-dist launch`")
        base = _env_style(env) if any(n in env for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) else World()
        if "DEVICE_ID" not in env:
            return base
        physical = _int(env, "DEVICE_ID")  # a one-card script (1p): this card
        return World(base.rank, base.size, base.local_rank, base.local_size, logical_device(physical, env, "DEVICE_ID"),
                     base.launcher if base.launcher != "single" else "ascend-script", base.master_addr,
                     base.master_port, physical)
    rank = _int(env, "RANK_ID")
    if env.get("RANK_TABLE_FILE"):
        return _ascend_script_with_table(env, rank)
    size = _opt(env, "RANK_SIZE")
    world_size = _opt(env, "WORLD_SIZE")
    if size is None and world_size is None:
        raise UserError(f"RANK_ID={rank} without RANK_SIZE: export RANK_SIZE (the number of processes) with it")
    size = world_size if size is None else size
    if world_size is not None and world_size != size:
        raise UserError(f"RANK_SIZE={size} and WORLD_SIZE={world_size} disagree on the number of processes; export "
                        "one of them, or both equal")
    if "RANK" in env and _int(env, "RANK") != rank:
        raise UserError(f"RANK_ID={rank} and RANK={_int(env, 'RANK')} disagree on this process's rank; export RANK "
                        "equal to RANK_ID in the loop, or only RANK_ID")
    local_size = _opt(env, "LOCAL_WORLD_SIZE") or size  # the loops run on one server unless told
    local_rank = _opt(env, "LOCAL_RANK")
    local_rank = rank % local_size if local_rank is None else local_rank
    _check_sizes(rank, size, local_rank, local_size, ("RANK_ID", "RANK_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if "DEVICE_ID" in env:
        physical = _int(env, "DEVICE_ID")
        logical = logical_device(physical, env, "DEVICE_ID")
    else:
        logical = local_rank  # the rank's position on its server, as the ModelZoo loops pass `--gpu $RANK_ID`
        physical = physical_device(logical, env, f"RANK_ID={rank}")
    return World(rank, size, local_rank, local_size, logical, "ascend-script", *_address(env), physical)


def _ascend_script_with_table(env: dict, rank: int) -> World:
    path = env["RANK_TABLE_FILE"]
    table = load_rank_table(path)
    found = [(i, position, device) for i, server in enumerate(table.servers)
             for position, device in enumerate(sorted(server.devices, key=lambda d: d.rank_id))
             if device.rank_id == rank]
    if not found:
        raise UserError(f"RANK_ID={rank} is not a rank_id of {path} (ranks 0..{table.rank_size - 1}); export the "
                        "global rank as RANK_ID, or fix the table")
    index, position, device = found[0]
    server = table.servers[index]
    size, local_size = table.rank_size, len(server.devices)
    checks = [("RANK_SIZE", (size, local_size), "the table's device count, or this server's"),
              ("WORLD_SIZE", (len(table.servers), size), "the table's server count (mindxdl) or device count"),
              ("RANK", (index, rank), "this server's index in the table (mindxdl) or RANK_ID")]
    for name, allowed, meaning in checks:
        if name in env and _int(env, name) not in allowed:
            raise UserError(f"{name}={_int(env, name)} contradicts {path}, where RANK_ID={rank} is device "
                            f"{device.device_id} of server {index} ({server.server_id}): {name} should be {meaning} "
                            f"({' or '.join(map(str, sorted(set(allowed))))}); fix the launch script or the table")
    if "DEVICE_ID" in env and _int(env, "DEVICE_ID") != device.device_id:
        raise UserError(f"DEVICE_ID={_int(env, 'DEVICE_ID')} but {path} gives RANK_ID={rank} device "
                        f"{device.device_id}; HCCL would refuse the mismatch: fix DEVICE_ID or the table")
    logical = logical_device(device.device_id, env, path)
    return World(rank, size, position, local_size, logical, "ascend-script", *_address(env), device.device_id)


def _env_style(env: dict) -> World:
    """RANK and WORLD_SIZE without LOCAL_RANK, as Volcano's pytorch plugin and Kubeflow's PyTorchJob give one
    process per pod, read as torch's env:// reads them (torch/distributed/rendezvous.py _env_rendezvous_handler:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, all required): this process is RANK of WORLD_SIZE, local rank 0."""
    if "LOCAL_RANK" in env and not ("RANK" in env and "WORLD_SIZE" in env):
        raise UserError(f"LOCAL_RANK={env['LOCAL_RANK']} without RANK and WORLD_SIZE: a worker needs its global rank "
                        "and the job's size too; start it with torchrun or `edsr-dist launch`, or export them")
    if "WORLD_SIZE" in env and "RANK" not in env:
        if _int(env, "WORLD_SIZE") == 1:
            return World(master_addr=_address(env)[0], master_port=_address(env)[1])
        raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']} without RANK: each process needs its own RANK "
                        "(0..WORLD_SIZE-1); export it, or use `edsr-dist launch` / torchrun")
    if "RANK" in env and "WORLD_SIZE" not in env:
        raise UserError(f"RANK={env['RANK']} without WORLD_SIZE: export WORLD_SIZE (the number of processes) too, or "
                        "use `edsr-dist launch` / torchrun")
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_size = _opt(env, "LOCAL_WORLD_SIZE") or 1
    if local_size > 1:
        raise UserError(f"LOCAL_WORLD_SIZE={local_size} without LOCAL_RANK: which of the {local_size} local workers "
                        "is this one? Export LOCAL_RANK, or start them with `edsr-dist launch` / torchrun")
    _check_sizes(rank, size, 0, 1, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise UserError(f"RANK={rank} WORLD_SIZE={size} without {' and '.join(missing)}: the processes cannot "
                            "find each other; export the address and port of rank 0's host (env:// needs both)")
    return World(rank, size, 0, 1, 0, "env", *_address(env), _physical_or_none(0, env))
