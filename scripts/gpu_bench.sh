#!/usr/bin/env bash
# One NVIDIA GPU, one command, a few minutes: `edsr-dist bench` for the paper model (EDSR 32 blocks x 256
# filters) at x2, global batch 16, 48x48 LR patches, channels_last, in bf16 and in fp16; prints images/s and
# achieved TFLOP/s of the real trainer and of a bare PyTorch loop. Target on one H100: >= 600 img/s.
#
# Needs a CUDA build of torch and this package's dependencies (h5py, scikit-image, PyYAML, psutil, tqdm,
# pillow); nothing is downloaded. Data: the embedded sample store (built in seconds on first use), no DIV2K.
#
#   scripts/gpu_bench.sh [OUT_DIR]      # JSON reports land in OUT_DIR (default bench-gpu/)
#
# Environment: PYTHON (default python3), GPU_BENCH_STEPS (timed steps, default 40), GPU_BENCH_WARMUP (default 15).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-bench-gpu}
python=${PYTHON:-python3}
steps=${GPU_BENCH_STEPS:-40}
warmup=${GPU_BENCH_WARMUP:-15}
mkdir -p "$out"

# Run from the checkout whether or not `pip install -e .` was done (GPU machines are often offline).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import torch, h5py, skimage, yaml, psutil, tqdm, PIL" 2>/dev/null; then
    echo "gpu_bench: a dependency is missing; installing the package (needs network): pip install -e $repo" >&2
    "$python" -m pip install -e "$repo"
fi
"$python" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_bench: no CUDA GPU visible to torch {torch.__version__} (a CPU build?); install a CUDA build of torch")
print(f"gpu_bench: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}", flush=True)
EOF

common=(--preset paper --scale 2 --batch-size 16 --patch-size 48 --device cuda --channels-last
        --warmup "$warmup" --steps "$steps" --store-seconds 0.5 --json)

run() {  # name, extra flags...
    local name=$1; shift
    local started=$SECONDS
    "$python" -m edsr_dist bench "${common[@]}" "$@" > "$out/$name.json"
    "$python" - "$out/$name.json" "$name" $((SECONDS - started)) <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
line = (f"{sys.argv[2]:<22} trainer {r['images_per_s']:7.1f} img/s {r['tflops']:6.1f} TFLOP/s | bare loop "
        f"{r['bare_images_per_s']:7.1f} img/s {r['bare_tflops']:6.1f} TFLOP/s | trainer/bare {r['overhead_ratio']:.3f}"
        f" | data wait {r['data_wait_fraction']:.1%} | {'ok' if r['images_per_s'] >= 600 else 'below'} 600 img/s")
if "fp32_nchw_images_per_s" in r:
    line += f" | fp32 NCHW bare {r['fp32_nchw_images_per_s']:.1f} img/s ({r['precision_speedup']:.2f}x)"
if r["skipped_steps"]:
    line += f" | {r['skipped_steps']} step(s) skipped by loss scaling"
print(line + f" [{sys.argv[3]} s]", flush=True)
EOF
}

run bf16 --precision bf16 --compare-fp32
run fp16 --precision fp16

# No host wait inside a training step: torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA
# call (a blocking copy to the host, .item(), .tolist(); collectives are not covered, torch/cuda/__init__.py
# set_sync_debug_mode docstring) from the start to the end of every steady-state train_step, with fp16 loss scaling
# and an EMA on (the trainer's StepTimer seam switches it on and off).
"$python" - <<'EOF'
import tempfile, torch
from edsr_dist.config import parse_train_args
from edsr_dist.parallel.world import World
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.trainer import Trainer

class SyncDebug(StepTimer):
    steps = 0
    def begin_step(self):
        self.steps += 1
        if self.steps > 3:
            torch.cuda.set_sync_debug_mode("error")
    def end_step(self, skipped):
        torch.cuda.set_sync_debug_mode("default")

for precision in ("fp16", "bf16"):
    cfg = parse_train_args(["--preset", "paper", "--device", "cuda", "--precision", precision, "--epochs", "1",
                            "--steps-per-epoch", "12", "--log-every", "1000", "--max-val-images", "1",
                            "--val-tile", "64", "--ema-decay", "0.999", "--progress", "false",
                            "--tensorboard", "false", "--samples-png", "false", "--out", tempfile.mkdtemp()])
    timer = SyncDebug()
    trainer = Trainer(cfg, World(), timer=timer)
    assert trainer.skip_on_device, trainer.optimizer_name
    trainer.fit()
    trainer.close()
    print(f"gpu_bench: sync-debug check {precision}: {timer.steps - 3} steady-state steps without a host sync "
          f"({trainer.optimizer_name})", flush=True)
EOF
echo "gpu_bench: JSON reports in $out/"
