"""`sr` in memory set by the tile, not the image: under an address-space limit that the whole x2 output in float32
alone would exceed, a tiled (and an automatically tiled) run still writes the image, equal to the whole-image pass;
asked for the whole image, it fails in one line that names a tile that would fit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edsr_dist.config import Config
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.model.edsr import build_model
from edsr_dist.state.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "workers" / "sr_under_limit.py"
SIDE = 1500  # LR side: the x2 output is 27 MB in uint8, 108 MB in float32
BUDGET_MIB = 96


def _run(budget_mib, warm_up, argv):
    # The PyTorch backend: its allocations are the tiling's own. (ONNX Runtime's arena grows in its own steps; its
    # peaks are measured in BENCHMARKS.md "sr memory".)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), str(budget_mib), str(warm_up), *argv, "--backend", "pytorch"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_sr_runs_in_tile_sized_memory(tmp_path):
    assert SIDE * 2 * SIDE * 2 * 3 * 4 > BUDGET_MIB * 2 ** 20  # the old float32 output alone would not fit
    cfg = Config(scale=2, num_blocks=1, num_filters=8, res_scale=1.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "config": cfg.to_dict(), "step": 1},
                    step=1, keep_last=1)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, SIDE, dtype=np.float32)
    lr = (ramp[:, None, None] * 0.5 + ramp[None, :, None] * 0.25 + rng.integers(0, 40, (SIDE, SIDE, 3))).astype(np.uint8)
    Image.fromarray(lr).save(tmp_path / "big.png", compress_level=1)
    Image.fromarray(lr[:40, :50]).save(tmp_path / "small.png")
    whole = super_resolve(model, lr, "cpu", tile=0)

    for tile_args in (["--tile", "200"], []):
        out = tmp_path / f"out{len(tile_args)}"
        done = _run(BUDGET_MIB, tmp_path / "small.png",
                    ["--checkpoint", str(tmp_path / "run"), str(tmp_path / "big.png"), "--out", str(out), *tile_args])
        assert done.returncode == 0, done.stderr[-3000:]
        sr = np.asarray(Image.open(out / "big_x2.png"))
        assert sr.shape == (2 * SIDE, 2 * SIDE, 3)
        assert np.abs(sr.astype(int) - whole).max() <= 1  # tiles equal the whole-image pass to float rounding

    done = _run(BUDGET_MIB, tmp_path / "small.png",
                ["--checkpoint", str(tmp_path / "run"), str(tmp_path / "big.png"), "--out", str(tmp_path / "no"),
                 "--tile", "0"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"big.png ({SIDE}x{SIDE}) does not fit in cpu memory in one piece; pass --tile " in line, line
    suggested = int(line.rsplit("--tile ", 1)[1].split()[0])
    assert 16 <= suggested < SIDE
    assert not (tmp_path / "no" / "big_x2.png").exists()
