"""`sr`'s default backend on the CPU: the checkpoint's ONNX export, verified against PyTorch once, cached by the
weights' SHA-256, reused, rebuilt when damaged, and made once when two processes ask at the same time."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image

from edsr_dist.cli import main as cli_main
from edsr_dist.config import Config
from edsr_dist.evaluation.command import main as eval_main
from edsr_dist.inference.onnx_cache import cached_onnx
from edsr_dist.model.edsr import build_model
from edsr_dist.state.checkpoint import save_checkpoint
from edsr_dist.state.checkpoint_files import file_sha256

REPO = Path(__file__).resolve().parents[2]


def _run_folder(tmp_path, seed=0):
    cfg = Config(scale=2, num_blocks=1, num_filters=8, res_scale=1.0)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "config": cfg.to_dict(), "step": 1},
                    step=1, keep_last=1)
    return tmp_path / "run"


def test_exported_once_reused_and_rebuilt_when_damaged(tmp_path):
    run = _run_folder(tmp_path)
    cache = str(tmp_path / "cache")
    first = cached_onnx(run, cache)
    assert first.exported_seconds is not None and first.path.is_file()
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["source_sha256"] == file_sha256(first.source) and first.path.name.startswith(record["source_sha256"])
    assert record["within_one_grey_level"] >= 0.999
    stamp = first.path.stat().st_mtime_ns

    again = cached_onnx(run, cache)
    assert again.exported_seconds is None and again.path == first.path and first.path.stat().st_mtime_ns == stamp
    assert cached_onnx(run, cache, raw=True).path != first.path  # other weights of the same file: another entry

    good = first.path.read_bytes()
    damages = {"truncated": good[:len(good) // 2],
               "one byte changed": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]}
    for what, damaged in damages.items():
        first.path.write_bytes(damaged)
        rebuilt = cached_onnx(run, cache)
        assert rebuilt.exported_seconds is not None, what
        assert first.path.read_bytes() == good, what  # the same export again, verified, in place of the damaged
    first.path.with_suffix(".json").write_text("{not json")
    assert cached_onnx(run, cache).exported_seconds is not None
    first.path.with_suffix(".json").unlink()
    assert cached_onnx(run, cache).exported_seconds is not None  # a file without its record is not trusted
    onnxruntime.InferenceSession(str(first.path), providers=["CPUExecutionProvider"])


def test_two_processes_export_once(tmp_path):
    run = _run_folder(tmp_path)
    go = tmp_path / "go"
    script = ("import sys, time, pathlib\n"
              "from edsr_dist.inference.onnx_cache import cached_onnx\n"
              "pathlib.Path(sys.argv[1] + '.ready').touch()\n"
              "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
              "entry = cached_onnx(sys.argv[3], sys.argv[4])\n"
              "print('exported' if entry.exported_seconds is not None else 'cached')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"p{i}"), str(go), str(run),
                               str(tmp_path / "cache")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"p{i}.ready").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()  # both are past their imports: they ask at the same moment
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["cached", "exported"]
    assert "waiting for another process" in "".join(err for _, err in results)


def test_sr_default_backend_matches_pytorch(tmp_path, capsys, monkeypatch):
    run = _run_folder(tmp_path, seed=1)
    monkeypatch.setenv("EDSR_DIST_CACHE", str(tmp_path / "cache"))
    img = np.random.default_rng(2).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    outputs = {}
    for name, extra in (("default", []), ("again", []), ("pytorch", ["--backend", "pytorch"])):
        assert cli_main(["sr", "--checkpoint", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / name),
                         "--device", "cpu", *extra]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / name / "a_x2.png")).astype(int)
    err = capsys.readouterr().err
    assert err.count("backend onnxruntime:") == 2 and "exported and verified" in err and "cached);" in err
    assert np.abs(outputs["default"] - outputs["pytorch"]).max() <= 1
    assert np.array_equal(outputs["default"], outputs["again"])


def test_eval_on_the_cached_export(tmp_path, capsys):
    run = _run_folder(tmp_path, seed=3)
    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    reports = {}
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        assert eval_main(["--checkpoints", str(run), "--data", str(folder), "--device", "cpu", "--precision", "fp32",
                          "--backend", backend, "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
                          "--csv", str(tmp_path / f"{backend}.csv")]) == 0
        reports[backend] = json.loads(out.read_text())["results"][0]
    assert reports["onnxruntime"]["backend"] == "onnxruntime"
    for key in ("psnr_y", "psnr_rgb"):
        assert abs(reports["onnxruntime"][key] - reports["pytorch"][key]) < 0.05, key
    assert "(verified) in" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoints", str(run), "--data", str(folder), "--device", "cpu", "--precision",
                     "bf16", "--backend", "onnxruntime"]) == 2
    assert "--backend onnxruntime evaluates fp32 on the CPU, not bf16" in capsys.readouterr().err
