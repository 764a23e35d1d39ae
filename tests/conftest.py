"""Fixtures, and the `e2e` marker on every test under tests/e2e (`python -m pytest -q -m "not e2e"` is the fast
inner loop). Helpers shared by tests are in helpers.py."""

from pathlib import Path

import pytest
from helpers import TINY, run_cli
from s3_server import MotoServer, require_moto_or_skip

from edsr_dist.data.sample_store import build_sample_store

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "sample.h5"
    build_sample_store(str(path))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_store) -> Path:
    """A finished real 10-step TINY run (one checkpoint, step 10) for tests that read it; copy it before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run_cli(["train", *TINY, "--data", str(sample_store), "--out", str(out), "--steps-per-epoch", "10"],
                     cwd=out.parent)
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoints" / "step_00000010.ckpt").is_file()
    return out


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on 127.0.0.1 (a real S3 endpoint); each test makes its own bucket."""
    require_moto_or_skip(pytest)
    server = MotoServer()
    yield server
    server.stop()
