"""What `edsr-dist train` does with a store that holds no validation images, from the command line; a store read
from a forked child process."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

from helpers import TINY, make_hr_folder, run_cli

from edsr_dist.data.store import PatchStore, crc32_of


def test_train_refuses_a_store_without_validation_images_in_one_line(tmp_path: Path) -> None:
    make_hr_folder(tmp_path / "hr", [(96, 96), (96, 144)])
    store = tmp_path / "novalid.h5"
    built = run_cli(["build-store", "--hr-dir", str(tmp_path / "hr"), "--tile-size", "48", "--out", str(store)],
                    cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "note: no validation images in this store" in built.stdout
    out = tmp_path / "run"
    result = run_cli(["train", *TINY, "--data", str(store), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "has no validation images" in err and "--valid-count K" in err and "--val-benchmark" in err
    assert "Result:" not in result.stdout and not (out / "checkpoints").exists()


def _read_in_child(store: PatchStore, queue: "multiprocessing.Queue[object]") -> None:
    queue.put([crc32_of(store.read_train(i)[1]) for i in range(store.num_train_tiles)])


def test_handle_is_reopened_after_fork_and_pickle(sample_store: Path) -> None:
    """A forked child (as a DataLoader worker is) reads through its own handle; a pickled store opens lazily."""
    store = PatchStore(str(sample_store), 4)
    expected = [crc32_of(store.read_train(i)[1]) for i in range(store.num_train_tiles)]  # parent handle open
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(store, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == expected
    assert [crc32_of(store.read_train(i)[1]) for i in range(store.num_train_tiles)] == expected  # parent still fine
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None and clone.read_train(0)[1].tobytes() == store.read_train(0)[1].tobytes()
