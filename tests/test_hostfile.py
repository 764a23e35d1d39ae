"""Hostfiles for horovodrun: parsing, the built command, and `launch --hostfile --dry-run`."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edsr_dist.dist.hostfile import horovodrun_command, parse_hostfile
from edsr_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]

GOOD = """# two GPU servers
gpu-a slots=4

gpu-b   slots = 2   # the small one
"""


def test_comments_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(GOOD)
    assert parse_hostfile(path) == [("gpu-a", 4), ("gpu-b", 2)]


@pytest.mark.parametrize("text,message", [
    ("gpu-a slots=4\ngpu-b\n", r":2: cannot read 'gpu-b'"),
    ("gpu-a slots=four\n", r":1: slots='four' is not a positive whole number"),
    ("gpu-a slots=0\n", r":1: slots='0'"),
    ("gpu-a slots=2\ngpu-a slots=2\n", r":2: host gpu-a already listed on line 1"),
    ("# nothing here\n\n", "lists no hosts"),
])
def test_bad_hostfiles(tmp_path, text, message):
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        parse_hostfile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_hostfile(tmp_path / "hostfile")


def test_horovodrun_command():
    hosts = [("gpu-a", 4), ("gpu-b", 4)]
    worker = ["python", "-m", "edsr_dist", "train", "--engine", "horovod"]
    assert horovodrun_command(hosts, worker) == ["horovodrun", "-np", "8", "-H", "gpu-a:4,gpu-b:4", *worker]
    assert horovodrun_command(hosts, worker, np=6)[:3] == ["horovodrun", "-np", "6"]
    with pytest.raises(UserError, match="does not fit"):
        horovodrun_command(hosts, worker, np=9)


def test_launch_hostfile_dry_run(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(GOOD)
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
    path.write_text(GOOD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--hostfile", str(path), "--nproc", "2",
                             "--dry-run"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "--nproc and --hostfile conflict" in result.stderr
