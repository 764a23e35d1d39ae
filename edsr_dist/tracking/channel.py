"""The side channel to the experiment trackers, MLflow and Weights & Biases (TensorBoard is written by
train/reporting.py's MetricsLog).

A tracker is a side channel. Rank 0 hands each record to a queue; one thread per tracker sends it, retrying with
back-off; a tracker that cannot be reached costs one warning, and at the end one line naming what it lacks. No
step ever waits for a tracker, and metrics.jsonl stays the record.

One tracker run per training run: the tracker's run id is kept in the run folder (run_folder.TRACKER_FILE), so every later
start of the run (--resume auto, the launcher's restarts, torchrun's, a resume from the bucket on another server)
continues the same run. The file also keeps, per metric, the last step the tracker acknowledged: a resumed run
repeats the steps after its checkpoint, and only the steps past that mark are sent again, so no step is logged twice.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path

from edsr_dist.state.atomic import atomic_write_text
from edsr_dist.tracking.mlflow_tracker import MlflowTracker
from edsr_dist.tracking.wandb_tracker import WandbTracker

RETRY_DELAYS_S = (1.0, 2.0, 4.0)  # between the tries of one record while the tracker has been answering
CLOSE_WAIT_S = 60.0  # at the end, how long the tracker may take to send what is still queued
BATCH_RECORDS = 100  # records sent in one request at most (MLflow's log_batch takes up to 1000 metrics)
USERINFO = re.compile(r"://[^/\s@]+@")
# The trackers' (and S3's) credential variables; a message never shows their values.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def make_tracker(name: str, project: str, run_name: str, folder: Path):
    if name == "mlflow":
        return MlflowTracker(project, run_name)
    return WandbTracker(project, run_name, folder)


class RunIds:
    """A run folder's TRACKER_FILE, shared by the tracker threads (path None: a run that keeps none, as eval's new
    one). {"mlflow": {"run_id": ..., "logged": {metric: last step acknowledged}}, "wandb": {...}}"""

    def __init__(self, path: Path | None, writable: bool = True):
        self.path, self.writable = path, writable
        self.lock = threading.Lock()
        self.data: dict = {}
        if path is not None and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:  # cut short by a kill mid-write of an older version: start a new tracker run
                self.data = {}

    def of(self, tracker: str) -> dict:
        """This tracker's entry; one that is not run id and steps (a damaged or edited file) starts a new run."""
        with self.lock:
            entry = self.data.get(tracker) if isinstance(self.data, dict) else None
            if not (isinstance(entry, dict) and isinstance(entry.get("run_id"), (str, type(None)))
                    and isinstance(entry.get("logged"), dict)
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in entry["logged"].values())):
                if not isinstance(self.data, dict):
                    self.data = {}
                entry = self.data[tracker] = {"run_id": None, "logged": {}}
            return entry

    def save(self) -> None:
        if self.path is None or not self.writable:
            return
        with self.lock:
            text = json.dumps(self.data, indent=1, sort_keys=True) + "\n"
        atomic_write_text(self.path, text)


class TrackerChannel:
    """One tracker's queue and thread. The training thread only calls `metrics`, `files` and `close`."""

    def __init__(self, tracker, ids: RunIds, params: dict, retry_delays: tuple[float, ...] = RETRY_DELAYS_S):
        self.tracker, self.ids, self.params = tracker, ids, params
        self.state = ids.of(tracker.name)
        self.retry_delays = retry_delays
        self.warned = False
        self.reachable = True  # after a record is given up on, one try per record until one gets through
        self.lost: list[int] = []  # steps of the records not delivered
        self.sent = 0
        self.completed = False
        self._started = False
        self._sending: list[int] = []  # the steps of the records on their way
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"edsr-dist-{tracker.name}", daemon=True)
        self._thread.start()

    # ---- the training thread's side ------------------------------------------------------------------------

    def metrics(self, values: dict[str, float], step: int, files: tuple[tuple[Path, str], ...] = ()) -> None:
        """`files`: (path, folder) sent with the metrics, unless every one of them was logged before."""
        self._queue.put(("metrics", values, step, files))

    def text(self, text: str, name: str) -> None:
        self._queue.put(("text", text, name))

    def close(self, completed: bool, kept_in: str = "metrics.jsonl holds them all",
              wait_s: float = CLOSE_WAIT_S) -> str | None:
        """Finish the tracker run and wait (up to wait_s) for the queue; one line about what it lacks, or None."""
        self.completed = completed
        self._queue.put(("finish",))
        self._queue.put(None)
        self._thread.join(wait_s)
        left = list(self._sending) if self._thread.is_alive() else []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] == "metrics":
                left.append(item[2])
        self._queue.put(None)  # a thread still stuck in a call ends when the call returns
        lost = self.lost + left
        if not lost and not self._thread.is_alive():
            return None
        run = self.tracker.where() if self.state["run_id"] else f"the {self.tracker.name} run"
        what = (f"{len(lost)} of {len(lost) + self.sent} records (steps {min(lost)} to {max(lost)})" if lost
                else "its end (the tracker did not answer in time)")
        return f"{run} lacks {what}; {kept_in}"

    # ---- the tracker thread ----------------------------------------------------------------------------------

    def _work(self) -> None:
        nothing = object()
        held = nothing  # an item taken off the queue while gathering a batch, handled next
        while True:
            item, held = (self._queue.get() if held is nothing else held), nothing
            if item is None:
                return
            kind = item[0]
            if kind == "metrics":
                # Whatever queued up meanwhile goes in one request: a tracker that is behind catches up in few calls,
                # and the thread takes the interpreter lock from the training loop less often.
                batch = [item]
                while len(batch) < BATCH_RECORDS:
                    try:
                        following = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if following is None or following[0] != "metrics":
                        held = following
                        break
                    batch.append(following)
                self._sending = [record[2] for record in batch]
                sent = self._deliver(functools.partial(self._send, batch))
                self._sending = []
                if sent is None:
                    self.lost += [record[2] for record in batch]
                else:
                    self.sent += sent
            elif kind == "text":
                self._deliver(functools.partial(self._send_text, item[1], item[2]))
            elif kind == "finish" and self._started:
                self._deliver(functools.partial(self.tracker.finish, self.completed))

    def _send(self, batch: list[tuple]) -> int:
        """Send what the tracker does not hold yet (an earlier attempt may have sent some); returns how many of the
        records had something to send."""
        self._start()
        logged = dict(self.state["logged"])
        fresh_records = []
        for _, values, step, files in batch:
            fresh = {key: value for key, value in values.items() if step > logged.get(key, -1)}
            if values and not fresh:
                continue
            logged.update({key: step for key in fresh})
            fresh_records.append((fresh, step, files))
        metrics = [(fresh, step) for fresh, step, _ in fresh_records if fresh]
        if metrics:
            self.tracker.log_metrics(metrics)
            self.state["logged"].update(logged)
            self.ids.save()
        for _, step, files in fresh_records:
            for path, folder in files:
                if path.is_file():
                    self.tracker.log_file(path, folder, step)
        return len(fresh_records)

    def _send_text(self, text: str, name: str) -> None:
        self._start()
        self.tracker.log_text(text, name)

    def _start(self) -> None:
        if self._started:
            return
        known = self.state["run_id"]
        self.state["run_id"] = self.tracker.start(known, self.params)
        if self.state["run_id"] != known:
            self.state["logged"] = {}
            self.ids.save()
        else:
            for key, step in self.tracker.last_steps().items():
                self.state["logged"][key] = max(step, self.state["logged"].get(key, -1))
        self._started = True
        print(f"tracking: {'continuing' if known else 'started'} {self.tracker.where()}", flush=True)

    def _deliver(self, send):
        """One record, retried with back-off while the tracker answers: what `send` returns, None if it failed."""
        delays = self.retry_delays if self.reachable else ()
        for attempt in range(len(delays) + 1):
            try:
                result = send()
                self.reachable = True
                return result
            except Exception as exc:  # noqa: BLE001 - any client or network error: never the training's problem
                if not self.warned:
                    self.warned = True
                    print(f"edsr-dist: warning: {self.tracker.name} does not answer "
                          f"({_one_line(exc)}); training goes on, the tracker gets what it can in the background "
                          "and the end of the run says what it lacks", file=sys.stderr, flush=True)
                if attempt < len(delays):
                    time.sleep(delays[attempt])
        self.reachable = False
        return None


def _one_line(exc: BaseException) -> str:
    """A client's error for the console: one line, without credentials (a tracking URI's user:password@, or the
    value of a variable that holds a secret, which a client may quote back)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = USERINFO.sub("://***@", text)
    for name in SECRET_VARIABLES:
        if os.environ.get(name):
            text = text.replace(os.environ[name], "***")
    return text if len(text) <= 200 else text[:197] + "..."


def open_channels(names: list[str], project: str, run_name: str, out: Path, ids: RunIds,
                  params: dict) -> list[TrackerChannel]:
    """A channel per tracker in `names` (TensorBoard aside, MetricsLog writes it), continuing the runs `ids` names."""
    return [TrackerChannel(make_tracker(name, project, run_name, out), ids, params)
            for name in names if name != "tensorboard"]


def run_name(out: str) -> str:
    """The tracker run's display name: the run folder's name (or the bucket prefix's last part)."""
    return out.rstrip("/").rsplit("/", 1)[-1] or "edsr"


def metrics_of(entry: dict) -> dict[str, float]:
    """A metrics.jsonl entry as tracker metrics, named as in TensorBoard: train/loss, epoch/psnr_y ..."""
    return {f"{entry['type']}/{key}": float(value) for key, value in entry.items()
            if key not in ("type", "step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)}
