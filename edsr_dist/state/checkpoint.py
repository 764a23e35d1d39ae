"""Checkpoint files: atomic writes, a checksum in every file, retention, and finding the newest good one.

File layout (one file per save, `<out>/checkpoints/step_<step:08d>.ckpt`):

    EDSRCKPT1\\n
    <sha256 hex of the payload>\\n
    <payload length in bytes>\\n
    <payload: torch.save of the state dict>

Next to the step files: `latest` and `best` (one line each, a file name) and `index.json`
(write order, step and validation PSNR of every kept file). All of them are replaced atomically
(edsr_dist/state/atomic.py: temporary file in the same folder, fsync, rename, fsync of the folder), so a crash, a kill or a
full disk never leaves a half-written checkpoint where a resume would pick it up.

The payload is read with weights_only unpickling (`edsr_dist.state.safe_load`): tensors, containers, numbers and
strings only, so a crafted file is refused before anything in it runs, checksum or not.
Finding files by name and header (step files, pointers, the newest complete file) is in checkpoint_files.py,
which needs no torch.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from edsr_dist.errors import DiskFull, UserError
from edsr_dist.state.atomic import atomic_write_bytes
from edsr_dist.state.checkpoint_files import (
    _HEADER_MAX,
    _STEP_FILE,
    BEST,
    CHECKPOINT_DIR,
    INDEX,
    LATEST,
    MAGIC,
    _checkpoint_folder,
    _resume_candidates,
    _step_of,
    follow_pointer,
)
from edsr_dist.state.safe_load import load_tensors

_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")
_CHUNK = 1 << 22


# ---- writing ----------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp_files(folder: Path) -> None:
    """Temporary files of writers that were killed mid-write (SIGKILL, OOM killer, node loss)."""
    for entry in folder.iterdir():
        match = _TMP_FILE.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink()
            except OSError:
                pass


def _write_failure(folder: Path, exc: OSError) -> UserError:
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space there (or lower --keep-last) or pass another --out"
        what = "the disk is full"
    elif code == errno.EFBIG:
        fix = ("raise the file size limit (`ulimit -f unlimited`) or pass an --out on a filesystem "
               "that allows large files")
        what = "the file is larger than this process or filesystem allows"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or pass another --out"
        what = "the folder is not writable"
    else:
        fix = "check the folder and the disk, or pass another --out"
        what = os.strerror(code) if code else str(exc)
    kind = DiskFull if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else UserError
    return kind(f"cannot write a checkpoint in {folder}: {what} ({exc.strerror or exc}); "
                f"earlier checkpoints are intact; {fix}")


def _read_index(folder: Path) -> dict:
    try:
        data = json.loads((folder / INDEX).read_text())
        if isinstance(data, dict) and isinstance(data.get("checkpoints"), list):
            return data
    except (OSError, ValueError, RecursionError):  # a damaged or crafted index is rebuilt from the files
        pass
    return {"format": 1, "checkpoints": [], "best": None}


def save_checkpoint(out_dir: str | Path, state: dict, step: int, keep_last: int, psnr: float | None = None) -> Path:
    """Write `state` as `<out_dir>/checkpoints/step_<step>.ckpt`, update latest/best/index, prune old files.

    Keeps the `keep_last` most recently written step files plus the one with the best PSNR.
    A failed write removes its temporary file, keeps every earlier checkpoint and raises UserError.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    folder = Path(out_dir) / CHECKPOINT_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_failure(folder, exc) from None

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = b"%s\n%s\n%d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    name = f"step_{step:08d}.ckpt"
    path = folder / name

    try:
        _remove_stale_tmp_files(folder)
        free = shutil.disk_usage(folder).free
        if free < len(header) + len(payload) + (1 << 20):
            # Fail before writing anything rather than fill the disk the other ranks' logs also need.
            raise OSError(errno.ENOSPC, f"needs {len(payload) / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")
        atomic_write_bytes(path, header, payload)
        pruned = _record_in_index(folder, name, step, psnr, keep_last)
    except OSError as exc:
        raise _write_failure(folder, exc) from None

    # Pruning comes last: when anything above fails, nothing has been deleted yet.
    for old in pruned:
        try:
            (folder / old).unlink()
        except OSError:
            pass
    return path


def _record_in_index(folder: Path, name: str, step: int, psnr: float | None, keep_last: int) -> list[str]:
    """Add the step file `name` to the index and point latest (and best, by PSNR) at the right files; returns the
    step files to prune, oldest first (all but the `keep_last` newest, the new one and the best), deleting none."""
    index = _read_index(folder)
    entries = [e for e in index["checkpoints"] if e.get("file") != name and (folder / e.get("file", "")).is_file()]
    psnr_value = float(psnr) if psnr is not None and psnr == psnr else None  # nan counts as "not measured"
    entries.append({"file": name, "step": int(step), "psnr": psnr_value})
    best = max((e for e in entries if e.get("psnr") is not None), key=lambda e: e["psnr"], default=None)

    # Oldest first: files this index does not know (copied in, older versions) by step, then write order.
    known = {e["file"] for e in entries}
    unknown = sorted((p for p in folder.iterdir() if _STEP_FILE.match(p.name) and p.name not in known),
                     key=_step_of)
    order = [p.name for p in unknown] + [e["file"] for e in entries]
    keep = set(order[-keep_last:]) | {name}
    if best is not None:
        keep.add(best["file"])

    index = {"format": 1, "checkpoints": [e for e in entries if e["file"] in keep],
             "best": best["file"] if best else None}
    atomic_write_bytes(folder / INDEX, json.dumps(index, indent=1).encode() + b"\n")
    if best is not None:
        atomic_write_bytes(folder / BEST, best["file"].encode() + b"\n")
    atomic_write_bytes(folder / LATEST, name.encode() + b"\n")
    return [old for old in order if old not in keep]


# ---- reading ----------------------------------------------------------------------------------------------

def _read_verified(path: Path) -> bytes:
    """Check magic, length and checksum; return the payload. UserError names what is wrong."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.strerror}; check the path and its permissions") from None
    with f:
        head = f.read(_HEADER_MAX)
        lines = head.split(b"\n", 3)
        if lines[0] != MAGIC:
            raise UserError(f"{path} is not an edsr-dist checkpoint (no {MAGIC.decode()} header); "
                            "pass a .ckpt file written by `edsr-dist train` (pretrained .pt/.pth/.safetensors "
                            "weights go to `edsr-dist sr`, `edsr-dist eval` or `edsr-dist export`)")
        if len(lines) < 4 or not re.fullmatch(rb"[0-9a-f]{64}", lines[1]) or not lines[2].isdigit():
            raise UserError(f"checkpoint {path} has a damaged header; it is corrupt, use an earlier checkpoint")
        expected_hash, expected_len = lines[1].decode(), int(lines[2])
        digest = hashlib.sha256()
        first = lines[3]
        chunks = [first]
        got = len(first)
        digest.update(first)
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            got += len(chunk)
            digest.update(chunk)
            chunks.append(chunk)
    if got < expected_len:
        raise UserError(f"checkpoint {path} is truncated ({got} of {expected_len} payload bytes; cut off while "
                        "being written or copied); use an earlier checkpoint or copy it again")
    if got > expected_len or digest.hexdigest() != expected_hash:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch); use an earlier checkpoint or copy it again")
    return b"".join(chunks)


def verify_checkpoint(path: str | Path) -> None:
    """Raise UserError unless `path` is a complete edsr-dist checkpoint with a matching checksum whose
    contents load without running code (checked on the meta device: no tensor data is read)."""
    load_tensors(_read_verified(Path(path)), path, "checkpoint", map_location="meta")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Verify one checkpoint file and load it weights-only; a file that would need code to load is refused."""
    state = load_tensors(_read_verified(Path(path)), path, "checkpoint", map_location)
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a training state; "
                        "pass a checkpoint written by `edsr-dist train`")
    return state


def find_checkpoint(path_or_dir: str | Path) -> Path | None:
    """A file: itself. A run or checkpoints folder: the newest valid checkpoint, or None.

    `latest` is tried first, then the other step files from the highest step down; every corrupt, truncated
    or unsafe file (one that would run code when loaded) skipped on the way gets one warning line on stderr.
    """
    path = Path(path_or_dir)
    if path.is_file():
        return follow_pointer(path)
    if not path.is_dir():
        return None
    for candidate in _resume_candidates(_checkpoint_folder(path)):
        try:
            verify_checkpoint(candidate)
        except UserError as exc:
            print(f"edsr-dist: warning: skipping {candidate}: {exc}", file=sys.stderr)
            continue
        return candidate
    return None


