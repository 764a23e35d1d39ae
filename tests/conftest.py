"""Fixtures, and the `e2e` marker on every test under tests/e2e (`python -m pytest -q -m "not e2e"` is the fast
inner loop). Helpers shared by tests are in helpers.py.

Under pytest-xdist (the README's test command runs the suite with `-n`) every worker has its own session fixtures;
what is expensive to build and only read afterwards (the sample store, finished reference runs) is built once per
test run by `build_once`, in whichever worker asks first, and read by all."""

import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TINY, final_state, resume_args, run_cli, spawn_ranks
from s3_server import MotoServer, require_moto
from tracker_servers import MlflowServer, require_package

from edsr_dist.data.sample_store import build_sample_store

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_configure(config):
    # One thread per process: the README's command runs 4 xdist workers on 2 cores, each starting more processes, and
    # an OpenMP thread descheduled at a barrier holds up its sibling (the demo alone: 86 CPU-seconds with two threads
    # on a quiet machine, 257 beside the suite). Subprocesses inherit it; a test that needs more threads passes them.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`build_once(name, build)`: the folder in which `build(folder)` ran once in this test run, whichever xdist
    worker asked first (the others wait on a file lock, then read it). A build that failed is tried again by the
    next worker that asks (and fails there too), so every test that needs it reports the failure. Folders are
    shared: copy one before changing it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, above popen-gwN/

    def once(name: str, build: Callable[[Path], None]) -> Path:
        folder, built = root / f"once-{name}", root / f"once-{name}.built"
        with open(root / f"once-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                built.touch()
        return folder
    return once


@pytest.fixture(scope="session")
def sample_store(build_once) -> Path:
    return build_once("store", lambda folder: build_sample_store(str(folder / "sample.h5"))) / "sample.h5"


def _train_tiny(sample_store: Path, folder: Path) -> None:
    out = folder / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "10"],
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoints" / "step_00000010.ckpt").is_file()


@pytest.fixture(scope="session")
def trained_run(build_once, sample_store) -> Path:
    """A finished real 10-step TINY run (one checkpoint, step 10) for tests that read it; copy it before changing it."""
    return build_once("trained", lambda folder: _train_tiny(sample_store, folder)) / "run"


def _reference_1w(sample_store: Path, folder: Path) -> None:
    out = folder / "run"
    result = run_cli(["train", *resume_args(sample_store, out)], cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr


def _reference_2w(sample_store: Path, folder: Path) -> None:
    out = folder / "run"
    codes, outputs = spawn_ranks([sys.executable, "-m", "edsr_dist", "train", *resume_args(sample_store, out)], 2,
                                 cwd=folder)
    assert codes == [0, 0], outputs


@pytest.fixture(scope="session")
def reference_1w(build_once, sample_store) -> dict:
    """The weights of the uninterrupted one-worker run (helpers.resume_args) that killed and resumed runs of the same
    command line must match bit for bit."""
    state = final_state(build_once("reference-1w", lambda folder: _reference_1w(sample_store, folder)) / "run")
    assert state["step"] == 20
    return state["model"]


@pytest.fixture(scope="session")
def reference_2w(build_once, sample_store) -> dict:
    """The same run on two Gloo workers."""
    state = final_state(build_once("reference-2w", lambda folder: _reference_2w(sample_store, folder)) / "run")
    assert state["step"] == 20 and state["meta"]["world_size"] == 2
    return state["model"]


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on 127.0.0.1 (a real S3 endpoint); each test makes its own bucket."""
    require_moto(pytest)
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifacts), one per test process; each test makes
    its own experiment."""
    require_package(pytest, "mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()
