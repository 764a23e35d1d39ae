"""What `edsr-dist train` does with a store that holds no validation images, from the command line."""

from __future__ import annotations

from pathlib import Path

from helpers import TINY, make_hr_folder, run_cli


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
