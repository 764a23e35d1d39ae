"""Object-storage figures for BENCHMARKS.md, against a local moto_server (pip install -e '.[test,s3]'):

    python scripts/bench_storage.py [--mib 256] [--blocks 32 --filters 256]

1. download: remote.fetch_file of a random object (streamed, MD5 against the ETag, atomic rename), MB/s;
2. upload: RunMirror of the same file (one put_file on the upload thread), MB/s;
3. the training thread's share of a mirrored checkpoint: save_checkpoint of a real EDSR training state (model +
   Adam) against RunMirror.checkpoint_saved (hard link + pointer snapshots) right after it, as a ratio;
4. what the upload thread costs the training thread through the CPU: the time of EDSR baseline train steps while
   that checkpoint uploads, against the same steps with nothing uploading.
All in one run, on one machine; moto keeps objects in memory and hashes them in Python, so upload figures are
moto's limit more than the client's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edsr_dist.config import Config  # noqa: E402
from edsr_dist.model.edsr import build_model  # noqa: E402
from edsr_dist.state.checkpoint import save_checkpoint  # noqa: E402
from edsr_dist.state.mirror import RunMirror  # noqa: E402
from edsr_dist.state.remote import fetch_file, filesystem  # noqa: E402


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


def train_steps(model, optimizer, steps: int) -> float:
    x, y = torch.rand(4, 3, 24, 24), torch.rand(4, 3, 48, 48)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.l1_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256, help="size of the transfer test object")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--port", type=int, default=47123)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{args.port}")
    server = start_moto(args.port)
    work = Path(tempfile.mkdtemp(prefix="edsr-bench-storage-"))
    try:
        fs, _ = filesystem("s3://bench/x")
        fs.mkdir("bench")
        blob = work / "blob.bin"
        blob.write_bytes(os.urandom(args.mib << 20))
        fs.put_file(str(blob), "bench/blob.bin")
        start = time.perf_counter()
        fetch_file("s3://bench/blob.bin", str(work / "cache"))
        down = (args.mib << 20) / (time.perf_counter() - start) / 1e6

        mirror = RunMirror("s3://bench/upload", work / "stage")
        assert mirror._put("blob.bin", blob)
        up = mirror.uploaded_bytes / mirror.upload_seconds / 1e6
        mirror.close()

        torch.manual_seed(0)
        cfg = Config(num_blocks=args.blocks, num_filters=args.filters, res_scale=0.1)
        model = build_model(cfg)
        optimizer = torch.optim.Adam(model.parameters())
        train_steps(model, optimizer, 1)  # Adam's moments exist, as in a real checkpoint
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}
        stage = work / "run"
        mirror = RunMirror("s3://bench/run", stage)
        saves, hands = [], []
        for step in range(1, 4):
            start = time.perf_counter()
            path = save_checkpoint(stage, state, step=step, keep_last=3)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            mirror.checkpoint_saved(path)
            hands.append(time.perf_counter() - start)
        size = path.stat().st_size
        mirror.close()

        small = build_model(Config(num_blocks=16, num_filters=64, res_scale=1.0))
        small_opt = torch.optim.Adam(small.parameters())
        train_steps(small, small_opt, 3)
        idle = train_steps(small, small_opt, 20)
        mirror = RunMirror("s3://bench/run2", stage)
        mirror.checkpoint_saved(path)
        busy = train_steps(small, small_opt, 20)
        mirror.close()

        best_save, best_hand = min(saves), min(hands)
        print(f"download {args.mib} MiB (fetch_file, MD5 checked): {down:.0f} MB/s")
        print(f"upload {args.mib} MiB (RunMirror put_file): {up:.0f} MB/s")
        print(f"checkpoint {size / 1e6:.0f} MB: local save {best_save * 1e3:.0f} ms, queueing its upload "
              f"{best_hand * 1e3:.2f} ms on the training thread = {100 * best_hand / best_save:.3f}% of the save")
        print(f"20 baseline train steps: {idle:.2f} s idle, {busy:.2f} s while that checkpoint uploads "
              f"({100 * (busy / idle - 1):+.0f}%)")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
