"""The MLflow tracker: one MLflow run per training run, spoken to through `MlflowClient` (no fluent API, so no
process-wide active run). The server and its credentials come from MLflow's own variables (MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN); nothing here reads or writes them.

Called on the tracker's own thread only (tracking/channel.py), so a slow server never holds up a step.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path

# MLflow retries a failed request itself with back-off for minutes and waits 120 s for an answer
# (mlflow/environment_variables.py: MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, MLFLOW_HTTP_REQUEST_TIMEOUT 120); the
# tracker thread retries on its own schedule, so a stopped server costs seconds, not minutes. A user's own
# setting of these variables wins. set_terminated prints the run's URL to stdout (_log_url in
# mlflow/tracking/_tracking_service/client.py); the URL can carry credentials, so it is not printed.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# MlflowClient.log_batch takes at most 1000 metrics and 100 params per call (mlflow/utils/validation.py).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000


def shown_uri(uri: str) -> str:
    """A tracking URI without user:password@, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, project: str, run_name: str):
        self.project, self.run_name = project, run_name
        self.client = None
        self.run_id: str | None = None

    def start(self, run_id: str | None, params: dict) -> str:
        """Continue `run_id`, or create the run (and the experiment) and log the settings as its parameters."""
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param
        self.client = self.client or MlflowClient()
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.project)
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for first in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[first:first + MAX_PARAMS_PER_BATCH])
        return self.run_id

    def last_steps(self) -> dict[str, int]:
        """The highest step the server holds for each metric of the run: what a killed attempt sent but could not
        note down in the run folder."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    def where(self) -> str:
        from mlflow import get_tracking_uri
        return f"MLflow run {self.run_id} (experiment {self.project!r} at {shown_uri(get_tracking_uri())})"

    def log_metrics(self, records: list[tuple[dict[str, float], int]]) -> None:
        """(metrics, step) records, in as few requests as MLflow takes."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for values, step in records for key, value in values.items()]
        for first in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[first:first + MAX_METRICS_PER_BATCH])

    def log_file(self, path: Path, folder: str, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, completed: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if completed else "KILLED")
