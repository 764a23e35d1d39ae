"""Real trackers for the tests: a real `mlflow server` on 127.0.0.1 (SQLite backend store, a local folder as the
artifact store, artifacts served by the server itself, so the client speaks HTTP only), and a reader of W&B's
offline run files. One server per pytest process (a session fixture in conftest.py): pytest-xdist workers each
start their own on a free port with their own folder."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

from helpers import free_port

START_TIMEOUT_S = 180  # the server imports MLflow's whole web stack: ~50 s on a loaded 2-core machine


def require_package(pytest, package: str) -> None:
    """The tracker tests need `package`: without it they fail, naming the install (the README's test command
    installs it), rather than skip and prove nothing."""
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is needed by the tracker tests; pip install -r requirements-cpu.txt "
                    f"(or pip install -e '.[{package}]')")


class MlflowServer:
    def __init__(self, folder: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=folder)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start on port {self.port}; see {folder}/server.log") \
                        from None
                time.sleep(0.5)

    def client(self, uri: str | None = None):
        from mlflow import MlflowClient
        return MlflowClient(uri or self.uri)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `mlflow server` runs uvicorn in a child; SIGTERM to it ends both
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- W&B offline run files ------------------------------------------------------------------------------------
# An offline run is `run-<id>.wandb`: a LevelDB-style log (github.com/google/leveldb doc/log_format.md) of W&B's
# protobuf `Record`s, behind a 7-byte header (":W&B", 0xBEE1, version 0). wandb >= 0.2x reads it in its Go core
# only; the Python reader it used to ship (wandb/sdk/internal/datastore.py, DataStore.scan_data) is what this
# follows. The records are decoded with wandb's own protobuf classes (wandb.proto.wandb_internal_pb2).

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path} is not a W&B run file"
    records, index, pending = [], HEADER, b""
    while True:
        if BLOCK - index % BLOCK < HEADER:  # a block's tail too short for a header is zero padding
            index += BLOCK - index % BLOCK
        if index + HEADER > len(data):
            break
        checksum, length, kind = struct.unpack("<IHB", data[index:index + HEADER])
        payload = data[index + HEADER:index + HEADER + length]
        if kind == 0 and length == 0:
            break  # the file ends in zeroes: written up to here
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"{path}: bad checksum"
        index += HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_offline_runs(folder: Path) -> list[tuple[str, dict[str, dict[int, float]]]]:
    """Each offline run under `folder` (oldest first): its run id and history, metric -> {step: value}."""
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, history = None, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, {})[step] = json.loads(item.value_json)
        runs.append((run_id, history))
    return runs
