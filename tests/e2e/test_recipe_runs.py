"""The training recipe through real processes: the EMA (with cosine warm-up and clipping) bit-exact through a
SIGKILL and resume and within 1e-4 between 1 and 2 workers; clipping identical on 2 Gloo ranks; a x4 run
initialised from a x2 run; --init-from with --resume auto."""

import json
import sys

import pytest
import torch
from helpers import REPO, TINY, max_relative_difference, run_cli, spawn_ranks
from test_resume import assert_bit_identical, final_state, kill_when, latest_is, start_hooked, train_args

RECIPE = ["--ema-decay", "0.9", "--lr-schedule", "cosine", "--warmup-steps", "3", "--min-lr", "1e-5",
          "--grad-clip-norm", "2.0"]
TOTAL_STEPS = 20


def recipe_args(store, out, save_every_steps: int = 0) -> list[str]:
    return train_args(store, out, save_every_steps) + RECIPE


@pytest.fixture(scope="module")
def reference(sample_store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("recipe1") / "run"
    result = run_cli(["train", *recipe_args(sample_store, out)], cwd=out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "EMA 0.9, grad clip 2.0" in result.stdout
    state = final_state(out)
    assert state["step"] == TOTAL_STEPS and state["ema"]["updates"] == TOTAL_STEPS
    state["out"] = out
    return state


def test_ema_is_bit_identical_through_sigkill_and_resume(sample_store, tmp_path, reference):
    out = tmp_path / "run"
    procs = start_hooked(recipe_args(sample_store, out, save_every_steps=7), 1, tmp_path, PAUSE_AFTER_SAVE_STEP=7)
    kill_when(procs, latest_is(out, 7))
    assert final_state(out)["ema"]["updates"] == 7
    result = run_cli(["train", *recipe_args(sample_store, out, save_every_steps=7)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step_00000007.ckpt at step 7" in result.stdout
    state = final_state(out)
    assert_bit_identical(state["model"], reference["model"])
    assert_bit_identical(state["ema"]["weights"], reference["ema"]["weights"])
    # The average really differs from the weights (else this test could not tell them apart).
    assert max_relative_difference(state["model"], state["ema"]["weights"]) > 1e-3


def test_ema_with_two_workers_matches_one_within_1e_4(sample_store, tmp_path, reference):
    out = tmp_path / "run"
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *recipe_args(sample_store, out)], 2,
                                 cwd=tmp_path)
    assert codes == [0, 0], outputs
    state = final_state(out)
    assert state["meta"]["world_size"] == 2 and state["ema"]["updates"] == TOTAL_STEPS
    assert max_relative_difference(reference["ema"]["weights"], state["ema"]["weights"]) < 1e-4
    assert max_relative_difference(reference["model"], state["model"]) < 1e-4


def test_export_gives_the_ema_unless_raw_weights(reference, tmp_path):
    for flags, expected in (([], reference["ema"]["weights"]), (["--raw-weights"], reference["model"])):
        target = tmp_path / f"weights{len(flags)}.pt"
        result = run_cli(["export", "--checkpoint", str(reference["out"]), "--out", str(target), *flags], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_bit_identical(torch.load(target, weights_only=True), expected)


def test_clipping_is_identical_on_every_rank(sample_store, tmp_path):
    clip = 0.5
    args = TINY + ["--data", str(sample_store), "--steps-per-epoch", "6", "--max-val-images", "1",
                   "--grad-clip-norm", str(clip), "--ema-decay", "0.5"]
    codes, outputs = spawn_ranks([sys.executable, str(REPO / "tests/workers/trainer_probe.py"), "clip",
                                  str(tmp_path), *args], 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    # The probe puts an inf into one gradient on rank 1 at step 3: the non-finite norm makes every rank skip that
    # step, without clipping it and without an EMA update.
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [3]
    assert ranks[0]["ema_updates"] == ranks[1]["ema_updates"] == 5
    assert len(ranks[0]["norms_before"]) == 5
    # Gradients on pixel values in [0, 255] are far above 0.5: every step was clipped, to the same norm on both.
    assert min(ranks[0]["norms_before"]) > 10 * clip
    assert ranks[0]["norms_after"] == pytest.approx([clip] * 5, rel=1e-4)
    assert ranks[0]["norms_before"] == ranks[1]["norms_before"]
    assert ranks[0]["norms_after"] == ranks[1]["norms_after"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["ema"] == ranks[1]["ema"]


def test_x4_run_initialised_from_a_x2_run_trains_and_resume_wins_over_init(trained_run, sample_store, tmp_path):
    x2 = trained_run / "checkpoints" / "latest"
    out = tmp_path / "x4"
    args = [*TINY, "--data", str(sample_store), "--out", str(out), "--scale", "4", "--init-from", str(x2),
            "--resume", "auto", "--steps-per-epoch", "10"]
    first = run_cli(["train", *args, "--max-steps", "5"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    line = next(l for l in first.stdout.splitlines() if l.startswith("init from"))
    assert "(sub_mean, add_mean, head, body, tail.0.0, tail.1)" in line
    assert line.endswith("left at their initial values: tail.0.2.weight, tail.0.2.bias")
    assert f"fresh start from the weights of {x2}" in first.stdout
    x2_weights = final_state(trained_run)["model"]
    x4_weights = final_state(out)["model"]
    assert final_state(out)["step"] == 5  # a fresh step count, not the x2 run's 10
    assert not torch.equal(x4_weights["head.0.weight"], x2_weights["head.0.weight"])  # it trained on from there
    assert max_relative_difference(x2_weights | {"tail.0.2.weight": x4_weights["tail.0.2.weight"],
                                                 "tail.0.2.bias": x4_weights["tail.0.2.bias"]}, x4_weights) < 0.5
    # The same command line again continues the x4 run; the x2 weights are not loaded over it.
    again = run_cli(["train", *args, "--max-steps", "10"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "at step 5 (--init-from" in again.stdout and "applies to a fresh start only" in again.stdout
    assert not any(l.startswith("init from") for l in again.stdout.splitlines())
    assert final_state(out)["step"] == 10
