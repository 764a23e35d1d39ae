"""Experiment trackers against the real thing: a real `mlflow server` (tests/tracker_servers.py) read back with
MlflowClient, and W&B in offline mode read back from its own run files. Each test logs to its own experiment."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO, TINY, clean_env, run_cli
from s3_server import Relay
from tracker_servers import require_package, wandb_offline_runs

from edsr_dist.data.skimage_benchmarks import write_benchmarks

# Look-alike credentials in the trackers' own variables (and S3's): none may reach a file of the run or its output.
SECRETS = {"MLFLOW_TRACKING_TOKEN": "mlflow-token-5e1f0c9a33",
           "WANDB_API_KEY": "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", "AWS_SECRET_ACCESS_KEY": "aws-secret-77c1d2e3f4"}


def tracker_file(out: Path) -> dict:
    return json.loads((out / "tracker.json").read_text())


def entries(out: Path, kind: str) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines) if e["type"] == kind}


def assert_no_secret(out: Path, *texts: str) -> None:
    for path in [p for p in out.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        leaked = [name for name, value in SECRETS.items() if value.encode() in data]
        assert not leaked, f"{leaked} in {path}"
    for text in texts:
        assert not [name for name, value in SECRETS.items() if value in text]


def start_train(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edsr_dist", "train", *args], cwd=cwd,
                            env={**clean_env(), **env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_logged(out: Path, tracker: str, step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Until the tracker has acknowledged step/loss at `step` or later (tracker.json); returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            logged = tracker_file(out)[tracker]["logged"].get("step/loss", 0)
        except (OSError, ValueError, KeyError):
            logged = 0
        if logged >= step:
            return logged
        assert proc.poll() is None, f"training ended before the tracker got step {step}: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"the tracker never acknowledged step {step}")


@pytest.fixture
def mlflow_env(mlflow_server, tmp_path) -> dict:
    return {"MLFLOW_TRACKING_URI": mlflow_server.uri, **SECRETS}


@pytest.mark.xdist_group("mlflow_server")  # one worker, one `mlflow server` start
def test_mlflow_run_holds_settings_metrics_samples_and_result(mlflow_server, mlflow_env, sample_store, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--tracker", "mlflow",
                      "--tracker-project", tmp_path.name, "--samples-png", "true"], cwd=tmp_path, env=mlflow_env)
    assert result.returncode == 0, result.stderr
    run_id = tracker_file(out)["mlflow"]["run_id"]
    assert f"tracking: started MLflow run {run_id}" in result.stdout
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == tmp_path.name
    assert run.data.params["num_blocks"] == "2" and run.data.params["tracker"] == "mlflow"
    assert run.data.params["out"] == str(out)
    steps = entries(out, "step")
    history = client.get_metric_history(run_id, "step/loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(e["loss"])) for s, e in sorted(steps.items())]
    assert [m.step for m in client.get_metric_history(run_id, "step/lr")] == [5, 10, 15, 20]
    assert [m.value for m in client.get_metric_history(run_id, "step/skipped_steps")] == [0, 0, 0, 0]
    epoch, final = entries(out, "epoch")[20], entries(out, "result")[20]
    assert run.data.metrics["epoch/psnr_y"] == pytest.approx(epoch["psnr_y"])
    assert run.data.metrics["result/psnr_y"] == pytest.approx(final["psnr_y"])
    assert run.data.metrics["result/bicubic_psnr_y"] == pytest.approx(final["bicubic_psnr_y"])
    samples = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert samples and [Path(a.path).name for a in client.list_artifacts(run_id, "samples")] == samples
    assert_no_secret(out, result.stdout, result.stderr)

    # eval --benchmarks adds its results and table to the checkpoint's run, or to a new run when asked.
    benchmarks = write_benchmarks(tmp_path / "benchmarks", "hr-folder", scales=(2,), size=2)
    scored = run_cli(["eval", "--checkpoints", str(out), "--benchmarks", str(benchmarks), "--tracker", "mlflow",
                      "--json", str(tmp_path / "eval.json")], cwd=tmp_path, env=mlflow_env)
    assert scored.returncode == 0, scored.stderr
    assert f"tracking: continuing MLflow run {run_id}" in scored.stdout
    report = json.loads((tmp_path / "eval.json").read_text())["results"]
    run = client.get_run(run_id)
    for row in report:
        key = f"benchmark/paper/{row['set']}/x2/psnr"
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(20, pytest.approx(row["psnr"]))]
    assert run.info.status == "FINISHED"
    table = client.download_artifacts(run_id, "benchmarks_paper.txt", str(tmp_path))
    assert report[0]["set"] in Path(table).read_text()
    separate = run_cli(["eval", "--checkpoints", str(out), "--benchmarks", str(benchmarks), "--tracker", "mlflow",
                        "--tracker-new-run", "--tracker-project", tmp_path.name], cwd=tmp_path, env=mlflow_env)
    assert separate.returncode == 0, separate.stderr
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 2 and {r.data.params.get("command") for r in runs} == {None, "eval --benchmarks"}


@pytest.mark.xdist_group("mlflow_server")  # one worker, one `mlflow server` start
def test_sigkill_and_resume_auto_continue_the_mlflow_run_without_a_step_twice(mlflow_server, mlflow_env,
                                                                               sample_store, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--data", str(sample_store), "--out", str(out), "--tracker", "mlflow", "--tracker-project",
            tmp_path.name, "--steps-per-epoch", "1000", "--log-every", "2", "--save-every-steps", "10"]
    proc = start_train(args, tmp_path, mlflow_env)
    try:
        wait_for_logged(out, "mlflow", 14, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    run_id = tracker_file(out)["mlflow"]["run_id"]
    # The resume starts at the last checkpoint (after the steps the tracker holds, or before them: the upload
    # thread runs behind) and stops 16 steps past both.
    saved = max(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.ckpt"))
    last = max(saved, tracker_file(out)["mlflow"]["logged"]["step/loss"]) + 16
    result = run_cli(["train", *args, "--resume", "auto", "--max-steps", str(last)], cwd=tmp_path, env=mlflow_env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and f"tracking: continuing MLflow run {run_id}" in result.stdout
    assert tracker_file(out)["mlflow"]["run_id"] == run_id
    client = mlflow_server.client()
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]
    history = client.get_metric_history(run_id, "step/loss")
    assert [m.step for m in history] == list(range(2, last + 1, 2))  # every logged step, each once
    steps = entries(out, "step")
    assert [m.value for m in history][-3:] == [pytest.approx(steps[s]["loss"]) for s in (last - 4, last - 2, last)]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.xdist_group("mlflow_server")  # one worker, one `mlflow server` start
def test_tracking_server_stopping_mid_run_costs_one_warning_and_training_finishes(mlflow_server, sample_store,
                                                                                  tmp_path):
    relay = Relay(mlflow_server.port)
    out = tmp_path / "run"
    # Steps of ~0.1 s (a larger model than TINY's): the run is still going when the tracker has started, which
    # takes seconds (importing MLflow); the tracker then catches up in one request, and the server goes away.
    proc = start_train([*TINY, "--data", str(sample_store), "--out", str(out), "--tracker", "mlflow",
                        "--tracker-project", tmp_path.name, "--steps-per-epoch", "400", "--log-every", "4",
                        "--num-blocks", "4", "--num-filters", "32", "--batch-size", "8", "--patch-size", "24"],
                       tmp_path, {"MLFLOW_TRACKING_URI": relay.endpoint, **SECRETS})
    try:
        wait_for_logged(out, "mlflow", 4, proc)
        relay.cut()  # the server stops answering: connections refused from now on
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr  # docs/TRACKING.md: a tracker never fails the run
    assert "Result: EDSR" in stdout
    assert len(re.findall(r"warning: mlflow does not answer", stderr)) == 1, stderr
    run_id = tracker_file(out)["mlflow"]["run_id"]
    held = [m.step for m in mlflow_server.client().get_metric_history(run_id, "step/loss")]
    steps = entries(out, "step")
    assert sorted(steps) == list(range(4, 401, 4))  # metrics.jsonl has every entry
    missing = len(steps) - len(held)
    assert missing > 0
    lacks = re.search(rf"warning: MLflow run {run_id} .* lacks (\d+) of (\d+) records \(steps \d+ to 400\); "
                      "metrics.jsonl holds them all", stderr)
    assert lacks, stderr
    assert len(stderr.strip().splitlines()) == 2, stderr  # the first failure and the final account, nothing else
    assert_no_secret(out, stdout, stderr)


def test_wandb_offline_run_is_continued_by_resume_with_each_step_once(sample_store, tmp_path):
    require_package(pytest, "wandb")
    env = {"WANDB_MODE": "offline", **SECRETS}
    out = tmp_path / "run"
    args = [*TINY, "--data", str(sample_store), "--out", str(out), "--tracker", "wandb", "--tracker-project",
            tmp_path.name, "--samples-png", "true"]
    first = run_cli(["train", *args, "--max-steps", "10"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    second = run_cli(["train", *args, "--resume", "auto"], cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    run_id = tracker_file(out)["wandb"]["run_id"]
    assert f"tracking: continuing W&B run {run_id}" in second.stdout
    runs = wandb_offline_runs(out)
    assert [rid for rid, _ in runs] == [run_id, run_id]
    steps = entries(out, "step")
    for (_, history), expected in zip(runs, ([5, 10], [15, 20])):
        assert sorted(history["step/loss"]) == expected
        assert [history["step/loss"][s] for s in expected] == [pytest.approx(steps[s]["loss"]) for s in expected]
    assert runs[1][1]["result/psnr_y"] == {20: pytest.approx(entries(out, "result")[20]["psnr_y"])}
    assert "samples/coffee_bicubic_edsr_gt/path" in runs[1][1]  # the sample images, as W&B images
    assert_no_secret(out, first.stdout, first.stderr, second.stdout, second.stderr)


def test_a_bucket_run_resumed_on_a_fresh_server_continues_its_tracker_run(s3_server, sample_store, tmp_path):
    """tracker.json travels with the run: uploaded with the checkpoints, pulled back by --resume auto."""
    require_package(pytest, "wandb")
    bucket = f"edsr-{uuid.uuid4().hex[:12]}"
    fs = s3_server.filesystem()
    fs.mkdir(bucket)
    env = {**s3_server.env(), "WANDB_MODE": "offline"}
    args = [*TINY, "--data", str(sample_store), "--out", f"s3://{bucket}/run", "--tracker", "wandb",
            "--tracker-project", tmp_path.name, "--resume", "auto"]
    first = run_cli(["train", *args, "--cache-dir", str(tmp_path / "server1"), "--max-steps", "10"], cwd=tmp_path,
                    env=env)
    assert first.returncode == 0, first.stderr
    run_id = json.loads(fs.cat_file(f"{bucket}/run/tracker.json"))["wandb"]["run_id"]
    # Another server: an empty cache, so the run (and which tracker run it continues) comes from the bucket.
    second = run_cli(["train", *args, "--cache-dir", str(tmp_path / "server2")], cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and f"tracking: continuing W&B run {run_id}" in second.stdout
    staged = next((tmp_path / "server2" / "runs").rglob("tracker.json")).parent
    assert [rid for rid, _ in wandb_offline_runs(staged)] == [run_id]
    assert sorted(wandb_offline_runs(staged)[0][1]["step/loss"]) == [15, 20]
