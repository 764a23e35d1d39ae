"""Object storage (S3, OBS and other fsspec protocols): the filesystem of a URL, and objects fetched once per server
into the local cache.

A fetched object lands at `<cache>/objects/<scheme>/<bucket>/<key>` (locations.cached_object_path) only after it is
complete and verified: it is streamed to `.<name>.part-<pid>` next to it, checked against the object's size, its
ETag (when the ETag is the MD5 of the content, i.e. a single-PUT object) and the caller's own check (the store's CRCs,
the checkpoint's SHA-256), then renamed into place; `<name>.source.json` records which object version it is, so
later runs and restarts reuse it after one HEAD request. One process per cache folder downloads while the others
wait on `<name>.lock` (flock): the ranks of a server, and two launchers sharing a cache, fetch it once.

fsspec and s3fs are the optional extra `.[s3]`, imported only here and only when a URL is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from edsr_dist.errors import UserError
from edsr_dist.locations import cached_object_path, split_url
from edsr_dist.state.atomic import atomic_write_text, make_parent_folder

INSTALL_HINT = "pip install 'edsr-dist[s3]' (fsspec with s3fs)"
# s3fs speaks to every S3-compatible store; obs:// (the ModelArts spelling) is OBS through its S3 endpoint.
S3_SCHEMES = ("s3", "s3a", "obs")
CHUNK = 16 << 20  # bytes per ranged GET while streaming a download
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


def filesystem(url: str, endpoint_url: str = ""):
    """(fsspec filesystem, path inside it) for `url`. The endpoint: `endpoint_url` (the --endpoint-url flag), else
    botocore's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config file (botocore >= 1.31); credentials: the
    standard AWS variables and files."""
    scheme, path = split_url(url)
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{url}: object storage needs fsspec, which is not installed; {INSTALL_HINT}") from None
    options: dict = {}
    protocol = scheme
    if scheme in S3_SCHEMES:
        protocol = "s3"
        # Fail over to our own retries quickly: botocore's default (legacy mode) waits long on a dead endpoint.
        options["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 120,
                                    "retries": {"max_attempts": 3, "mode": "standard"}}
        options["use_listings_cache"] = False  # a resume must see checkpoints another process wrote
        if scheme == "obs":
            # OBS refuses path-style requests (403 VirtualHostDomainRequired), botocore's choice for a custom
            # endpoint; s3:// keeps botocore's choice (or the config file's `s3 = addressing_style = ...`).
            options["config_kwargs"]["s3"] = {"addressing_style": "virtual"}
        if endpoint_url:
            options["endpoint_url"] = endpoint_url
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError:
        raise UserError(f"{url}: the {scheme}:// protocol needs a package that is not installed; "
                        f"{INSTALL_HINT if protocol == 's3' else 'install the fsspec package for ' + scheme}") from None
    except ValueError as exc:
        raise UserError(f"{url}: {exc}; use s3://BUCKET/KEY (or another fsspec protocol)") from None
    loop = getattr(fs, "loop", None)
    if loop is not None:
        loop.set_exception_handler(_quiet_connection_errors)
    return fs, path


def _quiet_connection_errors(loop, context: dict) -> None:
    """aiohttp leaves a 'Task exception was never retrieved' traceback on stderr when a connection drops under a
    request; the request itself fails, is retried and reported in one line, so that traceback is noise."""
    if isinstance(context.get("exception"), ConnectionError) or "aiohttp" in type(context.get("exception")).__module__:
        return
    loop.default_exception_handler(context)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed storage request (botocore and aiohttp errors are not OSErrors)."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return "no such object or bucket"
    if isinstance(exc, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"access denied or no credentials ({name}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {text}" if text else name


def object_info(fs, path: str, url: str) -> dict:
    """{"size": int, "etag": str | None} of one object; a missing object or unreachable store is a UserError."""
    try:
        info = fs.info(path)
    except Exception as exc:  # noqa: BLE001 - any client error becomes the one line below
        raise UserError(f"cannot read {url}: {describe_failure(exc)}; check the URL, the endpoint "
                        "(AWS_ENDPOINT_URL or --endpoint-url) and the credentials") from None
    if info.get("type") == "directory":
        raise UserError(f"{url} is a folder (prefix), not an object; pass the object's full key")
    etag = info.get("ETag") or info.get("etag")
    return {"size": int(info["size"]), "etag": etag.strip('"') if isinstance(etag, str) else None}


@contextlib.contextmanager
def server_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`: one process of this cache folder at a time; the others wait here.
    The kernel drops it when the holder dies, so a killed download never blocks the next one."""
    make_parent_folder(lock_path)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"edsr-dist: waiting for another process fetching {what}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove_partial_downloads(local: Path) -> None:
    """What a killed download left (`.<name>.part-<pid>`); only called with the lock held, so none is live."""
    for leftover in local.parent.glob(f".{local.name}.part-*"):
        leftover.unlink(missing_ok=True)


def _stream(fs, path: str, target: Path, size: int, label: str) -> str:
    """Copy the object to `target` in CHUNK reads; returns the MD5 of what was written. s3fs pins every ranged
    GET of one open file to the ETag it saw at open (If-Match), so an object replaced mid-read fails instead of
    mixing two versions."""
    digest = hashlib.md5(usedforsecurity=False)
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        with fs.open(path, "rb", block_size=CHUNK, cache_type="none") as source, open(target, "wb") as sink:
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                sink.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        bar.close()
    return digest.hexdigest()


def fetch_file(url: str, cache_dir: str = "", endpoint_url: str = "",
               verify: Callable[[Path], object] | None = None, what: str = "object") -> Path:
    """The verified local copy of the object at `url`, downloading it first unless the cache holds this very
    version. `verify(path)` raises UserError when the content is not what it should be (checked on the partial
    file, before the rename). A refused object leaves nothing in the cache."""
    fs, path = filesystem(url, endpoint_url)
    local = cached_object_path(url, cache_dir)
    record_path = local.with_name(local.name + ".source.json")
    info = object_info(fs, path, url)
    wanted = {"url": url, "size": info["size"], "etag": info["etag"]}
    with server_lock(local.with_name(local.name + ".lock"), url):
        record = _source_record(record_path)
        if (record is not None and {k: record.get(k) for k in wanted} == wanted and local.is_file()
                and local.stat().st_size == info["size"]):
            return local  # fetched and verified by an earlier run or another process of this server
        _remove_partial_downloads(local)
        record_path.unlink(missing_ok=True)  # from here on the copy in place (if any) is not the object's
        partial = local.with_name(f".{local.name}.part-{os.getpid()}")
        start = time.perf_counter()
        try:
            try:
                md5 = _stream(fs, path, partial, info["size"], local.name)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno is None:
                    raise UserError(f"cannot download {url}: {describe_failure(exc)}; check the store and "
                                    "run again") from None
                raise UserError(f"cannot write {partial} ({exc.strerror}); free space in the cache folder or "
                                "pass --cache-dir (or EDSR_DIST_CACHE) elsewhere") from None
            except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
                raise UserError(f"cannot download {url}: {describe_failure(exc)}; check the endpoint and "
                                "run again") from None
            seconds = time.perf_counter() - start
            got = partial.stat().st_size
            if got != info["size"]:
                raise UserError(f"{url}: downloaded {got} bytes but the object has {info['size']}; it changed or "
                                "the transfer was cut: run again")
            if info["etag"] and _MD5_ETAG.match(info["etag"]) and md5 != info["etag"]:
                raise UserError(f"{url}: the downloaded content does not match the object's ETag (MD5 {md5}, "
                                f"ETag {info['etag']}); the transfer was damaged: run again")
            if verify is not None:
                try:
                    verify(partial)
                except UserError as exc:  # name the object, not the partial file that is about to go
                    raise UserError(f"{url} refused, nothing cached: {str(exc).replace(str(partial), url)}") from None
            os.replace(partial, local)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        atomic_write_text(record_path, json.dumps({**wanted, "fetched": time.time()}) + "\n")
    rate = info["size"] / max(seconds, 1e-9) / 1e6
    print(f"fetched {what} {url}: {info['size'] / 1e6:.1f} MB in {seconds:.1f} s ({rate:.0f} MB/s), verified; "
          f"cached at {local}", file=sys.stderr, flush=True)
    return local


def fetch_folder(url: str, cache_dir: str = "", endpoint_url: str = "", what: str = "folder") -> Path:
    """Every object under the prefix `url`, fetched into one local folder (a benchmark set: a few small images,
    checked by size and ETag; the images themselves have no checksums)."""
    fs, path = filesystem(url, endpoint_url)
    try:
        listing = fs.find(path, detail=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot list {url}: {describe_failure(exc)}; check the URL and the endpoint") from None
    if not listing:
        raise UserError(f"{url} holds no objects; pass the prefix of a benchmark set folder (such as .../Set5)")
    local = cached_object_path(url, cache_dir)
    for name in sorted(listing):
        relative = name[len(path):].lstrip("/")
        fetch_file(f"{url.rstrip('/')}/{relative}", cache_dir, endpoint_url, what=what)
    return local
