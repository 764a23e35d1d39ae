"""URLs told apart from paths, the cache folder rule, where a bucket run is staged, and the object-store client's
set-up (the one-line error without s3fs, OBS's virtual-hosted addressing)."""

import sys
from pathlib import Path

import pytest

from edsr_dist.errors import UserError
from edsr_dist.locations import cache_root, cached_object_path, is_url, split_url, staging_folder


def test_urls_and_paths():
    assert is_url("s3://bucket/key.h5") and is_url("obs://b/k") and is_url("gs://b/k")
    assert not is_url("runs/edsr") and not is_url("/data/x.h5") and not is_url("") and not is_url("file:///x")
    assert split_url("s3://bucket/runs/a/") == ("s3", "bucket/runs/a")


def test_cache_root_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("EDSR_DIST_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "flag")) == tmp_path / "flag"  # --cache-dir wins
    monkeypatch.delenv("EDSR_DIST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edsr-dist"


def test_staging_folder_is_the_path_or_a_stable_place_in_the_cache(tmp_path):
    assert staging_folder("runs/x", str(tmp_path)) == Path("runs/x")
    staged = staging_folder("s3://bkt/runs/x", str(tmp_path))
    assert staged == tmp_path / "runs" / "s3" / "bkt" / "runs" / "x"
    assert staging_folder("s3://bkt/runs/x/", str(tmp_path)) == staged


def test_keys_cannot_climb_out_of_the_cache(tmp_path):
    path = cached_object_path("s3://bkt/../../etc/pass wd", str(tmp_path))
    assert path.resolve().is_relative_to(tmp_path / "objects")
    assert path.name == "pass_wd"


def test_missing_s3fs_is_one_line(monkeypatch):
    pytest.importorskip("fsspec")
    from edsr_dist.state.remote import filesystem
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    monkeypatch.setattr(sys.modules["fsspec.registry"], "_registry", {})  # no class imported before
    with pytest.raises(UserError, match=r"s3://b/k: the s3:// protocol needs a package .*pip install 'edsr-dist\[s3\]'"):
        filesystem("s3://b/k")


def test_obs_urls_use_virtual_hosted_addressing(monkeypatch):
    pytest.importorskip("s3fs")
    from edsr_dist.state.remote import filesystem
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "cn-north-4")
    endpoint = "https://obs.cn-north-4.myhuaweicloud.com"
    fs, path = filesystem("obs://mybucket/k", endpoint)
    assert path == "mybucket/k"
    assert fs.url(path).startswith("https://mybucket.obs.cn-north-4.myhuaweicloud.com/k?")
    fs, path = filesystem("s3://mybucket/k", endpoint)
    assert fs.url(path).startswith(f"{endpoint}/mybucket/k?")  # botocore's choice for a custom endpoint
