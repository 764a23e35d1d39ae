"""Exact resume after SIGKILL (1 and 2 workers, mid-epoch and at an epoch end), resume with another world size,
a kill in the middle of a checkpoint write, a truncated newest checkpoint, and a failing checkpoint write.

Killed runs go through the real CLI with one test-only hook (helpers.HOOKED_TRAIN): rank 0 pauses right after
writing the checkpoint of step k (or halfway through writing it), so the test can SIGKILL the process groups at a
known point; nothing in the trainer is told. The resumed run gets the very same command line (which already has
--resume auto), as a user would type it again.
"""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    REPO,
    STEPS_PER_EPOCH,
    assert_bit_identical,
    final_state,
    kill_when,
    latest_is,
    max_relative_difference,
    resume_args,
    run_cli,
    spawn_ranks,
    start_hooked,
)

from edsr_dist.state.checkpoint import find_checkpoint, verify_checkpoint

TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def run_killed_at(store, out: Path, step: int, world_size: int = 1) -> None:
    procs = start_hooked(resume_args(store, out, save_every_steps=step), out.parent, {"PAUSE_AFTER_SAVE_STEP": step},
                         world_size=world_size)
    kill_when(procs, latest_is(out, step))
    assert final_state(out)["step"] == step


@pytest.mark.parametrize("kill_step", [7, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_sigkill_then_resume_is_bit_identical_one_worker(sample_store, tmp_path, reference_1w, kill_step):
    out = tmp_path / "run"
    run_killed_at(sample_store, out, kill_step)
    result = run_cli(["train", *resume_args(sample_store, out, save_every_steps=kill_step)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"step_{kill_step:08d}.ckpt at step {kill_step}" in result.stdout  # really resumed, not restarted
    state = final_state(out)
    assert state["step"] == TOTAL_STEPS
    assert_bit_identical(state["model"], reference_1w)


def test_sigkill_two_workers_resume_with_two_and_with_one(sample_store, tmp_path, reference_1w, reference_2w):
    out = tmp_path / "run"
    run_killed_at(sample_store, out, 13, world_size=2)
    shutil.copytree(out, tmp_path / "run_for_one")

    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train",
                                  *resume_args(sample_store, out, save_every_steps=13)], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    assert "step_00000013.ckpt at step 13" in outputs[0]
    assert_bit_identical(final_state(out)["model"], reference_2w)

    # Another world size: the sample stream and the lr depend on the step only, so 2 -> 1 workers continues the
    # same run; only the float reduction order differs.
    result = run_cli(["train", *resume_args(sample_store, tmp_path / "run_for_one", save_every_steps=13)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 worker(s)" in result.stdout and "step_00000013.ckpt at step 13" in result.stdout
    resumed = final_state(tmp_path / "run_for_one")
    assert resumed["step"] == TOTAL_STEPS and resumed["meta"]["world_size"] == 1
    assert max_relative_difference(reference_2w, resumed["model"]) < 1e-4
    assert max_relative_difference(reference_1w, resumed["model"]) < 1e-4


def test_kill_mid_write_and_truncated_newest_fall_back_to_the_previous_checkpoint(sample_store, tmp_path, reference_1w):
    out = tmp_path / "run"
    folder = out / "checkpoints"
    procs = start_hooked(resume_args(sample_store, out, save_every_steps=5), tmp_path, {"PAUSE_MID_WRITE_STEP": 15})
    kill_when(procs, lambda: any(p.name.startswith(".step_00000015.ckpt.tmp-") for p in folder.glob(".*")))
    # The half-written file never got the real name; `latest` still names the last complete checkpoint.
    assert not (folder / "step_00000015.ckpt").exists()
    assert (folder / "latest").read_text().strip() == "step_00000010.ckpt"
    verify_checkpoint(folder / "step_00000010.ckpt")

    # Now damage the newest complete one too (as a copy cut short would): resume must fall back to step 5.
    newest = folder / "step_00000010.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run_cli(["train", *resume_args(sample_store, out, save_every_steps=5)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # The killed run left its owner record: taken over, with a note (docs/OPERATIONS.md, "One writer per run folder").
    assert lines[0].startswith(f"edsr-dist: took over --out {out} from job ") and lines[0].endswith(" is gone")
    warnings = lines[1:]
    assert len(warnings) == 1, result.stderr
    assert "step_00000010.ckpt" in warnings[0] and "truncated" in warnings[0]
    assert "step_00000005.ckpt at step 5" in result.stdout
    assert not list(folder.glob(".*.tmp-*"))  # the killed writer's leftover is cleaned up
    state = final_state(out)
    assert state["step"] == TOTAL_STEPS
    assert_bit_identical(state["model"], reference_1w)


def test_failing_write_keeps_the_previous_checkpoint_and_stops_with_one_line(sample_store, tmp_path):
    out = tmp_path / "run"
    first = run_cli(["train", *resume_args(sample_store, out), "--max-steps", "5"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "step_00000005.ckpt" in before

    def small_file_limit():
        # A full disk as this process sees it: no file may grow past 32 KiB (a checkpoint here is ~90 KiB).
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "train", *resume_args(sample_store, out, 3)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                            preexec_fn=small_file_limit)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write a checkpoint" in lines[0] and "ulimit" in lines[0], result.stderr
    assert "at step 5" in result.stdout  # it resumed, trained on and failed at its first save (step 6)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before  # nothing changed, nothing half-written left behind
    verify_checkpoint(folder / "step_00000005.ckpt")
    assert find_checkpoint(out) == folder / "step_00000005.ckpt"
