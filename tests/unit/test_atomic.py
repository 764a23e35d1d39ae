"""The one atomic-write helper: the target is either the old file or the complete new one, no temp file left."""

import pytest

from edsr_dist.state.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"sec", b"ond")
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_the_temporary_file_is_hidden_in_the_same_folder(tmp_path):
    with atomic_path(tmp_path / "w.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.pt.tmp-")
        tmp.write_bytes(b"x")
    assert (tmp_path / "w.pt").read_bytes() == b"x"
