"""The launcher's restart decisions that need no process: back-off, what a restart runs, dropping a device, how
the launchers of several servers agree (their store, in-process)."""

import time

import pytest
from helpers import free_port

from edsr_dist.config import parse_train_args
from edsr_dist.errors import UserError
from edsr_dist.launcher.job_store import JobStore
from edsr_dist.launcher.plan import Plan
from edsr_dist.launcher.supervise import _drop_device, _restart_train_args, restart_delay
from edsr_dist.state.checkpoint import save_checkpoint


def test_back_off_doubles_up_to_a_minute():
    assert [restart_delay(1.0, k) for k in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert restart_delay(0.0, 3) == 0


def test_restarts_resume_auto_and_never_overwrite(tmp_path):
    out = tmp_path / "run"
    first = ["--out", str(out), "--overwrite"]
    restart = parse_train_args(_restart_train_args(first, str(out)))
    assert (restart.resume, restart.overwrite) == ("auto", False)


def test_a_resume_file_applies_until_the_run_has_its_own_checkpoint(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other" / "step_00000010.ckpt"
    first = ["--out", str(out), "--resume", str(other)]
    assert parse_train_args(_restart_train_args(first, str(out))).resume == str(other)
    save_checkpoint(out, {"step": 3}, step=3, keep_last=1)
    assert parse_train_args(_restart_train_args(first, str(out))).resume == "auto"


def test_dropping_a_device_keeps_min_nproc_on_any_count():
    plan = Plan(workers=[], summary="", world_size=4, batch_size=12)
    assert _drop_device(plan, 2, min_nproc=3, dropped=frozenset()) == {2}
    assert _drop_device(plan, 2, min_nproc=4, dropped=frozenset()) == frozenset()  # would go below --min-nproc
    # 16 does not divide by 3: the job goes on with shares of 6/5/5.
    assert _drop_device(Plan(workers=[], summary="", world_size=4, batch_size=16), 2, min_nproc=1,
                        dropped=frozenset()) == {2}
    with pytest.raises(UserError, match=r"device 2 failed twice in a row and the job cannot continue without it: "
                                        r"batch_size 8 \(global\) is smaller than the 3 workers x --accumulate 3"):
        _drop_device(Plan(workers=[], summary="", world_size=4, batch_size=8, accumulate=3), 2, min_nproc=1,
                     dropped=frozenset())


def test_launchers_move_the_generation_on_once_and_follow_each_other():
    first = JobStore("127.0.0.1", free_port(), first=True, server_index=0, servers=2)
    other = JobStore("127.0.0.1", first.store.port, first=False, server_index=1, servers=2)
    assert (first.news(), other.news()) == ("", "")
    seen_before = first.seen
    assert other.move_on("rank 1 was killed") == "1"
    assert first.move_on("rank 0 exited with code 4") == "1"  # the same failure, seen later: not a second restart
    assert first.why() == "server 1: rank 1 was killed"
    first.seen, first._next_check = seen_before, 0.0  # as if it had not failed itself: it hears the news instead
    assert first.news() == "server 1: rank 1 was killed"
    assert first.follow() == "1"
    assert first.move_on("rank 0 exited with code 2", end=True) == "end"
    other._next_check = 0.0
    assert other.news() == "server 0: rank 0 exited with code 2"
    assert other.follow() == "end"
    assert other.move_on("rank 1 exited with code 4") == "end"  # nothing moves after the end
    other.close()
    started = time.monotonic()
    first.close()  # the other launcher said it is done: no wait
    assert time.monotonic() - started < 1
