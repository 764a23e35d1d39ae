import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, cwd, env=None, timeout=240):
    """`python -m edsr_dist ARGS` in a subprocess, as a user would run it."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "edsr_dist", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def spawn_ranks(command, world_size, cwd, extra_env=None, timeout=240):
    """Start `world_size` processes with torchrun-style variables (a real Gloo group on localhost)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", **(extra_env or {}))
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [p.returncode for p in procs], outputs


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over all tensors of two state dicts, relative to each tensor's largest |a|."""
    return max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() or 1.0) for k in a)


def assert_no_process_left(pids: list[int], within_s: float = 5.0) -> None:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    from edsr_dist.data.builder import build_sample_store

    path = tmp_path_factory.mktemp("store") / "sample.h5"
    build_sample_store(path)
    return path


# A tiny, fast configuration of the sample preset for multi-process tests.
TINY = ["--preset", "sample", "--num-blocks", "2", "--num-filters", "8", "--batch-size", "4", "--patch-size", "16",
        "--epochs", "1", "--steps-per-epoch", "20", "--precision", "fp32", "--max-val-images", "2",
        "--samples-png", "false", "--num-threads", "1", "--progress", "false", "--tensorboard", "false",
        "--log-every", "5"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_store) -> Path:
    """A finished real 10-step TINY run (one checkpoint, step 10) for tests that read it; copy it before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "10"],
                     cwd=out.parent)
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoints" / "step_00000010.ckpt").is_file()
    return out
