"""What `edsr-dist launch` starts on this machine: one WorkerSpec per device (rank, card, cores, environment,
command, log), read from a rank table, a Kubernetes operator's pod variables (pod_env) or --nproc;
`describe_plan` is what --dry-run prints."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field

from edsr_dist.config import Config, check_batch_splits, parse_train_args
from edsr_dist.errors import UserError
from edsr_dist.launcher.pod_env import PodJob, read_pod_env, workers_per_pod
from edsr_dist.locations import staging_folder
from edsr_dist.parallel import ascend_env
from edsr_dist.parallel.rank_table import Device, RankTable, Server, select_server, wait_for_rank_table

V1_TABLE_NAME = "rank_table_v1.json"
MULTI_SERVER_PORT = 29500  # every server must agree on the port without talking first, so no random one
POLL_S = 0.05
PROG = "edsr-dist launch"
# Variables a stale launch (or an outer launcher) could leave behind that would confuse a worker's World.
WORKER_VARS = ("RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_DEVICE_ID", "RANK", "WORLD_SIZE",
               "LOCAL_RANK", "LOCAL_WORLD_SIZE", "EDSR_DIST_LAUNCHER", "EDSR_DIST_RESTART", "EDSR_DIST_OWNER")


@dataclass
class WorkerSpec:
    rank: int
    local_rank: int
    device_id: int
    cores: list[int] | None  # None: not pinned
    env: dict[str, str]  # only what the launcher sets; the rest is inherited
    argv: list[str]
    log_path: str


@dataclass
class Plan:
    workers: list[WorkerSpec]
    summary: str  # one line for the console
    unset: list[str] = field(default_factory=list)  # inherited variables removed from the workers' environment
    v1_table: object = None  # a RankTable to write as version 1.0 at RANK_TABLE_FILE before starting
    world_size: int = 1
    servers: int = 1  # servers in the job (1 without a rank table)
    out: str = ""  # the run folder (train's --out); "" with --exec
    batch_size: int = 0  # the global batch; 0 with --exec
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    server_index: int = 0  # this server's entry in the rank table
    pod: PodJob | None = None  # the Kubernetes job this pod belongs to (its operator's variables), if any
    accumulate: int = 1  # train's --accumulate: micro-batches per step on each worker


def core_shares(allowed: list[int], workers: int) -> list[list[int]]:
    """Contiguous equal shares of the allowed cores, one per worker (taskset style); at least one core each."""
    allowed = sorted(allowed)
    if workers <= len(allowed):
        share = len(allowed) // workers
        return [allowed[i * share:(i + 1) * share] for i in range(workers)]
    return [[allowed[i % len(allowed)]] for i in range(workers)]  # more workers than cores: share round-robin


def card_core_shares(allowed: list[int], cards: list[int]) -> list[list[int]]:
    """One share per card, chosen by the card's own number rather than the worker's position: cores are split into
    max(card)+1 blocks (taskset style, as ModelZoo's train_full_8p.sh pins `KERNEL_NUM*RANK_ID`) and card k gets
    block k, so a server given cards 4-7 keeps cards 4-7 on the upper blocks, the NUMA side they sit on in an
    8-card server. torch_npu's own default split goes by logical index (NPUAffinityController.cpp:97-106,
    getNPUDefaultCores); only its `npu_affine:1` reads each card's affine CPUs from the driver
    (GetAffinityCPUInfo.cpp:74-136): set CPU_AFFINITY_CONF for that and the launcher leaves binding to it."""
    blocks = max(len(cards), max(cards) + 1)
    if blocks > len(allowed):
        return core_shares(allowed, len(cards))
    every = core_shares(allowed, blocks)
    return [every[card] for card in cards]


def torch_npu_binds() -> bool:
    """CPU_AFFINITY_CONF set to a binding mode: torch_npu binds each thread itself, and skips all of it when the
    process already has a narrower affinity (NPUAffinityController.cpp:322-342, checkThreadAffinityConflict), so
    the launcher must not pin. Mode 0 or unset: torch_npu binds nothing (:275-280, :354-356)."""
    # The mode: a bare number or `mode:N` among the comma-separated items, the first one (parseModeOnly, :187-215);
    # absent means 0 (:275).
    items = [item.strip() for item in os.environ.get("CPU_AFFINITY_CONF", "").split(",")]
    modes = [item.removeprefix("mode:") for item in items if item.isdigit() or item.startswith("mode:")]
    return bool(modes) and modes[0] not in ("", "0")  # the first one counts (parseModeOnly returns at it)


def allowed_cores() -> list[int]:
    """The cores this process may run on (a container or an outer taskset may have narrowed them)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def format_cores(cores: list[int] | None) -> str:
    if cores is None:
        return "any"
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def port_from_env() -> int | None:
    value = os.environ.get("MASTER_PORT", "")
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise UserError(f"MASTER_PORT={value!r} is not a port number; set it to 1..65535 or unset it")
    return int(value)


def worker_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    if args.exec:
        if not rest:
            raise UserError("--exec needs the worker command after `--`, like `-- python -c 'print(1)'`")
        return list(rest)
    return [sys.executable, "-m", "edsr_dist", "train", *rest]


def build_plan(args: argparse.Namespace, rest: list[str], dropped: frozenset[int] = frozenset(),
               job_id: str | None = None, restart: int = 0) -> Plan:
    """Workers for this machine: rank, device, cores, environment, command and log file of each. `dropped`:
    devices a restart leaves out (the ranks are numbered again over the others); `restart`: 0 for the first
    start, then the restart's number (the workers see it as EDSR_DIST_RESTART)."""
    table_path = _table_path(args)
    pod = read_pod_env(os.environ)
    if pod is not None:
        _check_pod_flags(pod, args)
    cfg = None if args.exec else parse_train_args(rest)
    if table_path is not None:
        seat = _seat_from_table(table_path, args, pod, dropped)
    elif pod is not None:
        seat = _seat_from_pod(pod, args, cfg, dropped)
    else:
        seat = _seat_from_nproc(args, dropped)
    master_port = _master_port(args, pod, seat.fixed_port)
    if cfg is not None:
        # Bad train arguments fail once, before any worker starts.
        check_batch_splits(cfg.batch_size, seat.world_size, cfg.accumulate)
    # A bucket --out is staged locally: logs go to the staging folder (uploaded with the run at its end).
    default_out = os.path.join("runs", "launch") if cfg is None else str(staging_folder(cfg.out, cfg.cache_dir))
    log_dir = args.log_dir or os.path.join(default_out, "logs")
    v1_table = None
    if seat.table is not None and dropped:
        # The table of the devices still in the job, numbered again; what HCCL reads on this restart.
        v1_table = seat.table
        seat.table_env["RANK_TABLE_FILE"] = os.path.abspath(os.path.join(log_dir, f"rank_table_{seat.world_size}p.json"))
    elif seat.table is not None and seat.table.format != "1.0":
        # HCCL matches group_list ranks by pod identity, which torch_npu's numeric identity never meets: export a
        # version 1.0 copy (same ranks, HCCL's order), written when the workers start.
        v1_table = seat.table
        seat.table_env["RANK_TABLE_FILE"] = os.path.abspath(os.path.join(log_dir, V1_TABLE_NAME))
    job_id = job_id or os.environ.get("JOB_ID") or str(int(time.time()))
    workers = _worker_specs(seat, args, worker_argv(args, rest), master_port, job_id, restart, log_dir)
    local = len(workers)
    ranks = [w.rank for w in workers]
    rank_text = f"rank {ranks[0]}" if local == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    summary = (f"{local} worker{'s' if local != 1 else ''} on {seat.where}: {rank_text} of {seat.world_size}, "
               f"devices {','.join(str(w.device_id) for w in workers)}; master {seat.master_addr}:{master_port}; "
               f"logs in {log_dir}")
    return Plan(workers, summary, seat.unset, v1_table, seat.world_size, seat.servers,
                "" if cfg is None else default_out, 0 if cfg is None else cfg.batch_size, seat.master_addr,
                master_port, seat.server_index, pod, 1 if cfg is None else cfg.accumulate)


@dataclass
class _Seat:
    """Where this machine's workers sit in the job, read from a rank table, a pod's variables or --nproc: the one
    part of a plan that differs between the three."""
    placements: list[tuple[int, int]]  # (global rank, device) of each local worker, in local-rank order
    world_size: int
    master_addr: str
    fixed_port: int | None  # a port every server must use (multi-server tables), else None
    where: str  # this machine, as the summary line names it
    table_env: dict[str, str]  # variables every worker gets from the rank table
    unset: list[str]
    table: RankTable | None = None  # the rank table in use (numbered again when devices are dropped)
    servers: int = 1
    server_index: int = 0


def _table_path(args: argparse.Namespace) -> str | None:
    """The rank table to read: --rank-table, else RANK_TABLE_FILE unless --nproc asks for local workers."""
    table_path = args.rank_table
    if table_path is None and args.nproc is None and os.environ.get("RANK_TABLE_FILE"):
        table_path = os.environ["RANK_TABLE_FILE"]
    if table_path is None and (args.server_id is not None or args.server_index is not None):
        raise UserError("--server-id/--server-index choose an entry of a rank table; pass --rank-table FILE too")
    return table_path


def _seat_from_table(table_path: str, args: argparse.Namespace, pod: PodJob | None, dropped: frozenset[int]) -> _Seat:
    """This server's entry of a rank table (chosen by flag, or by the pod's index inside a Kubernetes job)."""
    table = wait_for_rank_table(table_path, args.wait_table)
    if pod is not None and args.server_id is None and args.server_index is None:
        index = _pod_server(table, pod)
    else:
        index = select_server(table, args.server_id, args.server_index)
    server = table.servers[index]
    devices = sorted(server.devices, key=lambda d: d.rank_id)
    if pod is not None and pod.per_pod is not None and len(devices) != pod.per_pod:
        raise UserError(f"{table.path} gives server {index} {len(devices)} device(s) but the pod has "
                        f"{pod.per_pod} ({pod.variables}); mount the job's own rank table")
    if dropped:
        if len(table.servers) > 1:
            raise UserError(f"--min-nproc cannot leave devices out of the multi-server table {table.path}; "
                            "drop --min-nproc (restarts still happen) or give the job a smaller table")
        devices = [Device(d.device_id, d.device_ip, rank)
                   for rank, d in enumerate(d for d in devices if d.device_id not in dropped)]
        table = RankTable(path=table.path, servers=[Server(server.server_id, devices)],
                          real_path=table.real_path)
    table_env = ascend_env.hccl_env(server.server_id, multi_server=len(table.servers) > 1)
    table_env["RANK_TABLE_FILE"] = table.real_path
    if table.is_symlink:
        print(f"{PROG}: note: {table.path} is a symlink; workers get RANK_TABLE_FILE={table.real_path} "
              "(torch_npu refuses symlinks)", file=sys.stderr)
    return _Seat(placements=[(d.rank_id, d.device_id) for d in devices], world_size=table.rank_size,
                 master_addr=args.master_addr or (pod.master_addr if pod else table.servers[0].server_id),
                 fixed_port=MULTI_SERVER_PORT if len(table.servers) > 1 else None,
                 where=f"server {index} ({server.server_id}) of {table.path}", table_env=table_env, unset=[],
                 table=table, servers=len(table.servers), server_index=index)


def _seat_from_pod(pod: PodJob, args: argparse.Namespace, cfg: Config | None, dropped: frozenset[int]) -> _Seat:
    """This pod's workers in a Kubernetes job without a rank table (its operator's variables)."""
    per_pod, source = workers_per_pod(pod, args.nproc, os.environ, cfg.device if cfg is not None else "auto")
    # Global rank = pod index x workers per pod + local index: the pods' ranges tile 0..world-1 in pod order.
    placements = [(pod.pod_index * per_pod + i, d) for i, d in enumerate(d for d in range(per_pod)
                                                                        if d not in dropped)]
    chips = f", chips {','.join(map(str, pod.cards))} (ASCEND_VISIBLE_DEVICES)" if pod.cards else ""
    return _Seat(placements=placements,
                 world_size=pod.pods * per_pod if not dropped else len(placements),  # dropping: one pod only
                 master_addr=args.master_addr or pod.master_addr, fixed_port=None,
                 where=(f"pod {pod.pod_index} of {pod.pods} ({pod.operator}: {pod.variables}; {per_pod} per pod "
                        f"from {source}{chips})"),
                 table_env={}, unset=["RANK_TABLE_FILE"], servers=pod.pods, server_index=pod.pod_index)


def _seat_from_nproc(args: argparse.Namespace, dropped: frozenset[int]) -> _Seat:
    """--nproc workers on this machine alone."""
    placements = list(enumerate(d for d in range(args.nproc or 1) if d not in dropped))
    return _Seat(placements=placements, world_size=len(placements),
                 master_addr=args.master_addr or "127.0.0.1", fixed_port=None, where="this machine", table_env={},
                 unset=["RANK_TABLE_FILE"])  # a stale table would make torch_npu build the wrong communicator


def _master_port(args: argparse.Namespace, pod: PodJob | None, fixed_port: int | None) -> int:
    """--master-port, else the pod's MASTER_PORT, else this environment's, else the multi-server port, else a free
    one; several pods cannot pick a free one each, so they must be told."""
    pod_port = pod.master_port if pod is not None else None
    if pod is not None and pod.pods > 1 and not (args.master_port or pod_port or fixed_port):
        raise UserError(f"{pod.variables} describe pod {pod.pod_index} of {pod.pods} but MASTER_PORT is not set; "
                        "every pod must meet on the same port: set it (the operator normally does) or pass "
                        "--master-port")
    return args.master_port or pod_port or port_from_env() or fixed_port or free_port()


def _worker_specs(seat: _Seat, args: argparse.Namespace, argv: list[str], master_port: int, job_id: str,
                  restart: int, log_dir: str) -> list[WorkerSpec]:
    """One WorkerSpec per placement: its cores (or none, where binding is off or torch_npu binds) and the
    environment that tells it its place in the job."""
    with_table = seat.table is not None
    local = len(seat.placements)
    shares: list[list[int] | None]
    if args.no_bind or not hasattr(os, "sched_setaffinity") or (with_table and torch_npu_binds()):
        shares = [None] * local
        inherited = os.environ.get("OMP_NUM_THREADS")
        threads = inherited or str(max(1, len(allowed_cores()) // local))
    else:
        shares = list(card_core_shares(allowed_cores(), [device for _, device in seat.placements])
                      if with_table else core_shares(allowed_cores(), local))
        threads = ""
    workers = []
    for local_rank, ((rank, device), cores) in enumerate(zip(seat.placements, shares)):
        env = dict(seat.table_env)
        # DEVICE_ID is the card's own number (as in the table); ASCEND_DEVICE_ID the logical index set_device takes
        # (--nproc places workers on logical devices 0..N-1: their cards are the visible ones in that order).
        logical = ascend_env.logical_device(device) if with_table else device
        physical = device if with_table else _card_of(logical)
        env.update({
            "RANK_ID": str(rank), "RANK_SIZE": str(seat.world_size),
            "DEVICE_ID": str(physical), "ASCEND_DEVICE_ID": str(logical),
            "JOB_ID": job_id,
            "RANK": str(rank), "WORLD_SIZE": str(seat.world_size),
            "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local),
            "MASTER_ADDR": seat.master_addr, "MASTER_PORT": str(master_port),
            "EDSR_DIST_LAUNCHER": "1", "EDSR_DIST_RESTART": str(restart),
            "OMP_NUM_THREADS": str(len(cores)) if cores is not None else threads,
            # Workers write into pipes; unbuffered output keeps logs and the console live.
            "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"),
        })
        workers.append(WorkerSpec(rank, local_rank, device, cores, env, argv,
                                  os.path.join(log_dir, f"rank_{rank}.log")))
    return workers


def _check_pod_flags(pod: PodJob, args: argparse.Namespace) -> None:
    """Restarts inside a pod: this launcher reaches only its own pod's workers. With several pods Kubernetes
    restarts failed pods itself (a fresh launcher cannot rejoin the others' job store), so the job's restart
    policy restarts all pods and `--resume auto` continues (docs/KUBERNETES.md, Restarts)."""
    if pod.pods > 1 and args.max_restarts:
        raise UserError(f"--max-restarts {args.max_restarts} in pod {pod.pod_index} of a {pod.pods}-pod "
                        f"{pod.operator} job: a pod's launcher cannot restart the other pods' workers, and "
                        "Kubernetes restarts failed pods itself; drop --max-restarts and let the job's restart "
                        "policy restart all pods with --resume auto (docs/KUBERNETES.md)")


def _pod_server(table: RankTable, pod: PodJob) -> int:
    """The rank-table entry of this pod: its index. A pod's address is not the server_id (a host address), and
    ascend-operator writes its table's servers in rank order (docs/KUBERNETES.md)."""
    if len(table.servers) != pod.pods:
        raise UserError(f"{table.path} lists {len(table.servers)} server(s) but the job has {pod.pods} pod(s) "
                        f"({pod.variables}); mount the job's own rank table, or pass --server-index")
    return pod.pod_index


def _card_of(logical: int) -> int:
    """The physical card of logical device `logical` where ASCEND_RT_VISIBLE_DEVICES or /dev/davinciN say; the index
    itself otherwise (and for a malformed list, which the worker reports when it uses an NPU)."""
    try:
        return ascend_env.physical_device(logical, source="--nproc")
    except UserError:
        return logical


def describe_plan(plan: Plan) -> str:
    lines = [f"# {plan.summary}"]
    present = [name for name in plan.unset if name in os.environ]
    if present:
        lines.append(f"# unset: {' '.join(present)}")
    inherited = sorted(k for k in os.environ if k.startswith(("HCCL_", "ASCEND_RT_")) and k not in plan.workers[0].env)
    if inherited:
        lines.append("# passed through to every worker: " + " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in inherited))
    if plan.workers[0].cores is None and "RANK_TABLE_FILE" in plan.workers[0].env and torch_npu_binds():
        lines.append(f"# CPU binding: left to torch_npu (CPU_AFFINITY_CONF={os.environ['CPU_AFFINITY_CONF']})")
    if plan.v1_table is not None:
        lines.append(f"# {plan.v1_table.path} is a group_list table: workers get a version 1.0 copy written to "
                     f"{plan.workers[0].env['RANK_TABLE_FILE']}")
    for w in plan.workers:
        logical = w.env.get("ASCEND_DEVICE_ID", str(w.device_id))
        lines.append(f"# rank {w.rank}: device {w.env.get('DEVICE_ID', w.device_id)} (logical {logical}), local rank {w.local_rank}, cores "
                     f"{format_cores(w.cores)}, log {w.log_path}")
        pin = ["taskset", "-c", format_cores(w.cores)] if w.cores is not None else []
        lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in w.env.items()) + " " + shlex.join(pin + w.argv))
    return "\n".join(lines)
