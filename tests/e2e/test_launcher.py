"""The launcher with real `--exec` worker processes: environment, pinning, logs, supervision, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_no_process_left

WORKER = r'''
import json, os, signal, subprocess, sys, time
mode, shared = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK_ID", "RANK_SIZE", "DEVICE_ID",
        "ASCEND_DEVICE_ID", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "JOB_ID", "EDSR_DIST_LAUNCHER",
        "RANK_TABLE_FILE"]
print(json.dumps({"pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0)),
                  "env": {k: os.environ.get(k) for k in keys}}), flush=True)
print(f"hello from rank {rank}", flush=True)

def ready():
    open(os.path.join(shared, f"ready_{rank}"), "w").close()

def wait_for(count):
    deadline = time.time() + 30
    while len([f for f in os.listdir(shared) if f.startswith("ready_")]) < count and time.time() < deadline:
        time.sleep(0.02)

if mode == "ok":
    sys.exit(0)
if mode == "fail":  # rank 1 fails once everyone is up; rank 0 sleeps with a child of its own
    if rank == 0:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"grandchild": child.pid}), flush=True)
        ready()
        time.sleep(60)
    ready()
    wait_for(2)
    sys.exit(3)
if mode == "sigkill":
    ready()
    if rank == 1:
        wait_for(2)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
if mode == "hang":  # rank 1 ignores SIGTERM, so only the SIGKILL after the grace period stops it
    if rank == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready()
    time.sleep(60)
'''


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    shared = tmp_path / "shared"
    shared.mkdir()
    return script, shared


def env_without_launch_vars() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK_TABLE_FILE", "MASTER_PORT", "MASTER_ADDR", "JOB_ID", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return env


def launch(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edsr_dist", "launch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or env_without_launch_vars())


def records(log: Path) -> dict:
    """Merge the JSON lines a worker printed into one dict."""
    merged: dict = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


def expected_shares(workers: int) -> list[list[int]]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < workers:
        return [[allowed[i % len(allowed)]] for i in range(workers)]
    share = len(allowed) // workers
    return [allowed[i * share:(i + 1) * share] for i in range(workers)]




def test_two_workers_env_affinity_and_logs(tmp_path, worker):
    script, shared = worker
    logs = tmp_path / "logs"
    result = launch("--nproc", "2", "--log-dir", str(logs), "--master-port", "29999", "--exec", "--",
                    sys.executable, str(script), "ok", str(shared))
    assert result.returncode == 0, result.stderr
    per_rank = [records(logs / f"rank_{r}.log") for r in range(2)]
    shares = expected_shares(2)
    job_ids = set()
    for rank, rec in enumerate(per_rank):
        env = rec["env"]
        assert env["RANK"] == env["RANK_ID"] == str(rank)
        assert env["LOCAL_RANK"] == env["DEVICE_ID"] == env["ASCEND_DEVICE_ID"] == str(rank)
        assert env["WORLD_SIZE"] == env["RANK_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")
        assert env["EDSR_DIST_LAUNCHER"] == "1" and env["RANK_TABLE_FILE"] is None
        assert rec["affinity"] == shares[rank]
        assert env["OMP_NUM_THREADS"] == str(len(shares[rank]))
        job_ids.add(env["JOB_ID"])
    assert len(job_ids) == 1 and None not in job_ids
    assert per_rank[0]["pid"] != per_rank[1]["pid"]
    # Rank 0 on the console, rank 1 only in its log.
    assert "hello from rank 0" in result.stdout and "hello from rank 1" not in result.stdout
    assert "hello from rank 1" in (logs / "rank_1.log").read_text()


def test_free_port_and_no_bind(tmp_path, worker):
    script, shared = worker
    logs = tmp_path / "logs"
    env = dict(env_without_launch_vars(), OMP_NUM_THREADS="3")
    result = launch("--nproc", "2", "--no-bind", "--log-dir", str(logs), "--exec", "--",
                    sys.executable, str(script), "ok", str(shared), env=env)
    assert result.returncode == 0, result.stderr
    recs = [records(logs / f"rank_{r}.log") for r in range(2)]
    assert recs[0]["env"]["MASTER_PORT"] == recs[1]["env"]["MASTER_PORT"]
    assert 1 <= int(recs[0]["env"]["MASTER_PORT"]) <= 65535
    for rec in recs:
        assert rec["affinity"] == sorted(os.sched_getaffinity(0))  # not pinned
        assert rec["env"]["OMP_NUM_THREADS"] == "3"  # the user's choice survives when not binding


def test_failing_worker_stops_the_others(tmp_path, worker):
    script, shared = worker
    logs = tmp_path / "logs"
    started = time.monotonic()
    result = launch("--nproc", "2", "--log-dir", str(logs), "--grace", "5", "--exec", "--",
                    sys.executable, str(script), "fail", str(shared))
    assert result.returncode == 3
    assert time.monotonic() - started < 30  # rank 0 would sleep 60 s if it were not stopped
    errors = [line for line in result.stderr.splitlines() if "exited" in line or "killed" in line]
    assert errors == [f"edsr-dist launch: rank 1 (device 1) exited with code 3; see {logs / 'rank_1.log'}"]
    rank0 = records(logs / "rank_0.log")
    rank1 = records(logs / "rank_1.log")
    assert_no_process_left([rank0["pid"], rank0["grandchild"], rank1["pid"]])


def test_worker_killed_by_signal_is_named(tmp_path, worker):
    script, shared = worker
    logs = tmp_path / "logs"
    result = launch("--nproc", "2", "--log-dir", str(logs), "--exec", "--",
                    sys.executable, str(script), "sigkill", str(shared))
    assert result.returncode == 128 + signal.SIGKILL
    assert "rank 1 (device 1) was killed by signal SIGKILL" in result.stderr
    assert_no_process_left([records(logs / f"rank_{r}.log")["pid"] for r in range(2)])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_to_launcher_stops_all_workers(tmp_path, worker, sig, code):
    script, shared = worker
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "edsr_dist", "launch", "--nproc", "2", "--log-dir", str(logs),
                             "--grace", "1", "--exec", "--", sys.executable, str(script), "hang", str(shared)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env_without_launch_vars())
    try:
        deadline = time.monotonic() + 30
        while len(list(shared.glob("ready_*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(shared.glob("ready_*"))) == 2, "workers did not start"
        pids = [records(logs / f"rank_{r}.log")["pid"] for r in range(2)]
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code
    assert f"received {signal.Signals(sig).name}; stopped 2 workers" in stderr
    assert_no_process_left(pids)  # rank 1 ignored SIGTERM: the SIGKILL after --grace got it


def cpu_table(tmp_path: Path) -> Path:
    # Two servers; this host is the second (127.0.0.1), holding devices 4 and 6 as ranks 2 and 3.
    doc = {"version": "1.0", "status": "completed", "server_count": "2", "server_list": [
        {"server_id": "198.51.100.1", "device": [
            {"device_id": "0", "device_ip": "192.168.100.1", "rank_id": "0"},
            {"device_id": "1", "device_ip": "192.168.101.1", "rank_id": "1"}]},
        {"server_id": "127.0.0.1", "device": [
            {"device_id": "4", "device_ip": "192.168.104.2", "rank_id": "2"},
            {"device_id": "6", "device_ip": "192.168.106.2", "rank_id": "3"}]},
    ]}
    path = tmp_path / "cpu_table.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("via_env", [False, True], ids=["flag", "RANK_TABLE_FILE"])
def test_rank_table_launch_starts_this_servers_devices(tmp_path, worker, via_env):
    script, shared = worker
    table = cpu_table(tmp_path)
    logs = tmp_path / "logs"
    env = env_without_launch_vars()
    mode = ["--rank-table", str(table)]
    if via_env:
        env["RANK_TABLE_FILE"] = str(table)
        mode = []
    result = launch(*mode, "--log-dir", str(logs), "--exec", "--", sys.executable, str(script), "ok", str(shared),
                    env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["rank_2.log", "rank_3.log"]
    for local_rank, (rank, device) in enumerate([(2, 4), (3, 6)]):
        env_seen = records(logs / f"rank_{rank}.log")["env"]
        assert env_seen["RANK_ID"] == env_seen["RANK"] == str(rank)
        assert env_seen["DEVICE_ID"] == str(device) and env_seen["LOCAL_RANK"] == str(local_rank)
        assert env_seen["RANK_SIZE"] == env_seen["WORLD_SIZE"] == "4"
        assert env_seen["LOCAL_WORLD_SIZE"] == "2"
        assert env_seen["MASTER_ADDR"] == "198.51.100.1" and env_seen["MASTER_PORT"] == "29500"
        assert env_seen["RANK_TABLE_FILE"] == os.path.realpath(table)
    # The first local worker (rank 2 here) is the one echoed on this server's console.
    assert "hello from rank 2" in result.stdout


def test_rank_table_server_choice_and_errors(tmp_path):
    table = cpu_table(tmp_path)
    chosen = launch("--rank-table", str(table), "--server-index", "0", "--dry-run", "--", "--epochs", "1")
    assert chosen.returncode == 0, chosen.stderr
    assert "RANK_ID=0 " in chosen.stdout and "RANK_ID=1 " in chosen.stdout and "RANK_ID=2 " not in chosen.stdout
    assert "-m edsr_dist train --epochs 1" in chosen.stdout
    by_id = launch("--rank-table", str(table), "--server-id", "198.51.100.1", "--dry-run")
    assert by_id.returncode == 0 and "DEVICE_ID=1 " in by_id.stdout

    other = tmp_path / "other.json"
    other.write_text(table.read_text().replace("127.0.0.1", "198.51.100.2"))
    cases = [
        (["--rank-table", str(table), "--server-index", "2"], "--server-index 2 is out of range"),
        (["--rank-table", str(other)], "this host"),
        (["--rank-table", str(table), "--server-id", "198.51.100.9"], "--server-id 198.51.100.9 is not in"),
        (["--rank-table", str(table), "--nproc", "2"], "--rank-table and --nproc conflict"),
        (["--server-index", "0"], "pass --rank-table FILE too"),
        (["--nproc", "2", "--preset", "sample"], "launcher options go before `--`"),
        (["--nproc", "0"], "need at least 1 worker"),
        (["--exec"], "--exec needs the worker command"),
        (["--rank-table", str(tmp_path / "missing.json")], "not found"),
    ]
    for args, message in cases:
        result = launch(*args, "--dry-run")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_dry_run_default_log_dir_and_command(tmp_path):
    result = launch("--nproc", "2", "--dry-run", "--", "--preset", "sample", "--out", "runs/x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "logs in runs/x/logs" in result.stdout
    assert f"{sys.executable} -m edsr_dist train --preset sample --out runs/x" in result.stdout
    assert not (tmp_path / "runs").exists()  # a dry run starts and writes nothing
    plain = launch("--dry-run", cwd=tmp_path)
    assert "1 worker on this machine" in plain.stdout and "logs in runs/edsr/logs" in plain.stdout
    # The log folder follows the resolved configuration: the sample preset's own `out`.
    assert "logs in runs/sample/logs" in launch("--dry-run", "--", "--preset", "sample", cwd=tmp_path).stdout
    assert launch("--nproc", "3", "--dry-run", "--", "--batch-size", "16", cwd=tmp_path).returncode == 0  # 6/5/5
    bad = launch("--nproc", "3", "--dry-run", "--", "--batch-size", "2", cwd=tmp_path)
    assert bad.returncode == 2 and "is smaller than the 3 workers" in bad.stderr


def fake_python(tmp_path: Path) -> Path:
    """Stands in for the interpreter to show what the shell wrappers would run."""
    path = tmp_path / "fake-python"
    path.write_text('#!/bin/sh\necho "$*"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script,args,expected", [
    ("run_1p.sh", [], "-m edsr_dist launch --nproc 1 -- --preset sample"),
    ("run_1p.sh", ["--epochs", "2"], "-m edsr_dist launch --nproc 1 -- --epochs 2"),
    ("run_8p.sh", ["--nproc", "2"], "-m edsr_dist launch --nproc 2 -- --preset sample --out runs/sample_2p"),
    ("run_8p.sh", ["--nproc=2", "--epochs", "1"], "-m edsr_dist launch --nproc 2 -- --epochs 1"),
])
def test_shell_wrappers(tmp_path, script, args, expected):
    env = dict(env_without_launch_vars(), PYTHON=str(fake_python(tmp_path)))
    result = subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_run_8p_uses_rank_table_file(tmp_path):
    env = dict(env_without_launch_vars(), PYTHON=str(fake_python(tmp_path)), RANK_TABLE_FILE="/data/t.json")
    result = subprocess.run(["bash", str(REPO / "launch" / "run_8p.sh")], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path, env=env)
    assert result.stdout.strip() == "-m edsr_dist launch --rank-table /data/t.json --"
