"""--data / --out / --resume against a real S3 server (moto_server on 127.0.0.1, the real s3fs client over HTTP):
training from a bucket store, the mirrored run, exact resume from the bucket on an empty server after SIGKILL,
damaged objects refused, the server cut mid-upload, and one download per cache folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, make_hr_folder, run_cli
from s3_server import Relay

from edsr_dist.state.checkpoint import load_checkpoint

STEPS_PER_EPOCH = 10

# Rank 0 stops after saving (and queueing the upload of) the checkpoint of a listed step, says so with a file, and goes on when the test
# writes go_<step> (or never, for a SIGKILL). Nothing in the trainer is told.
HOOKED_TRAIN = r"""
import os, sys, time
from pathlib import Path
from edsr_dist.state.mirror import RunMirror

pause_steps = {int(s) for s in os.environ.get("PAUSE_STEPS", "").split(",") if s}
pause_dir = Path(os.environ.get("PAUSE_DIR", "."))
real_saved = RunMirror.checkpoint_saved

def saved(self, step_file):
    real_saved(self, step_file)  # queued for upload: the upload thread goes on while we wait
    step = int(step_file.stem.split("_")[1])
    if step in pause_steps:
        (pause_dir / f"saved_{step}").touch()
        while not (pause_dir / f"go_{step}").exists():
            time.sleep(0.02)

RunMirror.checkpoint_saved = saved
from edsr_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def bucket(s3_server):
    name = f"edsr-{uuid.uuid4().hex[:12]}"
    fs = s3_server.filesystem()
    fs.mkdir(name)
    return name


def put(s3_server, local: Path, url_path: str) -> None:
    s3_server.filesystem().put_file(str(local), url_path)


def train_args(data: str, out: str, cache: Path, epochs: int = 2, extra=()) -> list[str]:
    return [*TINY, "--data", data, "--out", out, "--cache-dir", str(cache), "--epochs", str(epochs),
            "--steps-per-epoch", str(STEPS_PER_EPOCH), "--validate-every", "1", "--save-every", "1",
            "--max-val-images", "1", "--resume", "auto", *extra]


def assert_pointers_resolve(fs, run: str) -> None:
    """Everything in the bucket that names a checkpoint names one that is there."""
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints", detail=False)}
    for pointer in ("latest", "best"):
        if pointer in names:
            target = fs.cat_file(f"{run}/checkpoints/{pointer}").decode().strip()
            assert target in names, f"{pointer} names {target}, not in the bucket ({sorted(names)})"
    if "index.json" in names:
        index = json.loads(fs.cat_file(f"{run}/checkpoints/index.json"))
        for entry in index["checkpoints"]:
            assert entry["file"] in names, f"index.json names {entry['file']}, not in the bucket"


def bucket_state(fs, run: str, tmp_path: Path) -> dict:
    name = fs.cat_file(f"{run}/checkpoints/latest").decode().strip()
    local = tmp_path / f"pulled_{name}"
    fs.get_file(f"{run}/checkpoints/{name}", str(local))
    return load_checkpoint(local)


def test_train_from_a_bucket_store_to_the_result_line(s3_server, bucket, sample_store, tmp_path):
    put(s3_server, sample_store, f"{bucket}/stores/sample.h5")
    cache = tmp_path / "cache"
    run = f"{bucket}/runs/first"
    result = run_cli(["train", *train_args(f"s3://{bucket}/stores/sample.h5", f"s3://{run}", cache, epochs=1,
                                           extra=["--samples-png", "true"])],
                     cwd=tmp_path, env=s3_server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Result:" in result.stdout
    assert result.stderr.count("fetched patch store") == 1
    cached = cache / "objects" / "s3" / bucket / "stores" / "sample.h5"
    assert cached.read_bytes() == sample_store.read_bytes()
    assert not list(cached.parent.glob(".sample.h5.part-*"))
    # The mirrored run: checkpoint, pointers, the result record and the sample image, all in the bucket.
    fs = s3_server.filesystem()
    assert fs.cat_file(f"{run}/checkpoints/latest").decode().strip() == "step_00000010.ckpt"
    assert_pointers_resolve(fs, run)
    records = [json.loads(line) for line in fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert records[-1]["type"] == "result"
    assert fs.glob(f"{run}/samples/*.png")
    staged = cache / "runs" / "s3" / bucket / "runs" / "first"
    assert (staged / "checkpoints" / "step_00000010.ckpt").read_bytes() == \
        fs.cat_file(f"{run}/checkpoints/step_00000010.ckpt")

    # A second run reuses the verified copy (one HEAD request), and a new run into a used prefix is refused.
    again = run_cli(["train", *train_args(f"s3://{bucket}/stores/sample.h5", f"s3://{bucket}/runs/second", cache,
                                          extra=["--max-steps", "2"])], cwd=tmp_path, env=s3_server.env())
    assert again.returncode == 0, again.stderr
    assert "fetched" not in again.stderr
    shutil.rmtree(staged)
    refused = run_cli(["train", *train_args(str(sample_store), f"s3://{run}", cache)[:-2]], cwd=tmp_path,
                      env=s3_server.env())
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "already holds a run" in refused.stderr and f"s3://{run}" in refused.stderr


def test_sigkill_then_resume_auto_from_the_bucket_is_bit_identical(s3_server, bucket, sample_store, tmp_path):
    reference_out = tmp_path / "reference"
    ref = run_cli(["train", *train_args(str(sample_store), str(reference_out), tmp_path / "refcache")],
                  cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    reference = load_checkpoint(reference_out / "checkpoints" / "step_00000020.ckpt")["model"]

    put(s3_server, sample_store, f"{bucket}/sample.h5")
    run, cache = f"{bucket}/run", tmp_path / "cache"
    args = train_args(f"s3://{bucket}/sample.h5", f"s3://{run}", cache, extra=["--save-every-steps", "7"])
    fs = s3_server.filesystem()
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_TRAIN, "train", *args], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO), PAUSE_STEPS="7", PAUSE_DIR=str(tmp_path),
                                     **s3_server.env()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # Killed once step 7's checkpoint is in the bucket (the upload thread sends it while rank 0 waits).
        while not (fs.exists(f"{run}/checkpoints/latest")
                   and fs.cat_file(f"{run}/checkpoints/latest").decode().strip() == "step_00000007.ckpt"):
            assert proc.poll() is None, f"the run ended with {proc.returncode} before the kill point"
            assert time.monotonic() < deadline, "step 7 never reached the bucket"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(cache)  # a fresh server: no cached store, no staged run

    result = run_cli(["train", *args], cwd=tmp_path, env=s3_server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "step_00000007.ckpt at step 7" in result.stdout
    state = bucket_state(fs, run, tmp_path)
    assert state["step"] == 20
    for name in reference:
        assert torch.equal(state["model"][name], reference[name]), f"{name} differs"
    assert_pointers_resolve(fs, run)


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_store_object_is_refused_in_one_line(s3_server, bucket, sample_store, tmp_path, damage):
    data = bytearray(sample_store.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    s3_server.filesystem().pipe_file(f"{bucket}/bad.h5", bytes(data))
    cache = tmp_path / "cache"
    result = run_cli(["train", *train_args(f"s3://{bucket}/bad.h5", str(tmp_path / "out"), cache)], cwd=tmp_path,
                     env=s3_server.env())
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"s3://{bucket}/bad.h5 refused, nothing cached" in lines[0]
    folder = cache / "objects" / "s3" / bucket
    assert sorted(p.name for p in folder.iterdir()) == ["bad.h5.lock"]  # no store, no partial file, no record
    assert not (tmp_path / "out").exists()


def test_server_cut_mid_upload_training_goes_on_and_the_upload_is_retried(s3_server, bucket, sample_store, tmp_path):
    relay = Relay(s3_server.port)
    run, cache = f"{bucket}/run", tmp_path / "cache"
    args = train_args(str(sample_store), f"s3://{run}", cache, extra=["--save-every-steps", "5"])
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_TRAIN, "train", *args], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO), PAUSE_STEPS="5,10", PAUSE_DIR=str(tmp_path),
                                     **s3_server.env(relay.endpoint)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(name: str) -> None:
        deadline = time.monotonic() + 120
        while not (tmp_path / name).exists():
            assert proc.poll() is None, "".join(err_lines)
            assert time.monotonic() < deadline, f"{name} never came"
            time.sleep(0.02)

    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    fs = s3_server.filesystem()
    try:
        wait_for("saved_5")
        relay.cut()  # the server stops answering: step 5 may be in flight, step 10 surely is not sent
        (tmp_path / "go_5").touch()
        wait_for("saved_10")  # training went on while the bucket was unreachable
        deadline = time.monotonic() + 60
        while not any("retrying in the background" in line for line in err_lines):  # a try failed (and said so)
            assert time.monotonic() < deadline, "no upload failure was reported"
            time.sleep(0.05)
        if fs.exists(f"{run}/checkpoints"):
            assert_pointers_resolve(fs, run)
        relay.restore()
        (tmp_path / "go_10").touch()
        out = proc.stdout.read()
        proc.wait(timeout=180)
        reader.join(10)
        err = "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.cut()
    assert proc.returncode == 0, out + err
    assert "Result:" in out
    assert "failed" in err and "retrying in the background" in err
    assert "gave up" not in err and "Traceback" not in err
    assert fs.cat_file(f"{run}/checkpoints/latest").decode().strip() == "step_00000020.ckpt"
    assert_pointers_resolve(fs, run)
    for step in (10, 20):
        assert fs.exists(f"{run}/checkpoints/step_{step:08d}.ckpt")


def launcher(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edsr_dist", "launch", "--nproc", "2", "--no-bind", "--", *args],
                            cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("caches", ["separate", "shared"])
def test_two_launchers_on_one_machine_download_once_per_cache_folder(s3_server, bucket, sample_store, tmp_path,
                                                                     caches):
    """Two launchers of 2 workers each (two "servers" on one machine): with a cache folder each, each downloads
    the store once (its second worker waits); sharing one cache folder, the store is downloaded once in all."""
    put(s3_server, sample_store, f"{bucket}/sample.h5")
    procs = []
    for n in range(2):
        cache = tmp_path / (f"cache{n}" if caches == "separate" else "cache")
        args = [*TINY, "--data", f"s3://{bucket}/sample.h5", "--out", str(tmp_path / f"out{n}"), "--cache-dir",
                str(cache), "--max-steps", "2", "--steps-per-epoch", "2", "--epochs", "1", "--max-val-images", "1"]
        procs.append(launcher(args, tmp_path, s3_server.env()))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    logs = [(tmp_path / f"out{n}" / "logs" / f"rank_{r}.log").read_text() for n in range(2) for r in range(2)]
    fetched = [log.count("fetched patch store") for log in logs]  # per launcher: its rank 0 and rank 1 logs
    per_launcher = [fetched[0] + fetched[1], fetched[2] + fetched[3]]
    if caches == "separate":
        assert per_launcher == [1, 1], fetched
    else:
        assert sum(per_launcher) == 1, fetched


def test_every_input_flag_takes_a_bucket_url(s3_server, bucket, sample_store, trained_run, tmp_path):
    """--init-from, --resume PATH, --val-benchmark, eval --checkpoints/--data and sr --checkpoint read s3:// URLs."""
    fs = s3_server.filesystem()
    checkpoint = trained_run / "checkpoints" / "step_00000010.ckpt"
    put(s3_server, checkpoint, f"{bucket}/weights/step_00000010.ckpt")
    put(s3_server, sample_store, f"{bucket}/sample.h5")
    make_hr_folder(tmp_path / "Set2", [(48, 48), (60, 36)])
    fs.put(str(tmp_path / "Set2"), f"{bucket}/benchmarks/", recursive=True)
    assert len(fs.find(f"{bucket}/benchmarks/Set2")) == 2
    cache, env, url = tmp_path / "cache", s3_server.env(), f"s3://{bucket}/weights/step_00000010.ckpt"
    common = [*TINY, "--data", f"s3://{bucket}/sample.h5", "--cache-dir", str(cache), "--max-steps", "2",
              "--steps-per-epoch", "2", "--epochs", "1"]

    init = run_cli(["train", *common, "--out", str(tmp_path / "init"), "--init-from", url, "--val-benchmark",
                    f"s3://{bucket}/benchmarks/Set2"], cwd=tmp_path, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    assert f"init from {url}: loaded" in init.stdout
    records = [json.loads(line) for line in (tmp_path / "init" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("val_set") == "Set2" and r.get("images") == 2 for r in records)

    resumed = run_cli(["train", *common, "--out", str(tmp_path / "resumed"), "--resume", url, "--epochs", "2",
                       "--max-steps", "12"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 10" in resumed.stdout

    evaluated = run_cli(["eval", "--checkpoints", url, "--data", f"s3://{bucket}/sample.h5", "--cache-dir",
                         str(cache), "--max-images", "1", "--json", str(tmp_path / "eval.json")], cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert (tmp_path / "eval.json").is_file()

    upscaled = run_cli(["sr", str(tmp_path / "Set2"), "--checkpoint", url, "--cache-dir", str(cache), "--out",
                        str(tmp_path / "sr")], cwd=tmp_path, env=env)
    assert upscaled.returncode == 0, upscaled.stdout + upscaled.stderr
    assert len(list((tmp_path / "sr").glob("*.png"))) == 2
    # Each object was downloaded once over all these commands.
    fetched = init.stderr + resumed.stderr + evaluated.stderr + upscaled.stderr
    assert fetched.count(f"fetched weights {url}") == 1 and fetched.count("fetched patch store") == 1


def test_resume_auto_refuses_a_bucket_run_with_no_usable_checkpoint(s3_server, bucket, sample_store, trained_run,
                                                                     tmp_path):
    good = (trained_run / "checkpoints" / "step_00000010.ckpt").read_bytes()
    fs = s3_server.filesystem()
    fs.pipe_file(f"{bucket}/run/checkpoints/step_00000010.ckpt", good[: len(good) // 2])  # cut short
    fs.pipe_file(f"{bucket}/run/checkpoints/latest", b"step_00000010.ckpt\n")
    result = run_cli(["train", *train_args(str(sample_store), f"s3://{bucket}/run", tmp_path / "cache")],
                     cwd=tmp_path, env=s3_server.env())
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "skipping" in lines[0] and "truncated" in lines[0], result.stderr
    assert "no checkpoint in" in lines[1] and "can be used" in lines[1]
    assert fs.cat_file(f"{bucket}/run/checkpoints/latest") == b"step_00000010.ckpt\n"  # nothing written over it
    assert not fs.exists(f"{bucket}/run/metrics.jsonl")


def test_a_second_server_staging_the_same_bucket_run_is_refused(s3_server, bucket, sample_store, tmp_path):
    """Two servers (own caches, so own staging folders) given one bucket --out: the bucket's owner record keeps
    the second out before it writes anything; the first finishes and releases the record."""
    put(s3_server, sample_store, f"{bucket}/sample.h5")
    run = f"{bucket}/run"
    first_args = train_args(f"s3://{bucket}/sample.h5", f"s3://{run}", tmp_path / "server_a")
    first = subprocess.Popen([sys.executable, "-c", HOOKED_TRAIN, "train", *first_args], cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=str(REPO), PAUSE_STEPS="10", PAUSE_DIR=str(tmp_path),
                                      **s3_server.env()),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "saved_10").exists():
            assert first.poll() is None, f"the first server ended with {first.returncode}: {first.communicate()}"
            assert time.monotonic() < deadline, "the first server never reached step 10"
            time.sleep(0.05)
        second = run_cli(["train", *train_args(f"s3://{bucket}/sample.h5", f"s3://{run}", tmp_path / "server_b")],
                         cwd=tmp_path, env=s3_server.env())
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"s3://{run} is in use by job" in lines[0], second.stderr
        assert not list((tmp_path / "server_b").rglob("*.ckpt")), "the refused server wrote a checkpoint"
        (tmp_path / "go_10").touch()
        out, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, err
    assert "Result:" in out
    fs = s3_server.filesystem()
    assert not fs.exists(f"{run}/.owner.json"), "the finished run left its owner record in the bucket"
    assert_pointers_resolve(fs, run)
