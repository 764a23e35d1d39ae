"""`edsr-dist build-store` and data_tools/build_store.py from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from edsr_dist.cli import main as cli_main


def test_cli_and_data_tools_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.h5"
    script = REPO / "data_tools" / "build_store.py"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(script), "--sample", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validation images" in done.stdout and out.is_file()
    assert cli_main(["build-store", "--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["build-store", "--hr-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1 and "Traceback" not in err
