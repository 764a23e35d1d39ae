"""A checkpoint or weights file is data: loading one never runs code from it, in every command that reads one."""

import io
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY, run_cli
from PIL import Image

from edsr_dist.errors import UserError
from edsr_dist.inference.weights import checkpoint_model
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from edsr_dist.state.checkpoint_files import follow_pointer

# Written by commit 0a0567e's trainer (`git archive 0a0567e`, then in that tree: `edsr-dist build-store --sample
# --out sample.h5` and `edsr-dist train --preset sample --data sample.h5 --out run --num-blocks 1 --num-filters 4
# --batch-size 2 --patch-size 8 --epochs 1 --steps-per-epoch 3 --precision fp32 --max-val-images 1`).
OLD_CHECKPOINT = REPO / "tests" / "data" / "step_00000003_v0a0567e.ckpt"
REFUSAL = "contains objects a checkpoint never holds (a reference to posix.system)"


class _RunsShell:
    """Pickles as a call of os.system: what a crafted checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _crafted_state(base: dict, marker: Path) -> dict:
    # A real training state with one extra entry; the file gets a valid header and checksum from our own writer.
    return {**base, "step": base["step"] + 10, "note": _RunsShell(marker)}


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def crafted(tmp_path, trained_run):
    """(a copy of the run whose newest checkpoint, step 20, would run a shell command, that file, the marker)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "marker"
    base = load_checkpoint(run / "checkpoints" / "step_00000010.ckpt")
    path = save_checkpoint(run, _crafted_state(base, marker), step=20, keep_last=3)
    assert (run / "checkpoints" / "latest").read_text().strip() == path.name
    return run, path, marker


def test_the_crafted_file_would_run_code_if_unpickled(crafted):
    """The control: an unrestricted unpickle of the same payload creates the marker, so its absence below means
    something."""
    _, path, marker = crafted
    payload = path.read_bytes().split(b"\n", 3)[3]
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def test_loaders_refuse_a_crafted_checkpoint(crafted, capsys):
    run, path, marker = crafted
    for load in (load_checkpoint, verify_checkpoint, checkpoint_model):
        with pytest.raises(UserError, match=re.escape(REFUSAL)) as info:
            load(path)
        assert str(path) in str(info.value) and "nothing in it was run" in str(info.value)
    # As for a damaged file: the newest file that verifies and loads safely is chosen, with one warning.
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000010.ckpt"
    assert f"skipping {path}: refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_our_checkpoint_from_a_real_run_loads_weights_only(trained_run):
    state = load_checkpoint(trained_run / "checkpoints" / "step_00000010.ckpt")
    assert state["step"] == 10 and state["config"]["num_blocks"] == 2
    adam = state["optimizer"]["state"]
    assert adam and all(torch.is_tensor(s["exp_avg"]) and torch.is_tensor(s["exp_avg_sq"]) for s in adam.values())
    assert float(next(iter(adam.values()))["step"]) == 10
    assert state["scaler"] == {"enabled": False, "scale": state["scaler"]["scale"], "good_steps": 0}
    assert state["rng"]["torch"].dtype == torch.uint8


def test_a_checkpoint_of_an_earlier_version_still_loads():
    state = load_checkpoint(OLD_CHECKPOINT)
    assert state["meta"]["package_version"] == "0.1.0" and state["step"] == 3
    assert all(torch.is_tensor(s["exp_avg"]) for s in state["optimizer"]["state"].values())
    model, cfg = checkpoint_model(OLD_CHECKPOINT)
    assert (cfg.num_blocks, cfg.num_filters) == (1, 4)
    assert torch.equal(model.state_dict()["head.0.weight"], state["model"]["head.0.weight"])


def test_a_pointer_cannot_lead_outside_its_folder(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    outside = tmp_path / "elsewhere.ckpt"
    shutil.copy(run / "checkpoints" / "step_00000010.ckpt", outside)
    (run / "checkpoints" / "latest").write_text("../../elsewhere.ckpt\n")
    with pytest.raises(UserError, match="not a file in"):
        follow_pointer(run / "checkpoints" / "latest")
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000010.ckpt"


def _files(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_sr_refuses_a_crafted_checkpoint(crafted, tmp_path):
    _, path, marker = crafted
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    result = run_cli(["sr", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "up")], cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert line.startswith("edsr-dist sr: error: refusing to load") and REFUSAL in line and str(path) in line
    assert not marker.exists() and not (tmp_path / "up").exists()


def test_sr_refuses_crafted_weights(tmp_path):
    marker = tmp_path / "marker"
    weights = tmp_path / "edsr_x2.pt"
    torch.save({"head.0.weight": torch.zeros(1), "x": _RunsShell(marker)}, weights)
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    result = run_cli(["sr", "--checkpoint", str(weights), str(image), "--out", str(tmp_path / "up")], cwd=tmp_path)
    assert result.returncode == 2
    assert "contains objects a weights file never holds (a reference to posix.system)" in _one_line(result.stderr)
    assert not marker.exists() and not (tmp_path / "up").exists()


def test_eval_refuses_a_crafted_checkpoint(crafted, tmp_path, sample_store):
    run, path, marker = crafted
    before = _files(run)
    result = run_cli(["eval", "--checkpoints", str(path), "--data", str(sample_store)], cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert line.startswith("edsr-dist eval: error: refusing to load") and REFUSAL in line and str(path) in line
    assert not marker.exists() and _files(run) == before


def test_export_refuses_a_crafted_checkpoint(crafted, tmp_path):
    _, path, marker = crafted
    for out in ("w.safetensors", "w.pth"):
        result = run_cli(["export", "--checkpoint", str(path), "--out", out], cwd=tmp_path)
        assert result.returncode == 2
        assert REFUSAL in _one_line(result.stderr)
        assert not (tmp_path / out).exists()
    assert not marker.exists()


def test_resume_auto_passes_over_a_crafted_newest_checkpoint(crafted, sample_store):
    run, path, marker = crafted
    args = [*TINY, "--data", str(sample_store), "--out", str(run), "--steps-per-epoch", "10", "--epochs", "2",
            "--resume", "auto"]
    result = run_cli(["train", *args], cwd=run.parent)
    assert result.returncode == 0, result.stderr
    assert f"skipping {path}: refusing to load {path}: it {REFUSAL}" in result.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_00000010.ckpt'} at step 10" in result.stdout
    assert not marker.exists()
    # The resumed run wrote its own step 20 in place of the crafted file.
    assert load_checkpoint(path)["step"] == 20


def test_resume_from_a_crafted_file_is_refused(crafted, sample_store):
    run, path, marker = crafted
    before = _files(run)
    args = [*TINY, "--data", str(sample_store), "--out", str(run), "--resume", str(path)]
    result = run_cli(["train", *args], cwd=run.parent)
    assert result.returncode == 2
    assert REFUSAL in _one_line(result.stderr)
    assert not marker.exists() and _files(run) == before


def test_a_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"epochs: 3\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"config file {config} has a YAML tag at line 2 that is not plain data" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_the_package_reads_pickles_in_one_place_only():
    """Every torch.load of the package is the weights-only one in safe_load.py; nothing unpickles otherwise."""
    calls = {}
    for path in (REPO / "edsr_dist").rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "weights_only=False", "yaml.load(", "allow_pickle=True"):
            if needle in text:
                calls.setdefault(needle, []).append(path.relative_to(REPO).as_posix())
    assert calls == {"torch.load(": ["edsr_dist/state/safe_load.py"]}
