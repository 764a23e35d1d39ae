"""--grad-comm: DDP's gradient all-reduce in fp16/bf16 on 2 real Gloo workers ends within tolerance of fp32."""

import sys

import pytest
from helpers import TINY, max_relative_difference, spawn_ranks

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint

STEPS = 12


def train_two(sample_store, tmp_path, grad_comm):
    out = tmp_path / grad_comm
    args = TINY + ["--data", str(sample_store), "--steps-per-epoch", str(STEPS), "--grad-comm", grad_comm]
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *args, "--out", str(out)], 2,
                                 cwd=tmp_path)
    assert codes == [0, 0], outputs
    state = load_checkpoint(find_checkpoint(out))
    assert state["step"] == STEPS
    return state["model"], outputs[0]


@pytest.fixture(scope="module")
def fp32_run(sample_store, tmp_path_factory):
    return train_two(sample_store, tmp_path_factory.mktemp("fp32"), "none")


# Gloo all-reduces float16 and bfloat16 (torch 2.13); bf16 goes through the hook under its own name, since DDP refuses
# torch's bf16_compress_hook by name without NCCL >= 2.10.
@pytest.mark.parametrize("grad_comm", ["fp16", "bf16"])
def test_half_precision_gradient_all_reduce_ends_close_to_fp32(fp32_run, sample_store, tmp_path, grad_comm):
    reference, _ = fp32_run
    weights, output = train_two(sample_store, tmp_path, grad_comm)
    assert f"{grad_comm} gradient all-reduce" in output
    difference = max_relative_difference(reference, weights)
    assert 0 < difference < 2e-2, difference  # rounded gradients (so the hook ran), the same training
