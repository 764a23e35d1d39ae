"""The verified ONNX export of a checkpoint, made once and kept in the cache folder: `sr` and `eval` run the
model in ONNX Runtime by default on the CPU, where it is the faster backend (BENCHMARKS.md "bench-sr").

An entry is keyed by the SHA-256 of the weights file (a run folder's newest valid checkpoint), with --raw-weights
and --res-scale, which change the network: <cache>/onnx/<key>.onnx, and <key>.json beside it, written after the
export passed `onnx_export.export_onnx`'s check against PyTorch, recording the .onnx file's own SHA-256. An entry is
used only when its record is there and the .onnx file still hashes to it; anything else (a missing, truncated or
altered file, a record of another format) is exported and checked again, never used. The export runs under the
entry's flock (`state/remote.server_lock`, the lock the bucket inputs' cache uses), so two processes export once:
the second waits, then finds the entry made.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edsr_dist.errors import UserError
from edsr_dist.inference.onnx_export import export_onnx, verification_image
from edsr_dist.inference.torch_runtime import load_inference_model
from edsr_dist.locations import cache_root
from edsr_dist.state.atomic import atomic_path
from edsr_dist.state.checkpoint import find_checkpoint
from edsr_dist.state.checkpoint_files import file_sha256, follow_pointer, is_checkpoint_file
from edsr_dist.state.remote import server_lock

RECORD_FORMAT = 1


class ExportUnavailable(Exception):
    """No verified export could be made or cached (its check failed, the cache folder is not writable); the
    message says why. The caller runs PyTorch instead."""


@dataclass
class CachedExport:
    path: Path  # the verified .onnx file
    source: Path  # the weights file it was exported from
    exported_seconds: float | None  # None: found in the cache


def weights_file(checkpoint: str | Path) -> Path:
    """The file a --checkpoint's weights are read from: a run folder's newest valid checkpoint, a pointer's target,
    or the file itself (as `torch_runtime.load_inference_model` resolves it)."""
    path = follow_pointer(Path(checkpoint))
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist; pass a .ckpt file, a run folder or a weights file")
    if path.is_dir() or is_checkpoint_file(path):
        found = find_checkpoint(path)
        if found is None:
            raise UserError(f"no valid checkpoint in {path}; pass a .ckpt file or a run folder that has checkpoints/")
        return found
    return path


def entry_paths(source_sha256: str, raw: bool, res_scale: float | None, cache_dir: str = "") -> tuple[Path, Path]:
    """(<key>.onnx, <key>.json) in <cache>/onnx/."""
    key = source_sha256 + ("-raw" if raw else "") + (f"-res{res_scale:g}" if res_scale is not None else "")
    folder = cache_root(cache_dir) / "onnx"
    return folder / f"{key}.onnx", folder / f"{key}.json"


def _usable(onnx_path: Path, record_path: Path, source_sha256: str) -> bool:
    try:
        record = json.loads(record_path.read_text())
        return (record.get("format") == RECORD_FORMAT and record.get("source_sha256") == source_sha256
                and onnx_path.is_file() and file_sha256(onnx_path) == record.get("onnx_sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def cached_onnx(checkpoint: str | Path, cache_dir: str = "", res_scale: float | None = None,
                raw: bool = False) -> CachedExport:
    """The verified .onnx file of `checkpoint`, exported (and checked against PyTorch) on first use.

    A checkpoint that cannot be loaded is the UserError loading it gives; `ExportUnavailable` when the export fails
    its check or the cache cannot be written (nothing is cached then)."""
    source = weights_file(checkpoint)
    source_sha256 = file_sha256(source)
    onnx_path, record_path = entry_paths(source_sha256, raw, res_scale, cache_dir)
    try:
        with server_lock(onnx_path.with_suffix(".lock"), f"the ONNX export of {source}"):
            if _usable(onnx_path, record_path, source_sha256):
                return CachedExport(onnx_path, source, None)
            start = time.perf_counter()
            record_path.unlink(missing_ok=True)  # the record goes first: no moment where it vouches for a new file
            model = load_inference_model(str(source), res_scale=res_scale, raw=raw)
            image, image_name = verification_image(None)
            try:
                checks = export_onnx(model, onnx_path, image)
            except UserError as exc:  # the check failed, or the file could not be written
                raise ExportUnavailable(str(exc)) from None
            record = {"format": RECORD_FORMAT, "source": str(source), "source_sha256": source_sha256,
                      "raw_weights": raw, "res_scale": res_scale, "onnx_sha256": file_sha256(onnx_path),
                      "verified_on": image_name, "within_one_grey_level": min(c.within_one for c in checks),
                      "max_grey_levels": max(c.max_grey_levels for c in checks)}
            with atomic_path(record_path) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")
            return CachedExport(onnx_path, source, time.perf_counter() - start)
    except OSError as exc:
        raise ExportUnavailable(f"cannot write the cache folder {onnx_path.parent}: {exc.strerror or exc}") from None
