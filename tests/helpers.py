"""Helpers shared by the tests (imported as `from helpers import ...`; fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.state.owner import OwnerRecord

REPO = Path(__file__).resolve().parents[1]


def free_port(span: int = 1) -> int:
    """A port p with p .. p + span - 1 free now. span 2 for a multi-server launch with --max-restarts: its
    launchers meet on the master port + 1, and a port there held by another test's process (a TCPStore of its own)
    would leave the second launcher waiting on the wrong store."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + span - 1 > 65535:
                continue
            with contextlib.ExitStack() as held:
                try:
                    for other in range(port + 1, port + span):
                        sock = held.enter_context(socket.socket())
                        sock.bind(("127.0.0.1", other))
                except OSError:
                    continue
            return port


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


def kill_job(proc: subprocess.Popen, pids) -> None:
    """SIGKILL a job's root process and every descendant remembered while it ran (a stopped or stuck worker is
    never left on the machine, even after a failed assertion)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def kill_groups(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the process group of each still running process started with `start_new_session=True` (every group
    first, then wait: a surviving rank must not notice its dead peer and exit by itself)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def still_running(pids, within_s: float = 5.0) -> list[int]:
    """Those of `pids` still running (zombies count as ended) after giving them up to `within_s` to end."""
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def assert_no_process_left(pids: list[int], within_s: float = 5.0) -> None:
    assert not still_running(pids, within_s), "processes left behind"


def clean_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK_TABLE_FILE", "MASTER_PORT", "MASTER_ADDR", "JOB_ID", "OMP_NUM_THREADS", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "RANK_ID", "RANK_SIZE", "EDSR_DIST_LAUNCHER"):
        env.pop(name, None)
    return env


class Job:
    """`edsr-dist launch` (by default `--nproc 2`) in the background, its console read line by line."""

    def __init__(self, launch_args: list[str], train_args: list[str], cwd: Path, nproc: int | None = 2,
                 command: list[str] | None = None, env: dict[str, str] | None = None, merge_stderr: bool = False):
        """`command`: what runs instead of `edsr-dist launch [--nproc N] LAUNCH_ARGS --` (torchrun, for example);
        `merge_stderr`: read stderr with stdout, line by line (torchrun's agent logs there)."""
        workers = ["--nproc", str(nproc)] if nproc else []
        command = command or [sys.executable, "-m", "edsr_dist", "launch", *workers, *launch_args, "--"]
        self.proc = subprocess.Popen([*command, *train_args], cwd=cwd, env=dict(clean_env(), **(env or {})),
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pids: list[int] = []
        self.left_behind: list[int] | None = None  # set by kill_leftovers once the job ended by itself

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
        stderr = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
        raise AssertionError(f"no line matching {pattern!r}; console so far:\n{''.join(self.stdout)[-8000:]}{stderr}")

    def workers(self) -> dict[int, psutil.Process]:
        """rank -> worker process; remembers every pid of the job's process tree for `assert_no_process_left`."""
        children = psutil.Process(self.proc.pid).children()
        ranks = {int(child.environ()["RANK"]): child for child in children if "RANK" in child.environ()}
        self.pids = sorted(set(self.pids) | {p.pid for child in children
                                             for p in [child, *child.children(recursive=True)]})
        return ranks

    def worker(self, timeout: float = 90) -> psutil.Process:
        """The first worker, once it is started (remembered for `kill_leftovers`)."""
        deadline = time.monotonic() + timeout
        while not (ranks := self.workers()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.05)
        return next(iter(ranks.values()))

    def wait(self, timeout: float = 120) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill_leftovers()
        self._reader.join(timeout=5)
        if self.proc.stderr:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        """Never leave a stopped or stuck worker on the machine. When the job already ended by itself, what of its
        process tree still runs (given 5 s to end) is first kept in `left_behind`, for the test to assert on (the
        kill would otherwise hide it)."""
        if self.proc.poll() is not None and self.left_behind is None:
            self.left_behind = still_running(self.pids)
        kill_job(self.proc, self.pids)

    def assert_nothing_left(self) -> None:
        """The job's whole process tree ended with it (as found before `kill_leftovers` killed any leftover)."""
        assert self.left_behind == [], f"processes left behind: {self.left_behind}"
        assert_no_process_left(self.pids)

    def last_stderr_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]


# A tiny, fast configuration of the sample preset for multi-process tests.
TINY = ["--preset", "sample", "--num-blocks", "2", "--num-filters", "8", "--batch-size", "4", "--patch-size", "16",
        "--epochs", "1", "--steps-per-epoch", "20", "--precision", "fp32", "--max-val-images", "2",
        "--samples-png", "false", "--num-threads", "1", "--progress", "false", "--tensorboard", "false",
        "--log-every", "5"]


# ---- runs and their checkpoints

STEPS_PER_EPOCH = 10


def resume_args(store, out, save_every_steps: int = 0) -> list[str]:
    """The run the resume tests interrupt: two epochs of STEPS_PER_EPOCH, validated and checkpointed at the end of
    each (so a resumed run crosses both), --resume auto (so the same command line resumes it)."""
    args = TINY + ["--data", str(store), "--out", str(out), "--epochs", "2", "--steps-per-epoch", str(STEPS_PER_EPOCH),
                   "--validate-every", "1", "--save-every", "1", "--max-val-images", "1", "--resume", "auto"]
    if save_every_steps:
        args += ["--save-every-steps", str(save_every_steps)]
    return args


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
        kill_groups(procs)
    assert all(p.returncode == -signal.SIGKILL for p in procs), [p.returncode for p in procs]


# workers/hooked_train.py: the CLI with test-only pauses around checkpoint writes (its docstring lists them).
HOOKED_TRAIN = REPO / "tests" / "workers" / "hooked_train.py"


def start_hooked(args: list[str], cwd: Path, pauses: dict, world_size: int = 1, env: dict | None = None,
                 capture: bool = False) -> list[subprocess.Popen]:
    """`edsr-dist train ARGS` through HOOKED_TRAIN with the pause variables `pauses`, as `world_size` ranks of a
    Gloo group on localhost (one process without rank variables when 1), each rank in its own process group
    (`kill_groups`). `capture`: stdout and stderr as text pipes (else discarded)."""
    port = free_port()
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    procs = []
    for rank in range(world_size):
        rank_env = dict(clean_env(), OMP_NUM_THREADS="1", **{k: str(v) for k, v in pauses.items()}, **(env or {}))
        if world_size > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HOOKED_TRAIN), "train", *args], cwd=cwd, env=rank_env,
                                      stdout=output, stderr=output, text=capture, start_new_session=True))
    return procs


def final_state(out: Path) -> dict:
    """The newest checkpoint of a run folder, loaded."""
    path = find_checkpoint(out)
    assert path is not None, f"no checkpoint in {out}"
    return load_checkpoint(path)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{differing} differ"


def latest_is(out: Path, step: int):
    """A condition: the run's `latest` pointer names the checkpoint of `step`."""
    pointer = out / "checkpoints" / "latest"
    return lambda: pointer.exists() and pointer.read_text().strip() == f"step_{step:08d}.ckpt"


def owner_record(**changes) -> OwnerRecord:
    """This process's owner record (heartbeat every 30 s) with `changes`."""
    return dataclasses.replace(OwnerRecord.mine(30.0), **changes)


def write_owner(folder: Path, record: OwnerRecord) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".owner.json").write_bytes(record.to_bytes())


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


def cloud_table(hosts_devices: list[tuple[str, str, list[int]]]) -> dict:
    """group_list ("cloud" mode) table: (pod_name, server_id, device ids) per instance."""
    instances = [{"pod_name": pod, "server_id": host,
                  "devices": [{"device_id": str(d), "device_ip": f"192.168.{i}.{d + 1}"} for d in devices]}
                 for i, (pod, host, devices) in enumerate(hosts_devices)]
    return {"status": "completed", "group_count": "1", "group_list": [
        {"group_name": "job", "device_count": str(sum(len(d) for _, _, d in hosts_devices)),
         "instance_count": str(len(instances)), "instance_list": instances}]}


def v1_with_ips(servers: list[tuple[str, list[tuple[int, str]]]]) -> dict:
    """A version 1.0 table as HCCL samples write it: (server_id, [(device_id, device_ip or "")]); no server_count."""
    rank = 0
    out = []
    for host, devices in servers:
        entries = []
        for device_id, ip in devices:
            entry = {"device_id": str(device_id), "rank_id": str(rank)}
            if ip:
                entry["device_ip"] = ip
            entries.append(entry)
            rank += 1
        out.append({"server_id": host, "device": entries})
    return {"version": "1.0", "status": "completed", "server_list": out}


# Real tables from public repositories (their sources: tests/data/rank_tables/SOURCES.md).
REAL_RANK_TABLES = REPO / "tests" / "data" / "rank_tables"


def write_table(tmp_path: Path, doc, name: str = "table.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


FAKE_NPU = REPO / "tests" / "fake_npu"


def fake_npu_env(**extra) -> dict:
    """The environment of a process that imports the fake torch_npu (tests/fake_npu) instead of none, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "ASCEND_RT_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{FAKE_NPU}"
    env.update(extra)
    return env


def launch_dry_run(args: list[str], env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`edsr-dist launch ARGS --dry-run --exec -- true` without the Ascend variables of this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "RANK", "ASCEND_RT"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "edsr_dist", "launch", *args, "--dry-run", "--exec", "--", "true"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


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
