"""The Ascend path under a fake torch_npu (tests/fake_npu): the NPU's rules are enforced on the CPU."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, fake_npu_env

# Its tests share an expensive module fixture: one xdist worker runs them all (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("npu_emulation")


def run_py(code: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=fake_npu_env(**extra), capture_output=True, text=True,
                          timeout=120)


def test_npu_model_is_contiguous_and_channels_last_would_crash():
    code = """
import torch
from edsr_dist.parallel import npu
from edsr_dist.model.precision import select_device
device = select_device("npu", 0)
model = torch.nn.Conv2d(3, 4, 3)
try:
    model.to(device, memory_format=torch.channels_last)
    print("channels_last accepted")
except RuntimeError as exc:
    print("refused:", exc)
model.to(device, memory_format=npu.memory_format(device, True))
print("resolved:", npu.memory_format(device, True))
"""
    result = run_py(code)
    assert "refused: Only c10::MemoryFormat::Contiguous" in result.stdout, result.stderr[-2000:]
    assert "resolved: torch.contiguous_format" in result.stdout


def test_set_device_takes_the_logical_index_of_a_physical_card():
    code = """
from edsr_dist.parallel.world import discover_world
from edsr_dist.model.precision import select_device
world = discover_world({"RANK_ID": "1", "RANK_SIZE": "4", "DEVICE_ID": "5", "ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"})
print("logical", world.device_index, "physical", world.physical_device)
print(select_device("npu", world.device_index, world.physical_device))
"""
    result = run_py(code, ASCEND_RT_VISIBLE_DEVICES="4,5,6,7")
    assert "logical 1 physical 5" in result.stdout, result.stderr[-2000:]
    assert "npu:1" in result.stdout


def test_the_fake_enforces_visible_devices_and_saturation():
    """The fake's own rules, which the tests above rely on."""
    code = """
import torch, torch_npu
try:
    torch.npu.set_device(5)
    print("physical id accepted")
except RuntimeError as exc:
    print("refused:", exc)
x = torch.full((2,), 60000.0).to("npu:0").half()
print("sum", (x + x).float().cpu().tolist(), "flag", torch_npu.npu.utils.get_npu_overflow_flag())
torch_npu.npu.utils.clear_npu_overflow_flag()
print("cleared", torch_npu.npu.utils.get_npu_overflow_flag())
"""
    result = run_py(code, ASCEND_RT_VISIBLE_DEVICES="4,5,6,7")
    assert "refused: Invalid device ID 5: 4 visible devices" in result.stdout, result.stderr[-2000:]
    assert "sum [65504.0, 65504.0] flag True" in result.stdout
    assert "cleared False" in result.stdout


def test_bf16_follows_the_chip():
    code = """
from edsr_dist.errors import UserError
from edsr_dist.model.precision import resolve_precision
try:
    print("bf16 ->", resolve_precision("bf16", "npu"))
except UserError as exc:
    print("refused:", exc)
print("auto ->", resolve_precision("auto", "npu"))
"""
    old = run_py(code, FAKE_NPU_SOC="Ascend910A")
    assert "refused: --precision bf16 needs an Ascend910B1 or later chip (Atlas A2/A3" in old.stdout, old.stderr[-2000:]
    assert "auto -> fp16" in old.stdout
    new = run_py(code, FAKE_NPU_SOC="Ascend910B1")
    assert "bf16 -> bf16" in new.stdout, new.stderr[-2000:]


def test_a_broken_torch_npu_is_one_line(tmp_path):
    broken = tmp_path / "torch_npu"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('torch_npu does not support a CUDA build of torch')\n")
    env = fake_npu_env()
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{tmp_path}"
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "train", "--device", "npu", "--preset", "sample"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "torch_npu cannot be imported (RuntimeError: torch_npu does not support a CUDA build" in result.stderr


def test_hccl_refuses_float64_all_reduce():
    code = """
import datetime, torch, torch.distributed as dist, torch_npu
dist.init_process_group("hccl", init_method="tcp://127.0.0.1:%d" % __import__("edsr_dist.launcher.plan", fromlist=["x"]).free_port(),
                        rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
t = torch.ones(2, dtype=torch.float64).to("npu:0")
try:
    dist.all_reduce(t)
    print("float64 accepted")
except RuntimeError as exc:
    print("refused:", exc)
dist.all_reduce(torch.ones(2).to("npu:0"))
print("float32 ok")
"""
    result = run_py(code)
    assert "refused: HCCL allreduce: Unsupported data type torch.float64" in result.stdout, result.stderr[-2000:]
    assert "float32 ok" in result.stdout


@pytest.fixture(scope="module")
def two_npu_run(tmp_path_factory):
    """run_8p.sh on a 2-device group_list table under the fake NPU, fp16 on a 910A: rank 1 overflows in its 2nd
    step, and every fp16 op of validation overflows (a stale flag for the step after it). The fake HCCL takes only
    a version 1.0 RANK_TABLE_FILE whose rank matches the card, so the launcher's v1.0 copy is checked too."""
    tmp = tmp_path_factory.mktemp("npu2")
    table = tmp / "rank_table.json"
    table.write_text(json.dumps({"status": "completed", "group_count": "1", "group_list": [
        {"group_name": "job", "device_count": "2", "instance_count": "1", "instance_list": [
            {"pod_name": "npu2p", "server_id": "127.0.0.1", "devices": [
                {"device_id": "1", "device_ip": "192.168.101.101"},
                {"device_id": "0", "device_ip": "192.168.100.101"}]}]}]}))
    out = tmp / "out"
    env = fake_npu_env(RANK_TABLE_FILE=str(table), FAKE_NPU_SOC="Ascend910A", FAKE_NPU_OVERFLOW_STEPS="1:2",
                   FAKE_NPU_INFERENCE_OVERFLOW="1")
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "run_8p.sh"), "--preset", "sample", "--device", "npu", "--epochs", "2",
         "--steps-per-epoch", "3", "--validate-every", "1", "--log-every", "1", "--max-val-images", "1",
         "--batch-size", "4", "--patch-size", "16", "--out", str(out), "--progress", "false",
         "--tensorboard", "false", "--samples-png", "false"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    steps = {}
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry["type"] == "step":
                steps[entry["step"]] = entry["loss_scale"]
    return result, steps


def test_run_8p_trains_on_the_fake_npu(two_npu_run):
    result, _ = two_npu_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "device npu:0, fp16, contiguous" in result.stdout
    assert "Result: EDSR" in result.stdout


def test_overflow_on_one_rank_skips_the_step_on_every_rank(two_npu_run):
    result, steps = two_npu_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # Rank 0 (which writes the metrics) did not overflow itself, yet skipped step 2: no record, scale halved.
    assert steps[1] == 1024.0
    assert 2 not in steps
    assert steps[3] == 512.0


def test_a_stale_flag_from_validation_does_not_skip_the_next_step(two_npu_run):
    result, steps = two_npu_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert steps[4] == 512.0  # the first step after validation ran and kept the scale
