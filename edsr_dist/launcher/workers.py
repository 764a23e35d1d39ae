"""One attempt of a launch: start the plan's workers (pinned, logged), watch them, stop them all on the first
failure, and name its root cause in one line (an Outcome)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil

from edsr_dist.errors import EXIT_COLLECTIVE_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from edsr_dist.launcher.job_store import JobStore
from edsr_dist.launcher.plan import POLL_S, PROG, WORKER_VARS, Plan, WorkerSpec
from edsr_dist.parallel.rank_table import RankTable
from edsr_dist.state.atomic import atomic_write_text

# After a worker failed the others cannot finish a step (every step needs every rank) and usually sit in a
# collective, where a Python SIGTERM handler does not run: a short wait, then SIGKILL.
FAILURE_GRACE_S = 2.0
# A hung rank makes every other rank's collective time out at about the same moment: wait this long for them
# before naming the ranks still running as the ones that stopped responding.
SETTLE_S = 2.0
# Exit codes a restart cannot help: a user error and divergence repeat identically; an interrupted worker was
# asked to stop (preemption), and so was one ended by these signals.
NOT_RETRIED = (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED)
NOT_RETRIED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def write_v1(table: RankTable, path: str) -> None:
    """The table as a version 1.0 regular file (torch_npu refuses symlinks), written whole or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder} for the version 1.0 rank table ({exc.strerror}); "
                        "pass a writable --log-dir") from None
    atomic_write_text(path, json.dumps(table.to_v1(), indent=4) + "\n")


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
    env = {k: v for k, v in os.environ.items() if k not in unset and k not in WORKER_VARS}
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
        how = f"was killed by signal {signal_name(-code)}"
    elif code == EXIT_INTERRUPTED and own:
        how, own = own, ""  # "interrupted at step N; checkpoint saved, continue with --resume auto"
    else:
        how = f"exited with code {code}"
    return f"rank {spec.rank} (device {spec.device_id}) {how}{': ' + own if own else ''}; see {spec.log_path}"


def _join_pumps(workers: list[_Worker]) -> None:
    for w in workers:
        w.pump.join(timeout=2.0)


class StopRequest:
    """Records SIGINT/SIGTERM/SIGHUP to the launcher; the supervision loop acts on it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopRequest":
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


def run_attempt(plan: Plan, grace: float, stop: "StopRequest", peers: "JobStore | None" = None) -> Outcome:
    """Start the plan's workers and wait; the first failure (or, with `peers`, a restart decided on another server)
    stops the rest."""
    workers = _start_workers(plan, grace, stop)
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
        return _interrupted(stop.signum, workers, killed, grace)
    if failed is not None:
        return _outcome(failed, silent, stopped)
    if news:
        return Outcome(EXIT_COLLECTIVE_FAILED, news, retriable=True, from_peer=True)
    return Outcome(0)


def _start_workers(plan: Plan, grace: float, stop: "StopRequest") -> list[_Worker]:
    """Make the log folder (and the version 1.0 rank table), print the plan's line, then start the workers in rank
    order; a signal stops the starting, and a failure to start one stops those already running."""
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
    return workers


def _interrupted(signum: int, workers: list[_Worker], killed: list[_Worker], grace: float) -> Outcome:
    """The launcher was signalled: say how the workers stopped, and whether rank 0 left a checkpoint to resume."""
    name = signal_name(signum)
    line = f"received {name}; stopped {len(workers)} worker{'s' if len(workers) != 1 else ''}; interrupted"
    first = min(workers, key=lambda w: w.spec.rank) if workers else None
    if killed:
        line += (f"; rank{'s' if len(killed) > 1 else ''} {', '.join(str(w.spec.rank) for w in killed)} "
                 f"did not stop within --grace {grace:g} s and {'were' if len(killed) > 1 else 'was'} "
                 "killed (raise --grace if rank 0 needs longer to write its checkpoint)")
    elif first is not None and first.spec.rank == 0 and first.proc.returncode == EXIT_INTERRUPTED:
        line += "; rank 0 saved a checkpoint at a step boundary: continue with --resume auto"
    return Outcome(128 + signum, line)
