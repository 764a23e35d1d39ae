"""The bad-input catalogue, end to end through the real CLI (`python -m edsr_dist ...`).

Every case must end with exit code 2, exactly one line on stderr that names the problem (and, by the project's
rule, the fix after a `;`), no traceback, and nothing written: the working folder is unchanged afterwards.
The module-level checks (every rejected shape of a rank table, a hostfile, a store) live in test_rank_table.py,
test_hostfile.py and test_store.py; this table proves the same errors reach a user as one clean line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import pytest
from helpers import REPO, TINY

# (work folder, sample store) -> the CLI arguments of one case, after writing the files it needs.
MakeArgs = Callable[[Path, Path], list[str]]

# Train settings that would run quickly if the input were good; bad inputs must stop them before any step.
TRAIN = [*TINY, "--tensorboard", "true"]  # tensorboard on: even its event file must not appear


def rank_table(servers: list[tuple[str, list[int]]]) -> dict:
    """A valid version 1.0 table, ranks numbered in server order."""
    doc = {"version": "1.0", "status": "completed", "server_count": str(len(servers)), "server_list": []}
    rank = 0
    for s, (server_id, devices) in enumerate(servers):
        entries = []
        for d in devices:
            entries.append({"device_id": str(d), "device_ip": f"192.168.{100 + d}.{1 + s}", "rank_id": str(rank)})
            rank += 1
        doc["server_list"].append({"server_id": server_id, "device": entries})
    return doc


def table_case(change=None, text: str | None = None, launcher_flags: tuple[str, ...] = ()) -> MakeArgs:
    """Launch from a rank table with this host (127.0.0.1) as server 0, after `change(doc)` (or as `text`)."""
    def make(tmp: Path, store: Path) -> list[str]:
        doc = rank_table([("127.0.0.1", [0, 1]), ("198.51.100.2", [0, 1])])
        if change is not None:
            change(doc)
        path = tmp / "rank_table.json"
        path.write_text(text if text is not None else json.dumps(doc))
        return ["launch", "--rank-table", str(path), *launcher_flags, "--", *TRAIN, "--data", str(store), "--out", str(tmp / "out")]
    return make


def _device(doc: dict, server: int, index: int) -> dict:
    return doc["server_list"][server]["device"][index]


def hostfile_case(text: str) -> MakeArgs:
    def make(tmp: Path, store: Path) -> list[str]:
        (tmp / "hostfile").write_text(text)
        return ["launch", "--hostfile", str(tmp / "hostfile"), "--", *TRAIN, "--out", str(tmp / "out")]
    return make


def store_case(damage) -> MakeArgs:
    """Train from a copy of the sample store after `damage(path)`; extra train arguments may be returned."""
    def make(tmp: Path, store: Path) -> list[str]:
        path = tmp / "store.h5"
        shutil.copyfile(store, path)
        extra = damage(path) or []
        return ["train", *TRAIN, "--data", str(path), "--out", str(tmp / "out"), *extra]
    return make


def _not_hdf5(path: Path) -> None:
    path.write_text("not a store\n" * 100)


def _drop_dataset(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f["train/lr_x2_crc32"]


def _only_x2_and_x4(path: Path) -> list[str]:
    with h5py.File(path, "a") as f:
        f.attrs["scales"] = [2, 4]
    return ["--scale", "3"]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_every_training_tile(path: Path) -> None:
    """One flipped byte in each x2 LR tile: whichever tiles the first batch draws, the checksum catches it."""
    with h5py.File(path, "r") as f:
        tiles = f["train/lr_x2"]
        offsets = [tiles.id.get_chunk_info(i).byte_offset for i in range(tiles.shape[0])]
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset + 100)
            value = f.read(1)[0]
            f.seek(offset + 100)
            f.write(bytes([value ^ 0x5A]))


def train_case(*args: str, files: dict[str, str] | None = None, data: bool = True) -> MakeArgs:
    """`train` with these arguments; `files` are written first ({name: text}); {tmp} in args is the folder."""
    def make(tmp: Path, store: Path) -> list[str]:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        data_args = ["--data", str(store)] if data else []
        return ["train", *TRAIN, *data_args, "--out", str(tmp / "out"), *(a.format(tmp=tmp) for a in args)]
    return make


def launch_case(*launch_args: str, train_args: tuple[str, ...] = ()) -> MakeArgs:
    def make(tmp: Path, store: Path) -> list[str]:
        return ["launch", *launch_args, "--", *TRAIN, "--data", str(store), "--out", str(tmp / "out"), *train_args]
    return make


def _set(doc: dict, path: list, value) -> None:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


CASES = [
    # ---- rank tables (launch --rank-table)
    ("table_invalid_json", table_case(text='{"version": "1.0", "status": "completed",,}'), "invalid JSON"),
    ("table_status_not_completed", table_case(lambda d: _set(d, ["status"], "initializing"), launcher_flags=("--wait-table", "1")),
     "was still not 'completed' after --wait-table 1 s"),
    ("table_duplicate_rank", table_case(lambda d: _set(_device(d, 1, 1), ["rank_id"], "2")), "duplicate rank_id 2"),
    ("table_missing_rank", table_case(lambda d: _set(_device(d, 1, 1), ["rank_id"], "9")), "rank_id 3 missing"),
    ("table_duplicate_device", table_case(lambda d: _set(_device(d, 0, 1), ["device_id"], "0")),
     "duplicate device_id 0"),
    ("table_missing_device_ip", table_case(lambda d: _device(d, 0, 0).pop("device_ip")),
     "missing device_ip in a multi-server table"),
    ("table_device_id_out_of_range", table_case(lambda d: _set(_device(d, 0, 1), ["device_id"], "16")),
     "device_id 16 is out of range"),
    ("table_server_count_mismatch", table_case(lambda d: _set(d, ["server_count"], "3")),
     "server_count is 3 but server_list has 2"),
    ("table_empty_server_list", table_case(lambda d: (_set(d, ["server_list"], []), _set(d, ["server_count"], "0"))),
     "server_list is empty"),
    ("table_this_host_not_listed", table_case(lambda d: _set(d["server_list"][0], ["server_id"], "198.51.100.1")),
     "this host"),
    # ---- hostfiles (launch --hostfile)
    ("hostfile_bad_line", hostfile_case("gpu-a slots=4\ngpu-b\n"), ":2: cannot read 'gpu-b'"),
    ("hostfile_slots_not_a_number", hostfile_case("gpu-a slots=four\n"), "slots='four' is not a positive whole number"),
    ("hostfile_missing", launch_case("--hostfile", "no-such-hostfile"), "no-such-hostfile not found"),
    # ---- patch stores (train --data)
    ("store_not_hdf5", store_case(_not_hdf5), "is not an HDF5 file"),
    ("store_missing_dataset", store_case(_drop_dataset), "missing dataset /train/lr_x2_crc32"),
    ("store_scale_not_in_store", store_case(_only_x2_and_x4), "holds scales x2, x4, not x3"),
    ("store_truncated", store_case(_truncate), "is truncated or damaged"),
    ("store_checksum_mismatch_found_in_training", store_case(_flip_every_training_tile), "checksum mismatch in"),
    ("store_patch_larger_than_tile", store_case(lambda p: ["--patch-size", "100"]), "patch larger than tile"),
    # ---- configuration
    ("config_unknown_key", train_case("--config", "{tmp}/bad.yaml", files={"bad.yaml": "learning_rate: 0.1\n"}),
     "unknown setting 'learning_rate'"),
    ("config_not_yaml", train_case("--config", "{tmp}/bad.yaml", files={"bad.yaml": "epochs: [1, 2\n"}),
     "not valid YAML"),
    ("config_wrong_type", train_case("--epochs", "many"), "epochs expects int"),
    ("config_wrong_type_in_yaml", train_case("--config", "{tmp}/bad.yaml", files={"bad.yaml": "batch_size: big\n"}),
     "batch_size"),
    ("config_negative_learning_rate", train_case("--lr", "-1"), "lr must be positive"),
    ("config_batch_smaller_than_the_world", launch_case("--nproc", "3", train_args=("--batch-size", "2")),
     "is smaller than the 3 workers"),
    ("config_unknown_preset", train_case("--preset", "huge"), "unknown preset"),
    # ---- paths
    ("path_missing_store", train_case("--data", "{tmp}/missing.h5", data=False), "missing.h5 does not exist"),
    ("path_missing_config", train_case("--config", "{tmp}/missing.yaml"), "missing.yaml"),
    ("path_missing_resume_checkpoint", train_case("--resume", "{tmp}/missing.ckpt"), "no valid checkpoint"),
    ("path_output_below_a_file", train_case("--out", "{tmp}/a_file/run", files={"a_file": "x"}),
     "a_file is a file, not a folder"),
    ("path_output_not_writable", train_case("--out", "/proc/edsr-dist-out"), "/proc/edsr-dist-out is not writable"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def clean_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK_TABLE_FILE", "MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_ID",
                 "RANK_SIZE", "EDSR_DIST_LAUNCHER", "JOB_ID"):
        env.pop(name, None)
    return env


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case,make_args,message", CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, sample_store, case, make_args, message):
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(work, sample_store)
    before = snapshot(work)
    result = subprocess.run([sys.executable, "-m", "edsr_dist", *args], cwd=work, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"edsr-dist {args[0]}: error: "), line
    assert message in line, line
    assert "; " in line, f"no fix given: {line}"
    assert snapshot(work) == before, "something was written"
    assert not (work / "out").exists()
