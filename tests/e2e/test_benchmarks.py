"""`edsr-dist eval --benchmarks`: benchmark folders built from scikit-image photos (odd sizes, grayscale, RGBA) in
the EDSR-PyTorch, BasicSR and bare-HR layouts; the protocols against numbers computed here independently; the
table and JSON; two Gloo ranks against one process; one-line errors; validation on a benchmark set."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, run_cli, spawn_ranks
from PIL import Image
from skimage.metrics import structural_similarity

from edsr_dist.data.resize import matlab_style_bicubic_upscale
from edsr_dist.data.skimage_benchmarks import write_benchmarks
from edsr_dist.errors import UserError
from edsr_dist.evaluation.benchmark_sets import find_sets
from edsr_dist.evaluation.benchmark_suite import format_table
from edsr_dist.evaluation.command import main as eval_main
from edsr_dist.evaluation.protocols import PROTOCOLS
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.model.edsr import EDSR

SIZE = 3  # 37 x 85 pixel crops: odd, so every scale crops
RESULT_KEYS = {"checkpoint", "set", "scale", "images", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "step",
               "sha256", "lr_source", "layout"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("benchmarks")
    return {layout: write_benchmarks(base / layout, layout, scales=(2, 3), size=SIZE)
            for layout in ("edsr-pytorch", "basicsr", "hr-folder")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Tiny x2 and x3 models with fixed random weights, as plain weight files."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for scale in (2, 3):
        torch.manual_seed(scale)
        paths[scale] = folder / f"tiny_x{scale}.pt"
        torch.save(EDSR(scale=scale, num_blocks=1, num_filters=8, res_scale=1.0).state_dict(), paths[scale])
    return paths


def run_eval(capsys, tmp_path, *args):
    """`edsr-dist eval ARGS --json ...` in this process (the CLI itself is run by the error and rank tests)."""
    out = tmp_path / f"eval_{len(list(tmp_path.glob('eval_*.json')))}.json"
    capsys.readouterr()
    assert eval_main([*map(str, args), "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_sets_are_found_in_every_layout_with_grayscale_and_alpha_images(roots):
    for layout, root in roots.items():
        sets = find_sets(root)
        assert [s.name for s in sets] == ["sk-gray-alpha", "sk-photos"]
        assert {s.layout for s in sets} == {layout}
        gray = sets[0]
        name, lr, hr = gray.load(0, 3)  # camera: a grayscale PNG, read as 3 equal channels
        assert name == "camera" and hr.shape == (36, 84, 3) and lr.shape == (12, 28, 3)
        assert (hr[..., 0] == hr[..., 1]).all() and (hr[..., 1] == hr[..., 2]).all()
        name, lr, hr = gray.load(2, 2)  # logo: RGBA, alpha dropped
        assert name == "logo" and hr.shape == (36, 84, 3)
    with Image.open(roots["edsr-pytorch"] / "sk-gray-alpha" / "HR" / "logo.png") as image:
        assert image.mode == "RGBA"
    with Image.open(roots["edsr-pytorch"] / "sk-gray-alpha" / "HR" / "camera.png") as image:
        assert image.mode == "L" and image.size == (85, 37)


def test_layouts_give_identical_numbers(roots, weights, tmp_path, capsys):
    reports = [run_eval(capsys, tmp_path, "--checkpoints", weights[2], weights[3], "--benchmarks", root)[0]
               for root in roots.values()]
    numbers = [[{k: r[k] for k in ("set", "scale", "images", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}
                for r in report["results"]] for report in reports]
    assert numbers[0] == numbers[1] == numbers[2]
    assert [r["layout"] for r in reports[1]["results"]] == ["basicsr"] * 4
    assert reports[0]["results"][0]["lr_source"].startswith("files in")
    assert reports[2]["results"][0]["lr_source"].startswith("MATLAB-style bicubic")


def independent_scores(model, root: Path, set_name: str, scale: int, channel: str, border: int) -> dict:
    """PSNR/SSIM written out here from the definitions: BT.601 Y or RGB, `border` cropped, scikit-image SSIM."""
    totals = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    files = sorted((root / set_name / "HR").glob("*.png"))
    for path in files:
        with Image.open(path) as image:
            hr = np.asarray(image.convert("RGB"))
        hr = hr[:hr.shape[0] // scale * scale, :hr.shape[1] // scale * scale]
        with Image.open(root / set_name / "LR_bicubic" / f"X{scale}" / f"{path.stem}x{scale}.png") as image:
            lr = np.asarray(image.convert("RGB"))
        outputs = {"": super_resolve(model, lr, "cpu"), "bicubic_": matlab_style_bicubic_upscale(lr, scale)}
        for prefix, sr in outputs.items():
            a, b = (x[border:-border, border:-border].astype(np.float64) for x in (sr, hr))
            if channel == "y":
                a, b = (16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255 for x in (a, b))
                ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255)
            else:
                ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255, channel_axis=2)
            totals[prefix + "psnr"] += 10 * math.log10(255 ** 2 / np.mean((a - b) ** 2))
            totals[prefix + "ssim"] += ssim
    return {key: value / len(files) for key, value in totals.items()}


@pytest.mark.parametrize("protocol, channel, extra", [("paper", "y", 0), ("rgb", "rgb", 0), ("edsr-div2k", "rgb", 6)])
def test_each_protocol_matches_numbers_computed_independently(roots, weights, tmp_path, capsys, protocol, channel,
                                                             extra):
    root = roots["edsr-pytorch"]
    report, _ = run_eval(capsys, tmp_path, "--checkpoints", weights[3], "--benchmarks", root, "--sets", "sk-photos",
                         "--protocol", protocol)
    (result,) = report["results"]
    model = EDSR(scale=3, num_blocks=1, num_filters=8, res_scale=1.0)
    model.load_state_dict(torch.load(weights[3]))
    expected = independent_scores(model.eval(), root, "sk-photos", 3, channel, 3 + extra)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert report["protocol"]["name"] == protocol
    assert report["protocol"]["border"] == ("scale + 6" if extra else "scale")


def test_multi_set_table_and_json_are_complete(roots, weights, tmp_path, capsys):
    report, stdout = run_eval(capsys, tmp_path, "--checkpoints", weights[2], weights[3], "--benchmarks",
                              roots["basicsr"], "--self-ensemble")
    results = report["results"]
    assert [(r["set"], r["scale"]) for r in results] == [("sk-gray-alpha", 2), ("sk-photos", 2),
                                                        ("sk-gray-alpha", 3), ("sk-photos", 3)]
    for r in results:
        assert RESULT_KEYS <= set(r) and len(r["sha256"]) == 64 and r["step"] is None
        assert r["images"] == (3 if r["set"] == "sk-gray-alpha" else 4)
        assert all(math.isfinite(r[k]) for k in ("psnr", "ssim", "self_ensemble_psnr", "self_ensemble_ssim"))
    protocol = report["protocol"]
    assert protocol["self_ensemble"] is True and protocol["precision"] == "fp32"
    assert protocol["images_per_set"] == {"sk-gray-alpha": 3, "sk-photos": 4}
    assert {"channel", "border", "rounding", "lr_source", "modcrop", "source"} <= set(protocol)
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("set "))
    assert "x2 tiny_x2.pt" in lines[header - 1] and "x3 tiny_x3.pt" in lines[header - 1]
    assert lines[header].split() == ["set", "images", "bicubic", "1x8", "1x8+", "bicubic", "1x8", "1x8+"]
    for row, r2, r3 in zip(lines[header + 1:header + 3], results[:2], results[2:]):
        cells = row.split()
        assert cells[:2] == [r2["set"], str(r2["images"])]
        assert cells[3] == f"{r2['psnr']:.2f}/{r2['ssim']:.4f}" and cells[6] == f"{r3['psnr']:.2f}/{r3['ssim']:.4f}"
        assert cells[4] == f"{r2['self_ensemble_psnr']:.2f}/{r2['self_ensemble_ssim']:.4f}"


def test_table_shows_paper_numbers_and_the_difference_when_the_model_matches():
    protocol = PROTOCOLS["paper"]
    result = {"checkpoint": "runs/paper/edsr_x2.ckpt", "set": "Set5", "scale": 2, "images": 5, "psnr": 38.0,
              "ssim": 0.96, "bicubic_psnr": 33.6, "bicubic_ssim": 0.93, "model": "EDSR", "num_blocks": 32,
              "num_filters": 256}
    other = {**result, "set": "MySet"}
    lines = format_table([result, other], protocol, ensemble=False).splitlines()
    assert lines[1].split() == ["set", "images", "bicubic", "EDSR", "paper", "ours-paper"]
    assert lines[2].split() == ["Set5", "5", "33.60/0.9300", "38.00/0.9600", "38.11/0.9601", "-0.11/-0.0001"]
    assert lines[3].split()[-2:] == ["-", "-"]  # no published number for this set
    # Another protocol: the paper's Y numbers are not comparable, so no paper columns.
    assert "paper" not in format_table([result], PROTOCOLS["rgb"], ensemble=False)
    # DIV2K: the paper's Table 2 scored 10 images (with EDSR+), the authors' README 100 images (PSNR only).
    div2k = {**result, "set": "DIV2K", "images": 10, "self_ensemble_psnr": 35.2, "self_ensemble_ssim": 0.97}
    lines = format_table([div2k], PROTOCOLS["edsr-div2k"], ensemble=True).splitlines()
    assert lines[1].split() == ["set", "images", "bicubic", "EDSR", "EDSR+", "paper", "ours-paper", "paper+",
                                "ours+-paper+"]
    assert lines[2].split()[5:] == ["35.03/0.9695", "+2.97/-0.0095", "35.12/0.9699", "+0.08/+0.0001"]
    lines = format_table([{**div2k, "images": 100}], PROTOCOLS["edsr-div2k"], ensemble=False).splitlines()
    assert lines[2].split()[4:] == ["35.03/-", "+2.97/-"]
    assert "paper" not in format_table([{**div2k, "images": 50}], PROTOCOLS["edsr-div2k"], ensemble=True)


def test_two_gloo_ranks_equal_one_process(roots, weights, tmp_path, capsys):
    single, _ = run_eval(capsys, tmp_path, "--checkpoints", weights[2], "--benchmarks", roots["hr-folder"])
    out = tmp_path / "two.json"
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "eval", "--checkpoints", str(weights[2]),
                                  "--benchmarks", str(roots["hr-folder"]), "--json", str(out), "--num-threads", "1"],
                                 2, cwd=tmp_path)
    assert codes == [0, 0], outputs
    two = json.loads(out.read_text())
    assert two["protocol"]["ranks"] == 2
    assert sum("image evaluations" in text for text in outputs) == 1  # rank 0 alone reports
    for a, b in zip(single["results"], two["results"]):
        assert a["images"] == b["images"]
        for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
            assert a[key] == pytest.approx(b[key], abs=1e-9)


def test_mismatched_lr_file_is_a_one_line_error(roots, weights, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(roots["edsr-pytorch"], root)
    bad = root / "sk-photos" / "LR_bicubic" / "X2" / "coffeex2.png"
    Image.new("RGB", (20, 11)).save(bad)
    result = run_cli(["eval", "--checkpoints", str(weights[2]), "--benchmarks", str(root)], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if "error" in line]) == 1 and "Traceback" not in result.stderr
    assert str(bad) in lines[-1] and "20x11" in lines[-1] and "42x18" in lines[-1]


def test_unknown_set_and_data_only_flags_are_user_errors(roots, weights):
    with pytest.raises(UserError, match="Set5 not found .* it has sk-gray-alpha, sk-photos"):
        eval_main(["--checkpoints", str(weights[2]), "--benchmarks", str(roots["basicsr"]), "--sets", "Set5"])
    with pytest.raises(UserError, match="--max-images only apply to --data"):
        eval_main(["--checkpoints", str(weights[2]), "--benchmarks", str(roots["basicsr"]), "--max-images", "1"])
    with pytest.raises(UserError, match="exactly one of --data"):
        eval_main(["--checkpoints", str(weights[2])])


def test_validation_on_a_benchmark_set_agrees_with_eval(sample_store, roots, tmp_path, capsys):
    """metrics.jsonl's numbers for val_benchmark/val_protocol are the eval table's numbers for that checkpoint."""
    set_folder = roots["basicsr"] / "sk-photos"
    run = tmp_path / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(run), "--steps-per-epoch", "6",
                      "--max-val-images", "0", "--val-benchmark", str(set_folder), "--val-protocol", "rgb"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r["type"] == "epoch" and "psnr" in r)
    assert epoch["val_set"] == "sk-photos" and epoch["protocol"] == "rgb" and epoch["images"] == 4
    report, _ = run_eval(capsys, tmp_path, "--checkpoints", run, "--benchmarks", roots["basicsr"],
                         "--sets", "sk-photos", "--protocol", "rgb")
    (evaluated,) = report["results"]
    assert evaluated["step"] == epoch["step"]
    for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        assert evaluated[key] == pytest.approx(epoch[key], abs=1e-9), key
    assert epoch["psnr"] != pytest.approx(epoch["psnr_y"], abs=1e-3)  # RGB, not the Y number


def test_store_validation_can_add_a_protocol(sample_store):
    from edsr_dist.config import build_config
    from edsr_dist.data.store import PatchStore
    from edsr_dist.evaluation.benchmark_sets import validation_source

    store = PatchStore(str(sample_store), 2)
    try:
        plain = validation_source(build_config(preset="sample", overrides={"max_val_images": "1"}), store)
        assert plain.keys == ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y") and plain.labels == {}
        cfg = build_config(preset="sample", overrides={"max_val_images": "1", "val_protocol": "edsr-div2k"})
        source = validation_source(cfg, store)
        assert source.count == 1 and source.labels == {"val_set": "store", "protocol": "edsr-div2k"}
        _, lr, hr = source.load(0)
        bicubic = matlab_style_bicubic_upscale(lr, 2)
        scores = source.score(bicubic, lr, hr)
        assert scores["psnr"] == pytest.approx(scores["bicubic_psnr"], abs=1e-12)
        assert scores["psnr"] == pytest.approx(PROTOCOLS["edsr-div2k"].psnr(bicubic, hr, 2), abs=1e-12)
    finally:
        store.close()
