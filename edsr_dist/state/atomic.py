"""Atomic file replacement, the one way every output file of the project is written.

The new content goes to a temporary file in the target's folder (same file system, so the rename is atomic),
is flushed to disk, and is renamed over the target; the folder is then synced so the rename itself survives a
power cut. A crash, a kill or a full disk leaves either the old file or the new one, never half of either, and
no temporary file behind (except after SIGKILL: `.<name>.tmp-<pid>`, which checkpoint.py clears for dead pids).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from edsr_dist.errors import UserError


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write (by any means: open, h5py, PIL, torch.save); when the block ends
    without an error it replaces `path`. On an error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def make_parent_folder(path: str | os.PathLike) -> None:
    """Create the folder an output file goes into; a one-line error when that is impossible."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {parent} ({exc.strerror}); pass another --out") from None


def atomic_write_bytes(path: str | os.PathLike, *parts: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in parts:
            f.write(part)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync(path: Path) -> None:
    # A folder cannot be opened on every platform/file system; the rename is still atomic there, only less durable.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
