"""Where things live: object-store URLs (s3://, obs://, gs://, ...) told apart from local paths, the cache folder,
and the local folder a bucket run is staged in. Plain text rules only (no I/O, no project imports), so the
settings (config.py), the launcher and the trainer all decide the same way."""

from __future__ import annotations

import os
import re
from pathlib import Path

# `scheme://rest`; a Windows drive (C:\) or a bare path never matches. `file://` is a local path.
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")


def is_url(path: str) -> bool:
    """True for an object-store URL such as s3://bucket/key."""
    match = _URL.match(path or "")
    return bool(match) and match.group(1) != "file"


def split_url(url: str) -> tuple[str, str]:
    """("s3", "bucket/key") without a trailing slash."""
    match = _URL.match(url)
    if not match:
        raise ValueError(f"not a URL: {url!r}")
    return match.group(1), match.group(2).strip("/")


def join_url(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def cache_root(cache_dir: str = "") -> Path:
    """The cache folder: `cache_dir` if given, else $EDSR_DIST_CACHE, else $XDG_CACHE_HOME/edsr-dist, else
    ~/.cache/edsr-dist (the rule the sample store has always used)."""
    root = cache_dir or os.environ.get("EDSR_DIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "edsr-dist")
    return Path(root).expanduser()


def _safe_parts(url: str) -> list[str]:
    scheme, rest = split_url(url)
    # Keys may hold characters no file system likes; a part that is empty, '.' or '..' cannot climb out.
    parts = [re.sub(r"[^A-Za-z0-9._=+-]", "_", p) for p in rest.split("/") if p]
    return [scheme] + [p if p not in (".", "..") else "_" for p in parts]


def cached_object_path(url: str, cache_dir: str = "") -> Path:
    """The one local copy of an object: <cache>/objects/<scheme>/<bucket>/<key>."""
    return cache_root(cache_dir).joinpath("objects", *_safe_parts(url))


def staging_folder(out: str, cache_dir: str = "") -> Path:
    """The local run folder of `--out`: the path itself, or for a bucket <cache>/runs/<scheme>/<bucket>/<prefix>
    (stable, so a restart on the same server continues from the staged files). The one place this is decided."""
    if not is_url(out):
        return Path(out)
    return cache_root(cache_dir).joinpath("runs", *_safe_parts(out))
