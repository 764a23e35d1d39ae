"""Failures of a running job, for real: a rank killed or hung mid-epoch, preemption, divergence.

Two CPU workers under `edsr-dist launch --nproc 2` (real Gloo, real signals); each test is bounded by subprocess
timeouts and leaves no process behind. The kill and hang tests print the measured time from the fault to the
launcher's exit (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, Job, assert_no_process_left, clean_env

# A run far longer than any test: only a fault (or max-steps) ends it.
ENDLESS = [*TINY, "--steps-per-epoch", "100000", "--log-every", "5"]
LAUNCH_TIMEOUT_S = 120




@pytest.mark.parametrize("victim", [0, 1], ids=["rank0", "rank1"])
def test_killed_rank_ends_the_job(tmp_path, sample_store, victim):
    out = tmp_path / "run"
    job = Job([], [*ENDLESS, "--data", str(sample_store), "--out", str(out)], tmp_path)
    try:
        job.wait_for_line(r"Step nr: \[10/")  # mid-epoch, both ranks busy stepping
        workers = job.workers()
        killed_at = time.monotonic()
        workers[victim].send_signal(signal.SIGKILL)
        code = job.wait(timeout=60)
        seconds = time.monotonic() - killed_at
    finally:
        job.kill_leftovers()
    print(f"\nkill -9 of rank {victim} -> launcher exit: {seconds:.2f} s")
    assert code == 128 + signal.SIGKILL
    assert seconds < 30
    assert job.last_stderr_line() == (f"edsr-dist launch: rank {victim} (device {victim}) was killed by signal "
                                      f"SIGKILL; see {out / 'logs' / f'rank_{victim}.log'}")
    assert_no_process_left(job.pids)
    survivor_log = (out / "logs" / f"rank_{1 - victim}.log").read_text()
    assert "Traceback" not in survivor_log  # it either said one line (lost the connection) or was stopped


def test_hung_rank_fails_within_the_collective_timeout(tmp_path, sample_store):
    out = tmp_path / "run"
    timeout_s = 10
    job = Job([], [*ENDLESS, "--data", str(sample_store), "--out", str(out), "--dist-timeout", str(timeout_s)],
              tmp_path)
    try:
        job.wait_for_line(r"Step nr: \[10/")
        workers = job.workers()
        stopped_at = time.monotonic()
        workers[1].send_signal(signal.SIGSTOP)  # alive but silent: rank 0's next collective never completes
        code = job.wait(timeout=60)
        seconds = time.monotonic() - stopped_at
    finally:
        job.kill_leftovers()
    print(f"\nSIGSTOP of rank 1 -> launcher exit: {seconds:.2f} s (--dist-timeout {timeout_s})")
    assert code == 4
    # The timeout fires, then the launcher waits briefly for other timeouts and stops the hung rank.
    assert timeout_s - 1 < seconds < timeout_s + 15
    line = job.last_stderr_line()
    assert line == (f"edsr-dist launch: rank 1 (device 1, process stopped) stopped responding: rank 0 gave up "
                    f"waiting for it in a collective (exit 4: a collective timed out after {timeout_s} s); "
                    f"see {out / 'logs' / 'rank_1.log'}")
    rank0 = (out / "logs" / "rank_0.log").read_text()
    assert "Traceback" not in rank0
    worker_line = rank0.strip().splitlines()[-1]
    assert worker_line.startswith(f"edsr-dist train: error: rank 0: a collective timed out after {timeout_s} s (")
    assert "raise --dist-timeout" in worker_line
    assert_no_process_left(job.pids)


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.ckpt"))


def test_sigterm_to_launcher_checkpoints_and_resume_continues(tmp_path, sample_store):
    from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint

    out = tmp_path / "run"
    train = [*ENDLESS, "--data", str(sample_store), "--out", str(out)]
    job = Job([], train, tmp_path)
    try:
        job.wait_for_line(r"Step nr: \[10/")
        job.workers()
        job.proc.send_signal(signal.SIGTERM)  # what a scheduler does on preemption
        code = job.wait(timeout=60)
    finally:
        job.kill_leftovers()
    assert code == 128 + signal.SIGTERM
    assert job.last_stderr_line() == ("edsr-dist launch: received SIGTERM; stopped 2 workers; interrupted; rank 0 "
                                      "saved a checkpoint at a step boundary: continue with --resume auto")
    assert_no_process_left(job.pids)
    (stopped_at,) = checkpoint_steps(out)  # no periodic saves in this run: only the preemption checkpoint
    assert stopped_at >= 10
    assert f"Interrupted at step {stopped_at}" in "".join(job.stdout)
    assert "edsr-dist train: interrupted" in (out / "logs" / "rank_1.log").read_text()

    resumed = Job([], [*train, "--resume", "auto", "--max-steps", str(stopped_at + 5)], tmp_path)
    try:
        code = resumed.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        resumed.kill_leftovers()
    console = "".join(resumed.stdout)
    assert code == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}.ckpt'} at step {stopped_at}" in console
    assert load_checkpoint(find_checkpoint(out))["step"] == stopped_at + 5
    # One metrics file for both runs: the step numbers go on from where the first run stopped, never back to 0.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] > stopped_at


def test_sigterm_to_one_worker_stops_all_at_the_same_step(tmp_path, sample_store):
    """A scheduler that signals the workers themselves (not the launcher): the stop request travels with the
    step's all-reduce, so every rank stops at the same step and rank 0 still writes the checkpoint."""
    out = tmp_path / "run"
    job = Job([], [*ENDLESS, "--data", str(sample_store), "--out", str(out)], tmp_path)
    try:
        job.wait_for_line(r"Step nr: \[10/")
        job.workers()[1].send_signal(signal.SIGTERM)
        code = job.wait(timeout=60)
    finally:
        job.kill_leftovers()
    assert code == 143
    (step,) = checkpoint_steps(out)
    assert job.last_stderr_line() == (f"edsr-dist launch: rank 0 (device 0) interrupted at step {step}; checkpoint "
                                      f"saved, continue with --resume auto; see {out / 'logs' / 'rank_0.log'}")
    assert f"edsr-dist train: interrupted at step {step};" in (out / "logs" / "rank_1.log").read_text()
    assert_no_process_left(job.pids)


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, sample_store):
    """A learning rate of 1e6 in fp32: step 1 is fine, its update blows the weights up, every later loss is inf/NaN."""
    from edsr_dist.state.checkpoint import load_checkpoint

    out = tmp_path / "run"
    env = clean_env()
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "train", *TINY, "--steps-per-epoch", "200",
                             "--lr", "1e6", "--log-every", "1", "--save-every-steps", "1", "--data", str(sample_store),
                             "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    good = out / "checkpoints" / "step_00000001.ckpt"
    assert lines[0] == (f"edsr-dist train: error: loss became NaN/inf for 5 consecutive steps (at step 6); the last "
                        f"good checkpoint {good} is kept; lower --lr, then --resume auto or start again")
    # Only step 1 had a finite loss (logged every step); no save happened during the bad steps, so retention
    # (keep_last 3) did not push the good checkpoint out.
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]
    assert len(logged) == 1 and '"step": 1,' in logged[0]
    assert checkpoint_steps(out) == [1]
    state = load_checkpoint(good)
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _documented_exit_codes() -> dict[str, str]:
    """The exit-code table of docs/OPERATIONS.md: code cell -> meaning cell."""
    section = (REPO / "docs" / "OPERATIONS.md").read_text().split("### Exit codes", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {code.strip(): meaning.strip() for code, meaning in rows}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_a_direct_train_exits_as_the_docs_say(tmp_path, sample_store, sig):
    """`edsr-dist train` without a launcher, Ctrl-C or SIGTERM mid-epoch: a checkpoint, then 128 + the signal,
    the code the exit-code table (docs/OPERATIONS.md) gives for that signal."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edsr_dist", "train", *ENDLESS, "--data", str(sample_store),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=clean_env())
    try:
        for line in proc.stdout:
            if line.startswith("Step nr: [5/"):
                break
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig
    assert re.search(r"edsr-dist train: interrupted at step \d+; checkpoint saved", stderr), stderr
    assert list((out / "checkpoints").glob("step_*.ckpt"))
    assert signal.Signals(sig).name in _documented_exit_codes()[str(128 + sig)]
