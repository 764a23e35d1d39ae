"""`edsr-dist runs status FOLDER`: who writes into a run folder (its owner record and heartbeat age) and how far
the run got (its newest checkpoint). Reads only; never takes, refreshes or removes a record."""

from __future__ import annotations

import time
from pathlib import Path

from edsr_dist.errors import CommandParser, UserError
from edsr_dist.state.checkpoint_files import newest_checkpoint_quick
from edsr_dist.state.owner import LocalLock, describe, owner_gone, read_owner, stale_after
from edsr_dist.state.run_folder import previous_run


def status_lines(folder: Path) -> list[str]:
    owner = read_owner(LocalLock(folder)) if folder.is_dir() else None
    found = previous_run(folder) if folder.is_dir() else None
    if owner is None and found is None:
        raise UserError(f"{folder} is not a run folder (no owner record, checkpoints or metrics.jsonl); "
                        "pass the --out of a run")
    lines = [f"run folder {folder}"]
    if owner is None:
        lines.append("owner: none (no job is writing here)")
    else:
        dead = owner_gone(owner)
        state = (f"dead ({dead}): the next run into this folder takes it over" if dead else
                 f"alive (heartbeat every {owner.heartbeat_s:g} s; taken for dead on another host after "
                 f"{stale_after(owner.heartbeat_s):.0f} s without one)")
        lines.append(f"owner: {describe(owner, time.time())}; {state}")
        lines.append(f"command: {owner.command}")
    newest = newest_checkpoint_quick(folder) if folder.is_dir() else None
    lines.append(f"newest checkpoint: step {newest[1]} ({newest[0]})" if newest else "newest checkpoint: none")
    return lines


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="edsr-dist runs", description="Look at run folders.")
    sub = parser.add_subparsers(dest="action", metavar="status")
    status = sub.add_parser("status", help="the owner of a run folder, its heartbeat age and the newest checkpoint")
    status.add_argument("folder", help="a run folder (the --out of a run)")
    args = parser.parse_args(argv)
    if args.action != "status":
        raise UserError("choose an action: `edsr-dist runs status FOLDER`")
    if "://" in args.folder:
        raise UserError(f"runs status reads a run folder on a local disk or a shared volume, not {args.folder}; "
                        "pass the local folder the bucket run is staged in")
    print("\n".join(status_lines(Path(args.folder))))
    return 0
