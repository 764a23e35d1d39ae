"""The owner record of a run folder (state/owner.py): exclusive create under a race, stale and pid-gone detection,
takeover races, the heartbeat, release, and who counts as the same job. (The cases that need other processes are
in tests/e2e/test_owner_processes.py.)"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, owner_record, write_owner

from edsr_dist.errors import UserError
from edsr_dist.state import owner as owner_mod
from edsr_dist.state.owner import (
    LocalLock,
    OwnerRecord,
    check_launcher_owns,
    claim,
    describe,
    machine_identity,
    owner_gone,
    read_owner,
    stale_after,
)
from edsr_dist.state.run_folder import hold_run_folder


def test_exclusive_create_has_one_winner_among_threads(tmp_path):
    for trial in range(20):
        lock_path = tmp_path / f"run{trial}"
        barrier = threading.Barrier(8)
        wins = []

        def create(n: int) -> None:
            barrier.wait()
            wins.append(LocalLock(lock_path).create(str(n).encode()) is not None)

        threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1


def test_a_reused_pid_does_not_count_as_alive():
    # This very process, but started at another time than the record says: the pid was reused.
    assert owner_gone(owner_record(pid_started=time.time() - 3600)) == f"its pid {os.getpid()} is gone"
    assert owner_gone(owner_record()) is None


def test_another_host_is_dead_only_once_its_heartbeat_is_stale():
    now = time.time()
    elsewhere = owner_record(host="node-7", machine="node-7|boot|pid:[1]", heartbeat_s=10.0)
    assert stale_after(10.0) == 60.0 and stale_after(30.0) == 120.0
    assert owner_gone(dataclasses.replace(elsewhere, heartbeat=now - 59), now) is None
    why = owner_gone(dataclasses.replace(elsewhere, heartbeat=now - 61), now)
    assert why == "its heartbeat is 61 s old (more than 60 s: 3 x 10 s + 30 s)"
    # The same hostname in another pid namespace (a second container with host networking): pids say nothing there.
    same_name = owner_record(machine=f"{elsewhere.host}|other-boot|pid:[2]", pid=1)
    assert owner_gone(same_name, now) is None


def test_take_over_forces_a_live_owner_and_the_old_heartbeat_notices(tmp_path, capsys):
    first = claim(LocalLock(tmp_path / "run"), "run", record=OwnerRecord.mine(0.05)).start()
    with pytest.raises(UserError, match="is in use by"):
        claim(LocalLock(tmp_path / "run"), "run")
    second = claim(LocalLock(tmp_path / "run"), "run", take_over=True, record=OwnerRecord.mine(0.05))
    assert capsys.readouterr().err.rstrip().endswith(": --take-over")
    deadline = time.monotonic() + 5
    while first.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.lost_to is not None and f"pid {os.getpid()}" in first.lost_to
    assert "no longer owns the folder" in capsys.readouterr().err
    first.release()  # must not remove the new owner's record
    assert read_owner(second.lock).token == second.token
    second.release()
    assert read_owner(second.lock) is None


def test_two_takers_of_one_dead_record_have_one_winner(tmp_path):
    for trial in range(20):
        folder = tmp_path / f"run{trial}"
        write_owner(folder, owner_record(host="gone", machine="gone|x|y", heartbeat=time.time() - 3600))
        seen = LocalLock(folder).read()[1]
        barrier = threading.Barrier(4)
        won = []

        def take(n: int) -> None:
            barrier.wait()
            version = LocalLock(folder).take(f"taker {n}".encode(), seen)
            if version is not None:
                won.append(n)

        threads = [threading.Thread(target=take, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won
        assert (folder / ".owner.json").read_bytes() == f"taker {won[0]}".encode()
        assert [p.name for p in folder.iterdir()] == [".owner.json"]  # no .taking-* left


def test_take_gives_back_a_record_written_since_it_was_read(tmp_path):
    lock = LocalLock(tmp_path / "run")
    stale = lock.create(b"old")
    lock.refresh(b"fresh heartbeat", stale)
    assert lock.take(b"mine", stale) is None
    assert (tmp_path / "run" / ".owner.json").read_bytes() == b"fresh heartbeat"


def test_without_hard_links_the_record_is_still_exclusive_taken_over_and_kept_by_overwrite(tmp_path, monkeypatch):
    """Some FUSE mounts have no hard links (link(2) fails with EPERM): the record is created with an exclusive open
    instead, a second job is still refused, a dead owner is still taken over, and --overwrite keeps the record."""
    def no_link(src, dst, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_link)
    run = tmp_path / "run"
    held = hold_run_folder(run, "", False, False)
    assert read_owner(LocalLock(run)).token == held.token
    with pytest.raises(UserError, match="in use by"):
        hold_run_folder(run, "", False, False)
    held.release()
    assert not run.exists()
    write_owner(run, owner_record(token="dead", host="elsewhere", machine="elsewhere", heartbeat=0.0))
    (run / "metrics.jsonl").write_text("{}\n")
    held = hold_run_folder(run, "", True, False)  # takes the dead owner's record over, moves the old run aside
    assert read_owner(LocalLock(run)).token == held.token
    assert sorted(p.name for p in run.iterdir()) == [".owner.json"]
    assert sorted(p.name for p in (tmp_path / "run.old-1").iterdir()) == ["metrics.jsonl"]
    held.release()


def test_the_heartbeat_refreshes_the_record(tmp_path):
    held = claim(LocalLock(tmp_path / "run"), "run", record=OwnerRecord.mine(0.05)).start()
    first = read_owner(held.lock).heartbeat
    time.sleep(0.3)
    record = read_owner(held.lock)
    assert record.heartbeat > first and record.token == held.token and held.lost_to is None
    held.release()


def test_release_leaves_no_record_and_no_empty_folder_it_made(tmp_path):
    held = claim(LocalLock(tmp_path / "a" / "b"), "a/b")
    assert (tmp_path / "a" / "b" / ".owner.json").is_file()
    held.release()
    assert list(tmp_path.iterdir()) == []


def test_a_record_cut_short_is_judged_by_its_file_time(tmp_path):
    (tmp_path / ".owner.json").write_bytes(b"")  # killed between the exclusive create and the write
    os.utime(tmp_path / ".owner.json", (time.time() - 600, time.time() - 600))
    record = read_owner(LocalLock(tmp_path))
    assert record.host == "unknown" and owner_gone(record).startswith("its heartbeat is 10 min old")
    (tmp_path / ".owner.json").write_bytes(b"{")
    with pytest.raises(UserError, match="in use by job unknown on host unknown"):
        claim(LocalLock(tmp_path), "x")  # just created by someone: wait for the bound


def test_torchrun_restarts_of_the_same_job_are_the_owner(tmp_path, monkeypatch):
    elsewhere = dict(host="node-7", machine="node-7|boot|pid:[1]")  # alive as far as anyone can tell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-abc")
    write_owner(tmp_path / "same", owner_record(job="torchrun:job-abc", restart_safe_job=True, **elsewhere))
    held = claim(LocalLock(tmp_path / "same"), "same")
    assert read_owner(held.lock).token == held.token
    held.release()
    write_owner(tmp_path / "other", owner_record(job="torchrun:job-xyz", restart_safe_job=True, **elsewhere))
    with pytest.raises(UserError, match="in use by job torchrun:job-xyz"):
        claim(LocalLock(tmp_path / "other"), "other")
    # torchrun's default run id names no job: two such jobs are two writers.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert owner_mod.job_identity() == (f"pid-{os.getpid()}", False)


def test_a_worker_of_the_launcher_that_owns_the_folder_takes_no_second_hold(tmp_path, monkeypatch):
    launcher = claim(LocalLock(tmp_path / "run"), "run")
    monkeypatch.setenv("EDSR_DIST_OWNER", launcher.token)
    assert hold_run_folder(tmp_path / "run", "auto", False, False) is None
    monkeypatch.setenv("EDSR_DIST_OWNER", "another-launchers-token")
    with pytest.raises(UserError, match="no longer owned by this worker's launcher"):
        hold_run_folder(tmp_path / "run", "auto", False, False)
    check_launcher_owns(launcher.lock, "run", launcher.token)
    launcher.release()


def test_overwrite_keeps_the_record_in_the_new_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    held = hold_run_folder(run, "", True, False)
    assert (tmp_path / "run.old-1" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run.old-1" / ".owner.json").exists()
    assert read_owner(LocalLock(run)).token == held.token
    held.release()


def test_a_refused_run_leaves_the_folder_as_it_was(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds a run"):
        hold_run_folder(run, "", False, False)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]


class StoppedWhileHolding(BaseException):
    """What cli's SIGTERM handler raises (cli.Terminated), at whatever call the signal lands on."""


def test_a_stop_between_writing_the_record_and_holding_it_leaves_no_record(tmp_path, monkeypatch):
    """The record is written, then the signal lands inside the Ownership's construction (or the return to the
    caller): no Ownership exists to release, and the record must still go (it blocked the folder for the takeover
    bound before: the CI-style run's SIGTERM-during-start-up failure). A record of another job is left alone."""
    built = owner_mod.Ownership

    def stopped(lock, record, version, note=""):
        assert read_owner(lock).token == record.token  # written and ours at the moment the stop lands
        built(lock, record, version, note)
        raise StoppedWhileHolding()

    monkeypatch.setattr(owner_mod, "Ownership", stopped)
    run = tmp_path / "a" / "run"
    with pytest.raises(StoppedWhileHolding):
        hold_run_folder(run, "", False, False)
    assert not (run / ".owner.json").exists() and not (tmp_path / "a").exists()  # nor the folders it made
    write_owner(tmp_path / "busy", owner_record(token="someone-else"))
    with pytest.raises(UserError, match="in use by"):
        hold_run_folder(tmp_path / "busy", "", False, False)
    assert read_owner(LocalLock(tmp_path / "busy")).token == "someone-else"


def test_a_stop_while_the_heartbeat_starts_leaves_no_record_and_no_thread(tmp_path, monkeypatch):
    """The main thread waits inside Thread.start for the heartbeat thread to run; a signal handler raises there (the
    CI run's second SIGTERM-during-start-up failure). The thread that did start is stopped and the record goes."""
    started = owner_mod.Ownership.start
    holds = []

    def stopped(self, on_lost=None):
        holds.append(self)
        started(self, on_lost)
        raise StoppedWhileHolding()

    monkeypatch.setattr(owner_mod.Ownership, "start", stopped)
    with pytest.raises(StoppedWhileHolding):
        hold_run_folder(tmp_path / "run", "", False, False)
    assert not (tmp_path / "run" / ".owner.json").exists()
    assert len(holds) == 1 and not holds[0]._thread.is_alive()


# The system calls a claim makes (pathlib's exists and mkdir come through os.stat and os.mkdir).
CLAIM_CALLS = ("open", "write", "fsync", "close", "link", "rename", "stat", "mkdir", "unlink")


@pytest.mark.parametrize("dead_owner", [False, True], ids=["new folder", "taking over a dead owner"])
def test_a_stop_at_any_system_call_of_the_claim_leaves_no_record_of_its_own(tmp_path, monkeypatch, dead_owner):
    """CPython runs a signal handler as soon as a call returns, before the result is stored. Stopped there, at each
    system call of the claim in turn, a start leaves no record of its own, no draft and no folder it made; a dead
    owner's record it was taking over is back or gone. (The O_EXCL create this replaced left an empty record when
    stopped at the open's return, which then blocked the folder: CI's third SIGTERM-during-start-up failure.)"""
    real = {name: getattr(os, name) for name in CLAIM_CALLS}
    test_thread = threading.get_ident()
    for stop_at in range(1, 200):
        calls = 0

        def stopping(name):
            def call(*args, **kwargs):
                nonlocal calls
                result = real[name](*args, **kwargs)
                if threading.get_ident() == test_thread:
                    calls += 1
                    if calls == stop_at:
                        raise StoppedWhileHolding(name)
                return result
            return call

        base = tmp_path / f"try-{stop_at}"
        run = base / "run"
        if dead_owner:
            write_owner(run, owner_record(token="dead", host="elsewhere", machine="elsewhere", heartbeat=0.0))
        hold = None
        with monkeypatch.context() as patched:
            for name in CLAIM_CALLS:
                patched.setattr(os, name, stopping(name))
            try:
                hold = hold_run_folder(run, "", False, False)
            except StoppedWhileHolding:
                pass
        if hold is not None:  # no call left to stop at: the claim went through
            assert read_owner(LocalLock(run)).token == hold.token
            hold.release()
            assert stop_at > 5  # the claim made system calls, and each was a stop point
            return
        left = read_owner(LocalLock(run))
        assert left is None or left.token == "dead", f"stopped at call {stop_at}: {left}"
        if dead_owner:
            assert sorted(p.name for p in run.iterdir()) == ([".owner.json"] if left else []), stop_at
        else:
            assert not base.exists(), f"stopped at call {stop_at}: {list(base.rglob('*'))}"
    raise AssertionError("the claim never went through")


def test_a_hold_its_caller_never_stored_is_released_when_the_process_exits(tmp_path):
    """A signal may unwind the caller between hold_run_folder's return and the assignment of its result (a call
    returns, the handler runs, the store never happens): nothing holds the Ownership, and the process's exit
    removes the record anyway."""
    run = tmp_path / "run"
    code = ("import sys\n"
            "from edsr_dist.state.run_folder import hold_run_folder\n"
            f"hold_run_folder({str(run)!r}, '', False, False)\n"
            f"assert (__import__('pathlib').Path({str(run)!r}) / '.owner.json').exists()\n"
            "raise SystemExit(143)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert not (run / ".owner.json").exists()


def test_the_record_says_who_and_when(tmp_path):
    held = claim(LocalLock(tmp_path), "x")
    record = json.loads((tmp_path / ".owner.json").read_text())
    assert {"host", "pid", "job", "started", "command", "heartbeat", "heartbeat_s", "machine"} <= record.keys()
    assert record["pid"] == os.getpid() and record["machine"] == machine_identity()
    assert describe(read_owner(held.lock), record["heartbeat"] + 200).endswith("last seen 3 min ago)")
    held.release()


def test_a_bad_heartbeat_interval_is_one_line(monkeypatch):
    monkeypatch.setenv("EDSR_DIST_OWNER_HEARTBEAT_S", "soon")
    with pytest.raises(UserError, match="EDSR_DIST_OWNER_HEARTBEAT_S='soon' is not a number"):
        owner_mod.heartbeat_interval()
    monkeypatch.setenv("EDSR_DIST_OWNER_HEARTBEAT_S", "0.5")
    assert owner_mod.heartbeat_interval() == 0.5
