"""The step's host waits, counted by the fake torch_npu (tests/fake_npu): every blocking read of a device tensor and
every non_blocking copy from pageable memory goes through it. The fake also records the optimizer and the
compile mode the trainer chose."""

import json
import subprocess
import sys

from helpers import TINY, fake_npu_env

PROBE = """
import json, sys
import torch, torch_npu
from torch_npu import _record
from edsr_dist.config import parse_train_args
from edsr_dist.parallel.world import World
from edsr_dist.train import trainer as trainer_module
from edsr_dist.train.step_timer import StepTimer

class Counting(StepTimer):
    def __init__(self):
        self.per_step = []
    def begin_step(self):
        self.at = dict(_record.counters)
    def end_step(self, skipped):
        self.per_step.append({k: _record.counters[k] - self.at[k] for k in self.at})

if sys.argv[1] == "fused":  # an Adam that takes the overflow flag as a tensor, as CUDA's fused Adam does
    trainer_module.make_optimizer = lambda params, cfg, device: (
        torch.optim.Adam(list(params), lr=cfg.lr, fused=True), "Adam (fused)")
timer = Counting()
trainer = trainer_module.Trainer(parse_train_args(sys.argv[2:]), World(), timer=timer)
trainer.fit()
print(json.dumps({"per_step": timer.per_step, "skip_on_device": trainer.skip_on_device,
                  "optimizer": trainer.optimizer_name, "ema_updates": trainer.ema.updates}))
trainer.close()
"""


def run_probe(mode, sample_store, tmp_path, soc, *extra):
    args = [*TINY, "--data", str(sample_store), "--out", str(tmp_path / mode), "--device", "npu",
            "--precision", "fp16", "--steps-per-epoch", "6", "--log-every", "1000", "--max-val-images", "1",
            "--ema-decay", "0.9", "--grad-clip-norm", "1e6", *extra]
    record = tmp_path / f"{mode}.jsonl"
    result = subprocess.run([sys.executable, "-c", PROBE, mode, *args], capture_output=True, text=True, timeout=300,
                            env=fake_npu_env(FAKE_NPU_SOC=soc, FAKE_NPU_RECORD=str(record)))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return json.loads(result.stdout.strip().splitlines()[-1]), events


def test_a_step_with_a_device_side_skip_never_waits_for_the_device(sample_store, tmp_path):
    observed, _ = run_probe("fused", sample_store, tmp_path, "Ascend910B1")
    assert observed["skip_on_device"] is True
    steady = observed["per_step"][2:]  # the first steps set up optimizer state
    assert len(steady) == 4
    # No .item()/.tolist()/.cpu() inside a step: the flags of step k are read during step k+1 from a copy made
    # without waiting; and the batches come from page-locked memory.
    assert all(step == {"device_reads": 0, "pageable_async_copies": 0} for step in steady), observed["per_step"]
    assert observed["ema_updates"] == 6


def test_npu_default_is_npu_fused_adam_with_binary_kernels_and_one_read_per_step(sample_store, tmp_path):
    observed, events = run_probe("default", sample_store, tmp_path, "Ascend910A")
    assert observed["optimizer"] == "NpuFusedAdam" and observed["skip_on_device"] is False
    assert {"event": "optimizer", "name": "NpuFusedAdam"} in events
    assert {"event": "compile_mode", "jit_compile": False} in events  # 910A compiles just in time by default
    # NpuFusedAdam takes no overflow flag: the skip is the host's decision, one read of the flags per step.
    assert all(step == {"device_reads": 1, "pageable_async_copies": 0} for step in observed["per_step"][2:])


def test_from_910b1_binary_kernels_are_already_the_default(sample_store, tmp_path):
    _, events = run_probe("default", sample_store, tmp_path, "Ascend910B1")
    assert not [e for e in events if e["event"] == "compile_mode"]
