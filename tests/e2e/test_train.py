"""One worker end to end: the loss falls, validation reports, checkpoints and sample PNGs appear."""

import json

from helpers import TINY, run_cli
from PIL import Image

from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.train.reporting import SAMPLE_GAP, SAMPLE_LABEL_HEIGHT


def test_short_training_run_reduces_the_loss_and_writes_everything(sample_store, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "15",
                      "--epochs", "2", "--lr", "2e-3", "--samples-png", "true", "--validate-every", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("Step nr: [5/30] - Loss: ") and " - Lr: 2.000e-03" in line for line in lines)
    assert any(line.startswith("Epoch nr: [2/2] - Loss: ") and "val PSNR" in line for line in lines)
    assert lines[-1].startswith("Result: EDSR ") and lines[-1].endswith("(Y-PSNR, 2 held-out images)")

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]
    result_record = next(r for r in records if r["type"] == "result")
    assert 10 < result_record["psnr_y"] < 60 and 0 < result_record["ssim_y"] <= 1

    state = load_checkpoint(find_checkpoint(out))
    assert state["step"] == 30 and state["config"]["num_filters"] == 8
    assert set(state) >= {"model", "optimizer", "scaler", "epoch", "step_in_epoch", "meta"}

    pngs = sorted((out / "samples").glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as image:
        width, height = image.size
    assert width == 3 * (height - SAMPLE_LABEL_HEIGHT) + 2 * SAMPLE_GAP  # three crops side by side, labels above


def test_max_steps_stops_early_and_still_reports(sample_store, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--max-steps", "7"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Result: EDSR" in result.stdout
    assert load_checkpoint(find_checkpoint(out))["step"] == 7


def test_missing_store_is_a_one_line_error(tmp_path):
    result = run_cli(["train", *TINY, "--data", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_resume_drops_records_logged_after_the_checkpoint(sample_store, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data", str(sample_store), "--out", str(out), "--max-val-images", "1"]
    assert run_cli([*args, "--max-steps", "10"], cwd=tmp_path).returncode == 0
    # What a run killed after its step-10 checkpoint leaves behind: a record of a step that will be redone,
    # and a line cut short by the kill.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "step", "step": 15, "loss": 99.0}) + "\n" + '{"type": "st')
    result = run_cli([*args, "--max-steps", "20", "--resume", "auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == sorted(set(steps)) and 15 in steps and 99.0 not in [r["loss"] for r in records if r["type"] == "step"]
