"""Small things a user expects of the command line: --version, usage, near-miss flags, --print-config,
rank-table without torch and without clobbering, readable exports, where the demo caches its store."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, TINY, run_cli

from edsr_dist import __version__
from edsr_dist.cli import main as cli_main
from edsr_dist.config import PRESETS, build_config

OLD_CHECKPOINT = REPO / "tests" / "data" / "step_00000003_v0a0567e.ckpt"


def test_version_and_bare_usage(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"edsr-dist {__version__}\n"
    assert cli_main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: edsr-dist <command>")


@pytest.mark.parametrize("argv, hint", [
    (["train", "--epoch", "3"], "unknown option --epoch (did you mean --epochs?)"),
    (["train", "--num-block=4"], "unknown option --num-block (did you mean --num-blocks?)"),
    (["trian"], "unknown command 'trian' (did you mean train?)"),
    (["rank-table", "make", "--devices", "0", "--forse"], "unrecognized arguments: --forse (did you mean --force?)"),
    (["export", "--checkpoint", "x", "--out", "y.pt", "--nmes", "basicsr"], "(did you mean --names?)"),
])
def test_near_miss_flags_get_a_suggestion(argv, hint, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert hint in err and err.count("\n") == 1


def test_near_miss_yaml_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epoch: 3\n")
    with pytest.raises(Exception, match=r"unknown setting 'epoch' \(did you mean epochs\?\)"):
        build_config(config_file=str(config))


def test_print_config_shows_a_preset_and_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["train", "--preset", "baseline", "--print-config", "--epochs", "7"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "# preset baseline sets: num_blocks=16, num_filters=64, res_scale=1.0"
    assert "num_blocks: 16               # default 32" in text and "epochs: 7                    # default 100" in text
    (tmp_path / "printed.yaml").write_text(text)
    assert build_config(config_file=str(tmp_path / "printed.yaml")) == build_config(
        preset="baseline", overrides={"epochs": "7"})
    assert {k: yaml.safe_load(text)[k] for k in PRESETS["baseline"]} == PRESETS["baseline"]


def test_rank_table_check_works_without_torch(tmp_path):
    # torch made unimportable (None in sys.modules), every other dependency present, as on a login node.
    no_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'edsr-dist'; "
                "runpy.run_module('edsr_dist', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                          env=env, capture_output=True).returncode != 0
    result = subprocess.run([sys.executable, "-c", no_torch, "rank-table", "check",
                             str(REPO / "rank_table" / "hccl_8p.json")], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("1 server, 8 devices, 8 ranks")


def test_rank_table_make_does_not_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "hccl_2p.json"
    make = ["rank-table", "make", "--devices", "0-1", "--server-ip", "10.0.0.7",
            "--device-ips", "192.168.100.107,192.168.101.107", "--out", str(out)]
    assert cli_main(make) == 0
    out.write_text('{"kept": true}\n')  # a table someone edited by hand
    capsys.readouterr()
    assert cli_main(make) == 2
    assert capsys.readouterr().err == (f"edsr-dist rank-table: error: --out {out} already exists; pass --force to "
                                       "replace it, or another --out\n")
    assert json.loads(out.read_text()) == {"kept": True}
    assert cli_main([*make, "--force"]) == 0
    assert json.loads(out.read_text())["server_count"] == "1"


def test_exported_safetensors_are_readable_like_pth(tmp_path):
    pytest.importorskip("safetensors")
    for name in ("w.safetensors", "w.pth"):
        assert cli_main(["export", "--checkpoint", str(OLD_CHECKPOINT), "--out", str(tmp_path / name)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("w.safetensors", "w.pth")}
    assert modes == {"w.safetensors": 0o666 & ~umask, "w.pth": 0o666 & ~umask}


def test_the_demo_says_where_it_caches_the_sample_store(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli(["train", *TINY, "--max-steps", "1", "--out", str(tmp_path / "run")], cwd=tmp_path,
                     env={"EDSR_DIST_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    stores = list(cache.glob("sample_*.h5"))
    assert len(stores) == 1
    assert f"sample store: {stores[0]} (cached; EDSR_DIST_CACHE sets the folder)" in result.stdout.splitlines()
