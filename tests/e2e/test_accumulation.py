"""Any number of devices, one trajectory: gradient accumulation and uneven shares of the global batch, over real
Gloo groups on localhost (CPU, fp32). The global batch is 16 (4 x the TINY batch) so that it splits 6/5/5 over 3
workers; 12 steps of the sample preset, as the 4-worker figure of docs/TRAINING.md."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from helpers import REPO, TINY, max_relative_difference, run_cli, spawn_ranks

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint

STEPS = 12
ARGS = [*TINY, "--batch-size", "16", "--steps-per-epoch", str(STEPS), "--ema-decay", "0.9", "--max-val-images", "1"]
# The existing bound for an even split (4 workers vs 1 after 12 steps of the sample preset).
EVEN_SPLIT_BOUND = 4e-4
# Float rounding of this tiny model: every split measured about 1e-6 here (the test prints them); a split whose
# gradient were not the full-batch mean (shares averaged without their weights) ends far outside.
ROUNDING = 5e-5


def train(tmp_path, name: str, workers: int, sample_store, *extra: str) -> dict:
    """The final checkpoint's state, with rank 0's epoch loss line added as "epoch_loss"."""
    out = tmp_path / name
    args = [*ARGS, "--data", str(sample_store), "--out", str(out), *extra]
    if workers == 1:
        result = run_cli(["train", *args], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        console = result.stdout
    else:
        codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *args], workers, cwd=tmp_path)
        assert codes == [0] * workers, outputs
        console = outputs[0]
    state = load_checkpoint(find_checkpoint(out))
    assert state["step"] == STEPS
    state["epoch_loss"] = float(re.search(r"Epoch nr: \[1/1\] - Loss: ([0-9.]+)", console).group(1))
    return state


def distances(reference: dict, other: dict) -> tuple[float, float]:
    return (max_relative_difference(reference["model"], other["model"]),
            max_relative_difference(reference["ema"]["weights"], other["ema"]["weights"]))


def test_accumulation_and_uneven_shares_end_where_one_worker_ends(sample_store, tmp_path):
    one = train(tmp_path, "one", 1, sample_store)
    runs = {
        "4 workers (even)": train(tmp_path, "four", 4, sample_store),
        "1 worker x accumulate 4": train(tmp_path, "one_acc4", 1, sample_store, "--accumulate", "4"),
        "2 workers x accumulate 2": train(tmp_path, "two_acc2", 2, sample_store, "--accumulate", "2"),
        "3 workers (6/5/5)": train(tmp_path, "three", 3, sample_store),
    }
    found = {name: distances(one, state) for name, state in runs.items()}
    print("\nmax relative difference from 1 worker (weights, EMA): " + json.dumps(found))
    even = max(found["4 workers (even)"])
    assert even < EVEN_SPLIT_BOUND, found
    for name, (weights, ema) in found.items():
        # No further from the 1-worker run than the even split's bound, and at the level of float rounding.
        assert weights < min(EVEN_SPLIT_BOUND, ROUNDING) and ema < min(EVEN_SPLIT_BOUND, ROUNDING), (name, found)
        assert runs[name]["ema"]["updates"] == STEPS  # EMA counts optimizer steps, not micro-steps
        # The epoch's loss is the mean over its samples however they were shared (each rank counted by its share).
        assert runs[name]["epoch_loss"] == pytest.approx(one["epoch_loss"], rel=1e-5), name
    # One worker with accumulation adds the same per-sample gradients as one worker without, in another order:
    # float rounding only (the 1-worker run is the reference of every distributed exactness test).
    assert found["1 worker x accumulate 4"][0] < 1e-4, found


def test_an_overflow_in_one_micro_step_of_one_rank_skips_the_whole_step_on_every_rank(sample_store, tmp_path):
    args = [*TINY, "--data", str(sample_store), "--precision", "fp16", "--steps-per-epoch", "6",
            "--max-val-images", "1", "--accumulate", "2"]
    codes, outputs = spawn_ranks([sys.executable, str(REPO / "tests/workers/trainer_probe.py"), "overflow-micro",
                                  str(tmp_path), *args], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["micro_steps"] == ranks[1]["micro_steps"] == [2] * 6
    # Rank 1's first micro-step of step 3 overflowed (its local gradient); both ranks skipped step 3 only, once.
    assert ranks[1]["local_flags"][2] == 1.0
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [3]
    assert ranks[0]["scales"] == ranks[1]["scales"]
    assert ranks[0]["scales"][2] == ranks[0]["scales"][1] / 2  # halved once for the whole step
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6)


def test_sigkill_in_the_middle_of_an_accumulation_then_resume_is_bit_identical(sample_store, tmp_path):
    """The probe kills its own process after the first of 4 micro-steps of step 7; `--resume auto` continues from
    the step-4 checkpoint (checkpoints are taken between optimizer steps only) and ends bit for bit where the
    uninterrupted run ends, EMA and optimizer state included."""
    args = [*ARGS, "--data", str(sample_store), "--accumulate", "4", "--save-every-steps", "4"]
    whole = tmp_path / "whole"
    result = run_cli(["train", *args, "--out", str(whole)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    killed = tmp_path / "killed"
    codes, outputs = spawn_ranks([sys.executable, str(REPO / "tests/workers/trainer_probe.py"), "kill", str(killed),
                                  *args], 1, cwd=tmp_path)
    assert codes == [-9], outputs
    assert load_checkpoint(find_checkpoint(killed))["step"] == 4
    resumed = run_cli(["train", *args, "--out", str(killed), "--resume", "auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 4" in resumed.stdout
    expected, got = load_checkpoint(find_checkpoint(whole)), load_checkpoint(find_checkpoint(killed))
    assert got["step"] == expected["step"] == STEPS
    for part in ("model", "optimizer", "ema"):
        assert _flat(got[part]) == _flat(expected[part]), part


def _flat(value) -> list:
    """A nested state as a list of (path, bytes or value), for an exact comparison."""
    if torch.is_tensor(value):
        return [value.cpu().numpy().tobytes()]
    if isinstance(value, dict):
        return [(k, _flat(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_flat(v) for v in value]
    return [value]
