"""The tracker side channel (tracking/channel.py) with an in-memory tracker, and the --tracker setting. The real
MLflow server and W&B files are in tests/e2e/test_tracking.py."""

from __future__ import annotations

import json
import threading

import pytest

from edsr_dist import config
from edsr_dist.config import build_config, tracker_names
from edsr_dist.errors import UserError
from edsr_dist.state.run_folder import TRACKER_FILE
from edsr_dist.tracking.channel import RunIds, TrackerChannel, metrics_of


class MemoryTracker:
    """Holds what it is sent; `fail` makes the next calls raise (a server that does not answer)."""

    name = "memory"

    def __init__(self, fail: int = 0, held: dict | None = None):
        self.fail = fail
        self.logged: list[tuple[int, dict]] = []
        self.files: list[str] = []
        self.runs_started: list[str | None] = []
        self.finished: list[bool] = []
        self.held = held or {}
        self.gate = threading.Event()
        self.gate.set()

    def _maybe_fail(self) -> None:
        self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("connection refused")

    def start(self, run_id, params):
        self._maybe_fail()
        self.runs_started.append(run_id)
        return run_id or "run-1"

    def last_steps(self):
        return self.held

    def where(self):
        return "memory run run-1"

    def log_metrics(self, records):
        self._maybe_fail()
        self.logged += [(step, values) for values, step in records]

    def log_file(self, path, folder, step):
        self.files.append(f"{folder}/{path.name}")

    def log_text(self, text, name):
        self.files.append(name)

    def finish(self, completed):
        self._maybe_fail()
        self.finished.append(completed)


def test_records_reach_the_tracker_in_order_and_the_run_id_is_kept(tmp_path, capsys):
    tracker = MemoryTracker()
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {"lr": 1e-4}, retry_delays=(0.0,))
    for step in (5, 10):
        channel.metrics({"step/loss": step / 10}, step)
    sample = tmp_path / "a.png"
    sample.write_bytes(b"png")
    channel.metrics({"result/psnr_y": 30.0}, 10, files=((sample, "samples"),))
    assert channel.close(completed=True) is None
    assert tracker.logged == [(5, {"step/loss": 0.5}), (10, {"step/loss": 1.0}), (10, {"result/psnr_y": 30.0})]
    assert tracker.files == ["samples/a.png"] and tracker.finished == [True]
    saved = json.loads((tmp_path / TRACKER_FILE).read_text())
    assert saved == {"memory": {"run_id": "run-1", "logged": {"step/loss": 10, "result/psnr_y": 10}}}
    assert capsys.readouterr().out == "tracking: started memory run run-1\n"


def test_a_continued_run_gets_only_steps_past_what_it_holds(tmp_path):
    (tmp_path / TRACKER_FILE).write_text(json.dumps({"memory": {"run_id": "run-1", "logged": {"step/loss": 10}}}))
    # The server holds step 15 too: sent by a killed attempt after its last note in the run folder.
    tracker = MemoryTracker(held={"step/loss": 15})
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=(0.0,))
    for step in (5, 10, 15, 20):
        channel.metrics({"step/loss": 1.0}, step)
    channel.metrics({"epoch/psnr_y": 30.0}, 20)
    channel.metrics({"result/psnr_y": 30.0}, 20, files=((tmp_path, "samples"),))
    assert channel.close(completed=True) is None
    assert tracker.runs_started == ["run-1"]
    assert tracker.logged == [(20, {"step/loss": 1.0}), (20, {"epoch/psnr_y": 30.0}), (20, {"result/psnr_y": 30.0})]


def test_retries_then_delivers_with_one_warning(tmp_path, capsys):
    tracker = MemoryTracker(fail=2)
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=(0.0, 0.0, 0.0))
    channel.metrics({"step/loss": 1.0}, 5)
    channel.metrics({"step/loss": 0.5}, 10)
    assert channel.close(completed=True) is None
    assert [step for step, _ in tracker.logged] == [5, 10]
    err = capsys.readouterr().err
    assert err.count("warning: memory does not answer (connection refused)") == 1


def test_an_unreachable_tracker_loses_records_and_says_which_at_the_end(tmp_path, capsys):
    tracker = MemoryTracker(fail=10 ** 6)
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=(0.0, 0.0))
    for step in (5, 10, 15):
        channel.metrics({"step/loss": 1.0}, step)
    problem = channel.close(completed=True)
    assert problem == "the memory run lacks 3 of 3 records (steps 5 to 15); metrics.jsonl holds them all"
    assert capsys.readouterr().err.count("warning:") == 1
    assert not (tmp_path / TRACKER_FILE).exists()


def test_close_does_not_wait_for_a_tracker_that_hangs(tmp_path):
    tracker = MemoryTracker()
    tracker.gate.clear()  # every call blocks: a server that accepts the connection and never answers
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=(0.0,))
    channel.metrics({"step/loss": 1.0}, 5)
    channel.metrics({"step/loss": 1.0}, 10)
    problem = channel.close(completed=True, wait_s=0.2)
    assert problem == "the memory run lacks 2 of 2 records (steps 5 to 10); metrics.jsonl holds them all"
    tracker.gate.set()
    channel._thread.join(5)


def test_metrics_are_named_as_in_tensorboard():
    entry = {"type": "epoch", "step": 20, "epoch": 1, "loss": 0.5, "psnr_y": 30.0, "protocol": "paper", "ok": True}
    assert metrics_of(entry) == {"epoch/loss": 0.5, "epoch/psnr_y": 30.0}


def test_tracker_setting_is_checked_with_one_line_naming_the_fix(monkeypatch):
    assert tracker_names("MLflow, wandb,mlflow") == ["mlflow", "wandb"] and tracker_names("none") == []
    with pytest.raises(UserError, match=r"--tracker 'mlfow' is not a tracker \(did you mean mlflow\?\); choose"):
        build_config(overrides={"tracker": "tensorboard,mlfow"})
    real_find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(UserError) as error:
        build_config(overrides={"tracker": "wandb"})
    assert str(error.value) == ("--tracker wandb: the wandb package is not installed; pip install 'edsr-dist[wandb]', "
                                "or drop wandb from --tracker")
    with pytest.raises(UserError, match="tracker_project must not be empty"):
        build_config(overrides={"tracker_project": " "})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"memory": {"run_id": 7, "logged": {}}}',
                                     '{"memory": {"run_id": "r", "logged": {"step/loss": "x"}}}'])
def test_a_damaged_tracker_file_starts_a_new_tracker_run(tmp_path, content):
    (tmp_path / TRACKER_FILE).write_text(content)
    tracker = MemoryTracker()
    channel = TrackerChannel(tracker, RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=(0.0,))
    channel.metrics({"step/loss": 1.0}, 5)
    assert channel.close(completed=True) is None
    assert tracker.runs_started == [None] and tracker.logged == [(5, {"step/loss": 1.0})]
    assert json.loads((tmp_path / TRACKER_FILE).read_text())["memory"]["run_id"] == "run-1"


def test_a_clients_error_never_shows_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-8c1f2e")

    class Quoting(MemoryTracker):
        def start(self, run_id, params):
            raise ConnectionError("API request to http://me:pw-93a1@mlflow.example.org/api failed (token tok-8c1f2e)")

    channel = TrackerChannel(Quoting(), RunIds(tmp_path / TRACKER_FILE), {}, retry_delays=())
    channel.metrics({"step/loss": 1.0}, 5)
    channel.close(completed=True)
    err = capsys.readouterr().err
    assert "http://***@mlflow.example.org/api failed (token ***)" in err
    assert "pw-93a1" not in err and "tok-8c1f2e" not in err
