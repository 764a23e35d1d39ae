"""The owner record of a run whose --out is a bucket prefix: the object `<prefix>/.owner.json`, written only by
conditional puts (the same `OwnerLock` interface as the local file, state/owner.py).

- create: PutObject with `If-None-Match: *`: of two jobs starting at once the store lets one put succeed and
  answers the other 412 PreconditionFailed (AWS S3 since 2024-08; moto >= 5.0.15; botocore >= 1.35.2).
- heartbeat and takeover: PutObject with `If-Match: <the ETag we read>` (compare-and-swap; AWS since 2024-11,
  moto >= 5.1.5, botocore >= 1.35.69): a 412 means another job wrote the record since, so of two takers of a dead
  owner's record one wins, and an owner whose record was taken over learns it at its next beat.
- release: read, and DeleteObject with `If-Match` if the record is still ours (the condition needs moto >= 5.1.22;
  where a store ignores it, only a takeover between that read and the delete would lose its record).
- read: one GetObject, so the content and its ETag belong together.
- after each create or takeover the record is read back (at once and `SETTLE_S` later): on a store that ignores
  the conditions the job whose record is not there refuses, instead of two jobs both writing.
- a store that ignores the conditions is met as well as it can be (state/owner.py `claim` reads the record before
  creating it and refuses a live owner; the heartbeat reads and compares before its write), and found out once
  per run: right after the record is ours, the same record is put again with `If-None-Match: *` and with an
  `If-Match` no object has; a store that honours them answers 412 to both, one that answers 200 gets a one-line
  notice that the lock is best effort there.

s3fs translates a 412 with `<Condition>If-None-Match</Condition>` into FileExistsError and any other 412 into
OSError(EINVAL) (s3fs/errors.py, translate_boto_error); a store that leaves out the Condition element shows the
first as the second, so both count as "the record exists". The object store itself is reached with the fsspec
filesystem of the storage layer (`fs` is an s3fs.S3FileSystem); this module never opens connections of its own.
"""

from __future__ import annotations

import asyncio
import errno
import sys
import time

from edsr_dist.state.owner import RECORD_NAME

SETTLE_S = 2.0  # seconds between a put of the record and its second read-back
NO_SUCH_ETAG = '"00000000000000000000000000000000"'  # an If-Match that names no object's content


def _refused(exc: OSError) -> bool:
    """A precondition that did not hold (412), as s3fs reports it; a missing object for If-Match is 404."""
    return isinstance(exc, (FileExistsError, FileNotFoundError)) or exc.errno == errno.EINVAL


class BucketLock:
    """`<bucket>/<prefix>/.owner.json` in an S3-compatible store (S3, OBS, MinIO, moto)."""

    def __init__(self, fs, root: str, url: str, settle_s: float = SETTLE_S):
        """`fs`: an s3fs filesystem; `root`: "bucket/prefix" of the run; `url`: the --out the user gave (messages);
        `settle_s`: how long after a put the record is read back once more (see `_still_ours`)."""
        self.fs = fs
        self.settle_s = settle_s
        self.bucket, _, prefix = root.strip("/").partition("/")
        self.key = f"{prefix}/{RECORD_NAME}" if prefix else RECORD_NAME
        self.where = f"{url.rstrip('/')}/{RECORD_NAME}"
        self.ignored_conditions: list[str] | None = None  # found out once, after the record became ours

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except OSError as exc:
            if _refused(exc):
                return None
            raise
        return response["ETag"]

    def _still_ours(self, data: bytes, version: str | None) -> str | None:
        """A store that ignores the condition (OBS documents neither header on PUT) lets the last writer win: every
        loser then reads another job's record back. Read back at once and again after `settle_s`, so two writers
        whose puts and reads interleave see the later put too. Costs nothing where the condition holds."""
        if version is None:
            return None
        try:
            for delay in (0.0, self.settle_s):
                time.sleep(delay)
                found = self.read()
                if found is None or found[0] != data:
                    return None
            self._probe_conditions(data, found[1])
        except BaseException:
            # A signal or a lost endpoint while settling: the record we put must not outlive this start.
            try:
                self.remove(version)
            except Exception:  # noqa: BLE001 - the endpoint is away: the next run takes the record over
                pass
            raise
        return found[1]

    def _probe_conditions(self, data: bytes, version: str) -> None:
        """Once per run: does this store honour the conditions? Both puts write the content already there (same
        ETag), so a store that ignores them changes nothing; one that honours them answers 412."""
        if self.ignored_conditions is not None:
            return
        ignored = []
        if self._put(data, IfNoneMatch="*") is not None:
            ignored.append("If-None-Match")
        if self._put(data, IfMatch=NO_SUCH_ETAG) is not None:
            ignored.append("If-Match")
        self.ignored_conditions = ignored
        if ignored:
            print(f"edsr-dist: note: the store of {self.where} ignores conditional writes ({' and '.join(ignored)} "
                  "on PutObject), so the one-writer lock there is best effort: a live owner is still refused, but "
                  "two jobs started within a few seconds of each other may both write (docs/OPERATIONS.md)",
                  file=sys.stderr, flush=True)

    def create(self, data: bytes) -> str | None:
        try:
            version = self._put(data, IfNoneMatch="*")
        except BaseException as exc:
            if not isinstance(exc, Exception):  # a signal while the put was in flight: it may have landed
                self._remove_if_ours(data)
            raise
        return self._still_ours(data, version)

    def _remove_if_ours(self, data: bytes) -> None:
        try:
            found = self.read()
            if found is not None and found[0] == data:
                self.remove(found[1])
        except Exception:  # noqa: BLE001 - the endpoint is away: the next run takes the record over
            pass

    def read(self) -> tuple[bytes, str, float] | None:
        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await response["Body"].read(), response["ETag"], response["LastModified"].timestamp()
            finally:
                response["Body"].close()

        try:
            # s3fs runs its requests on its own event loop thread; the body must be read on that loop too.
            return asyncio.run_coroutine_threadsafe(get(), self.fs.loop).result()
        except FileNotFoundError:
            return None

    def take(self, data: bytes, version: str) -> str | None:
        return self._still_ours(data, self._put(data, IfMatch=version))

    def refresh(self, data: bytes, version: str) -> str | None:
        # Read and compare first: where the store ignores If-Match, the put alone would overwrite another job's record.
        found = self.read()
        if found is None or found[1] != version:
            return None
        return self._put(data, IfMatch=version)

    def remove(self, version: str) -> None:
        found = self.read()  # also where a store ignores If-Match on DeleteObject (moto < 5.1.22, older S3 APIs)
        if found is None or found[1] != version:
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as exc:
            if not _refused(exc):
                raise
