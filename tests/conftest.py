"""Fixtures, and the `e2e` marker on every test under tests/e2e (`python -m pytest -q -m "not e2e"` is the fast
inner loop). Helpers shared by tests are in helpers.py."""

from pathlib import Path

import pytest

from edsr_dist.data.sample import build_sample_store

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
