"""Exact resume after SIGKILL (1 and 2 workers, mid-epoch and at an epoch end), resume with another world size,
a kill in the middle of a checkpoint write, a truncated newest checkpoint, and a failing checkpoint write.

Killed runs go through the real CLI with one test-only hook (HOOKED_TRAIN): rank 0 pauses right after writing the
checkpoint of step k (or halfway through writing it), so the test can SIGKILL the process groups at a known point;
nothing in the trainer is told. The resumed run gets the very same command line (which already has --resume auto),
as a user would type it again.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, free_port, max_relative_difference, run_cli, spawn_ranks

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint, verify_checkpoint

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 2 * STEPS_PER_EPOCH

HOOKED_TRAIN = r"""
import os, sys, time
import edsr_dist.state.checkpoint as checkpoint

pause_after = int(os.environ.get("PAUSE_AFTER_SAVE_STEP", "0"))
pause_mid_write = int(os.environ.get("PAUSE_MID_WRITE_STEP", "0"))
real_save, real_write = checkpoint.save_checkpoint, checkpoint.atomic_write_bytes

def save(out_dir, state, step, keep_last, psnr=None):
    path = real_save(out_dir, state, step, keep_last, psnr)
    if step == pause_after:
        time.sleep(600)  # the test SIGKILLs us here
    return path

def write(path, *parts):
    if path.name == f"step_{pause_mid_write:08d}.ckpt":
        data = b"".join(parts)
        # Half of the file under the temporary name the real writer uses, then wait for the kill.
        with open(path.with_name(f".{path.name}.tmp-{os.getpid()}"), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        time.sleep(600)
    real_write(path, *parts)

checkpoint.save_checkpoint, checkpoint.atomic_write_bytes = save, write
from edsr_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(store, out, save_every_steps: int = 0) -> list[str]:
    # Validation and an epoch-end checkpoint every epoch, so a resumed run crosses both.
    args = TINY + ["--data", str(store), "--out", str(out), "--epochs", "2", "--steps-per-epoch", str(STEPS_PER_EPOCH),
                   "--validate-every", "1", "--save-every", "1", "--max-val-images", "1", "--resume", "auto"]
    if save_every_steps:
        args += ["--save-every-steps", str(save_every_steps)]
    return args


def final_state(out) -> dict:
    path = find_checkpoint(out)
    assert path is not None, f"no checkpoint in {out}"
    return load_checkpoint(path)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"




def start_hooked(args, world_size: int, cwd: Path, **pause) -> list[subprocess.Popen]:
    """Start `world_size` ranks of the hooked trainer, each in its own process group."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{k: str(v) for k, v in pause.items()})
        if world_size == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, "-c", HOOKED_TRAIN, "train", *args], cwd=cwd, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    return procs


def kill_when(procs: list[subprocess.Popen], ready, timeout: float = 180.0) -> None:
    """SIGKILL every process group as soon as `ready()` is true (the run must not end by itself first)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead, f"a rank exited with {dead} before the kill point"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.02)
    finally:
        # Every group first, then wait: a surviving rank must not notice its dead peer and exit by itself.
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
    assert all(p.returncode == -signal.SIGKILL for p in procs), [p.returncode for p in procs]


def latest_is(out: Path, step: int):
    pointer = out / "checkpoints" / "latest"
    return lambda: pointer.exists() and pointer.read_text().strip() == f"step_{step:08d}.ckpt"


def run_killed_at(store, out: Path, step: int, world_size: int = 1) -> None:
    procs = start_hooked(train_args(store, out, save_every_steps=step), world_size, out.parent,
                         PAUSE_AFTER_SAVE_STEP=step)
    kill_when(procs, latest_is(out, step))
    assert final_state(out)["step"] == step


@pytest.fixture(scope="module")
def reference_1w(sample_store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref1") / "run"
    result = run_cli(["train", *train_args(sample_store, out)], cwd=out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    state = final_state(out)
    assert state["step"] == TOTAL_STEPS
    return state["model"]


@pytest.fixture(scope="module")
def reference_2w(sample_store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref2") / "run"
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *train_args(sample_store, out)], 2,
                                 cwd=out.parent)
    assert codes == [0, 0], outputs
    state = final_state(out)
    assert state["step"] == TOTAL_STEPS and state["meta"]["world_size"] == 2
    return state["model"]


@pytest.mark.parametrize("kill_step", [7, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_sigkill_then_resume_is_bit_identical_one_worker(sample_store, tmp_path, reference_1w, kill_step):
    out = tmp_path / "run"
    run_killed_at(sample_store, out, kill_step)
    result = run_cli(["train", *train_args(sample_store, out, save_every_steps=kill_step)], cwd=tmp_path)
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
                                  *train_args(sample_store, out, save_every_steps=13)], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    assert "step_00000013.ckpt at step 13" in outputs[0]
    assert_bit_identical(final_state(out)["model"], reference_2w)

    # Another world size: the sample stream and the lr depend on the step only, so 2 -> 1 workers continues the
    # same run; only the float reduction order differs.
    result = run_cli(["train", *train_args(sample_store, tmp_path / "run_for_one", save_every_steps=13)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 worker(s)" in result.stdout and "step_00000013.ckpt at step 13" in result.stdout
    resumed = final_state(tmp_path / "run_for_one")
    assert resumed["step"] == TOTAL_STEPS and resumed["meta"]["world_size"] == 1
    assert max_relative_difference(reference_2w, resumed["model"]) < 1e-4
    assert max_relative_difference(reference_1w, resumed["model"]) < 1e-4


def test_kill_mid_write_and_truncated_newest_fall_back_to_the_previous_checkpoint(sample_store, tmp_path, reference_1w):
    out = tmp_path / "run"
    folder = out / "checkpoints"
    procs = start_hooked(train_args(sample_store, out, save_every_steps=5), 1, tmp_path, PAUSE_MID_WRITE_STEP=15)
    kill_when(procs, lambda: any(p.name.startswith(".step_00000015.ckpt.tmp-") for p in folder.glob(".*")))
    # The half-written file never got the real name; `latest` still names the last complete checkpoint.
    assert not (folder / "step_00000015.ckpt").exists()
    assert (folder / "latest").read_text().strip() == "step_00000010.ckpt"
    verify_checkpoint(folder / "step_00000010.ckpt")

    # Now damage the newest complete one too (as a copy cut short would): resume must fall back to step 5.
    newest = folder / "step_00000010.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run_cli(["train", *train_args(sample_store, out, save_every_steps=5)], cwd=tmp_path)
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
    first = run_cli(["train", *train_args(sample_store, out), "--max-steps", "5"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "step_00000005.ckpt" in before

    def small_file_limit():
        # A full disk as this process sees it: no file may grow past 32 KiB (a checkpoint here is ~90 KiB).
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "train", *train_args(sample_store, out, 3)],
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
