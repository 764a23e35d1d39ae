"""Faults around the training loop, with real processes: a full disk (a small tmpfs mounted for the test) at start,
between checkpoints, under build-store and export; SIGTERM and Ctrl-C during start-up; a bucket endpoint lost for
good mid-run and during the owner claim (a TCP relay in front of moto_server, cut); a missing bucket; a store that
ignores conditional writes (a relay that strips If-None-Match/If-Match); the bucket pruned after a resume from a
wiped cache. Each case: one line naming cause and fix, the documented exit code, nothing half-written, no owner
record left behind.

A run is paused or made to fill its disk at a chosen checkpoint by one test-only hook (HOOK): it wraps
`save_checkpoint` before the command imports it; nothing in the trainer is told.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO, TINY, run_cli
from s3_server import Relay

from edsr_dist.errors import UserError
from edsr_dist.state.bucket_lock import BucketLock
from edsr_dist.state.owner import OwnerRecord, claim

HOOK = r"""
import errno, os, sys, time
from pathlib import Path
import edsr_dist.state.checkpoint as checkpoint

pause_steps = {int(s) for s in os.environ.get("PAUSE_STEPS", "").split(",") if s}
fill_step = int(os.environ.get("FILL_AFTER_STEP", "0"))
signals = Path(os.environ.get("PAUSE_DIR", "."))
real_save = checkpoint.save_checkpoint

def save(out_dir, state, step, keep_last, psnr=None):
    path = real_save(out_dir, state, step=step, keep_last=keep_last, psnr=psnr)
    if step == fill_step:  # the disk fills up between this checkpoint and the next
        with open(Path(out_dir) / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        # The log's last page still has room (a file system allocates whole pages): pad it with whole records, so
        # the run's next record is the write that finds the disk full.
        fd = os.open(Path(out_dir) / "metrics.jsonl", os.O_WRONLY | os.O_APPEND)
        pad = b'{"type": "test-padding"}\n'
        while True:
            size = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, pad) == len(pad):
                    continue
            except OSError:
                pass
            os.ftruncate(fd, size)
            break
        os.close(fd)
    if step in pause_steps:
        (signals / f"saved_{step}").touch()
        while not (signals / f"go_{step}").exists():
            time.sleep(0.02)
    return path

checkpoint.save_checkpoint = save
from edsr_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def hooked(args: list[str], cwd: Path, env: dict | None = None, **hook_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOOK, *args], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(REPO), PAUSE_DIR=str(cwd), OMP_NUM_THREADS="1",
                                     **(env or {}), **{k: str(v) for k, v in hook_env.items()}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended with {proc.returncode} before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def train_args(data: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["train", *TINY, "--data", str(data), "--out", str(out), *extra]


# ---- full disks: an 8 MiB tmpfs, filled -------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: an 8 MiB tmpfs mounted under tmp_path (needs root, as on the CI runner and
    this machine); `fill()` writes a file until the disk is full."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): the full-disk tests need root; "
                    "run the suite as root (as CI does) or in a container")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_at_start_is_one_line_and_leaves_no_owner_record(small_disk, sample_store, tmp_path):
    filler = fill(small_disk)
    out = small_disk / "run"
    for command in (train_args(sample_store, out, "--max-steps", "2"),
                    ["launch", "--nproc", "2", "--", *train_args(sample_store, out, "--max-steps", "2")[1:]]):
        result = run_cli(command, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        line = one_line(result.stderr)
        assert f"cannot write the owner record {out}/.owner.json (No space left on device); free space" in line, line
        assert not out.exists()  # no 0-byte record, no empty folder
    filler.unlink()
    again = run_cli(train_args(sample_store, out, "--max-steps", "2"), cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr  # never refused as "in use by job unknown"
    assert not (out / ".owner.json").exists()


def test_a_disk_filling_between_checkpoints_keeps_whole_lines_and_names_the_step_held(small_disk, sample_store,
                                                                                      tmp_path):
    out = small_disk / "run"
    proc = hooked(train_args(sample_store, out, "--save-every-steps", "5", "--keep-last", "1"), tmp_path,
                  FILL_AFTER_STEP=5)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stdout + stderr
    line = one_line(stderr)
    assert line.startswith(f"edsr-dist train: error: cannot write {out}/metrics.jsonl: No space left on device; "), line
    assert line.endswith(f"the folder holds step 5 ({out}/checkpoints/step_00000005.ckpt); free space there and "
                         "continue with --resume auto"), line
    records = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]  # whole lines only
    assert [r["step"] for r in records if r["type"] != "test-padding"] == [5]
    assert not (out / ".owner.json").exists()
    # Space freed: the same command continues from step 5.
    (out / "filler").unlink()
    resumed = run_cli(train_args(sample_store, out, "--save-every-steps", "5", "--keep-last", "1", "--resume",
                                 "auto"), cwd=tmp_path, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout


def test_build_store_onto_a_full_disk_is_one_line_and_keeps_the_old_store(small_disk, tmp_path):
    old = small_disk / "sample.h5"
    old.write_bytes(b"the old store")
    fill(small_disk, leave=300 << 10)
    result = run_cli(["build-store", "--sample", "--out", str(old), "--no-progress"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # not a segmentation fault (139)
    line = one_line(result.stderr)
    assert f"writing store {old} failed (it needs about" in line and "MiB free); check free space" in line, line
    assert old.read_bytes() == b"the old store"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "sample.h5"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_build_store_failing_mid_write_does_not_crash(tmp_path):
    """The free-space check passes, then HDF5's writes fail (a 1 MiB file size limit): h5py objects of such a file
    crash the process when freed; the command ends in one line and exit 2 instead."""
    out = tmp_path / "sample.h5"
    proc = subprocess.run([sys.executable, "-m", "edsr_dist", "build-store", "--sample", "--out", str(out),
                           "--no-progress"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line == (f"edsr-dist build-store: error: writing store {out} failed (File too large); check free space "
                    "and permissions of its folder; nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.safetensors", "model.pth"])
def test_export_onto_a_full_disk_is_one_line(small_disk, trained_run, tmp_path, name):
    fill(small_disk, leave=8 << 10)
    out = small_disk / name
    result = run_cli(["export", "--checkpoint", str(trained_run), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (f"edsr-dist export: error: cannot write {out} (No space left on device); "
                                       "free space or pass another --out; nothing was written")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# ---- signals from the first moment -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_sigterm_during_start_up_prints_one_line_and_leaves_no_owner_record(s3_server, sample_store, tmp_path,
                                                                            where):
    """Stopped while it starts, once its owner record exists (the store, the model and the resume come after it;
    in a bucket, the record's 2 s read-back)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if where == "folder":
        out = tmp_path / "run"
        record_exists = (out / ".owner.json").exists
    else:
        name = f"faults-{uuid.uuid4().hex[:12]}"
        fs = s3_server.filesystem()
        fs.mkdir(name)
        out = f"s3://{name}/run"
        env.update(s3_server.env())

        def record_exists() -> bool:
            return fs.exists(f"{name}/run/.owner.json")
    proc = subprocess.Popen([sys.executable, "-m", "edsr_dist",
                             *train_args(sample_store, out, "--cache-dir", str(tmp_path / "cache"))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(record_exists, proc, what="the owner record")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stdout + stderr
    assert one_line(stderr) == ("edsr-dist train: stopped by SIGTERM before it finished; nothing half-written was "
                                "kept; run the same command again (train: --resume auto continues a run)")
    assert not record_exists()


READY_THEN_MAIN = "import sys; from edsr_dist.cli import main; print('ready', flush=True); sys.exit(main(sys.argv[1:]))"


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    # The interpreter itself is up (a Ctrl-C before that is Python's own); the command then imports torch (seconds).
    proc = subprocess.Popen([sys.executable, "-c", READY_THEN_MAIN, "eval", "--help"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.3)  # into main(), well before `import torch` ends
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert one_line(stderr) == "edsr-dist eval: interrupted"


# ---- buckets: lost endpoints, a missing bucket, a store without conditional writes, pruning -----------------

@pytest.fixture
def bucket(s3_server):
    name = f"faults-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(name)
    return name


def test_a_missing_bucket_is_one_line_at_once(s3_server, sample_store, tmp_path):
    start = time.monotonic()
    result = run_cli(train_args(sample_store, "s3://no-such-bucket-here/run", "--cache-dir", str(tmp_path / "c")),
                     cwd=tmp_path, env=s3_server.env())
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (
        "edsr-dist train: error: --out s3://no-such-bucket-here/run: the bucket no-such-bucket-here does not exist "
        "at this endpoint; create it first (e.g. `aws s3 mb s3://no-such-bucket-here`) or check the URL and "
        "AWS_ENDPOINT_URL")
    assert time.monotonic() - start < 30  # no ten rounds of a "changing" record
    assert not (tmp_path / "c" / "runs").exists()


def test_the_endpoint_lost_for_good_mid_run_stops_in_one_line_with_exit_5(s3_server, bucket, sample_store,
                                                                          tmp_path):
    relay = Relay(s3_server.port)
    cache = tmp_path / "cache"
    run = f"s3://{bucket}/run"
    proc = hooked(train_args(sample_store, run, "--cache-dir", str(cache), "--save-every-steps", "5"), tmp_path,
                  env={**s3_server.env(relay.endpoint), "EDSR_DIST_OWNER_HEARTBEAT_S": "0.3",
                       "EDSR_DIST_UPLOAD_RETRY_S": "0.1"}, PAUSE_STEPS="5")
    fs = s3_server.filesystem()
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: (tmp_path / "saved_5").exists(), proc, what="step 5")
        assert fs.exists(f"{bucket}/run/.owner.json")
        relay.cut()  # for good
        # After 3 missed beats of 0.3 s the heartbeat stops the run (at the next step, with a checkpoint).
        wait_for(lambda: any("so this job stops now" in line for line in errors), proc, what="the stop")
        (tmp_path / "go_5").touch()
        stdout = proc.stdout.read()
        proc.wait(timeout=120)
        reader.join(timeout=10)
        stderr = "".join(errors)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.cut()
    assert proc.returncode == 5, stdout + stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    warnings = [line for line in lines if "cannot refresh the owner record" in line]
    assert len(warnings) <= 1, stderr  # warned once (none where the first failed refresh already took that long)
    stops = [line for line in lines if "could not be refreshed for" in line]
    assert len(stops) == 1 and stops[0].endswith("so this job stops now"), stderr
    stage = cache / "runs" / "s3" / bucket / "run"
    assert lines[-1].startswith("edsr-dist train: error: could not upload ") and \
        lines[-1].endswith(f"the complete run is in {stage}: copy it to the bucket, or run the same command again "
                           "(--resume auto uploads what is missing)"), lines[-1]
    held = sorted(p.name for p in (stage / "checkpoints").glob("step_*.ckpt"))
    assert held and held[-1] > "step_00000005.ckpt"  # stopped at the next step with a checkpoint
    assert not (stage / ".owner.json").exists()


def test_the_endpoint_lost_during_the_claim_is_one_line(s3_server, bucket, sample_store, tmp_path):
    relay = Relay(s3_server.port)
    fs = s3_server.filesystem()
    proc = subprocess.Popen([sys.executable, "-m", "edsr_dist",
                             *train_args(sample_store, f"s3://{bucket}/run", "--cache-dir", str(tmp_path / "c"))],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO), **s3_server.env(relay.endpoint)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The record is put, then read back 2 s later: cut in between.
        wait_for(lambda: fs.exists(f"{bucket}/run/.owner.json"), proc, what="the owner record")
        relay.cut()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stdout + stderr
    line = one_line(stderr)
    assert line.startswith(f"edsr-dist train: error: --out s3://{bucket}/run: lost the object store while claiming "
                           "the run ("), line
    assert line.endswith("the run did not start; check the endpoint (AWS_ENDPOINT_URL or --endpoint-url) and "
                         "start again"), line


class ConditionStrippingRelay(Relay):
    """A store that ignores conditional writes: the relay removes If-None-Match and If-Match from every request
    it forwards (HTTP/1.1 requests with a Content-Length or chunked bodies, as botocore sends them)."""

    DROPPED = (b"if-none-match:", b"if-match:")

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                head = []
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    head.append(line)
                if not head:
                    return
                kept = [h for h in head if not h.lower().startswith(self.DROPPED)]
                fields = {h.split(b":", 1)[0].strip().lower(): h.split(b":", 1)[1].strip() for h in kept[1:]
                          if b":" in h}
                upstream.sendall(b"".join(kept) + b"\r\n")
                if b"content-length" in fields:
                    upstream.sendall(reader.read(int(fields[b"content-length"])))
                elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                    while True:
                        size_line = reader.readline()
                        upstream.sendall(size_line)
                        size = int(size_line.split(b";")[0], 16)
                        upstream.sendall(reader.read(size + 2))
                        if size == 0:
                            break
        except (OSError, ValueError):
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_store_ignoring_conditional_writes_still_refuses_a_second_job(s3_server, bucket, sample_store, tmp_path):
    relay = ConditionStrippingRelay(s3_server.port)
    env = {**s3_server.env(relay.endpoint), "EDSR_DIST_OWNER_HEARTBEAT_S": "0.3"}
    run = f"s3://{bucket}/run"
    first = hooked(train_args(sample_store, run, "--cache-dir", str(tmp_path / "c1"), "--save-every-steps", "5",
                              "--resume", "auto"), tmp_path, env=env, PAUSE_STEPS="5")
    try:
        wait_for(lambda: (tmp_path / "saved_5").exists(), first, what="step 5")
        time.sleep(1.5)  # "minutes later": several heartbeats after the first job's start and read-backs
        second = run_cli(train_args(sample_store, run, "--cache-dir", str(tmp_path / "c2"), "--resume", "auto"),
                         cwd=tmp_path, env=env)
        (tmp_path / "go_5").touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
        relay.cut()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"--out {run} is in use by job " in one_line(second.stderr)
    assert first.returncode == 0, stdout + stderr
    notices = [line for line in stderr.splitlines() if "ignores conditional writes" in line]
    assert notices == [f"edsr-dist: note: the store of {run}/.owner.json ignores conditional writes (If-None-Match "
                       "and If-Match on PutObject), so the one-writer lock there is best effort: a live owner is still "
                       "refused, but two jobs started within a few seconds of each other may both write "
                       "(docs/OPERATIONS.md)"]
    fs = s3_server.filesystem()
    assert not fs.exists(f"{bucket}/run/.owner.json")


def test_the_bucket_is_pruned_by_what_it_holds_after_a_resume_from_a_wiped_cache(s3_server, bucket, sample_store,
                                                                                  tmp_path):
    run, cache = f"s3://{bucket}/run", tmp_path / "cache"
    args = [*train_args(sample_store, run, "--cache-dir", str(cache), "--save-every-steps", "5", "--keep-last", "2",
                        "--resume", "auto")]
    first = run_cli([*args, "--max-steps", "15"], cwd=tmp_path, env=s3_server.env())
    assert first.returncode == 0, first.stderr
    fs = s3_server.filesystem()

    def steps() -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run/checkpoints", detail=False)
                      if p.rsplit("/", 1)[-1].startswith("step_"))

    assert steps() == ["step_00000010.ckpt", "step_00000015.ckpt"]
    shutil.rmtree(cache)  # a fresh server: the resume pulls step 15 only
    second = run_cli(args, cwd=tmp_path, env=s3_server.env())
    assert second.returncode == 0, second.stderr
    index = json.loads(fs.cat_file(f"{bucket}/run/checkpoints/index.json"))
    assert steps() == sorted(entry["file"] for entry in index["checkpoints"]) == \
        ["step_00000015.ckpt", "step_00000020.ckpt"]  # step 10, named by nothing, is gone from the bucket too


# ---- values that reached torch unchecked, through the real command line ---------------------------------------

def test_train_with_a_beta_adam_refuses_is_one_line(sample_store, tmp_path):
    result = run_cli(train_args(sample_store, tmp_path / "run", "--beta1", "1"), cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result.stderr) == ("edsr-dist train: error: beta1 must be in [0, 1), got 1.0; the paper uses "
                                       "--beta1 0.9")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("port", ["99999", "0", "-5"])
def test_world_and_train_agree_on_master_port(tmp_path, port):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    world = run_cli(["world"], cwd=tmp_path, env=env)
    assert world.returncode == 2
    assert one_line(world.stderr) == (f"edsr-dist world: error: MASTER_PORT='{port}' is not a port number; set it "
                                      "to 1..65535 or unset it")


def test_a_deeply_nested_rank_table_is_one_line(tmp_path):
    table = tmp_path / "table.json"
    table.write_text("[" * 100000)
    for command in (["rank-table", "check", str(table)], ["launch", "--rank-table", str(table), "--", *TINY]):
        result = run_cli(command, cwd=tmp_path, env={"RANK_TABLE_FILE": ""})
        assert result.returncode == 2, result.stderr
        assert "the JSON is nested too deeply to read; a rank table is a few levels deep" in one_line(result.stderr)


def test_eval_of_weights_of_another_scale_and_of_a_raw_pickle_is_one_line(trained_run, sample_store, tmp_path):
    weights = tmp_path / "x2.pth"
    exported = run_cli(["export", "--checkpoint", str(trained_run), "--out", str(weights)], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    wrong = run_cli(["eval", "--data", str(sample_store), "--checkpoints", str(weights), "--scale", "3"],
                    cwd=tmp_path)
    assert wrong.returncode == 2
    assert one_line(wrong.stderr) == (f"edsr-dist eval: error: {weights} is a x2 model but --scale is 3; pass "
                                      "--scale 2 or the checkpoints of a x3 run")
    for name in ("raw.pt", "raw.ckpt"):
        raw = tmp_path / name
        raw.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
        result = run_cli(["eval", "--data", str(sample_store), "--checkpoints", str(raw), "--scale", "2"],
                         cwd=tmp_path)
        assert result.returncode == 2
        line = one_line(result.stderr)
        assert line.startswith(f"edsr-dist eval: error: refusing to load {raw}: it contains objects a ") and \
            "(Unsupported operand 149); nothing in it was run" in line, line


def test_on_a_store_ignoring_conditions_a_dead_owner_is_taken_over_with_the_line(s3_server, bucket, capsys):
    """In process, through the same stripping relay: a dead owner's record is read first, so taking it over says
    so (before, the unconditional put replaced it silently); a live one is refused; the heartbeat of an owner whose
    record another job overwrote notices at its next beat."""
    relay = ConditionStrippingRelay(s3_server.port)
    try:
        fs = s3_server.filesystem(relay.endpoint)
        url = f"s3://{bucket}/run"
        lock = BucketLock(fs, f"{bucket}/run", url, settle_s=0.1)
        dead = dataclasses.replace(OwnerRecord.mine(30.0), host="node-b", machine="node-b|boot|pid:[1]",
                                   heartbeat=time.time() - 3600, job="J-dead")
        s3_server.filesystem().pipe_file(f"{bucket}/run/.owner.json", dead.to_bytes())
        held = claim(lock, url, record=OwnerRecord.mine(0.2)).start()
        err = capsys.readouterr().err
        assert f"edsr-dist: took over --out {url} from job J-dead on host node-b" in err
        assert "ignores conditional writes (If-None-Match and If-Match on PutObject)" in err
        with pytest.raises(UserError, match=rf"^--out {url} is in use by job "):
            claim(BucketLock(fs, f"{bucket}/run", url, settle_s=0.1), url)
        other = dataclasses.replace(OwnerRecord.mine(30.0), token="t-other", job="J-other")
        record = f"{bucket}/run/.owner.json"
        deadline = time.monotonic() + 10
        while held.lost_to is None:
            assert time.monotonic() < deadline, "the owner never noticed"
            # Ignoring If-Match, a write between the heartbeat's read and its put is overwritten by that put (the
            # store lets the last writer win), so the other job writes again as its own read-back would make it.
            if json.loads(s3_server.filesystem().cat_file(record))["token"] != "t-other":
                s3_server.filesystem().pipe_file(record, other.to_bytes())
            time.sleep(0.05)
        assert "J-other" in held.lost_to
        held.release()
        assert json.loads(s3_server.filesystem().cat_file(record))["token"] == "t-other"
    finally:
        relay.cut()
