"""`edsr-dist eval`: a folder of checkpoints from a real tiny run (table, CSV, JSON, numbers equal to the trainer's
own validation), a folder of HR PNGs (LR made like the store builder's), weights files, and one-line user errors."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, run_cli
from PIL import Image

from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError
from edsr_dist.evaluation.command import main as eval_main

VAL_IMAGES = 2


@pytest.fixture(scope="module")
def run_dir(sample_store, tmp_path_factory) -> Path:
    """Two epochs of a tiny model, validated and checkpointed at the end of each (steps 10 and 20)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--epochs", "2",
                      "--steps-per-epoch", "10", "--validate-every", "1", "--save-every", "1",
                      "--max-val-images", str(VAL_IMAGES)], cwd=out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def epoch_records(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["type"] == "epoch"}


def table_lines(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["checkpoint", "step"])
    rows = []
    for line in lines[header + 1:]:
        if line.startswith("bicubic baseline"):
            break
        rows.append(line.split())
    return rows


def test_folder_of_checkpoints_repeats_the_trainers_validation(run_dir, sample_store, capsys):
    assert eval_main(["--checkpoints", str(run_dir), "--data", str(sample_store), "--max-images", str(VAL_IMAGES),
                      "--num-threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = table_lines(out)
    assert [row[:2] for row in rows] == [["step_00000010.ckpt", "10"], ["step_00000020.ckpt", "20"]]

    records = epoch_records(run_dir)
    folder = run_dir / "checkpoints"
    report = json.loads((folder / "eval_sample.json").read_text())
    assert [r["step"] for r in report["results"]] == [10, 20]
    for result in report["results"]:
        expected = records[result["step"]]
        assert result["images"] == expected["images"] == VAL_IMAGES
        for key in ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y"):
            assert result[key] == pytest.approx(expected[key], abs=1e-9), key
        assert len(result["per_image"]) == VAL_IMAGES
    # The printed table rounds the same numbers.
    for row, result in zip(rows, report["results"]):
        assert row[2:] == [f"{result['psnr_y']:.3f}", f"{result['ssim_y']:.4f}", f"{result['psnr_rgb']:.3f}"]

    with open(folder / "eval_sample.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [10, 20]
    for row, result in zip(table, report["results"]):
        assert Path(row["checkpoint"]).name == Path(result["checkpoint"]).name
        assert float(row["psnr_y"]) == pytest.approx(result["psnr_y"], abs=1e-6)
        assert float(row["ssim_y"]) == pytest.approx(result["ssim_y"], abs=1e-6)
        assert int(row["scale"]) == 2 and int(row["images"]) == VAL_IMAGES
    # Training improved the model: the later checkpoint scores higher.
    assert report["results"][1]["psnr_y"] > report["results"][0]["psnr_y"]


def test_folder_of_hr_pngs_matches_the_store_and_modcrops(run_dir, sample_store, tmp_path, capsys):
    # The store's validation HR images as PNGs: its LR was made by the same bicubic (bicubic-pil) from them,
    # so evaluating the folder must give the store's numbers.
    store = PatchStore(str(sample_store), 2)
    assert store.degradation == "bicubic-pil"
    folder, odd = tmp_path / "Set5" / "HR", tmp_path / "odd"
    folder.mkdir(parents=True)
    odd.mkdir()
    for index in range(VAL_IMAGES):
        name, _, hr = store.read_valid(index)
        Image.fromarray(hr).save(folder / f"{name}.png")
        # One extra row and column: modcrop to the scale must cut them off again.
        padded = np.pad(hr, ((0, 1), (0, 1), (0, 0)), mode="edge")
        Image.fromarray(padded).save(odd / f"{name}.png")
    store.close()
    checkpoint = run_dir / "checkpoints" / "step_00000020.ckpt"

    common = ["--max-images", str(VAL_IMAGES), "--num-threads", "1", "--device", "cpu"]
    results = {}
    for data in (sample_store, odd):
        out_json = tmp_path / f"{Path(data).stem}.json"
        assert eval_main(["--checkpoints", str(checkpoint), "--data", str(data), *common, "--json", str(out_json),
                          "--csv", str(tmp_path / f"{Path(data).stem}.csv")]) == 0
        results[data] = json.loads(out_json.read_text())["results"][0]
    # The `best` pointer names a step file; default outputs go next to the checkpoints, named after Set5/HR.
    best = run_dir / "checkpoints" / (run_dir / "checkpoints" / "best").read_text().strip()
    assert eval_main(["--checkpoints", str(run_dir / "checkpoints" / "best"), "--data", str(folder), *common]) == 0
    report = json.loads((run_dir / "checkpoints" / "eval_Set5_HR.json").read_text())
    assert report["degradation"] == "bicubic-pil" and report["results"][0]["checkpoint"] == str(best)
    assert best == checkpoint  # validation PSNR rose, so the best is the later checkpoint
    results[folder] = report["results"][0]
    capsys.readouterr()
    reference = results[sample_store]
    for data in (folder, odd):
        assert [e["name"] for e in results[data]["per_image"]] == sorted(e["name"] for e in reference["per_image"])
        for key in ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y"):
            assert results[data][key] == pytest.approx(reference[key], abs=1e-9), (data, key)
    # Nothing was written next to the checkpoints when --csv/--json were given.
    assert not list((run_dir / "checkpoints").glob("eval_odd*"))


def test_weights_file_and_self_ensemble(run_dir, sample_store, tmp_path, capsys):
    from edsr_dist.inference.weights import export_torch

    checkpoint = run_dir / "checkpoints" / "step_00000020.ckpt"
    weights = export_torch(checkpoint, tmp_path / "edsr_x2.pt", names="basicsr")
    common = ["--data", str(sample_store), "--max-images", "1", "--num-threads", "1", "--device", "cpu"]
    for source in (checkpoint, weights):
        assert eval_main(["--checkpoints", str(source), *common, "--json", str(tmp_path / f"{source.stem}.json"),
                          "--csv", str(tmp_path / f"{source.stem}.csv")]) == 0
    assert eval_main(["--checkpoints", str(checkpoint), *common, "--self-ensemble", "--tile", "16"]) == 0
    out = capsys.readouterr().out
    from_ckpt = json.loads((tmp_path / "step_00000020.json").read_text())["results"][0]
    from_weights = json.loads((tmp_path / "edsr_x2.json").read_text())["results"][0]
    assert from_weights["step"] is None and from_ckpt["step"] == 20
    # BasicSR-named weights of the same network give the same numbers (the model is built without the config,
    # so only float rounding in a different memory layout may differ).
    assert from_weights["psnr_y"] == pytest.approx(from_ckpt["psnr_y"], abs=1e-3)
    ensemble = json.loads((run_dir / "checkpoints" / "eval_sample_self-ensemble.json").read_text())
    assert ensemble["self_ensemble"] is True and ensemble["tile"] == 16
    assert np.isfinite(ensemble["results"][0]["psnr_y"])
    assert ensemble["results"][0]["psnr_y"] != pytest.approx(from_ckpt["psnr_y"], abs=1e-6)
    assert "edsr_x2.pt" in out and " - " in out  # the weights row has no step


def test_bad_inputs_are_one_line_user_errors(run_dir, sample_store, tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        eval_main(["--checkpoints", str(tmp_path / "missing"), "--data", str(sample_store)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no step_.*ckpt"):
        eval_main(["--checkpoints", str(tmp_path / "empty"), "--data", str(sample_store)])
    with pytest.raises(UserError, match="empty holds no images; pass a folder of png/bmp/tif/tiff/webp/jpg/jpeg images"):
        eval_main(["--checkpoints", str(run_dir), "--data", str(tmp_path / "empty")])
    with pytest.raises(UserError, match="x2 model but --scale is 3"):
        eval_main(["--checkpoints", str(run_dir), "--data", str(sample_store), "--scale", "3", "--csv",
                   str(tmp_path / "x.csv"), "--json", str(tmp_path / "x.json")])
    (tmp_path / "not_a_store.h5").write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        eval_main(["--checkpoints", str(run_dir), "--data", str(tmp_path / "not_a_store.h5"), "--csv",
                   str(tmp_path / "x.csv"), "--json", str(tmp_path / "x.json")])

    # A damaged file in a folder is skipped with one warning; the others are still evaluated.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy)
    damaged = copy / "step_00000010.ckpt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    assert eval_main(["--checkpoints", str(copy), "--data", str(sample_store), "--max-images", "1"]) == 0
    captured = capsys.readouterr()
    assert [row[1] for row in table_lines(captured.out)] == ["20"]
    assert captured.err.count("\n") == 1 and "step_00000010.ckpt" in captured.err and "truncated" in captured.err

    # Through the CLI: exit 2, one line, no traceback; and a damaged single file is an error, not a warning.
    result = run_cli(["eval", "--checkpoints", str(damaged), "--data", str(sample_store)], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_eval_defaults_to_the_checkpoints_training_precision(sample_store, tmp_path, capsys):
    """A bf16 run: eval without --precision scores in bf16 and repeats its val PSNR; --precision fp32 differs."""
    out = tmp_path / "run"
    result = run_cli(["train", *TINY, "--precision", "bf16", "--data", str(sample_store), "--out", str(out),
                      "--steps-per-epoch", "10", "--max-val-images", str(VAL_IMAGES)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (validated,) = epoch_records(out).values()
    args = ["--checkpoints", str(out), "--data", str(sample_store), "--max-images", str(VAL_IMAGES),
            "--num-threads", "1", "--device", "cpu"]
    assert eval_main(args) == 0
    printed = capsys.readouterr().out
    assert "(cpu, precision as trained)" in printed.splitlines()[0]
    assert "precision bf16: as each checkpoint was trained and validated" in printed
    as_trained = json.loads((out / "checkpoints" / "eval_sample.json").read_text())["results"][0]
    assert as_trained["precision"] == "bf16"
    assert as_trained["psnr_y"] == pytest.approx(validated["psnr_y"], abs=1e-9)
    assert eval_main([*args, "--precision", "fp32"]) == 0
    full = json.loads((out / "checkpoints" / "eval_sample.json").read_text())["results"][0]
    assert full["precision"] == "fp32" and abs(full["psnr_y"] - validated["psnr_y"]) > 1e-6
