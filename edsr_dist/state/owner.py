"""One writer per run folder: the job that owns `--out` holds an owner record in it until it ends.

The record (`<out>/.owner.json`, or a lock object beside a bucket prefix) says who writes there: host, pid, job,
start time, command and a heartbeat refreshed every `heartbeat_s` seconds by a thread. It is created exclusively
(written whole under a draft name, then hard-linked to its own name: link(2) fails with EEXIST, atomically on local
file systems and on NFS, where the server decides; a bucket uses a conditional put, `If-None-Match: *`), so of two
jobs starting at once exactly one gets it.
A second writer is refused in one line. The record of a dead owner is taken over: on the same machine as soon as its
pid is gone (compared with the process's start time, so a reused pid does not count as alive), elsewhere once its
heartbeat is older than `stale_after(heartbeat_s)`, or at once with `--take-over`.

Who counts as the owner, not as a second writer: the workers of a launcher that holds the record (they get its
token in EDSR_DIST_OWNER), the launcher's own restarts (the launcher keeps the record across them) and torchrun's
restarts of the same job (TORCHELASTIC_RUN_ID is the same on every restart; its default "none" names no job).

The storage behind the record is the small `OwnerLock` interface: `LocalLock` here, a bucket object in
`state/bucket_lock.py`.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import hashlib
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from edsr_dist.errors import UserError
from edsr_dist.state.atomic import atomic_write_bytes

RECORD_NAME = ".owner.json"
OWNER_ENV = "EDSR_DIST_OWNER"  # the launcher's token, given to its workers: they are the owner, not a second writer
HEARTBEAT_ENV = "EDSR_DIST_OWNER_HEARTBEAT_S"  # seconds between heartbeats (tests use short ones)
DEFAULT_HEARTBEAT_S = 30.0
# A heartbeat older than 3 missed beats plus this margin (clock skew between hosts, a slow shared volume) is dead.
STALE_MARGIN_S = 30.0
# The owner stops when it could not refresh its record for this many beats: before another host may take the folder
# over (that needs the margin on top), so the two never write at once.
MISSED_BEATS = 3
# torchrun's --rdzv-id defaults to "none" (torch/distributed/run.py, the --rdzv-id argument); only --standalone and
# single-node static runs get a uuid there. "none" is shared by unrelated jobs, so it names no job.
NO_RUN_ID = "none"


def heartbeat_interval() -> float:
    value = os.environ.get(HEARTBEAT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_HEARTBEAT_S
    except ValueError:
        raise UserError(f"{HEARTBEAT_ENV}={value!r} is not a number of seconds; unset it or give e.g. 30") from None
    if not seconds > 0:
        raise UserError(f"{HEARTBEAT_ENV}={value!r} must be above 0 seconds; unset it or give e.g. 30")
    return seconds


def stale_after(heartbeat_s: float) -> float:
    """Seconds without a heartbeat after which an owner on another host is taken for dead."""
    return 3 * heartbeat_s + STALE_MARGIN_S


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def machine_identity() -> str:
    """What makes two pids comparable: same kernel boot and same pid namespace (two containers on one node share
    the boot but not the pids; a hostname alone can repeat across pods with host networking)."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}|{boot}|{pid_ns}"


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def job_identity() -> tuple[str, bool]:
    """(job id for the record, whether it identifies the job across restarts)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != NO_RUN_ID:
        return f"torchrun:{run_id}", True
    return os.environ.get("JOB_ID") or f"pid-{os.getpid()}", False


def _command_line() -> str:
    """The command as typed (`python -m edsr_dist` shows as edsr-dist)."""
    program = sys.argv[0] if sys.argv else ""
    if program.endswith(("__main__.py", "edsr-dist")):
        program = "edsr-dist"
    return shlex.join([program, *sys.argv[1:]])


@dataclass
class OwnerRecord:
    token: str  # unique per owner: what the launcher hands its workers
    job: str
    host: str
    machine: str
    pid: int
    pid_started: float | None
    started: float
    heartbeat: float
    heartbeat_s: float
    command: str
    restart_safe_job: bool = False  # `job` is the same on a restart of the same job (torchrun's run id)

    @classmethod
    def mine(cls, heartbeat_s: float) -> "OwnerRecord":
        now = time.time()
        job, restart_safe = job_identity()
        return cls(uuid.uuid4().hex, job, socket.gethostname(), machine_identity(), os.getpid(),
                   process_start_time(os.getpid()), now, now, heartbeat_s, _command_line(), restart_safe)

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=1) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, modified: float) -> "OwnerRecord":
        """A record, or a placeholder for one that cannot be read (cut short by a kill while being created):
        unknown host, its file time as the heartbeat, so it is taken over once that is stale."""
        try:
            fields = json.loads(data.decode())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in fields.items() if k in names})
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
            return cls("", "unknown", "unknown", "", 0, None, modified, modified, DEFAULT_HEARTBEAT_S, "")


class OwnerLock(Protocol):
    """Where a record lives. `version` identifies one content of the record (content hash, or the object's ETag)."""

    where: str

    def create(self, data: bytes) -> str | None:
        """Exclusive create: the new version, or None when a record exists."""

    def read(self) -> tuple[bytes, str, float] | None:
        """(content, version, modification time), or None when there is no record."""

    def take(self, data: bytes, version: str) -> str | None:
        """Replace the record of another owner if it is still `version`; the new version, or None (lost the race)."""

    def refresh(self, data: bytes, version: str) -> str | None:
        """The owner rewrites its own record (the heartbeat): the new version, or None when the record is no longer
        `version` (another job took it over)."""

    def remove(self, version: str) -> None:
        """Delete the record if it is still `version`."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# link(2): EPERM "the file system containing oldpath and newpath does not support the creation of hard links";
# ENOTSUP/EOPNOTSUPP/ENOSYS from FUSE file systems that have none.
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _write_new(path: Path, data: bytes) -> bool:
    """Create `path` exclusively holding `data`, fsynced; False when it exists. A failed write removes it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _publish(draft: Path, path: Path) -> bool:
    """Give `draft`'s content the name `path` unless `path` exists; True when it now does. A hard link (atomic, and
    the content is whole from the first moment), or where the file system has no hard links, an exclusive copy
    (which a signal at its open's return can leave empty)."""
    try:
        os.link(draft, path)
        return True
    except FileExistsError:
        # An NFS client may retransmit a LINK the server already did and get EEXIST for its own link: the draft's
        # link count says whether it is ours (the lock-file recipe in open(2)'s notes on O_EXCL).
        return os.stat(draft).st_nlink == 2
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    return _write_new(path, draft.read_bytes())


class LocalLock:
    """`<folder>/.owner.json` on a local disk or a shared volume."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / RECORD_NAME
        self.where = str(self.path)
        self._made: list[Path] = []  # folders the record's create made: removed with it when left empty

    def create(self, data: bytes) -> str | None:
        # The record is written whole under a draft name, then published as RECORD_NAME by a hard link, which fails
        # when a record exists (atomic on local file systems and NFS). A signal handler runs as soon as a system
        # call returns, before Python stores the result: a start stopped right after the link still finds its own
        # token in the record and removes it (remove_if_mine). An O_EXCL open of the record itself, stopped at the
        # open's return, left an empty record that named nobody and blocked the folder.
        missing = []
        folder = self.folder
        while not folder.exists() and folder.parent != folder:
            missing.append(folder)
            folder = folder.parent
        self._made = self._made or missing
        draft = self.path.with_name(f"{RECORD_NAME}.new-{uuid.uuid4().hex}")
        try:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                _write_new(draft, data)
                if not _publish(draft, self.path):
                    return None
            finally:
                draft.unlink(missing_ok=True)
        except BaseException as exc:
            self._remove_made_folders()  # only empty ones: a record linked just before a signal keeps its folder
            if isinstance(exc, OSError):
                raise UserError(f"cannot write the owner record {self.path} ({exc.strerror or exc}); free space "
                                "there, make it writable, or pass another --out; nothing was written") from None
            raise
        return _digest(data)

    def read(self) -> tuple[bytes, str, float] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, _digest(data), modified

    def take(self, data: bytes, version: str) -> str | None:
        # Move the dead owner's record to a name of our own: of two takers only one rename finds it. If what we moved
        # is no longer the record we judged (a live owner wrote it since), it goes back, unless a record exists
        # again; it goes back too when this is stopped before the judgement (a signal at the rename's return).
        moved = self.path.with_name(f"{RECORD_NAME}.taking-{uuid.uuid4().hex}")
        judged_dead = False
        try:
            try:
                os.rename(self.path, moved)
            except FileNotFoundError:
                return None
            judged_dead = _digest(moved.read_bytes()) == version
        finally:
            if not judged_dead and moved.exists():
                _publish(moved, self.path)  # unless a record exists again
            moved.unlink(missing_ok=True)
        if not judged_dead:
            return None
        return self.create(data)

    def refresh(self, data: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        atomic_write_bytes(self.path, data)  # a new file renamed over the record: never seen half-written
        return _digest(data)

    def remove(self, version: str) -> None:
        found = self.read()
        if found is not None and found[1] == version:
            self.path.unlink(missing_ok=True)
            self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in self._made:  # a run stopped before it wrote anything leaves no empty folder behind
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue  # stopped before the mkdir made it
            except OSError:
                break

    def move_to(self, folder: Path) -> None:
        """--overwrite moved the folder (with this record) aside: bring the record back into the new, empty one."""
        aside = folder / RECORD_NAME
        self.folder.mkdir(parents=True, exist_ok=True)
        if not _publish(aside, self.path):
            raise UserError(f"another job created {self.path} while --overwrite moved the previous run to "
                            f"{folder}; check which job writes to {self.folder}")
        aside.unlink()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def describe(record: OwnerRecord, now: float | None = None) -> str:
    """`job J on host H (pid P, started T, last seen S ago)`."""
    now = time.time() if now is None else now
    return (f"job {record.job} on host {record.host} (pid {record.pid}, started {_when(record.started)}, "
            f"last seen {_age(now - record.heartbeat)} ago)")


def owner_gone(record: OwnerRecord, now: float | None = None) -> str | None:
    """Why the record's owner is dead (its pid is gone on this machine, or its heartbeat is stale), or None."""
    now = time.time() if now is None else now
    if record.machine and record.machine == machine_identity():
        try:
            process = psutil.Process(record.pid)
            alive = process.status() != psutil.STATUS_ZOMBIE and (
                record.pid_started is None or abs(process.create_time() - record.pid_started) < 1.0)
        except psutil.Error:
            alive = False
        return None if alive else f"its pid {record.pid} is gone"
    silent = now - record.heartbeat
    if silent > stale_after(record.heartbeat_s):
        return (f"its heartbeat is {_age(silent)} old (more than {stale_after(record.heartbeat_s):.0f} s: "
                f"3 x {record.heartbeat_s:g} s + {STALE_MARGIN_S:g} s)")
    return None


def stop_this_process() -> None:
    """What the owner of a run does when its record is lost: ask itself to stop as a preemption would (SIGTERM: the
    trainer stops at the next step with a checkpoint, the launcher stops its workers, a start-up unwinds)."""
    os.kill(os.getpid(), signal.SIGTERM)


class Ownership:
    """This process's hold on a run folder: the record, its heartbeat thread, and the release at the end."""

    def __init__(self, lock: OwnerLock, record: OwnerRecord, version: str, note: str = ""):
        self.lock, self.record, self.version, self.note = lock, record, version, note
        self.lost_to: str | None = None  # set by the heartbeat when another job took the record over
        self.unreachable: str | None = None  # set by the heartbeat when the record could not be refreshed in time
        self.on_lost = None  # called (from the heartbeat thread) once the folder is no longer surely ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="owner-heartbeat", daemon=True)
        # A signal may unwind the caller before it stores this hold (between a return and an assignment): the
        # record still goes when the process exits.
        atexit.register(self.release)

    def start(self, on_lost=None) -> "Ownership":
        """Start the heartbeat (after the run-folder rule, which may move the folder with the record aside).
        `on_lost`: what to do when the record is taken over or cannot be refreshed for MISSED_BEATS beats."""
        self.on_lost = on_lost
        self._thread.start()
        return self

    @property
    def token(self) -> str:
        return self.record.token

    def _beat(self) -> None:
        """Refresh the record every beat. Any failure (a full disk, an endpoint away) is retried at the next beat
        with one warning; this thread never dies of it. After MISSED_BEATS beats without a refresh another host
        may soon take the folder over (stale_after), so the job stops then, in one line."""
        warned = False
        last_refresh = time.monotonic()
        while not self._stop.wait(self.record.heartbeat_s):
            self.record.heartbeat = time.time()
            try:
                version = self.lock.refresh(self.record.to_bytes(), self.version)
            except Exception as exc:  # noqa: BLE001 - botocore and aiohttp errors are not OSErrors
                silent = time.monotonic() - last_refresh
                reason = _one_line(exc)
                if silent >= MISSED_BEATS * self.record.heartbeat_s:
                    if self._stop.is_set():
                        return
                    self.unreachable = (f"the owner record {self.lock.where} could not be refreshed for "
                                        f"{silent:.0f} s ({reason}); another host may take the run over after "
                                        f"{stale_after(self.record.heartbeat_s):.0f} s, so this job stops now")
                    print(f"edsr-dist: error: {self.unreachable}", file=sys.stderr, flush=True)
                    self._lost()
                    return
                if not warned:
                    print(f"edsr-dist: warning: cannot refresh the owner record {self.lock.where} ({reason}); "
                          f"retrying every {self.record.heartbeat_s:g} s, stopping the job after "
                          f"{MISSED_BEATS * self.record.heartbeat_s:g} s without a refresh", file=sys.stderr,
                          flush=True)
                    warned = True
                continue
            last_refresh = time.monotonic()
            warned = False
            if version is None:
                try:
                    found = self.lock.read()
                except Exception:  # noqa: BLE001
                    found = None
                other = OwnerRecord.parse(found[0], found[2]) if found else None
                self.lost_to = describe(other) if other else "nobody (the record was deleted)"
                print(f"edsr-dist: warning: the owner record {self.lock.where} now names {self.lost_to}; this job "
                      "no longer owns the folder (taken over with --take-over?) and stops; check which job writes "
                      "there", file=sys.stderr, flush=True)
                self._lost()
                return
            self.version = version

    def _lost(self) -> None:
        if self.on_lost is not None and not self._stop.is_set():
            self.on_lost()

    @property
    def stopped_job(self) -> str | None:
        """Why the heartbeat stopped this job (the line it printed), or None."""
        return self.unreachable or (f"the owner record now names {self.lost_to}" if self.lost_to else None)

    def release(self) -> None:
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.lost_to is None:
            try:
                self.lock.remove(self.version)
            except Exception:  # noqa: BLE001 - an endpoint away: the record is taken over by the next run
                pass  # (pid gone on this machine, or a stale heartbeat elsewhere)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def claim(lock: OwnerLock, out: str, take_over: bool = False, record: OwnerRecord | None = None) -> Ownership:
    """Become the owner of `out` or raise the one-line refusal; prints a note when a dead owner is taken over.
    The record is read before it is created, so a live owner is refused even where the store ignores the exclusive
    create (an S3-compatible store without conditional writes). The heartbeat starts with `Ownership.start()`.
    `record`: the record to write (made here when None); a caller that passes it can clean up with
    `remove_if_mine` whatever happens between the write and its hold on the returned Ownership."""
    me = record or OwnerRecord.mine(heartbeat_interval())
    for _ in range(10):  # each round is one create or takeover raced by another job; a loss sends us round again
        found = lock.read()
        if found is None:
            version = lock.create(me.to_bytes())
            if version is not None:
                return Ownership(lock, me, version)
            found = lock.read()
            if found is None:
                continue  # released between our create and our read
        data, seen, modified = found
        other = OwnerRecord.parse(data, modified)
        if other.restart_safe_job and other.job == me.job:
            why, note = "", ""  # torchrun's restart of the job that owns it: the owner, quietly
        else:
            why = owner_gone(other) or ("--take-over" if take_over else None)
            if why is None:
                raise UserError(f"--out {out} is in use by {describe(other)}; wait for it to end, stop it, or use "
                                "another --out (--take-over if you know it is dead)")
            note = f"took over --out {out} from {describe(other)}: {why}"
        version = lock.take(me.to_bytes(), seen)
        if version is not None:
            if note:
                print(f"edsr-dist: {note}", file=sys.stderr, flush=True)
            return Ownership(lock, me, version, note)
    raise UserError(f"--out {out}: the owner record {lock.where} keeps changing under us; another job is starting "
                    "there at the same moment; start again, or use another --out")


def remove_if_mine(lock: OwnerLock, record: OwnerRecord) -> None:
    """Remove the owner record if it is still `record` (its token). For a start that failed or was stopped anywhere
    between writing the record and holding its Ownership: a signal handler raises at any call, including inside the
    write's return or the Ownership's construction, where no Ownership exists to release. Never raises."""
    try:
        found = lock.read()
        if found is not None and OwnerRecord.parse(found[0], found[2]).token == record.token:
            lock.remove(found[1])
    except Exception:  # noqa: BLE001 - a damaged record or an endpoint away: not ours to fix here
        pass


def check_launcher_owns(lock: OwnerLock, out: str, token: str) -> None:
    """A worker of a launcher (EDSR_DIST_OWNER set): its launcher must still hold the record."""
    found = lock.read()
    record = OwnerRecord.parse(found[0], found[2]) if found else None
    if record is None or record.token != token:
        holder = describe(record) if record else "nobody"
        raise UserError(f"--out {out} is no longer owned by this worker's launcher (the record names {holder}); "
                        "stop the other job or use another --out")


def read_owner(lock: OwnerLock) -> OwnerRecord | None:
    found = lock.read()
    return OwnerRecord.parse(found[0], found[2]) if found else None
