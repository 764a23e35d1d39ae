"""One writer per run folder, with real processes: two runs started at once, a second `--resume auto` beside a
training owner, a SIGKILLed owner taken over by the next `--resume auto`, a launcher's restart (its own job), and
owner records of other hosts (stale: taken over; fresh: refused, unless --take-over).

Runs that must still be training while a second one starts go through the real CLI with one test-only hook
(helpers.HOOKED_TRAIN): rank 0 waits right after writing the checkpoint of step PAUSE_AFTER_SAVE_STEP until the test
creates the file GO_FILE (or SIGKILLs it); nothing in the trainer is told.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TINY, Job, assert_bit_identical, final_state, kill_groups, latest_is, run_cli, start_hooked

from edsr_dist.state.owner import LocalLock, read_owner

HEARTBEAT = {"EDSR_DIST_OWNER_HEARTBEAT_S": "0.2"}
TIMEOUT_S = 150


def train_args(store: Path, out: Path) -> list[str]:
    return [*TINY, "--data", str(store), "--out", str(out), "--steps-per-epoch", "20", "--save-every-steps", "10",
            "--resume", "auto"]


def start_owner(args: list[str], cwd: Path, go: Path, pause_step: int = 10) -> subprocess.Popen:
    """A hooked run that waits after the checkpoint of `pause_step` until `go` exists."""
    (proc,) = start_hooked(args, cwd, {"PAUSE_AFTER_SAVE_STEP": pause_step, "GO_FILE": go}, env=HEARTBEAT,
                           capture=True)
    return proc


def wait_until(ready, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, f"exited with {proc.returncode} too early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def snapshot(folder: Path) -> dict:
    """Every file but the owner record (whose heartbeat changes, through a temporary `.owner.json.tmp-PID` renamed
    over it) with its size and time."""
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if not p.name.startswith(".owner.json") and p.is_file()}


def one_line_refusal(result_stderr: str, out: Path) -> str:
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"edsr-dist train: error: --out {out} is in use by job "), lines[0]
    assert lines[0].endswith("; wait for it to end, stop it, or use another --out (--take-over if you know it is dead)")
    return lines[0]


def _train_alone(sample_store: Path, folder: Path) -> None:
    result = run_cli(["train", *train_args(sample_store, folder / "run")], cwd=folder, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def reference(build_once, sample_store) -> dict:
    """The weights of the same run alone, uninterrupted (built once per test run, see conftest.build_once)."""
    state = final_state(build_once("owner-reference", lambda folder: _train_alone(sample_store, folder)) / "run")
    assert state["step"] == 20
    return state["model"]


def test_two_fresh_runs_at_once_one_trains_the_other_is_refused(tmp_path, sample_store):
    out, go = tmp_path / "run", tmp_path / "go"
    args = train_args(sample_store, out)[:-2]  # fresh runs, no --resume
    procs = [start_owner(args, tmp_path, go) for _ in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run was refused"
            time.sleep(0.02)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, loser_err = loser.communicate()
        assert loser.returncode == 2, loser_err
        one_line_refusal(loser_err, out)
        go.touch()
        _, winner_err = winner.communicate(timeout=TIMEOUT_S)
        assert winner.returncode == 0, winner_err
    finally:
        kill_groups(procs)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("type") == "step"]
    assert steps and len(steps) == len(set(steps)), "two runs' records in one metrics.jsonl"
    assert sum(r.get("type") == "result" for r in records) == 1
    assert final_state(out)["step"] == 20
    assert not (out / ".owner.json").exists()


def test_a_second_resume_while_the_owner_trains_is_refused(tmp_path, sample_store, reference):
    out, go = tmp_path / "run", tmp_path / "go"
    owner = start_owner(train_args(sample_store, out), tmp_path, go)
    try:
        wait_until(latest_is(out, 10), owner)
        record = read_owner(LocalLock(out))
        assert record.pid == owner.pid
        wait_until(lambda: read_owner(LocalLock(out)).heartbeat > record.heartbeat, owner, timeout=10)  # beating
        status = run_cli(["runs", "status", str(out)], cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"pid {owner.pid}" in status.stdout and "; alive (heartbeat every 0.2 s" in status.stdout
        assert f"newest checkpoint: step 10 ({out / 'checkpoints' / 'step_00000010.ckpt'})" in status.stdout
        before = snapshot(out)
        second = run_cli(["train", *train_args(sample_store, out)], cwd=tmp_path)
        assert second.returncode == 2
        line = one_line_refusal(second.stderr, out)
        assert f"on host {socket.gethostname()} (pid {owner.pid}, started " in line
        assert snapshot(out) == before
        go.touch()
        _, err = owner.communicate(timeout=TIMEOUT_S)
        assert owner.returncode == 0, err
    finally:
        kill_groups([owner])
    assert_bit_identical(final_state(out)["model"], reference)
    assert not (out / ".owner.json").exists()


def test_resume_after_sigkill_takes_over_and_ends_bit_identical(tmp_path, sample_store, reference):
    out, go = tmp_path / "run", tmp_path / "never"
    owner = start_owner(train_args(sample_store, out), tmp_path, go)
    try:
        wait_until(latest_is(out, 10), owner)
    finally:
        kill_groups([owner])
    assert read_owner(LocalLock(out)).pid == owner.pid  # a SIGKILL leaves the record behind
    status = run_cli(["runs", "status", str(out)], cwd=tmp_path)
    assert f"; dead (its pid {owner.pid} is gone): the next run into this folder takes it over" in status.stdout
    result = run_cli(["train", *train_args(sample_store, out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"edsr-dist: took over --out {out} from job ") and f"(pid {owner.pid}, " in first
    assert first.endswith(f": its pid {owner.pid} is gone")
    assert "resumed from" in result.stdout
    assert_bit_identical(final_state(out)["model"], reference)
    assert not (out / ".owner.json").exists()


def test_a_launchers_restart_is_the_owner(tmp_path, sample_store):
    out = tmp_path / "run"
    args = [*TINY, "--data", str(sample_store), "--out", str(out), "--save-every-steps", "4", "--log-every", "1"]
    job = Job(["--max-restarts", "1", "--restart-delay", "0.2"], args, tmp_path, nproc=1)
    try:
        job.wait_for_line(r"Step nr: \[6/")
        record = read_owner(LocalLock(out))
        assert record.pid == job.proc.pid  # the launcher holds it, not its worker
        job.workers()[0].send_signal(signal.SIGKILL)
        banner = job.wait_for_line(r"resumed from .* at step \d+$", timeout=TIMEOUT_S)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    assert code == 0, job.stderr
    # The kill is sent once step 6 is logged; on a busy host the worker may train and save step 8 before it lands.
    resumed = int(re.search(r"at step (\d+)$", banner).group(1))
    assert resumed % 4 == 0 and resumed >= 4, banner
    assert "restart 1 of 1" in job.stderr and "in use by" not in job.stderr + "".join(job.stdout)
    assert job.last_stderr_line() == "edsr-dist launch: finished after 1 restart"
    assert not (out / ".owner.json").exists()


def _record_from_another_host(out: Path, heartbeat_age_s: float) -> None:
    now = time.time()
    record = {"token": "t-other", "job": "J-other", "host": "node-b", "machine": "node-b|boot-b|pid:[9]",
              "pid": 4242, "pid_started": now - 7200, "started": now - 7200, "heartbeat": now - heartbeat_age_s,
              "heartbeat_s": 30.0, "command": "edsr-dist train --out run"}
    (out / ".owner.json").write_text(json.dumps(record))


def test_a_stale_owner_on_another_host_is_taken_over_with_a_note(tmp_path, trained_run, sample_store):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    _record_from_another_host(out, heartbeat_age_s=3600)
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "10",
                      "--resume", "auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"edsr-dist: took over --out {out} from job J-other on host node-b (pid 4242, started ")
    assert first.endswith("last seen 60 min ago): its heartbeat is 60 min old (more than 120 s: 3 x 30 s + 30 s)")
    assert "already complete" in result.stdout
    assert not (out / ".owner.json").exists()


def test_a_live_owner_on_another_host_is_refused_unless_take_over(tmp_path, trained_run, sample_store):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    _record_from_another_host(out, heartbeat_age_s=5)
    args = ["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "10",
            "--resume", "auto"]
    before = snapshot(out)
    refused = run_cli(args, cwd=tmp_path)
    assert refused.returncode == 2
    assert "is in use by job J-other on host node-b (pid 4242, started " in one_line_refusal(refused.stderr, out)
    assert snapshot(out) == before and json.loads((out / ".owner.json").read_text())["token"] == "t-other"
    forced = run_cli([*args, "--take-over"], cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert re.search(r"\(pid 4242, started .+, last seen \d+ s ago\): --take-over$", forced.stderr.splitlines()[0])


def test_runs_status_of_a_folder_that_is_no_run(tmp_path):
    result = run_cli(["runs", "status", str(tmp_path / "nothing")], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"edsr-dist runs: error: {tmp_path / 'nothing'} is not a run folder (no owner record, checkpoints or "
        "metrics.jsonl); pass the --out of a run"]
    bucket = run_cli(["runs", "status", "s3://bucket/run"], cwd=tmp_path)
    assert bucket.returncode == 2 and len(bucket.stderr.strip().splitlines()) == 1
