"""Multi-process training over real Gloo groups on localhost: world-size invariance, torchrun, mpirun,
our launcher with a CPU rank table, lockstep overflow skipping, distributed validation."""

import json
import os
import shutil
import sys

import pytest
import torch
from helpers import REPO, TINY, free_port, max_relative_difference, run_cli, spawn_ranks

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint


def final_weights(out_dir):
    path = find_checkpoint(out_dir)
    assert path is not None, f"no checkpoint in {out_dir}"
    return load_checkpoint(path)["model"]




def test_world_size_invariance_1_vs_2_workers(sample_store, tmp_path):
    args = TINY + ["--data", str(sample_store), "--steps-per-epoch", "24"]
    single = run_cli(["train", *args, "--out", str(tmp_path / "one")], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *args, "--out", str(tmp_path / "two")],
                                 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert load_checkpoint(find_checkpoint(tmp_path / "two"))["step"] == 24
    difference = max_relative_difference(one, two)
    assert difference < 1e-4, difference
    # The runs really trained: the weights moved away from the seed's initialisation.
    from edsr_dist.model.edsr import EDSR

    torch.manual_seed(0)
    initial = EDSR(scale=2, num_blocks=2, num_filters=8, res_scale=1.0).state_dict()
    assert max_relative_difference(initial, one) > 1e-3


def test_torchrun_two_workers(sample_store, tmp_path):
    port = free_port()
    result = subprocess_run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "edsr_dist", "train",
                             *TINY, "--data", str(sample_store), "--out", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 worker(s) via torchrun" in result.stdout
    assert result.stdout.count("Result: EDSR") == 1  # rank 0 alone reports
    assert find_checkpoint(tmp_path / "run") is not None


def mpirun_available() -> bool:
    if shutil.which("mpirun"):
        return True
    if os.environ.get("EDSR_DIST_REQUIRE_MPI"):
        pytest.fail("mpirun is required here (EDSR_DIST_REQUIRE_MPI is set); apt-get install openmpi-bin")
    return False


@pytest.mark.skipif("not mpirun_available()", reason="Open MPI not installed (apt-get install openmpi-bin)")
def test_mpirun_two_workers(sample_store, tmp_path):
    port = free_port()
    result = subprocess_run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                             "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", "-x", "PYTHONPATH",
                             sys.executable, "-m", "edsr_dist", "train", *TINY, "--data", str(sample_store),
                             "--out", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 worker(s) via mpi" in result.stdout
    assert result.stdout.count("Result: EDSR") == 1


def test_launcher_from_a_cpu_rank_table(sample_store, tmp_path):
    table = {"version": "1.0", "status": "completed", "server_count": "1", "server_list": [
        {"server_id": "127.0.0.1", "device": [
            {"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"},
            {"device_id": "1", "device_ip": "192.168.101.101", "rank_id": "1"}]}]}
    (tmp_path / "table.json").write_text(json.dumps(table))
    out = tmp_path / "run"
    result = run_cli(["launch", "--rank-table", str(tmp_path / "table.json"), "--master-port", str(free_port()), "--",
                      *TINY, "--data", str(sample_store), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Result: EDSR" in result.stdout  # rank 0 echoed on the console
    for rank in (0, 1):
        assert (out / "logs" / f"rank_{rank}.log").exists()
    assert "2 worker(s) via edsr-dist" in (out / "logs" / "rank_0.log").read_text()
    assert "Result:" not in (out / "logs" / "rank_1.log").read_text()


def test_fp16_overflow_on_one_rank_skips_the_step_on_all(sample_store, tmp_path):
    args = TINY + ["--data", str(sample_store), "--precision", "fp16", "--steps-per-epoch", "6", "--max-val-images", "1"]
    codes, outputs = spawn_ranks([sys.executable, str(REPO / "tests/workers/trainer_probe.py"), "overflow",
                                  str(tmp_path), *args], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    # Only rank 1 saw the overflow at step 3, yet both ranks skipped it and halved their scale together.
    assert ranks[0]["local_flags"][2] == 0.0 and ranks[1]["local_flags"][2] == 1.0
    assert 3 in ranks[0]["skipped"] and ranks[0]["skipped"] == ranks[1]["skipped"]
    assert ranks[0]["scales"] == ranks[1]["scales"]
    assert ranks[0]["scales"][2] == ranks[0]["scales"][1] / 2
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6)


def test_distributed_validation_equals_single_process(sample_store, tmp_path):
    args = TINY + ["--data", str(sample_store), "--max-val-images", "0"]
    probe = [sys.executable, str(REPO / "tests/workers/trainer_probe.py"), "validate"]
    codes, outputs = spawn_ranks(probe + [str(tmp_path / "one"), *args], 1, cwd=tmp_path)
    assert codes == [0], outputs
    codes, outputs = spawn_ranks(probe + [str(tmp_path / "two"), *args], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    single = json.loads((tmp_path / "one" / "probe_rank0.json").read_text())
    spread = json.loads((tmp_path / "two" / "probe_rank0.json").read_text())
    assert spread["images"] == single["images"] >= 2
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y"):
        assert spread[key] == pytest.approx(single[key], abs=1e-9), key


def subprocess_run(command, cwd):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
