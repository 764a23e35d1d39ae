"""`edsr-dist launch`: start one worker per device on this machine and supervise them.

Modes (at most one):
  --rank-table FILE   Ascend style: the workers of this server's entry (matched by a local address,
                      or --server-id / --server-index); RANK_TABLE_FILE from the environment picks this too.
  --nproc N           N local workers on devices 0..N-1, rendezvous on 127.0.0.1 (the default, with N=1,
                      when there is no rank table).
  (a Kubernetes pod)  the operator's pod variables (Volcano/PyTorchJob RANK + WORLD_SIZE, Kubeflow PET_*,
                      AscendJob LOCAL_WORLD_SIZE): one worker per device of the pod (--nproc, else the operator's
                      count, else the pod's devices), ranks pod index x per pod + local index, the operator's
                      master (launcher/pod_env.py; docs/KUBERNETES.md).
  --hostfile FILE     GPU clusters: exec `horovodrun -np N -H host:slots,...`; Horovod supervises from there.

The launcher only starts, pins, logs and stops processes; a worker only trains (`python -m edsr_dist train`).
With --exec the arguments after `--` are the whole worker command (diagnostics and tests).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from edsr_dist.errors import CommandParser, UserError, at_least
from edsr_dist.launcher.hostfile import horovodrun_command, parse_hostfile
from edsr_dist.launcher.plan import MULTI_SERVER_PORT, PROG, WORKER_VARS, build_plan, describe_plan, worker_argv
from edsr_dist.launcher.supervise import DEFAULT_RESTART_DELAY_S, MAX_RESTART_DELAY_S, run_workers
from edsr_dist.launcher.workers import FAILURE_GRACE_S

# Preemption (SIGTERM to the launcher): time for the workers to reach a step boundary and for rank 0 to write
# its checkpoint before SIGKILL. Below the 30 s that Kubernetes and Slurm give before their own SIGKILL.
DEFAULT_GRACE_S = 25.0
DEFAULT_WAIT_TABLE_S = 300.0  # mindxdl's rank_table.sh polls 60 x 5 s for "completed"


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, usage=f"{PROG} [options] -- <train arguments>",
                description="Start and supervise one worker per device. Everything after `--` goes to "
                            "`edsr-dist train` (or, with --exec, is the whole worker command).")
    mode = p.add_argument_group("where the workers come from (at most one; default: $RANK_TABLE_FILE, else a "
                                "Kubernetes pod's operator variables, else --nproc 1)")
    mode.add_argument("--rank-table", metavar="FILE", help="Ascend rank table; start this server's devices")
    mode.add_argument("--nproc", type=int, metavar="N", help="N local workers on devices 0..N-1")
    mode.add_argument("--hostfile", metavar="FILE", help="`hostname slots=N` lines; exec horovodrun")
    p.add_argument("--server-id", metavar="IP", help="this server's server_id in the rank table (default: match a local address)")
    p.add_argument("--server-index", type=int, metavar="K", help="this server's position in the rank table's server list")
    p.add_argument("--wait-table", type=float, default=DEFAULT_WAIT_TABLE_S, metavar="S",
                   help="wait up to S seconds for a rank table whose status is not yet 'completed' (Kubernetes "
                        f"writes 'initializing' first; default {DEFAULT_WAIT_TABLE_S:g})")
    p.add_argument("--no-bind", action="store_true", help="do not pin workers to cores")
    p.add_argument("--master-addr", metavar="A",
                   help="rendezvous host (default: the operator's MASTER_ADDR in a pod, else the first server, "
                        "or 127.0.0.1)")
    p.add_argument("--master-port", type=int, metavar="P",
                   help=f"rendezvous port (default: $MASTER_PORT, or PET_MASTER_PORT in a Kubeflow pod; else a "
                        f"free port; {MULTI_SERVER_PORT} for multi-server tables)")
    p.add_argument("--log-dir", metavar="DIR", help="per-rank logs rank_<id>.log (default: <out>/logs of the train settings)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="S",
                   help=f"seconds between SIGTERM and SIGKILL when the launcher is stopped (time for rank 0 to write its "
                        f"checkpoint; default {DEFAULT_GRACE_S:g}); after a worker failure at most {FAILURE_GRACE_S:g}")
    heal = p.add_argument_group("self-healing (not with --hostfile; torchrun users: torchrun --max-restarts N ... "
                                "train --resume auto)")
    heal.add_argument("--max-restarts", type=int, default=0, metavar="N",
                      help="after a worker dies, hangs past --dist-timeout or fails (not exit 2, a user error, nor 3, "
                           "divergence), stop the group and start it again with --resume auto, up to N times "
                           "(default 0; not in a Kubernetes job of several pods: its restart policy restarts them)")
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


def _check_flags(args: argparse.Namespace) -> None:
    modes = [name for name, value in (("--rank-table", args.rank_table), ("--nproc", args.nproc),
                                      ("--hostfile", args.hostfile)) if value is not None]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} conflict; pick one way of placing workers")
    if args.server_id is not None and args.server_index is not None:
        raise UserError("--server-id and --server-index conflict; pass only one of them")
    at_least("--nproc", args.nproc, 1, "need at least 1 worker")
    at_least("--wait-table", args.wait_table, 0, "must be 0 or more seconds")
    at_least("--grace", args.grace, 0, "must be 0 or more seconds")
    at_least("--max-restarts", args.max_restarts, 0, "must be 0 or more")
    at_least("--restart-delay", args.restart_delay, 0, "must be 0 or more seconds")
    at_least("--min-nproc", args.min_nproc, 1, "need at least 1 worker")
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


def _run_horovod(args: argparse.Namespace, rest: list[str]) -> int:
    command = horovodrun_command(parse_hostfile(args.hostfile), worker_argv(args, rest))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which(command[0]) is None:
        raise UserError("horovodrun not found on PATH; install horovod (bash scripts/install_horovod.sh) or use "
                        "--nproc / --rank-table")
    # Horovod's variables must win in the workers' World, so drop anything a previous launch left.
    env = {k: v for k, v in os.environ.items() if k not in WORKER_VARS}
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
