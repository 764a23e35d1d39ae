"""The README's demos, in the order it lists them, on a fresh folder: `bash launch/run_1p.sh` (runs/sample), then
`bash launch/run_8p.sh --nproc 2` (runs/sample_2p). Both used to write runs/sample, so the second was refused.

The scripts run exactly as a user runs them, with no arguments of their own; only the interpreter they call (PYTHON,
the scripts' documented knob) appends flags that shorten the schedule (a later `--field value` wins), so the test
takes seconds instead of the demos' 1,500 steps each. The launcher, the run-folder rule and training are real."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO, clean_env

from edsr_dist.data.sample_store import default_sample_store_path

SHORTER = ["--max-steps", "4", "--max-val-images", "1", "--samples-png", "false", "--tensorboard", "false",
           "--progress", "false", "--num-threads", "1"]


def shortening_python(tmp_path: Path) -> Path:
    path = tmp_path / "python-shorter"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" {" ".join(SHORTER)}\n')
    path.chmod(0o755)
    return path


def run_script(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_readme_demos_run_one_after_the_other(tmp_path, sample_store):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(sample_store, cache / Path(default_sample_store_path()).name)  # the store the demos would build
    clone = tmp_path / "clone"
    clone.mkdir()
    env = dict(clean_env(), PYTHON=str(shortening_python(tmp_path)), EDSR_DIST_CACHE=str(cache))

    first = run_script(["run_1p.sh"], clone, env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (clone / "runs" / "sample" / "checkpoints" / "latest").is_file()

    second = run_script(["run_8p.sh", "--nproc", "2"], clone, env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "already holds a run" not in second.stderr
    assert (clone / "runs" / "sample_2p" / "checkpoints" / "latest").is_file()
    assert (clone / "runs" / "sample_2p" / "logs" / "rank_1.log").is_file()
    assert second.stdout.strip().splitlines()[-1].startswith("Result: EDSR ")

    # docs/OPERATIONS.md's resume line for the first demo finds it complete and repeats its result.
    again = run_script(["run_1p.sh", "--preset", "sample", "--resume", "auto"], clone, env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already complete" in again.stdout + again.stderr
