"""The owner record of a bucket --out (state/bucket_lock.py) against a real S3 server: moto's `moto_server` on
127.0.0.1, spoken to by s3fs/botocore over HTTP (no client mocked), started by the shared `s3_server` fixture."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from edsr_dist.errors import UserError
from edsr_dist.state.bucket_lock import BucketLock
from edsr_dist.state.owner import OwnerRecord, claim, read_owner


@pytest.fixture
def bucket(s3_server, request):
    """The shared moto_server (tests/conftest.py `s3_server`), a bucket per test."""
    fs = s3_server.filesystem()
    name = "own-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    fs.mkdir(name)
    return fs, name


def lock_of(bucket, prefix: str = "runs/x2") -> BucketLock:
    fs, name = bucket
    return BucketLock(fs, f"{name}/{prefix}", f"s3://{name}/{prefix}", settle_s=0.1)


def test_of_several_jobs_starting_at_once_one_gets_the_record(bucket):
    for trial in range(5):
        barrier = threading.Barrier(6)
        won, refused = [], []

        def start(n: int) -> None:
            lock = lock_of(bucket, f"race{trial}")
            barrier.wait()
            try:
                won.append(claim(lock, lock.where, record=OwnerRecord.mine(30)))
            except UserError as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=start, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 5, refused
        assert all(" is in use by job " in line for line in refused)
        assert read_owner(won[0].lock).token == won[0].token
        won[0].release()
        assert read_owner(won[0].lock) is None


def test_heartbeat_uses_if_match_and_notices_a_takeover(bucket, capsys):
    first = claim(lock_of(bucket), "s3://b/runs/x2", record=OwnerRecord.mine(0.1)).start()
    etag = first.version
    deadline = time.monotonic() + 10
    while first.version == etag:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)
    assert read_owner(first.lock).heartbeat > first.record.started
    with pytest.raises(UserError, match=r"^--out s3://b/runs/x2 is in use by job .* last seen \d+ s ago\)"):
        claim(lock_of(bucket), "s3://b/runs/x2")
    second = claim(lock_of(bucket), "s3://b/runs/x2", take_over=True, record=OwnerRecord.mine(30))
    while first.lost_to is None:
        assert time.monotonic() < deadline + 10, "the old owner never noticed"
        time.sleep(0.05)
    assert "no longer owns the folder" in capsys.readouterr().err
    first.release()  # its If-Match delete must leave the new owner's record
    assert read_owner(second.lock).token == second.token
    second.release()
    assert read_owner(second.lock) is None


def test_a_stale_record_from_another_host_is_taken_over_by_one_of_two(bucket, capsys):
    lock = lock_of(bucket)
    stale = dataclasses.replace(OwnerRecord.mine(30.0), host="node-b", machine="node-b|boot|pid:[1]",
                                heartbeat=time.time() - 3600, job="J-old")
    assert lock.create(stale.to_bytes()) is not None
    assert lock.create(b"second") is None  # If-None-Match: * on an existing key
    seen = lock.read()[1]
    results = []
    barrier = threading.Barrier(2)

    def take(n: int) -> None:
        barrier.wait()
        results.append(lock_of(bucket).take(f"taker {n}".encode(), seen))

    threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is None for r in results) == [False, True]  # If-Match: one CAS wins
    # Through claim: the note names the dead owner and the bound.
    lock.take(stale.to_bytes(), lock.read()[1])
    held = claim(lock_of(bucket), "s3://b/runs/x2")
    note = capsys.readouterr().err
    assert "took over --out s3://b/runs/x2 from job J-old on host node-b" in note
    assert note.rstrip().endswith("its heartbeat is 60 min old (more than 120 s: 3 x 30 s + 30 s)")
    held.release()


def test_a_store_that_ignores_the_condition_still_has_one_owner(bucket):
    """Last writer wins on such a store (OBS documents no If-None-Match on PUT): the read-back tells the loser."""
    fs, name = bucket
    lock = lock_of(bucket)
    plain_put = lock._put
    lock._put = lambda data, **condition: plain_put(data)  # the store drops the condition
    lock.settle_s = 0.5
    assert lock.create(b"first") is not None
    # Another job's put lands while we settle: we are not the owner, although our own put "succeeded".
    other = threading.Timer(0.1, lambda: fs.pipe_file(f"{name}/runs/x2/.owner.json", b"other job"))
    other.start()
    assert lock.create(b"second") is None
    other.join()
    assert lock.read()[0] == b"other job"


def test_two_prefixes_of_one_bucket_are_two_folders(bucket):
    a = claim(lock_of(bucket, "runs/a"), "a", record=OwnerRecord.mine(30))
    b = claim(lock_of(bucket, "runs/b"), "b", record=OwnerRecord.mine(30))
    fs, name = bucket
    assert sorted(fs.find(name)) == [f"{name}/runs/a/.owner.json", f"{name}/runs/b/.owner.json"]
    a.release()
    b.release()
