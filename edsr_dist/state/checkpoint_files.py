"""Checkpoint files by name and header: the step files of a run folder, the `latest`/`best` pointers, and the
newest complete file, without reading a payload. No torch here: the launcher uses these before any worker exists
(and `edsr-dist runs`), and must start without importing torch (state/checkpoint.py holds the payloads; its
docstring describes the file layout).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from edsr_dist.errors import UserError

MAGIC = b"EDSRCKPT1"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
INDEX = "index.json"
_STEP_FILE = re.compile(r"^step_(\d+)\.ckpt$")
_HEADER_MAX = 128  # bytes; the three header lines are far shorter


def _step_of(path: Path) -> int:
    match = _STEP_FILE.match(path.name)
    return int(match.group(1)) if match else -1


def is_checkpoint_file(path: str | Path) -> bool:
    """True when the file starts with the checkpoint header (says nothing about its integrity)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC) + 1) == MAGIC + b"\n"
    except OSError:
        return False


def _checkpoint_folder(path: Path) -> Path:
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def list_checkpoints(path_or_dir: str | Path) -> list[Path]:
    """All step files of a run folder (or its checkpoints folder), oldest step first."""
    path = Path(path_or_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    folder = _checkpoint_folder(path)
    return sorted((p for p in folder.iterdir() if _STEP_FILE.match(p.name) and p.is_file()), key=_step_of)


def follow_pointer(pointer: Path) -> Path:
    """checkpoints/latest and checkpoints/best hold the name of a step file next to them; other paths pass through."""
    if pointer.name not in (LATEST, BEST) or not pointer.is_file() or is_checkpoint_file(pointer):
        return pointer
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {pointer} ({exc}); pass a step_*.ckpt file or the run folder") from None
    target = pointer.parent / name
    # A bare file name only: a copied-in pointer must not lead a resume to files outside this folder.
    if Path(name).name != name or not target.is_file():
        raise UserError(f"{pointer} names {name!r}, which is not a file in {pointer.parent}; "
                        "pass a step_*.ckpt file or the run folder")
    return target


def _resume_candidates(folder: Path) -> list[Path]:
    """Step files in the order a resume tries them: the one `latest` names, then the others from the highest step."""
    candidates = list(reversed(list_checkpoints(folder)))
    try:
        latest = follow_pointer(folder / LATEST) if (folder / LATEST).is_file() else None
    except UserError:
        latest = None
    if latest is not None:
        candidates = [latest] + [c for c in candidates if c.name != latest.name]
    return candidates


def _complete_on_disk(path: Path) -> bool:
    """Header intact and the file as long as it says: what a kill mid-copy would break (no payload is read)."""
    try:
        with open(path, "rb") as f:
            lines = f.read(_HEADER_MAX).split(b"\n", 3)
        size = path.stat().st_size
    except OSError:
        return False
    if len(lines) < 4 or lines[0] != MAGIC or not lines[2].isdigit():
        return False
    return size == sum(len(line) + 1 for line in lines[:3]) + int(lines[2])


def newest_checkpoint_quick(path_or_dir: str | Path) -> tuple[Path, int] | None:
    """(file, step) `--resume auto` will most likely continue from, judged by names and headers alone, without
    reading payloads (the launcher says it before each restart; the worker's own choice verifies checksums)."""
    path = Path(path_or_dir)
    if not path.is_dir():
        return None
    for candidate in _resume_candidates(_checkpoint_folder(path)):
        if _complete_on_disk(candidate):
            return candidate, _step_of(candidate)
    return None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (a checkpoint, an exported model), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
