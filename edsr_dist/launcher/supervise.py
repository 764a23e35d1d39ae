"""Supervision across attempts: restarts after a retriable failure (--max-restarts) with a back-off, continuing
from the newest checkpoint, leaving out a device that failed twice (--min-nproc), and agreeing with the other
servers' launchers through the job store."""

from __future__ import annotations

import argparse
import os
import sys
import time

from edsr_dist.config import check_batch_splits, describe_split, parse_train_args
from edsr_dist.errors import EXIT_DIVERGED, EXIT_USER_ERROR, UserError
from edsr_dist.launcher.job_store import JobStore
from edsr_dist.launcher.plan import POLL_S, PROG, Plan, build_plan
from edsr_dist.launcher.workers import Outcome, StopRequest, run_attempt, signal_name
from edsr_dist.state.checkpoint_files import newest_checkpoint_quick
from edsr_dist.state.claim import claim_out
from edsr_dist.state.owner import OWNER_ENV, Ownership

DEFAULT_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0


def claim_out_folder(train_args: list[str]) -> Ownership | None:
    """The one-writer and one-run-per-folder rules, before this launcher opens its logs in --out (only where rank 0
    runs: one decision per job). The launcher then owns the folder for the whole job, its restarts included."""
    cfg = parse_train_args(train_args)
    return claim_out(cfg.out, cfg.cache_dir, cfg.resume, cfg.overwrite, cfg.take_over, cfg.endpoint_url)


def _as_owner(plan: Plan, owner: Ownership | None) -> Plan:
    """The workers are this launcher's job: its token tells rank 0 not to take a second hold."""
    if owner is not None:
        for worker in plan.workers:
            worker.env[OWNER_ENV] = owner.token
    return plan


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
    --min-nproc workers, whatever their number (the global batch is split unevenly where it must: the trajectory
    stays the same), as long as every worker still gets a sample per micro-batch."""
    remaining = plan.world_size - 1
    if remaining < min_nproc:
        return dropped
    if plan.batch_size:
        try:
            check_batch_splits(plan.batch_size, remaining, plan.accumulate)
        except UserError as exc:
            raise UserError(f"device {device} failed twice in a row and the job cannot continue without it: "
                            f"{exc}") from None
    return dropped | {device}


def run_workers(args: argparse.Namespace, rest: list[str]) -> int:
    """Start the workers, supervise them, restart them after a retriable failure (--max-restarts). Returns the
    launcher's exit code."""
    job_id = os.environ.get("JOB_ID") or str(int(time.time()))
    plan = build_plan(args, rest, job_id=job_id)
    if args.min_nproc is not None and plan.servers > 1:
        raise UserError("--min-nproc works with --nproc and single-server rank tables (the servers of a "
                        "multi-server job would have to agree on new ranks); drop --min-nproc")
    owner = claim_out_folder(rest) if not args.exec and plan.workers[0].rank == 0 else None
    peers = None
    try:
        if plan.servers > 1 and args.max_restarts:
            peers = JobStore(plan.master_addr, plan.master_port + 1, plan.server_index == 0, plan.server_index,
                              plan.servers)
        return _supervise(args, rest, _as_owner(plan, owner), job_id, peers, owner)
    finally:
        if peers is not None:
            peers.close()
        if owner is not None:
            owner.release()


def _supervise(args: argparse.Namespace, rest: list[str], plan: Plan, job_id: str, peers: JobStore | None,
               owner: Ownership | None) -> int:
    """Run attempts until one finishes, fails in a way a restart cannot help, or the restart budget is spent."""
    restarts = 0
    dropped: frozenset[int] = frozenset()
    last_blamed: int | None = None
    ended_elsewhere = False
    with StopRequest() as stop:
        while True:
            outcome = run_attempt(plan, args.grace, stop, peers)
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
            dropped, note = _drop_repeat_offender(plan, args, outcome, last_blamed, dropped)
            last_blamed = outcome.blamed_device
            delay = restart_delay(args.restart_delay, restarts)
            train_args = rest if args.exec else _restart_train_args(rest, plan.out)
            print(f"{PROG}: {outcome.line}; restart {restarts} of {args.max_restarts} in {delay:g} s, "
                  f"{_resume_point(plan)}{note}", file=sys.stderr, flush=True)
            deadline = time.monotonic() + delay
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if stop.signum is not None:
                print(f"{PROG}: received {signal_name(stop.signum)} before restart {restarts}; nothing running",
                      file=sys.stderr, flush=True)
                return 128 + stop.signum
            plan = _as_owner(build_plan(args, train_args, dropped, job_id, restarts), owner)
    return _report_end(args, plan, outcome, restarts, ended_elsewhere, stopped=stop.signum is not None)


def _drop_repeat_offender(plan: Plan, args: argparse.Namespace, outcome: Outcome, last_blamed: int | None,
                          dropped: frozenset[int]) -> tuple[frozenset[int], str]:
    """With --min-nproc, a device blamed for two failures in a row is left out of the next attempt: the devices
    left out from now on, and the note the restart line gets ("" when nothing more is dropped)."""
    if args.min_nproc is None or outcome.blamed_device is None or outcome.blamed_device != last_blamed:
        return dropped, ""
    before = dropped
    dropped = _drop_device(plan, outcome.blamed_device, args.min_nproc, dropped)
    if dropped == before:
        return dropped, ""
    left = plan.world_size - 1
    note = (f"; device {outcome.blamed_device} failed twice in a row: continuing without it on "
            f"{left} worker{'s' if left != 1 else ''}")
    if plan.batch_size:
        note += f" (global batch {plan.batch_size}, {describe_split(plan.batch_size, left)})"
    return dropped, note


def _report_end(args: argparse.Namespace, plan: Plan, outcome: Outcome, restarts: int, ended_elsewhere: bool,
                stopped: bool) -> int:
    """The launcher's last line (why the job ended, and after how many restarts) and its exit code."""
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
    elif args.max_restarts and not stopped:
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
