"""Hostfiles for horovodrun: parsing and the built command."""

from __future__ import annotations

import pytest

from edsr_dist.errors import UserError
from edsr_dist.launcher.hostfile import horovodrun_command, parse_hostfile

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


