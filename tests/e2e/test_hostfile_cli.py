"""`edsr-dist launch --hostfile`: the horovodrun command it would run, and flags that do not apply."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from helpers import REPO

HOSTFILE = "gpu-a slots=4\ngpu-b slots=2\n"


def test_launch_hostfile_dry_run(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(HOSTFILE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--hostfile", str(path), "--dry-run",
                             "--", "--engine", "horovod"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout.strip()) == ["horovodrun", "-np", "6", "-H", "gpu-a:4,gpu-b:2", sys.executable,
                                                  "-m", "edsr_dist", "train", "--engine", "horovod"]
    # The shell wrapper reads $HOSTFILE, passes the train arguments through and execs horovodrun:
    # a stand-in horovodrun first on PATH shows what it was given (and keeps a real one from ssh-ing out).
    stand_in = tmp_path / "bin" / "horovodrun"
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/sh\necho "horovodrun $*"\necho "RANK_ID=${RANK_ID:-unset}"\n')
    stand_in.chmod(0o755)
    wrapper = subprocess.run(["bash", str(REPO / "launch" / "run_hvd.sh"), "--engine", "horovod"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env=dict(env, HOSTFILE=str(path), RANK_ID="5", PATH=f"{stand_in.parent}:{env['PATH']}"))
    assert wrapper.returncode == 0, wrapper.stderr
    assert wrapper.stdout.splitlines() == [
        f"horovodrun -np 6 -H gpu-a:4,gpu-b:2 {sys.executable} -m edsr_dist train --engine horovod",
        "RANK_ID=unset",  # a stale launcher variable would override Horovod's rank in the worker
    ]


def test_hostfile_rejects_local_only_flags(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(HOSTFILE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--hostfile", str(path), "--nproc", "2",
                             "--dry-run"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "--nproc and --hostfile conflict" in result.stderr
