#!/usr/bin/env bash
# Peak resident memory of `edsr-dist sr` by image size, with and without --tile, on both backends (BENCHMARKS.md
# "sr memory"). usage: scripts/sr_memory.sh WORK_DIR [FILTERS] [BLOCKS] [SIDES...]
# A random x2 EDSR of FILTERS x BLOCKS (default 16 x 1: the memory is the images' and one window's; the baseline's
# 64 x 16 takes minutes per 6000x6000 image on a 2-core CPU); LR images of SIDE x SIDE (default 1000 3000 6000).
set -euo pipefail
work=${1:?usage: scripts/sr_memory.sh WORK_DIR [FILTERS] [BLOCKS] [SIDES...]}
filters=${2:-16}
blocks=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
sides=${*:-1000 3000 6000}
mkdir -p "$work"
export EDSR_DIST_CACHE="$work/cache"
python - "$work" "$filters" "$blocks" $sides <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edsr_dist.config import Config
from edsr_dist.model.edsr import build_model
from edsr_dist.state.checkpoint import save_checkpoint

work, filters, blocks, sides = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), map(int, sys.argv[4:])
cfg = Config(scale=2, num_blocks=blocks, num_filters=filters, res_scale=1.0)
torch.manual_seed(0)
save_checkpoint(work / "run", {"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "step": 1},
                step=1, keep_last=1)
rng = np.random.default_rng(0)
for side in sides:
    if not (work / f"in{side}.png").exists():  # a smooth ramp with noise: photo-like, quick to compress
        ramp = np.linspace(0, 200, side, dtype=np.float32)
        img = ramp[:, None, None] * 0.5 + ramp[None, :, None] * 0.25 + rng.integers(0, 40, (side, side, 3))
        Image.fromarray(img.astype(np.uint8)).save(work / f"in{side}.png", compress_level=1)
PY
edsr-dist-sr() { python -m edsr_dist sr --checkpoint "$work/run" "$@"; }
edsr-dist-sr "$work/in1000.png" --out "$work/out" >/dev/null 2>&1 || true  # the ONNX export, once, untimed
printf "%-6s %-12s %-10s %12s %10s %14s\n" side backend tile peak_MiB seconds output_MiB
for side in $sides; do
  for backend in default pytorch; do
    for tile in auto 256; do
      args=("$work/in$side.png" --out "$work/out")
      [ "$backend" = pytorch ] && args+=(--backend pytorch)
      [ "$tile" != auto ] && args+=(--tile "$tile")
      /usr/bin/time -v -o "$work/time.txt" python -m edsr_dist sr --checkpoint "$work/run" "${args[@]}" >/dev/null
      peak=$(awk -F': ' '/Maximum resident/ {print int($2 / 1024)}' "$work/time.txt")
      secs=$(awk -F': ' '/Elapsed \(wall/ {split($2, t, ":"); print (length(t) == 3 ? t[1] * 3600 + t[2] * 60 + t[3] : t[1] * 60 + t[2])}' "$work/time.txt")
      printf "%-6s %-12s %-10s %12s %10s %14.0f\n" "$side" "$backend" "$tile" "$peak" "$secs" "$(echo "$side * $side * 12 / 1048576" | bc -l)"
    done
  done
done
