"""A run whose --out is a bucket: staged in a local folder (locations.staging_folder) and mirrored to the bucket by
rank 0's upload thread; pulled back from the bucket by `--resume auto` on a server whose staging folder is empty.

Order of uploads, so the bucket never names a checkpoint it does not hold: the step file first (hard-linked when it
was saved, so local pruning cannot take it away before it is sent), then index.json, `best` and `latest` as they
were right after that save, then metrics.jsonl and tracker.json (tracking/channel.py); old step files pruned locally
are deleted from the bucket last. Each object is one PUT (or a multipart upload that becomes visible only when
complete), so a reader sees either the old object or the new one. A failed upload is retried with back-off on the
upload thread and reported in one line; training never waits for it. `close()` sends everything still missing (the
final checkpoint, samples, the Result record) before the process exits.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edsr_dist.errors import UserError
from edsr_dist.locations import join_url
from edsr_dist.state.atomic import atomic_path, make_parent_folder
from edsr_dist.state.checkpoint import verify_checkpoint
from edsr_dist.state.checkpoint_files import BEST, CHECKPOINT_DIR, INDEX, LATEST, list_checkpoints
from edsr_dist.state.claim import remote_step_files
from edsr_dist.state.remote import describe_failure, filesystem
from edsr_dist.state.run_folder import METRICS, TRACKER_FILE

# Back-off between tries of one upload (seconds); after the last one the upload is given up and reported.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
RETRY_ENV = "EDSR_DIST_UPLOAD_RETRY_S"  # other back-off delays, comma-separated seconds (tests use short ones)
PENDING = ".upload"  # hard links of step files waiting for their upload, inside the staging folder
POINTERS = (INDEX, BEST, LATEST)


@dataclass
class _Batch:
    """What one checkpoint save sends: the step file, then the pointers as they were after it, then the log."""
    step_file: Path | None = None
    name: str = ""
    small: list[tuple[str, bytes]] = field(default_factory=list)  # (key relative to the run, content)
    local_steps: set[str] = field(default_factory=set)  # step files kept locally after that save


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _download(fs, remote: str, target: Path) -> bool:
    """One object to `target`, atomically; False when it does not exist."""
    make_parent_folder(target)
    try:
        with atomic_path(target) as tmp:
            fs.get_file(remote, str(tmp))
    except FileNotFoundError:
        return False
    return True


def pull_run(url: str, local: Path, endpoint_url: str = "") -> set[str]:
    """Fill an empty staging folder from the bucket for `--resume auto`: metrics.jsonl, tracker.json (so the tracker
    runs continue), the pointers, and step files in the order a resume tries them (`latest` first, then from the
    highest step) until one passes the same checks as a local file (checksum, weights-only); `best` too. Returns the
    step files pulled."""
    fs, root = filesystem(url, endpoint_url)
    try:
        steps = remote_step_files(fs, root)
        if not steps:
            return set()
        folder = local / CHECKPOINT_DIR
        for name in (METRICS, TRACKER_FILE):
            _download(fs, f"{root}/{name}", local / name)
        for name in POINTERS:
            _download(fs, f"{root}/{CHECKPOINT_DIR}/{name}", folder / name)
        latest, best = (((_read(folder / name) or b"").decode(errors="replace").strip()) for name in (LATEST, BEST))
        order = ([latest] if latest in steps else []) + [s for s in steps if s != latest]
        pulled: set[str] = set()
        for name in order + ([best] if best in steps else []):
            if name in pulled:
                continue
            if pulled and name != best:
                continue  # one good step file to continue from; after it only `best`
            target = folder / name
            start = time.perf_counter()
            _download(fs, f"{root}/{CHECKPOINT_DIR}/{name}", target)
            try:
                verify_checkpoint(target)
            except UserError as exc:
                print(f"edsr-dist: warning: skipping {join_url(url, CHECKPOINT_DIR, name)}: {exc}", file=sys.stderr,
                      flush=True)
                target.unlink(missing_ok=True)
                continue
            size = target.stat().st_size
            print(f"pulled {join_url(url, CHECKPOINT_DIR, name)} ({size / 1e6:.1f} MB in "
                  f"{time.perf_counter() - start:.1f} s) into {folder}", flush=True)
            pulled.add(name)
        if not pulled:  # as check_nothing_to_resume for a local folder: never start over on top of a run
            raise UserError(f"--resume auto: no checkpoint in {join_url(url, CHECKPOINT_DIR)} can be used (see the "
                            "warnings above); copy a good one there, or start a new run with another --out prefix")
        return pulled
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--resume auto: cannot read the run in {url}: {describe_failure(exc)}; check the endpoint "
                        "and the credentials, then run again") from None


def retry_delays_from_env() -> tuple[float, ...]:
    value = os.environ.get(RETRY_ENV, "")
    if not value:
        return RETRY_DELAYS_S
    try:
        delays = tuple(float(part) for part in value.split(","))
    except ValueError:
        delays = ()
    if not delays or not all(0 <= d < float("inf") for d in delays):
        raise UserError(f"{RETRY_ENV}={value!r} is not a list of seconds; unset it or give e.g. 1,2,4")
    return delays


class RunMirror:
    """Rank 0's upload thread for a bucket --out."""

    def __init__(self, url: str, local: Path, endpoint_url: str = "", known: set[str] | None = None,
                 retry_delays: tuple[float, ...] | None = None):
        self.url, self.local = url, local
        self.fs, self.root = filesystem(url, endpoint_url)
        self.retry_delays = retry_delays_from_env() if retry_delays is None else retry_delays
        self._gave_up = False  # an upload was given up: the store is away, later ones try once until one succeeds
        # Step files that are (or will be) in the bucket because of this run: pulled, or staged here already.
        self.remote_steps: set[str] = set(known or ()) | {p.name for p in list_checkpoints(local / CHECKPOINT_DIR)}
        self.failures: list[str] = []  # uploads given up on, for the final report
        self.upload_seconds = 0.0
        self.uploaded_bytes = 0
        shutil.rmtree(local / PENDING, ignore_errors=True)  # links a killed run left; the final sync covers them
        self._saves = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="edsr-dist-upload", daemon=True)
        self._thread.start()

    # ---- the training thread's side: cheap snapshots only -----------------------------------------------

    def checkpoint_saved(self, step_file: Path) -> None:
        """Called right after save_checkpoint returned: queue the step file and the pointers as they are now."""
        self._saves += 1  # one link per save: a step saved twice (step and epoch cadence) is queued twice
        pending = self.local / PENDING / f"{self._saves}-{step_file.name}"
        make_parent_folder(pending)
        try:
            os.link(step_file, pending)  # same inode: pruning the step file later does not remove the data
        except OSError:
            shutil.copyfile(step_file, pending)  # a file system without hard links
        folder = step_file.parent
        small = [(f"{CHECKPOINT_DIR}/{name}", data) for name in POINTERS if (data := _read(folder / name)) is not None]
        for name in (METRICS, TRACKER_FILE):  # the records, and which tracker runs they continue
            data = _read(self.local / name)
            if data is not None:
                small.append((name, data))
        self._queue.put(_Batch(pending, step_file.name, small, {p.name for p in list_checkpoints(folder)}))

    def close(self) -> str | None:
        """Send what is still missing (final checkpoint, pointers, metrics, samples), wait for the thread, and
        return one line about uploads given up on (None when the bucket holds the whole run)."""
        self._queue.put("sync")
        self._queue.put(None)
        self._thread.join()
        if not self.failures:
            return None
        shown = ", ".join(self.failures[:3]) + (f" and {len(self.failures) - 3} more" if len(self.failures) > 3 else "")
        return (f"could not upload {shown} to {self.url}; the complete run is in {self.local}: copy it to the "
                f"bucket, or run the same command again (--resume auto uploads what is missing)")

    # ---- the upload thread --------------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if item == "sync":
                    self._sync()
                else:
                    self._send_batch(item)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything and keep draining
                self.failures.append(f"({describe_failure(exc)})")
                print(f"edsr-dist: warning: upload to {self.url} failed: {describe_failure(exc)}", file=sys.stderr,
                      flush=True)

    def _put(self, key: str, source: Path | bytes) -> bool:
        """One object, retried with back-off; True once it is in the bucket."""
        remote = f"{self.root}/{key}"
        first_error = None
        tries = 1 if self._gave_up else len(self.retry_delays) + 1
        for attempt in range(tries):
            try:
                start = time.perf_counter()
                if isinstance(source, bytes):
                    self.fs.pipe_file(remote, source)
                    size = len(source)
                else:
                    self.fs.put_file(str(source), remote)
                    size = source.stat().st_size
                self.upload_seconds += time.perf_counter() - start
                self.uploaded_bytes += size
                self._gave_up = False
                if first_error is not None:
                    print(f"edsr-dist: upload of {key} to {self.url} succeeded on try {attempt + 1}", file=sys.stderr,
                          flush=True)
                return True
            except FileNotFoundError as exc:
                if not isinstance(source, bytes) and not source.exists():
                    first_error = first_error or "the local file is gone"
                    break
                first_error = first_error or describe_failure(exc)
            except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors: retried like the others
                first_error = first_error or describe_failure(exc)
            if attempt == tries - 1:
                break
            if attempt == 0:
                print(f"edsr-dist: warning: upload of {key} to {self.url} failed ({first_error}); retrying in the "
                      f"background (up to {len(self.retry_delays)} more tries), training goes on", file=sys.stderr,
                      flush=True)
            time.sleep(self.retry_delays[attempt])
        self.failures.append(key)
        if not self._gave_up:  # one line per outage: the uploads after it try once each, quietly
            print(f"edsr-dist: warning: gave up uploading {key} to {self.url} ({first_error}); the next "
                  "checkpoint's upload, or the final one, sends it again", file=sys.stderr, flush=True)
        self._gave_up = True
        return False

    def _send_batch(self, batch: _Batch) -> None:
        sent = self._put(f"{CHECKPOINT_DIR}/{batch.name}", batch.step_file)
        batch.step_file.unlink(missing_ok=True)
        if not sent:
            return  # its pointers would name a file the bucket does not hold
        self.remote_steps.add(batch.name)
        for key, data in batch.small:
            if not self._put(key, data) and key.startswith(CHECKPOINT_DIR):
                return  # keep the older pointers; never delete what they might still name
        self._prune(batch.local_steps)

    def _prune(self, local_steps: set[str]) -> None:
        """Delete from the bucket the step files the staging folder no longer keeps, by what the bucket holds: a run
        resumed on a fresh server pulled only the files it resumes from, and the older ones the bucket still holds
        are named by no pointer once the new index.json is up."""
        try:
            held = set(remote_step_files(self.fs, self.root))
        except Exception:  # noqa: BLE001 - the store is away: what this run knows it sent
            held = set(self.remote_steps)
        for name in sorted(held - local_steps):
            try:
                self.fs.rm_file(f"{self.root}/{CHECKPOINT_DIR}/{name}")
                self.remote_steps.discard(name)
            except Exception as exc:  # noqa: BLE001 - a leftover old checkpoint costs space, nothing else
                print(f"edsr-dist: warning: could not delete the pruned {name} from {self.url} "
                      f"({describe_failure(exc)})", file=sys.stderr, flush=True)

    def _sync(self) -> None:
        """Everything of the staging folder the bucket lacks, step files first and pointers after them."""
        try:
            remote = {p[len(self.root):].lstrip("/"): int(info.get("size", -1))
                      for p, info in self.fs.find(self.root, detail=True).items()}
        except FileNotFoundError:
            remote = {}
        folder = self.local / CHECKPOINT_DIR
        steps = list_checkpoints(folder) if folder.is_dir() else []
        for path in steps:
            key = f"{CHECKPOINT_DIR}/{path.name}"
            if remote.get(key) != path.stat().st_size and not self._put(key, path):
                return  # pointers after a missing step file could name it
            self.remote_steps.add(path.name)
        for name in POINTERS:
            data = _read(folder / name)
            if data is not None and not self._put(f"{CHECKPOINT_DIR}/{name}", data):
                return
        rest = [p for p in sorted(self.local.rglob("*")) if p.is_file()
                and p.relative_to(self.local).parts[0] not in (CHECKPOINT_DIR, PENDING)]
        for path in rest:
            key = path.relative_to(self.local).as_posix()
            if key in (METRICS, TRACKER_FILE) or remote.get(key) != path.stat().st_size:
                self._put(key, path)
        self._prune({p.name for p in steps})
