"""Helpers shared by the tests (imported as `from helpers import ...`; fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

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


def clean_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK_TABLE_FILE", "MASTER_PORT", "MASTER_ADDR", "JOB_ID", "OMP_NUM_THREADS", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "RANK_ID", "RANK_SIZE", "EDSR_DIST_LAUNCHER"):
        env.pop(name, None)
    return env


class Job:
    """`edsr-dist launch` (by default `--nproc 2`) in the background, its console read line by line."""

    def __init__(self, launch_args: list[str], train_args: list[str], cwd: Path, nproc: int | None = 2,
                 command: list[str] | None = None):
        """`command`: what runs instead of `edsr-dist launch [--nproc N] LAUNCH_ARGS --` (torchrun, for example)."""
        workers = ["--nproc", str(nproc)] if nproc else []
        command = command or [sys.executable, "-m", "edsr_dist", "launch", *workers, *launch_args, "--"]
        self.proc = subprocess.Popen([*command, *train_args], cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pids: list[int] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; console so far:\n{''.join(self.stdout)}"
                             f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def workers(self) -> dict[int, psutil.Process]:
        """rank -> worker process; remembers every pid of the job's process tree for `assert_no_process_left`."""
        children = psutil.Process(self.proc.pid).children()
        ranks = {int(child.environ()["RANK"]): child for child in children if "RANK" in child.environ()}
        self.pids = [p.pid for child in children for p in [child, *child.children(recursive=True)]]
        return ranks

    def wait(self, timeout: float = 120) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill_leftovers()
        self._reader.join(timeout=5)
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        """Only after a failed assertion: never leave a stopped or stuck worker on the machine."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass

    def last_stderr_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]


# A tiny, fast configuration of the sample preset for multi-process tests.
TINY = ["--preset", "sample", "--num-blocks", "2", "--num-filters", "8", "--batch-size", "4", "--patch-size", "16",
        "--epochs", "1", "--steps-per-epoch", "20", "--precision", "fp32", "--max-val-images", "2",
        "--samples-png", "false", "--num-threads", "1", "--progress", "false", "--tensorboard", "false",
        "--log-every", "5"]


# ---- Ascend rank tables


def v1(servers: list[tuple[str, list[int]]], numbers_as=str) -> dict:
    """A valid version 1.0 table: servers as (server_id, device ids); ranks numbered in server order."""
    doc = {"version": "1.0", "status": "completed", "server_count": numbers_as(len(servers)), "server_list": []}
    rank = 0
    for s, (server_id, device_ids) in enumerate(servers):
        devices = []
        for d in device_ids:
            devices.append({"device_id": numbers_as(d), "device_ip": f"192.168.{100 + d}.{101 + s}",
                            "rank_id": numbers_as(rank)})
            rank += 1
        doc["server_list"].append({"server_id": server_id, "device": devices})
    return doc


def write_table(tmp_path: Path, doc, name: str = "table.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


# ---- image folders for store tests

def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random but smooth-ish image (bicubic of noise), so resampling is exercised on realistic content."""
    small = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def make_hr_folder(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = {}
    for number, (height, width) in enumerate(sizes, start=1):
        stem = f"{number:04d}"
        images[stem] = smooth_image(rng, height, width)
        write_png(folder / f"{stem}.png", images[stem])
    return images


def make_official_lr(folder: Path, hr: dict[str, np.ndarray], scales, seed: int = 1) -> dict[tuple[str, int], np.ndarray]:
    """DIV2K layout X{s}/<stem>x{s}.png with arbitrary content (proves the files are used, not regenerated)."""
    rng = np.random.default_rng(seed)
    lrs = {}
    for stem, image in hr.items():
        for scale in scales:
            lr = rng.integers(0, 256, (image.shape[0] // scale, image.shape[1] // scale, 3), dtype=np.uint8)
            write_png(folder / f"X{scale}" / f"{stem}x{scale}.png", lr)
            lrs[stem, scale] = lr
    return lrs
