"""Ascend servers as their users launch them, under the fake torch_npu (tests/fake_npu) or on Gloo: a ModelZoo-style
per-device loop, mindxdl's rank-table variables, torchrun and torch_npu_run with a rank table, run_8p.sh without a
table, one process per Kubernetes pod. Each trains the sample to one `Result:` line from one job of the right size,
or stops in one line. docs/ASCEND.md ("Launch styles") cites the upstream script behind each environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, free_port

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fake_npu"
TRAIN = [*TINY, "--steps-per-epoch", "4", "--max-val-images", "1", "--dist-timeout", "60"]
LAUNCH_VARS = ("RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_DEVICE_ID", "ASCEND_RT_VISIBLE_DEVICES",
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "EDSR_DIST_LAUNCHER", "TORCHELASTIC_RUN_ID", "JOB_ID")


def env_for(npu: bool, tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{FAKE}" if npu else str(REPO)
    env["TMPDIR"] = str(tmp_path)  # the card claims of one test stay apart from any other's
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_args(store: Path, out: Path, npu: bool = True) -> list[str]:
    return [*TRAIN, "--data", str(store), "--out", str(out), "--device", "npu" if npu else "cpu"]


def start_all(envs: list[dict], args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "edsr_dist", "train", *args], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def assert_one_job(results, workers: int, launcher: str) -> str:
    console = "".join(r.stdout + r.stderr for r in results)
    assert [r.returncode for r in results] == [0] * len(results), console[-4000:]
    assert f"{workers} worker(s) via {launcher}" in console, console[-4000:]
    assert console.count("Result: EDSR") == 1, console[-4000:]
    return console


def table(tmp_path: Path, devices: list[tuple[int, int]]) -> Path:
    """A one-server (127.0.0.1) version 1.0 table: (device_id, rank_id) pairs."""
    doc = {"version": "1.0", "status": "completed", "server_count": "1", "server_list": [
        {"server_id": "127.0.0.1", "device": [{"device_id": str(d), "device_ip": f"192.168.{100 + d}.1",
                                               "rank_id": str(r)} for d, r in devices]}]}
    path = tmp_path / "rank_table.json"
    path.write_text(json.dumps(doc))
    return path


def test_modelzoo_loop_trains_one_job_each_rank_on_its_own_card(tmp_path, sample_store):
    """ResNet50_ID4149 test/train_full_8p.sh: ASCEND_DEVICE_ID=0 exported once, then RANK_ID looped with RANK_SIZE
    (the port is set here only so that parallel test runs do not meet on 29500)."""
    port = str(free_port())
    envs = [env_for(True, tmp_path, ASCEND_DEVICE_ID="0", RANK_SIZE="2", RANK_ID=str(i), MASTER_PORT=port)
            for i in range(2)]
    console = assert_one_job(start_all(envs, train_args(sample_store, tmp_path / "out"), tmp_path), 2,
                             "ascend-script")
    assert "device npu:0" in console  # rank 0's banner; rank 1 took card 1 (the fake refuses a shared card)


def test_two_ranks_on_one_card_stop_in_one_line(tmp_path, sample_store):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "edsr_dist", "train", *train_args(sample_store, tmp_path / "out")],
                              env=env_for(True, tmp_path, DEVICE_ID="0", RANK_SIZE="2", RANK_ID=str(i),
                                          MASTER_PORT=port), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        refused = [p for p in procs if p.poll() is not None]
    finally:
        for p in procs:  # the other rank waits for its peer until --dist-timeout: a bare loop has no supervisor
            if p.poll() is None:
                p.kill()
    assert len(refused) == 1
    stderr = refused[0].communicate()[1]
    for p in procs:
        p.communicate()
    assert refused[0].returncode == 2, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "card 0 (logical 0) is already used by rank" in line and "Traceback" not in stderr


def test_mindxdl_rank_table_variables_train_one_job(tmp_path, sample_store):
    """mindxdl-deploy ranktable/train_start.sh: RANK = server index, WORLD_SIZE = server count, RANK_ID global,
    RANK_SIZE per server, RANK_TABLE_FILE, MASTER_ADDR = the first server; no DEVICE_ID, LOCAL_RANK, MASTER_PORT."""
    path = table(tmp_path, [(0, 0), (1, 1)])
    port = str(free_port())
    envs = [env_for(True, tmp_path, RANK_TABLE_FILE=str(path), RANK="0", WORLD_SIZE="1", RANK_ID=str(i),
                    RANK_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for i in range(2)]
    assert_one_job(start_all(envs, train_args(sample_store, tmp_path / "out"), tmp_path), 2, "ascend-script")


@pytest.mark.parametrize("runner", ["torchrun", "torch_npu_run"])
def test_elastic_runners_with_a_rank_table_put_each_rank_on_its_table_card(tmp_path, sample_store, runner):
    """The table gives rank 0 card 1 and rank 1 card 0: HCCL needs the process-group rank to be the table's rank_id
    on that card. torch_npu_run's agent hosts the store on MASTER_PORT itself."""
    path = table(tmp_path, [(1, 0), (0, 1)])
    port = str(free_port())
    module = "torch.distributed.run" if runner == "torchrun" else "torch_npu.distributed.run"
    command = [sys.executable, "-m", module, "--nproc-per-node" if runner == "torchrun" else "--nproc_per_node", "2",
               "--nnodes", "1", "--node-rank" if runner == "torchrun" else "--node_rank", "0",
               "--master-addr" if runner == "torchrun" else "--master_addr", "127.0.0.1",
               "--master-port" if runner == "torchrun" else "--master_port", port,
               "-m", "edsr_dist", "train", *train_args(sample_store, tmp_path / "out")]
    result = subprocess.run(command, env=env_for(True, tmp_path, RANK_TABLE_FILE=str(path)), cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    console = assert_one_job([result], 2, runner)
    assert "device npu:1" in console  # rank 0's banner: its table card, logical 1


def test_run_8p_without_a_table_starts_one_worker_per_visible_npu(tmp_path, sample_store):
    result = subprocess.run(["bash", str(REPO / "launch" / "run_8p.sh"), *train_args(sample_store, tmp_path / "out")],
                            env=env_for(True, tmp_path, ASCEND_RT_VISIBLE_DEVICES="0,1"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    console = assert_one_job([result], 2, "edsr-dist")
    assert "2 workers on this machine" in console


def test_one_process_per_pod_is_one_job(tmp_path, sample_store):
    """Volcano's pytorch plugin / Kubeflow PyTorchJob: MASTER_ADDR, MASTER_PORT, WORLD_SIZE = pods, RANK = pod index.
    Each process stands for a pod with 8 NPUs (its own host name and /tmp) and uses one of them."""
    port = str(free_port())
    envs = []
    for i in range(2):
        pod = tmp_path / f"pod{i}"
        pod.mkdir()
        envs.append(env_for(True, pod, RANK=str(i), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                            FAKE_NPU_HOST=f"pod-{i}"))
    console = assert_one_job(start_all(envs, train_args(sample_store, tmp_path / "out"), tmp_path), 2, "env")
    assert "uses 1 of the 8 NPUs it sees (one process per pod" in console
    assert "run `edsr-dist launch` in the pod" in console


@pytest.mark.parametrize("env,fragment", [
    # ascend-operator env.go setPytorchEnv: LOCAL_RANK is the pod's list of local ranks.
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0,1", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "2222"}, "AscendJob pod's environment"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "2222"}, "RANK=2 is not below"),
    ({"RANK_ID": "3", "RANK_SIZE": "8", "RANK": "4"}, "RANK_ID=3 and RANK=4 disagree"),
])
def test_contradictory_environment_stops_before_any_process_group(tmp_path, env, fragment):
    for command in (["train", "--preset", "sample", "--device", "cpu"], ["world", "--json"]):
        result = subprocess.run([sys.executable, "-m", "edsr_dist", *command], env=env_for(False, tmp_path, **env),
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_world_prints_what_the_trainer_uses(tmp_path):
    env = env_for(False, tmp_path, RANK_ID="5", RANK_SIZE="8", ASCEND_DEVICE_ID="0", ASCEND_RT_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "world", "--json"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    world = json.loads(result.stdout)
    assert {k: world[k] for k in ("rank", "size", "local_rank", "local_size", "launcher", "device",
                                  "physical_device")} == {"rank": 5, "size": 8, "local_rank": 5, "local_size": 8,
                                                          "launcher": "ascend-script", "device": 5,
                                                          "physical_device": 5}


def test_a_broken_cann_under_autoload_is_one_line_even_for_cpu(tmp_path):
    """torch_npu's torch.backends entry point makes `import torch` import it (torch/__init__.py)."""
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "train", "--preset", "sample", "--device", "cpu"],
                            env=env_for(True, tmp_path, FAKE_NPU_BROKEN_CANN="1"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "auto-loads torch_npu" in result.stderr and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in result.stderr
    assert "set_env.sh" in result.stderr
