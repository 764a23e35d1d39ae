"""One run per output folder: a new run never mixes its checkpoints and records with an earlier run's.

A folder holds a run once it has checkpoints or `metrics.jsonl` (the launcher's `logs/` alone do not count: they
are written for the run about to start). Continuing it takes `--resume auto` (or a checkpoint inside it); starting
over in it takes `--overwrite`, which renames the old run to a sibling folder and deletes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from edsr_dist.errors import UserError
from edsr_dist.state.checkpoint_files import CHECKPOINT_DIR, list_checkpoints
from edsr_dist.state.owner import (
    OWNER_ENV,
    LocalLock,
    OwnerLock,
    OwnerRecord,
    Ownership,
    check_launcher_owns,
    claim,
    heartbeat_interval,
    remove_if_mine,
    stop_this_process,
)

METRICS = "metrics.jsonl"
TRACKER_FILE = "tracker.json"  # the experiment tracker runs this run continues (tracking/channel.py)


def _step_files(out: Path) -> list[Path]:
    return list_checkpoints(out / CHECKPOINT_DIR) if (out / CHECKPOINT_DIR).is_dir() else []


def previous_run(out: Path) -> str | None:
    """What an earlier run left in `out` ("3 checkpoints up to step_00001500.ckpt, metrics.jsonl"), or None."""
    parts = []
    steps = _step_files(out)
    if steps:
        parts.append(f"{len(steps)} checkpoint{'s' if len(steps) > 1 else ''} up to {steps[-1].name}")
    if (out / METRICS).is_file():
        parts.append(METRICS)
    return ", ".join(parts) or None


def _aside_name(out: Path) -> Path:
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}.old-{n}")


def _continues(out: Path, resume: str) -> bool:
    if resume == "auto":
        return True
    return bool(resume) and Path(resume).resolve().is_relative_to(out.resolve())


def claim_run_folder(out: str | Path, resume: str, overwrite: bool) -> Path | None:
    """Apply the rule before anything is written into `out`; returns where an old run was moved, if one was.

    Called by rank 0 of `edsr-dist train` and, before that, by the launcher before it opens its logs in `out`
    (the worker then finds only those logs there).
    """
    out = Path(out)
    found = previous_run(out) if out.is_dir() else None
    if found is None:
        return None
    if _continues(out, resume):
        if overwrite:
            raise UserError(f"--overwrite starts a new run in {out}, --resume {resume} continues the one there; "
                            "pass only one of them")
        return None
    aside = _aside_name(out)
    if not overwrite:
        raise UserError(f"--out {out} already holds a run ({found}); continue it with --resume auto, or start a "
                        f"new run with another --out (--overwrite moves the old run to {aside})")
    try:
        os.rename(out, aside)
    except OSError as exc:
        raise UserError(f"cannot move the previous run in {out} to {aside} ({exc.strerror or exc}); "
                        "move it yourself or pass another --out") from None
    print(f"edsr-dist: moved the previous run in {out} to {aside} (--overwrite); nothing was deleted",
          file=sys.stderr, flush=True)
    return aside


def hold_run_folder(out: str | Path, resume: str, overwrite: bool, take_over: bool,
                    lock: OwnerLock | None = None, shown: str = "") -> Ownership | None:
    """Become the folder's one writer (state/owner.py), then apply the one-run rule; both before anything else is
    written. Returns the hold to release at the end, or None for a worker whose launcher holds it (EDSR_DIST_OWNER).
    `lock`: where the record lives when not in `out` itself (a bucket run: state/bucket_lock.BucketLock); `shown`:
    the --out the user gave, for messages (a bucket run's URL rather than its staging folder)."""
    local = LocalLock(out)
    lock = lock or local
    token = os.environ.get(OWNER_ENV, "")
    if token:
        check_launcher_owns(lock, shown or str(out), token)
        claim_run_folder(out, resume, overwrite)
        return None
    me = OwnerRecord.mine(heartbeat_interval())
    owner = None
    try:
        owner = claim(lock, shown or str(out), take_over, record=me)
        aside = claim_run_folder(out, resume, overwrite)
        if aside is not None and lock is local:
            local.move_to(aside)
        return owner.start(on_lost=stop_this_process)
    except BaseException:
        # Whether or not claim returned: SIGTERM (cli.Terminated) may land anywhere from the record's write on,
        # including inside the heartbeat thread's start (the main thread waits there, where handlers run).
        if owner is not None:
            owner.release()  # stops the heartbeat if it started, removes the record
        else:
            remove_if_mine(lock, me)
        raise


def check_nothing_to_resume(out: str | Path) -> None:
    """`--resume auto` found no usable checkpoint: fine for a first run, an error when every one was refused."""
    out = Path(out)
    if _step_files(out):
        raise UserError(f"--resume auto: no checkpoint in {out / CHECKPOINT_DIR} can be used (see the warnings "
                        "above); copy a good one there, or start again with --overwrite (the old run is moved "
                        "aside) or another --out")


def recorded_result(out: str | Path, step: int) -> dict | None:
    """The `result` record a finished run wrote into metrics.jsonl at `step`, or None."""
    try:
        lines = (Path(out) / METRICS).read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):  # a line cut short by a kill
            continue
        if isinstance(entry, dict) and entry.get("type") == "result" and entry.get("step") == step:
            return entry
    return None


def check_output_folder(out: Path) -> None:
    """Fail early if `out` cannot be (or become) a writable folder, without leaving anything behind: the folder
    is created with the first file written into it, so a run stopped by bad input writes nothing."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # nearest existing ancestor (Path.exists is False below a regular file)
    if not existing.is_dir():
        raise UserError(f"output folder {out} cannot be created: {existing} is a file, not a folder; "
                        "pass --out to a writable folder")
    try:
        # A real write, not os.access: as root, access() says yes where the file system still says no.
        tempfile.TemporaryDirectory(dir=existing, prefix=".edsr-write-test-").cleanup()
    except OSError as exc:
        raise UserError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                        "pass --out to a writable folder") from None
