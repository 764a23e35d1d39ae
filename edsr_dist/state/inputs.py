"""Inputs that may be URLs (`--data`, `--init-from`, `--resume`, `--val-benchmark`, `eval --data`,
`sr --checkpoint`): a local path passes through, a URL is fetched into the cache (remote.fetch_file) and checked
with the checks its kind has anyway: a store's CRCs (the caller hands in `verify_store`: the store format belongs
to data/, above this package), a checkpoint's SHA-256 and weights-only load."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edsr_dist.locations import is_url
from edsr_dist.state.checkpoint import verify_checkpoint
from edsr_dist.state.checkpoint_files import is_checkpoint_file
from edsr_dist.state.remote import fetch_file, fetch_folder

STORE, WEIGHTS, FOLDER = "store", "weights", "folder"


def _verify_weights(path: Path) -> None:
    # An edsr-dist checkpoint carries a checksum; other weight files (.pt, .safetensors) only size and ETag.
    if is_checkpoint_file(path):
        verify_checkpoint(path)


def local_input(path: str, kind: str, cache_dir: str = "", endpoint_url: str = "",
                verify_store: Callable[[Path], object] | None = None) -> str:
    """`path` itself, or the verified local copy of the object (or prefix, for FOLDER) it names; a STORE needs
    `verify_store` (data/store.verify_store)."""
    if not path or not is_url(path):
        return path
    if kind == FOLDER:
        return str(fetch_folder(path, cache_dir, endpoint_url, what="benchmark file"))
    if kind == STORE and verify_store is None:
        raise ValueError("local_input of a store needs verify_store")
    verify = {STORE: verify_store, WEIGHTS: _verify_weights}[kind]
    return str(fetch_file(path, cache_dir, endpoint_url, verify=verify, what="patch store" if kind == STORE else "weights"))
