"""`edsr-dist launch`: start one worker per device on this machine and supervise them.

Modes (at most one):
  --rank-table FILE   Ascend style: the workers of this server's entry (matched by a local address,
                      or --server-id / --server-index); RANK_TABLE_FILE from the environment picks this too.
  --nproc N           N local workers on devices 0..N-1, rendezvous on 127.0.0.1 (the default, with N=1,
                      when there is no rank table).
  --hostfile FILE     GPU clusters: exec `horovodrun -np N -H host:slots,...`; Horovod supervises from there.

The launcher only starts, pins, logs and stops processes; a worker only trains (`python -m edsr_dist train`).
With --exec the arguments after `--` are the whole worker command (diagnostics and tests).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import psutil
from torch.distributed import TCPStore

from edsr_dist.config import check_batch_divides, parse_train_args
from edsr_dist.launcher.hostfile import horovodrun_command, parse_hostfile
from edsr_dist.parallel import ascend_env
from edsr_dist.launcher.rank_table import Device, RankTable, Server, wait_for_rank_table, write_v1
from edsr_dist.state.checkpoint import newest_checkpoint_quick
from edsr_dist.errors import (CommandParser, EXIT_COLLECTIVE_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED,
                              EXIT_USER_ERROR, UserError)
from edsr_dist.state.run_folder import claim_run_folder

# Preemption (SIGTERM to the launcher): time for the workers to reach a step boundary and for rank 0 to write
# its checkpoint before SIGKILL. Below the 30 s that Kubernetes and Slurm give before their own SIGKILL.
DEFAULT_GRACE_S = 25.0
# After a worker failed the others cannot finish a step (every step needs every rank) and usually sit in a
# collective, where a Python SIGTERM handler does not run: a short wait, then SIGKILL.
FAILURE_GRACE_S = 2.0
# A hung rank makes every other rank's collective time out at about the same moment: wait this long for them
# before naming the ranks still running as the ones that stopped responding.
SETTLE_S = 2.0
V1_TABLE_NAME = "rank_table_v1.json"
DEFAULT_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
# Exit codes a restart cannot help: a user error and divergence repeat identically; an interrupted worker was
# asked to stop (preemption), and so was one ended by these signals.
NOT_RETRIED = (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED)
NOT_RETRIED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MULTI_SERVER_PORT = 29500  # every server must agree on the port without talking first, so no random one
JOB_STORE_TIMEOUT_S = 300.0  # how long a launcher waits for the first server's launcher (it may start later)
POLL_S = 0.05
DEFAULT_WAIT_TABLE_S = 300.0  # mindxdl's rank_table.sh polls 60 x 5 s for "completed"
PROG = "edsr-dist launch"

# Variables a stale launch (or an outer launcher) could leave behind that would confuse a worker's World.
_WORKER_VARS = ("RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_DEVICE_ID", "RANK", "WORLD_SIZE",
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


# ------------------------------------------------------------------------------------------- helpers


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


def allowed_cores() -> list[int]:
    """The cores this process may run on (a container or an outer taskset may have narrowed them)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _claim_out_folder(train_args: list[str]) -> None:
    """The one-run-per-folder rule, before this launcher opens its logs in --out (only where rank 0 runs: one
    decision per job)."""
    cfg = parse_train_args(train_args)
    claim_run_folder(cfg.out, cfg.resume, cfg.overwrite)


def _format_cores(cores: list[int] | None) -> str:
    if cores is None:
        return "any"
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _port_from_env() -> int | None:
    value = os.environ.get("MASTER_PORT", "")
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise UserError(f"MASTER_PORT={value!r} is not a port number; set it to 1..65535 or unset it")
    return int(value)


# ---------------------------------------------------------------------------------------------- plan


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, usage=f"{PROG} [options] -- <train arguments>",
                description="Start and supervise one worker per device. Everything after `--` goes to "
                            "`edsr-dist train` (or, with --exec, is the whole worker command).")
    mode = p.add_argument_group("where the workers come from (at most one; default: $RANK_TABLE_FILE, else --nproc 1)")
    mode.add_argument("--rank-table", metavar="FILE", help="Ascend rank table; start this server's devices")
    mode.add_argument("--nproc", type=int, metavar="N", help="N local workers on devices 0..N-1")
    mode.add_argument("--hostfile", metavar="FILE", help="`hostname slots=N` lines; exec horovodrun")
    p.add_argument("--server-id", metavar="IP", help="this server's server_id in the rank table (default: match a local address)")
    p.add_argument("--server-index", type=int, metavar="K", help="this server's position in the rank table's server list")
    p.add_argument("--wait-table", type=float, default=DEFAULT_WAIT_TABLE_S, metavar="S",
                   help="wait up to S seconds for a rank table whose status is not yet 'completed' (Kubernetes "
                        f"writes 'initializing' first; default {DEFAULT_WAIT_TABLE_S:g})")
    p.add_argument("--no-bind", action="store_true", help="do not pin workers to cores")
    p.add_argument("--master-addr", metavar="A", help="rendezvous host (default: first server, or 127.0.0.1)")
    p.add_argument("--master-port", type=int, metavar="P",
                   help=f"rendezvous port (default: $MASTER_PORT, else a free port; {MULTI_SERVER_PORT} for multi-server tables)")
    p.add_argument("--log-dir", metavar="DIR", help="per-rank logs rank_<id>.log (default: <out>/logs of the train settings)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="S",
                   help=f"seconds between SIGTERM and SIGKILL when the launcher is stopped (time for rank 0 to write its "
                        f"checkpoint; default {DEFAULT_GRACE_S:g}); after a worker failure at most {FAILURE_GRACE_S:g}")
    heal = p.add_argument_group("self-healing (not with --hostfile; torchrun users: torchrun --max-restarts N ... "
                                "train --resume auto)")
    heal.add_argument("--max-restarts", type=int, default=0, metavar="N",
                      help="after a worker dies, hangs past --dist-timeout or fails (not exit 2, a user error, nor 3, "
                           "divergence), stop the group and start it again with --resume auto, up to N times "
                           "(default 0)")
    heal.add_argument("--restart-delay", type=float, default=DEFAULT_RESTART_DELAY_S, metavar="S",
                      help=f"seconds before the first restart, doubling each time up to {MAX_RESTART_DELAY_S:g} "
                           f"(default {DEFAULT_RESTART_DELAY_S:g})")
    heal.add_argument("--min-nproc", type=int, metavar="K",
                      help="when the same device fails twice in a row, restart without it while at least K workers "
                           "remain (same global batch, more per worker); --nproc and single-server rank tables")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--exec", action="store_true", help="the arguments after `--` are the whole worker command")
    return p


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _worker_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    if args.exec:
        if not rest:
            raise UserError("--exec needs the worker command after `--`, like `-- python -c 'print(1)'`")
        return list(rest)
    return [sys.executable, "-m", "edsr_dist", "train", *rest]


def _check_flags(args: argparse.Namespace) -> None:
    modes = [name for name, value in (("--rank-table", args.rank_table), ("--nproc", args.nproc),
                                      ("--hostfile", args.hostfile)) if value is not None]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} conflict; pick one way of placing workers")
    if args.server_id is not None and args.server_index is not None:
        raise UserError("--server-id and --server-index conflict; pass only one of them")
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: need at least 1 worker")
    if args.wait_table < 0:
        raise UserError(f"--wait-table {args.wait_table:g}: must be 0 or more seconds")
    if args.grace < 0:
        raise UserError(f"--grace {args.grace:g}: must be 0 or more seconds")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if args.restart_delay < 0:
        raise UserError(f"--restart-delay {args.restart_delay:g}: must be 0 or more seconds")
    if args.min_nproc is not None and args.min_nproc < 1:
        raise UserError(f"--min-nproc {args.min_nproc}: need at least 1 worker")
    if args.min_nproc is not None and not args.max_restarts:
        raise UserError("--min-nproc only acts when a restart happens; pass --max-restarts N too")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise UserError(f"--master-port {args.master_port}: must be 1..65535")
    if args.hostfile is not None:
        unused = [flag for flag, value in (("--server-id", args.server_id), ("--server-index", args.server_index),
                                           ("--master-addr", args.master_addr), ("--master-port", args.master_port),
                                           ("--log-dir", args.log_dir), ("--min-nproc", args.min_nproc))
                  if value is not None]
        if args.max_restarts:
            unused.append("--max-restarts")
        if args.no_bind:
            unused.append("--no-bind")
        if unused:
            raise UserError(f"{', '.join(unused)} not used with --hostfile (horovodrun places, connects and logs the "
                            "workers); drop them")


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

    master_port = args.master_port or _port_from_env() or fixed_port or free_port()
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
    argv = _worker_argv(args, rest)

    local = len(placements)
    shares: list[list[int] | None]
    if args.no_bind or not hasattr(os, "sched_setaffinity"):
        shares = [None] * local
        inherited = os.environ.get("OMP_NUM_THREADS")
        threads = inherited or str(max(1, len(allowed_cores()) // local))
    else:
        shares = list(core_shares(allowed_cores(), local))
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
    if plan.v1_table is not None:
        lines.append(f"# {plan.v1_table.path} is a group_list table: workers get a version 1.0 copy written to "
                     f"{plan.workers[0].env['RANK_TABLE_FILE']}")
    for w in plan.workers:
        logical = w.env.get("ASCEND_DEVICE_ID", str(w.device_id))
        lines.append(f"# rank {w.rank}: device {w.device_id} (logical {logical}), local rank {w.local_rank}, cores "
                     f"{_format_cores(w.cores)}, log {w.log_path}")
        pin = ["taskset", "-c", _format_cores(w.cores)] if w.cores is not None else []
        lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in w.env.items()) + " " + shlex.join(pin + w.argv))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- supervise


class _Worker:
    def __init__(self, spec: WorkerSpec, proc, pump: threading.Thread, last_line: list[str]):
        self.spec = spec
        self.proc = proc
        self.pump = pump
        self.last_line = last_line  # [the worker's last non-empty output line], filled by its pump

    def own_error(self) -> str:
        """The worker's own one-line error (`edsr-dist train: error: ...`), if that is how it ended."""
        self.pump.join(timeout=1.0)  # the line may still be in the pipe
        line = self.last_line[0]
        for marker in ("error: ", "interrupted"):
            if line.startswith("edsr-dist ") and marker in line:
                return line.split("error: ", 1)[-1] if marker == "error: " else line.split(": ", 1)[-1]
        return ""


def _pump_output(fd: int, log, echo, last_line: list[str]) -> None:
    """Copy a worker's output to its log (and, for the first local worker, the console) as it arrives."""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            lines = [line for line in chunk.decode("utf-8", "replace").splitlines() if line.strip()]
            if lines:
                last_line[0] = lines[-1].strip()
            log.write(chunk)
            log.flush()
            if echo is not None:
                try:
                    echo.write(chunk)
                    echo.flush()
                except (OSError, ValueError):
                    echo = None  # console gone (closed pipe); keep logging
    finally:
        os.close(fd)
        log.close()


def _start(spec: WorkerSpec, unset: list[str], echo) -> _Worker:
    env = {k: v for k, v in os.environ.items() if k not in unset and k not in _WORKER_VARS}
    env.update(spec.env)
    restart = int(spec.env.get("EDSR_DIST_RESTART", "0"))
    try:
        # A restart appends: the log of the attempt that failed is what explains the restart.
        log = open(spec.log_path, "ab" if restart else "wb")
        if restart:
            log.write(f"==== {PROG}: restart {restart} ====\n".encode())
    except OSError as exc:
        raise UserError(f"cannot write {spec.log_path} ({exc.strerror}); pass a writable --log-dir") from None
    read_fd, write_fd = os.pipe()
    saved = os.sched_getaffinity(0) if spec.cores is not None else None
    try:
        # Pin by narrowing this thread's affinity around the spawn: the child inherits it from its first
        # instruction (no window before pinning, no preexec_fn in a threaded process); then restore ours.
        if spec.cores is not None:
            os.sched_setaffinity(0, spec.cores)
        try:
            # Own session and process group: the whole worker tree can be signalled at once, and a
            # Ctrl-C on the terminal reaches only the launcher, which then stops workers in order.
            proc = subprocess.Popen(spec.argv, env=env, stdin=subprocess.DEVNULL, stdout=write_fd,
                                    stderr=write_fd, start_new_session=True)
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
    except FileNotFoundError:
        os.close(read_fd)
        log.close()
        raise UserError(f"cannot start rank {spec.rank}: command {spec.argv[0]!r} not found; check the worker "
                        "command (after `--` with --exec)") from None
    except BaseException:
        os.close(read_fd)
        log.close()
        raise
    finally:
        os.close(write_fd)
    last_line = [""]
    pump = threading.Thread(target=_pump_output, args=(read_fd, log, echo, last_line), name=f"rank{spec.rank}-output",
                            daemon=True)
    pump.start()
    return _Worker(spec, proc, pump, last_line)


def _signal_group(worker: _Worker, sig: int) -> None:
    try:
        os.killpg(worker.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_all(workers: list[_Worker], grace: float) -> list[_Worker]:
    """SIGTERM every worker's process group, SIGKILL what is left after `grace` seconds, reap everything.
    Returns the workers that were still running when SIGKILL came."""
    for w in workers:
        if w.proc.poll() is None:
            _signal_group(w, signal.SIGTERM)
            _signal_group(w, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs again
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
        time.sleep(POLL_S)
    killed = [w for w in workers if w.proc.poll() is None]
    for w in workers:
        # Also reaches helpers a worker left behind in its group (data loader processes, for example).
        _signal_group(w, signal.SIGKILL)
    for w in workers:
        w.proc.wait()
    _join_pumps(workers)
    return killed


def _root_cause(bad: list[tuple[_Worker, int]]) -> _Worker:
    """Of the workers found failed in one poll, the likeliest cause: a death by signal, then an error of its
    own, then a rank that only saw the others fail (collective error) or was interrupted; lowest rank first."""
    def weight(item: tuple[_Worker, int]) -> tuple[int, int]:
        worker, code = item
        if code < 0:
            order = 0
        elif code in (EXIT_COLLECTIVE_FAILED, EXIT_INTERRUPTED):
            order = 2
        else:
            order = 1
        return order, worker.spec.rank
    return min(bad, key=weight)[0]


def _unresponsive(workers: list[_Worker], failed: _Worker) -> list[_Worker]:
    """After `failed` gave up on a collective: the ranks that neither exited nor failed within SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        running = [w for w in workers if w.proc.poll() is None]
        if all(_is_stopped(w) for w in running):  # also when none is left: nothing more to wait for
            break
        time.sleep(POLL_S)
    return [w for w in workers if w.proc.poll() is None]


def _is_stopped(worker: _Worker) -> bool:
    try:
        return psutil.Process(worker.proc.pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _describe_failure(failed: _Worker, silent: list[_Worker], stopped: set[int]) -> str:
    spec, code = failed.spec, failed.proc.returncode
    own = failed.own_error()
    if silent:
        names = ", ".join(f"{w.spec.rank} (device {w.spec.device_id}"
                          f"{', process stopped' if w.spec.rank in stopped else ''})" for w in silent)
        # "rank 0: a collective timed out after 10 s (detail); what to do" -> "a collective timed out after 10 s"
        gist = own.split(": ", 1)[-1].split(" (", 1)[0].split("; ", 1)[0] if own else "a collective failed"
        return (f"rank{'s' if len(silent) > 1 else ''} {names} stopped responding: rank {spec.rank} gave up waiting "
                f"for {'them' if len(silent) > 1 else 'it'} in a collective (exit {code}: {gist}); "
                f"see {silent[0].spec.log_path}")
    if code < 0:
        how = f"was killed by signal {_signal_name(-code)}"
    elif code == EXIT_INTERRUPTED and own:
        how, own = own, ""  # "interrupted at step N; checkpoint saved, continue with --resume auto"
    else:
        how = f"exited with code {code}"
    return f"rank {spec.rank} (device {spec.device_id}) {how}{': ' + own if own else ''}; see {spec.log_path}"


def _join_pumps(workers: list[_Worker]) -> None:
    for w in workers:
        w.pump.join(timeout=2.0)


class _StopRequest:
    """Records SIGINT/SIGTERM/SIGHUP to the launcher; the supervision loop acts on it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _console():
    return getattr(sys.stdout, "buffer", None)


@dataclass
class Outcome:
    """How one start of the workers ended."""
    code: int  # the launcher's exit code if it ended here
    line: str = ""  # one line for the console (without the program name); "" when every worker finished
    retriable: bool = False  # a failure that a restart from the last checkpoint can get past
    blamed_device: int | None = None  # this server's device at fault (died, crashed, hung); None: a peer elsewhere
    from_peer: bool = False  # another server's launcher decided it (restart or end); the line is its news


def _outcome(failed: _Worker, silent: list[_Worker], stopped: set[int]) -> Outcome:
    code = failed.proc.returncode
    line = _describe_failure(failed, silent, stopped)
    retriable = code not in NOT_RETRIED and -code not in NOT_RETRIED_SIGNALS
    if silent:
        blamed = silent[0].spec.device_id
    elif code == EXIT_COLLECTIVE_FAILED:
        blamed = None  # it only saw another rank fail; that rank is on another server (else it is named instead)
    else:
        blamed = failed.spec.device_id
    return Outcome(128 - code if code < 0 else code, line, retriable, blamed)


def _run_attempt(plan: Plan, grace: float, stop: "_StopRequest", peers: "_JobStore | None" = None) -> Outcome:
    """Start the plan's workers and wait; the first failure (or, with `peers`, a restart decided on another server)
    stops the rest."""
    log_dir = os.path.dirname(plan.workers[0].log_path) or "."
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the log folder {log_dir} ({exc.strerror}); pass a writable --log-dir") from None
    if plan.v1_table is not None:
        write_v1(plan.v1_table, plan.workers[0].env["RANK_TABLE_FILE"])
    print(f"{PROG}: {plan.summary}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    workers: list[_Worker] = []
    try:
        for i, spec in enumerate(plan.workers):
            if stop.signum is not None:
                break
            workers.append(_start(spec, plan.unset, _console() if i == 0 else None))
    except BaseException:
        _stop_all(workers, grace)
        raise
    failed: _Worker | None = None
    silent: list[_Worker] = []
    stopped: set[int] = set()
    news = ""
    while stop.signum is None and failed is None:
        if peers is not None:
            news = peers.news()
            if news:
                break
        finished = [(w, w.proc.poll()) for w in workers]
        bad = [(w, code) for w, code in finished if code not in (None, 0)]
        if bad:
            failed = _root_cause(bad)
            if failed.proc.returncode == EXIT_COLLECTIVE_FAILED and "collective" in failed.own_error():
                silent = _unresponsive(workers, failed)
                stopped = {w.spec.rank for w in silent if _is_stopped(w)}
            break
        if all(code == 0 for _, code in finished):
            break
        time.sleep(POLL_S)
    # A signal during the wait above still lets us stop in order; further ones are absorbed.
    if news or (failed is not None and failed.proc.returncode != EXIT_INTERRUPTED):
        grace = min(grace, FAILURE_GRACE_S)  # else the workers were signalled directly: rank 0 may be saving
    killed = _stop_all(workers, grace)
    if failed is not None and failed.proc.returncode == EXIT_INTERRUPTED:
        # Every rank stops at the same step; report the lowest one (rank 0 names its checkpoint).
        failed = min((w for w in workers if w.proc.returncode == EXIT_INTERRUPTED), key=lambda w: w.spec.rank)
    if failed is None and stop.signum is not None:
        name = _signal_name(stop.signum)
        line = f"received {name}; stopped {len(workers)} worker{'s' if len(workers) != 1 else ''}; interrupted"
        first = min(workers, key=lambda w: w.spec.rank) if workers else None
        if killed:
            line += (f"; rank{'s' if len(killed) > 1 else ''} {', '.join(str(w.spec.rank) for w in killed)} "
                     f"did not stop within --grace {grace:g} s and {'were' if len(killed) > 1 else 'was'} "
                     "killed (raise --grace if rank 0 needs longer to write its checkpoint)")
        elif first is not None and first.spec.rank == 0 and first.proc.returncode == EXIT_INTERRUPTED:
            line += "; rank 0 saved a checkpoint at a step boundary: continue with --resume auto"
        return Outcome(128 + stop.signum, line)
    if failed is not None:
        return _outcome(failed, silent, stopped)
    if news:
        return Outcome(EXIT_COLLECTIVE_FAILED, news, retriable=True, from_peer=True)
    return Outcome(0)


class _JobStore:
    """How the launchers of a multi-server job agree on restarts. The first server's launcher holds a small
    key-value store (torch's TCPStore) on the master port + 1. The job's generation (0 for the first start, then the
    restart number, or "end") lives there: the launcher that sees a failure first moves it on, and every other
    launcher that sees it move stops its workers and follows, also one whose workers are all hung and which would
    otherwise see nothing. So every server restarts as often, and at the same time, as the others."""

    KEY = "edsr-dist/generation"
    CHECK_S = 0.5  # how often a running attempt asks whether another server moved the job on

    DONE = "edsr-dist/launchers-done"
    CLOSE_WAIT_S = 10.0  # the first launcher keeps the store up this long for the others to finish reading it

    def __init__(self, addr: str, port: int, first: bool, server_index: int, servers: int):
        try:
            self.store = TCPStore(addr, port, is_master=first, wait_for_workers=False,
                                  timeout=timedelta(seconds=JOB_STORE_TIMEOUT_S))
            if first:
                self.store.set(self.KEY, "0")
            self.seen = self.store.get(self.KEY).decode()
        except (RuntimeError, OSError) as exc:
            raise UserError(f"launchers cannot meet at {addr}:{port} ({str(exc).splitlines()[0]}); with "
                            "--max-restarts the first server's launcher listens there (master port + 1): open it "
                            "between the servers") from None
        self.server_index = server_index
        self.servers = servers
        self.first = first
        self.reachable = True
        self._next_check = 0.0
        self._latest = self.seen

    def news(self) -> str:
        """While workers run: "" or the line of the launcher that restarted or ended the job elsewhere."""
        if not self.reachable or time.monotonic() < self._next_check:
            return ""
        self._next_check = time.monotonic() + self.CHECK_S
        try:
            now = self.store.get(self.KEY).decode()
        except (RuntimeError, OSError):
            # The first server's launcher is gone; its workers' fate reaches ours through the collectives. Asking
            # again would only repeat torch's warning.
            self.reachable = False
            return ""
        if now == self.seen:
            return ""
        self._latest = now
        return self.why(now)

    def follow(self) -> str:
        """After `news`: join the generation another launcher moved the job to."""
        self.seen = self._latest
        return self.generation()

    def generation(self) -> str:
        """The restart number the job is in ("0" at first), or "end"."""
        return self.seen.split("@", 1)[0]

    def why(self, value: str | None = None) -> str:
        """The line of the launcher that moved the job to `value` (default: where this launcher last saw it)."""
        try:
            return self.store.get(f"{self.KEY}/{value or self.seen}").decode()
        except (RuntimeError, OSError):
            return "the first server (its launcher cannot be reached)"

    def close(self) -> None:
        """The others say they are done; the first launcher waits for them (briefly) before its store goes away."""
        try:
            if not self.first:
                if self.reachable:
                    self.store.add(self.DONE, 1)
                return
            deadline = time.monotonic() + self.CLOSE_WAIT_S
            while self.store.add(self.DONE, 0) < self.servers - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except (RuntimeError, OSError):
            pass

    def move_on(self, line: str, end: bool = False) -> str:
        """After a failure seen here: the generation the job is in now ("end" when it ended). The first launcher
        to ask moves it on (and tells the others why); the others learn where it went. A value names its mover
        (`<generation>@<server>`), so a launcher knows whether the move was its own."""
        if self.generation() == "end":
            return "end"
        target = f"{'end' if end else int(self.generation()) + 1}@{self.server_index}"
        try:
            now = self.store.compare_set(self.KEY, self.seen, target).decode()
            if now == target:
                self.store.set(f"{self.KEY}/{target}", f"server {self.server_index}: {line}")
        except (RuntimeError, OSError):
            now = "end"  # nobody to restart with
        self.seen = now
        return self.generation()


def restart_delay(first_s: float, restart: int) -> float:
    """Back-off before restart number `restart` (1, 2, ...): first_s, then doubling, at most MAX_RESTART_DELAY_S."""
    return min(first_s * 2 ** (restart - 1), MAX_RESTART_DELAY_S)


def _restart_train_args(rest: list[str], out: str) -> list[str]:
    """A restart continues the run in --out: `--resume auto` (settings given later win), never --overwrite (it
    would move the run being healed aside). Before the first checkpoint the first start's --resume still applies:
    a run started from another run's checkpoint starts from it again."""
    if newest_checkpoint_quick(out) is None and parse_train_args(rest).resume not in ("", "auto"):
        return [*rest, "--overwrite", "false"]
    return [*rest, "--resume", "auto", "--overwrite", "false"]


def _resume_point(plan: Plan) -> str:
    """Where the restart continues, for its console line."""
    if not plan.out:
        return "same command"
    found = newest_checkpoint_quick(plan.out)
    if found is not None:
        return f"from step {found[1]} ({found[0]})"
    if plan.workers[0].rank != 0:
        return "from rank 0's newest checkpoint"  # another server's disk, unless --out is shared
    return "from step 0 (no checkpoint yet)"


def _drop_device(plan: Plan, device: int, min_nproc: int, dropped: frozenset[int]) -> frozenset[int]:
    """The devices to leave out after `device` failed twice in a row: with it, if the job stays at or above
    --min-nproc workers and the global batch still divides."""
    remaining = plan.world_size - 1
    if remaining < min_nproc:
        return dropped
    if plan.batch_size:
        try:
            check_batch_divides(plan.batch_size, remaining)
        except UserError as exc:
            raise UserError(f"device {device} failed twice in a row and the job cannot continue without it: "
                            f"{exc}") from None
    return dropped | {device}


def run_workers(args: argparse.Namespace, rest: list[str]) -> int:
    """Start the workers, supervise them, restart them after a retriable failure (--max-restarts). Returns the
    launcher's exit code."""
    job_id = os.environ.get("JOB_ID") or str(int(time.time()))
    plan = build_plan(args, rest, job_id=job_id)
    if not args.exec and plan.workers[0].rank == 0:
        _claim_out_folder(rest)
    if args.min_nproc is not None and plan.servers > 1:
        raise UserError("--min-nproc works with --nproc and single-server rank tables (the servers of a "
                        "multi-server job would have to agree on new ranks); drop --min-nproc")
    peers = None
    if plan.servers > 1 and args.max_restarts:
        peers = _JobStore(plan.master_addr, plan.master_port + 1, plan.server_index == 0, plan.server_index,
                          plan.servers)
    try:
        return _supervise(args, rest, plan, job_id, peers)
    finally:
        if peers is not None:
            peers.close()


def _supervise(args: argparse.Namespace, rest: list[str], plan: Plan, job_id: str, peers: _JobStore | None) -> int:
    """Run attempts until one finishes, fails in a way a restart cannot help, or the restart budget is spent."""
    restarts = 0
    dropped: frozenset[int] = frozenset()
    last_blamed: int | None = None
    ended_elsewhere = False
    with _StopRequest() as stop:
        while True:
            outcome = _run_attempt(plan, args.grace, stop, peers)
            final = outcome.code == 0 or not outcome.retriable or stop.signum is not None
            target = restarts + 1
            if peers is not None and outcome.code != 0:
                generation = (peers.follow() if outcome.from_peer else
                              peers.move_on(outcome.line, end=final or target > args.max_restarts))
                if generation == "end":
                    asked_to_end = not outcome.from_peer and (final or target > args.max_restarts)
                    if not asked_to_end:
                        ended_elsewhere = True
                        outcome.line = peers.why()
                    final = True
                else:
                    target = int(generation)
            if final or target > args.max_restarts:
                break
            restarts = target
            note = ""
            if (args.min_nproc is not None and outcome.blamed_device is not None
                    and outcome.blamed_device == last_blamed):
                before = dropped
                dropped = _drop_device(plan, outcome.blamed_device, args.min_nproc, dropped)
                if dropped != before:
                    left = plan.world_size - 1
                    note = (f"; device {outcome.blamed_device} failed twice in a row: continuing without it on "
                            f"{left} worker{'s' if left != 1 else ''}")
                    if plan.batch_size:
                        note += f" (global batch {plan.batch_size}, {plan.batch_size // left} each)"
            last_blamed = outcome.blamed_device
            delay = restart_delay(args.restart_delay, restarts)
            train_args = rest if args.exec else _restart_train_args(rest, plan.out)
            print(f"{PROG}: {outcome.line}; restart {restarts} of {args.max_restarts} in {delay:g} s, "
                  f"{_resume_point(plan)}{note}", file=sys.stderr, flush=True)
            deadline = time.monotonic() + delay
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if stop.signum is not None:
                print(f"{PROG}: received {_signal_name(stop.signum)} before restart {restarts}; nothing running",
                      file=sys.stderr, flush=True)
                return 128 + stop.signum
            plan = build_plan(args, train_args, dropped, job_id, restarts)
    after = f"{restarts} restart{'s' if restarts != 1 else ''}"
    if outcome.code == 0:
        if restarts:
            print(f"{PROG}: finished after {after}", file=sys.stderr, flush=True)
        return 0
    line = outcome.line
    if ended_elsewhere:
        line = f"stopped {len(plan.workers)} worker(s); the job ended on {line}"
    elif outcome.retriable and args.max_restarts:
        line += f"; gave up after {after} (--max-restarts {args.max_restarts})"
    elif args.max_restarts and stop.signum is None:
        line += f"; not restarted: {_why_not_retried(outcome.code)}" + (f" (after {after})" if restarts else "")
    elif restarts:
        line += f" (after {after})"
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)
    return outcome.code


def _why_not_retried(code: int) -> str:
    if code == EXIT_USER_ERROR:
        return "a user error repeats on every restart"
    if code == EXIT_DIVERGED:
        return "a diverged run diverges again from the same checkpoint"
    return "the workers were asked to stop"


# ------------------------------------------------------------------------------------------ horovod


def _run_horovod(args: argparse.Namespace, rest: list[str]) -> int:
    command = horovodrun_command(parse_hostfile(args.hostfile), _worker_argv(args, rest))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which(command[0]) is None:
        raise UserError("horovodrun not found on PATH; install horovod (bash scripts/install_horovod.sh) or use "
                        "--nproc / --rank-table")
    # Horovod's variables must win in the workers' World, so drop anything a previous launch left.
    env = {k: v for k, v in os.environ.items() if k not in _WORKER_VARS}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)
    return 0  # not reached


def main(argv: list[str]) -> int:
    own, rest = _split_argv(list(argv))
    args, unknown = _parser().parse_known_args(own)
    if unknown:
        raise UserError(f"unknown launcher option(s) {' '.join(unknown)}; launcher options go before `--`, "
                        f"train arguments after it, like `{PROG} --nproc 2 -- --preset sample`")
    _check_flags(args)
    if args.hostfile is not None:
        return _run_horovod(args, rest)
    if args.dry_run:
        print(describe_plan(build_plan(args, rest)))
        return 0
    return run_workers(args, rest)
