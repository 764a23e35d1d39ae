"""What `edsr-dist launch` starts on this machine: one WorkerSpec per device (rank, card, cores, environment,
command, log), read from a rank table or --nproc; `describe_plan` is what --dry-run prints."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field

import psutil

from edsr_dist.config import check_batch_divides, parse_train_args
from edsr_dist.errors import UserError
from edsr_dist.launcher.rank_table import Device, RankTable, Server, wait_for_rank_table
from edsr_dist.parallel import ascend_env

V1_TABLE_NAME = "rank_table_v1.json"
MULTI_SERVER_PORT = 29500  # every server must agree on the port without talking first, so no random one
POLL_S = 0.05
PROG = "edsr-dist launch"
# Variables a stale launch (or an outer launcher) could leave behind that would confuse a worker's World.
WORKER_VARS = ("RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_DEVICE_ID", "RANK", "WORLD_SIZE",
               "LOCAL_RANK", "LOCAL_WORLD_SIZE", "EDSR_DIST_LAUNCHER", "EDSR_DIST_RESTART")


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


def local_addresses() -> set[str]:
    """Every address of this host's interfaces (IPv4 and IPv6), loopback included, and its hostname."""
    found = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.split("%", 1)[0])  # drop an IPv6 zone suffix like fe80::1%eth0
    return found


def select_server(table, server_id: str | None = None, server_index: int | None = None,
                  addresses: set[str] | None = None) -> int:
    """Index of this server's entry in the table: explicit index, explicit id, or the one local address match."""
    ids = [s.server_id for s in table.servers]
    listed = ", ".join(f"[{i}] {sid}" for i, sid in enumerate(ids))
    if server_index is not None:
        if not 0 <= server_index < len(ids):
            raise UserError(f"--server-index {server_index} is out of range: {table.path} has {len(ids)} server(s) "
                            f"({listed}); pass 0..{len(ids) - 1}")
        if server_id is not None and ids[server_index] != server_id:
            raise UserError(f"--server-index {server_index} is {ids[server_index]}, not --server-id {server_id}; "
                            "pass only one of them")
        return server_index
    if server_id is not None:
        matches = [i for i, sid in enumerate(ids) if sid == server_id]
        if not matches:
            raise UserError(f"--server-id {server_id} is not in {table.path} (servers: {listed}); "
                            "pass one of those, or --server-index")
    else:
        addresses = local_addresses() if addresses is None else addresses
        matches = [i for i, sid in enumerate(ids) if sid in addresses]
        if not matches:
            mine = ", ".join(sorted(a for a in addresses if ":" not in a)[:6])
            raise UserError(f"this host ({mine}) is not in {table.path} (servers: {listed}); run the launcher on a "
                            "listed server, pass --server-id/--server-index, or make a table for this host with "
                            "`edsr-dist rank-table make --devices 0-7 --out FILE`")
    if len(matches) > 1:
        raise UserError(f"{table.path} lists this host {len(matches)} times (entries "
                        f"{', '.join(map(str, matches))}); pass --server-index to say which entry this launcher runs")
    return matches[0]


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
    table_path = args.rank_table
    if table_path is None and args.nproc is None and os.environ.get("RANK_TABLE_FILE"):
        table_path = os.environ["RANK_TABLE_FILE"]
    if table_path is None and (args.server_id is not None or args.server_index is not None):
        raise UserError("--server-id/--server-index choose an entry of a rank table; pass --rank-table FILE too")

    unset: list[str] = []
    if table_path is not None:
        table = wait_for_rank_table(table_path, args.wait_table)
        index = select_server(table, args.server_id, args.server_index)
        server = table.servers[index]
        devices = sorted(server.devices, key=lambda d: d.rank_id)
        if dropped:
            if len(table.servers) > 1:
                raise UserError(f"--min-nproc cannot leave devices out of the multi-server table {table.path}; "
                                "drop --min-nproc (restarts still happen) or give the job a smaller table")
            devices = [Device(d.device_id, d.device_ip, rank)
                       for rank, d in enumerate(d for d in devices if d.device_id not in dropped)]
            table = RankTable(path=table.path, servers=[Server(server.server_id, devices)],
                              real_path=table.real_path)
        placements = [(d.rank_id, d.device_id) for d in devices]
        world_size = table.rank_size
        master_addr = args.master_addr or table.servers[0].server_id
        fixed_port = MULTI_SERVER_PORT if len(table.servers) > 1 else None
        where = f"server {index} ({server.server_id}) of {table.path}"
        table_env = ascend_env.hccl_env(server.server_id, multi_server=len(table.servers) > 1)
        table_env["RANK_TABLE_FILE"] = table.real_path
        if table.is_symlink:
            print(f"{PROG}: note: {table.path} is a symlink; workers get RANK_TABLE_FILE={table.real_path} "
                  "(torch_npu refuses symlinks)", file=sys.stderr)
    else:
        nproc = args.nproc or 1
        placements = list(enumerate(d for d in range(nproc) if d not in dropped))
        world_size = len(placements)
        master_addr = args.master_addr or "127.0.0.1"
        fixed_port = None
        where = "this machine"
        table_env = {}
        unset.append("RANK_TABLE_FILE")  # a stale table would make torch_npu build the wrong communicator

    master_port = args.master_port or port_from_env() or fixed_port or free_port()
    cfg = None if args.exec else parse_train_args(rest)
    if cfg is not None:
        check_batch_divides(cfg.batch_size, world_size)  # bad train arguments fail once, before any worker starts
    default_out = os.path.join("runs", "launch") if cfg is None else cfg.out
    log_dir = args.log_dir or os.path.join(default_out, "logs")
    v1_table = None
    if table_path is not None and dropped:
        # The table of the devices still in the job, numbered again; what HCCL reads on this restart.
        v1_table = table
        table_env["RANK_TABLE_FILE"] = os.path.abspath(os.path.join(log_dir, f"rank_table_{world_size}p.json"))
    elif table_path is not None and table.format != "1.0":
        # HCCL matches group_list ranks by pod identity, which torch_npu's numeric identity never meets: export a
        # version 1.0 copy (same ranks, HCCL's order), written when the workers start.
        v1_table = table
        table_env["RANK_TABLE_FILE"] = os.path.abspath(os.path.join(log_dir, V1_TABLE_NAME))
    job_id = job_id or os.environ.get("JOB_ID") or str(int(time.time()))
    argv = worker_argv(args, rest)

    local = len(placements)
    shares: list[list[int] | None]
    if args.no_bind or not hasattr(os, "sched_setaffinity") or (table_path is not None and torch_npu_binds()):
        shares = [None] * local
        inherited = os.environ.get("OMP_NUM_THREADS")
        threads = inherited or str(max(1, len(allowed_cores()) // local))
    else:
        shares = list(card_core_shares(allowed_cores(), [device for _, device in placements])
                      if table_path is not None else core_shares(allowed_cores(), local))
        threads = ""
    workers = []
    for local_rank, ((rank, device), cores) in enumerate(zip(placements, shares)):
        env = dict(table_env)
        # DEVICE_ID is the card's own number (as in the table); ASCEND_DEVICE_ID the logical index set_device takes.
        logical = ascend_env.logical_device(device) if table_path is not None else device
        env.update({
            "RANK_ID": str(rank), "RANK_SIZE": str(world_size),
            "DEVICE_ID": str(device), "ASCEND_DEVICE_ID": str(logical),
            "JOB_ID": job_id,
            "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "EDSR_DIST_LAUNCHER": "1", "EDSR_DIST_RESTART": str(restart),
            "OMP_NUM_THREADS": str(len(cores)) if cores is not None else threads,
            # Workers write into pipes; unbuffered output keeps logs and the console live.
            "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"),
        })
        workers.append(WorkerSpec(rank, local_rank, device, cores, env, argv,
                                  os.path.join(log_dir, f"rank_{rank}.log")))
    ranks = [w.rank for w in workers]
    rank_text = f"rank {ranks[0]}" if local == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    summary = (f"{local} worker{'s' if local != 1 else ''} on {where}: {rank_text} of {world_size}, devices "
               f"{','.join(str(w.device_id) for w in workers)}; master {master_addr}:{master_port}; logs in {log_dir}")
    return Plan(workers, summary, unset, v1_table, world_size, len(table.servers) if table_path is not None else 1,
                "" if cfg is None else cfg.out, 0 if cfg is None else cfg.batch_size, master_addr, master_port,
                index if table_path is not None else 0)


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
        lines.append(f"# rank {w.rank}: device {w.device_id} (logical {logical}), local rank {w.local_rank}, cores "
                     f"{format_cores(w.cores)}, log {w.log_path}")
        pin = ["taskset", "-c", format_cores(w.cores)] if w.cores is not None else []
        lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in w.env.items()) + " " + shlex.join(pin + w.argv))
    return "\n".join(lines)
