"""The HDF5 patch store: builder round trips, the sample store, damaged files, bad builder input."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import make_hr_folder, make_official_lr, smooth_image, write_png

from edsr_dist.cli import main as cli_main
from edsr_dist.data.build_store import main as build_main
from edsr_dist.data.resize import matlab_style_bicubic_downscale, pil_bicubic_downscale
from edsr_dist.data.sample_store import SAMPLE_SCENES, build_sample_store, sample_split
from edsr_dist.data.store import PatchStore, crc32_of, store_info, verify_store
from edsr_dist.errors import UserError

TILE = 24  # divisible by 2, 3 and 4
SCALES = (2, 3, 4)


def expected_tiles(image: np.ndarray, side: int, multiple: int = 1) -> list[np.ndarray]:
    """Tiles of the image cropped to a multiple of `multiple`: every `side` pixels from the top-left corner, the
    last row and column ending exactly at the bottom and right edges."""
    height, width = image.shape[0] // multiple * multiple, image.shape[1] // multiple * multiple

    def starts(length: int) -> list[int]:
        if length < side:
            return []
        origins = list(range(0, length - side + 1, side))
        return origins + [length - side] if origins[-1] + side < length else origins

    return [image[y:y + side, x:x + side] for y in starts(height) for x in starts(width)]


def stored_tiles(hr: np.ndarray, lr: np.ndarray, scale: int, multiple: int = 12) -> tuple[list, list]:
    """(HR tiles, LR tiles) a store keeps of one training image: the HR cropped to a multiple of lcm(scales),
    and the matching top-left part of the LR of the whole image."""
    height, width = hr.shape[0] // multiple * multiple, hr.shape[1] // multiple * multiple
    return (expected_tiles(hr[:height, :width], TILE),
            expected_tiles(lr[: height // scale, : width // scale], TILE // scale))


def build(*args: str) -> int:
    return build_main([*args, "--no-progress"])


# Image sizes: 50 and 75 are not multiples of 3 or 4 (floor LR sizes); 20x30 is smaller than a tile.
TRAIN_SIZES = [(50, 75), (48, 49), (20, 30), (72, 60)]


def test_generated_bicubic_round_trip(tmp_path: Path) -> None:
    hr = make_hr_folder(tmp_path / "hr", TRAIN_SIZES + [(61, 70)])
    out = tmp_path / "store.h5"
    assert build("--hr-dir", str(tmp_path / "hr"), "--scales", "2,3,4", "--tile-size", str(TILE), "--out", str(out),
                 "--valid-count", "1") == 0
    train_stems, valid_stem = ["0001", "0002", "0004"], sorted(hr)[-1]  # 0003 (30x20) is smaller than a tile
    info = store_info(str(out))
    assert info["attrs"]["format_version"] == 2 and info["attrs"]["degradation"] == "bicubic-pil"
    assert info["scales"] == [2, 3, 4] and info["tile_size"] == TILE and info["attrs"]["checksum"] == "crc32"
    assert {"created", "builder_version", "source", "sources"} <= set(info["attrs"])
    for scale in SCALES:
        store = PatchStore(str(out), scale)
        hr_tiles, lr_tiles = [], []
        for stem in train_stems:
            hr_part, lr_part = stored_tiles(hr[stem], pil_bicubic_downscale(hr[stem], scale), scale)
            hr_tiles, lr_tiles = hr_tiles + hr_part, lr_tiles + lr_part
        # 50x75 -> 48x72: 2 x 3; 48x49 -> 48x48: 2 x 2; 72x60: 3 x 3 (the last column overlaps the one before)
        assert store.num_train_tiles == len(hr_tiles) == 2 * 3 + 2 * 2 + 3 * 3
        for index in range(store.num_train_tiles):
            lr, hr_tile = store.read_train(index)
            assert lr.dtype == np.uint8 and hr_tile.tobytes() == hr_tiles[index].tobytes()
            assert lr.tobytes() == lr_tiles[index].tobytes()
        assert store.valid_names == [valid_stem]
        name, lr, hr_valid = store.read_valid(0)
        assert name == valid_stem and hr_valid.shape == (60, 60, 3)  # cropped to a multiple of lcm(2,3,4)=12
        np.testing.assert_array_equal(hr_valid, hr[valid_stem][:60, :60])
        np.testing.assert_array_equal(lr, pil_bicubic_downscale(hr[valid_stem][:60, :60], scale))
        store.close()
    with h5py.File(out, "r") as f:  # tile bookkeeping: source image and origin of each tile
        names = [n.decode() for n in f["train/names"][()]]
        assert names == train_stems
        assert f["train/image_index"][()].tolist() == [0] * 6 + [1] * 4 + [2] * 9
        assert f["train/image_size"][()].tolist() == [[48, 72], [48, 48], [72, 60]]
        assert f["train/tile_origin"][4].tolist() == [24, 24] and f["train/tile_origin"][6].tolist() == [0, 0]
        assert f["train/tile_origin"][-1].tolist() == [48, 36]
        assert f["train/hr"].chunks == (1, TILE, TILE, 3) and f["train/hr"].compression is None


def test_official_lr_round_trip(tmp_path: Path) -> None:
    hr = make_hr_folder(tmp_path / "hr", TRAIN_SIZES)
    lrs = make_official_lr(tmp_path / "lr", hr, SCALES)
    valid_hr = make_hr_folder(tmp_path / "vhr", [(50, 39)], seed=5)
    valid_lr = make_official_lr(tmp_path / "vlr", valid_hr, SCALES, seed=6)
    out = tmp_path / "official.h5"
    assert build("--hr-dir", str(tmp_path / "hr"), "--lr-dir", str(tmp_path / "lr"), "--scales", "2,3,4",
                 "--tile-size", str(TILE), "--out", str(out), "--valid-hr-dir", str(tmp_path / "vhr"),
                 "--valid-lr-dir", str(tmp_path / "vlr")) == 0
    assert store_info(str(out))["degradation"] == "official"
    for scale in SCALES:
        store = PatchStore(str(out), scale)
        hr_tiles, lr_tiles = [], []
        for stem in sorted(hr):
            hr_part, lr_part = stored_tiles(hr[stem], lrs[stem, scale], scale)
            hr_tiles, lr_tiles = hr_tiles + hr_part, lr_tiles + lr_part
        assert store.num_train_tiles == len(hr_tiles)
        for index in range(store.num_train_tiles):
            lr, hr_tile = store.read_train(index)
            assert hr_tile.tobytes() == hr_tiles[index].tobytes() and lr.tobytes() == lr_tiles[index].tobytes()
        name, lr, hr_valid = store.read_valid(0)
        assert name == "0001" and hr_valid.shape == (48, 36, 3)
        np.testing.assert_array_equal(hr_valid, valid_hr["0001"][:48, :36])
        np.testing.assert_array_equal(lr, valid_lr["0001", scale][: 48 // scale, : 36 // scale])
    assert verify_store(str(out))["checked"] == 4 * (store.num_train_tiles + 1)


def test_sample_store_builds_offline_with_a_scene_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sample store must build without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = tmp_path / "sample.h5"
    summary = build_sample_store(str(out))
    assert summary["train_tiles"] > 100 and summary["valid_images"] == 3

    scenes_by_split: dict[str, set[str]] = {"train": set(), "valid": set()}
    image_scene = {}
    for scene, split, names in SAMPLE_SCENES:
        scenes_by_split[split].add(scene)
        for name in names:
            assert name not in image_scene, f"{name} listed twice"
            image_scene[name] = scene
    assert not scenes_by_split["train"] & scenes_by_split["valid"]
    assert {"chelsea", "coffee", "astronaut"} == scenes_by_split["valid"]
    assert image_scene["motorcycle_left"] == image_scene["motorcycle_right"]

    train_names, valid_names = sample_split()
    info = store_info(str(out))
    assert info["valid_names"] == valid_names == ["chelsea", "coffee", "astronaut"]
    assert info["tile_size"] == 144 and info["scales"] == [2, 3, 4] and info["degradation"] == "bicubic-pil"
    with h5py.File(out, "r") as f:
        stored_train = [n.decode() for n in f["train/names"][()]]
        assert stored_train == train_names
        train_hashes = {hashlib.sha1(f["train/hr"][i].tobytes()).digest() for i in range(f["train/hr"].shape[0])}
    # No validation pixels in training: no training tile appears inside a validation image.
    store = PatchStore(str(out), 2)
    for index in range(store.num_valid):
        _, _, hr_valid = store.read_valid(index)
        for tile in expected_tiles(hr_valid, 144):
            assert hashlib.sha1(np.ascontiguousarray(tile).tobytes()).digest() not in train_hashes



# ---------------------------------------------------------------------------------------------------- damaged files


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    make_hr_folder(tmp_path / "hr", [(48, 72), (50, 75)])
    out = tmp_path / "small.h5"
    assert build("--hr-dir", str(tmp_path / "hr"), "--tile-size", str(TILE), "--out", str(out),
                 "--valid-count", "1") == 0
    return out


def damaged_copy(src: Path, name: str) -> Path:
    dst = src.with_name(name)
    shutil.copyfile(src, dst)
    return dst


def test_not_hdf5_and_missing_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not a store\n" * 100)
    with pytest.raises(UserError, match="not an HDF5 file"):
        PatchStore(str(text), 2)
    with pytest.raises(UserError, match="does not exist"):
        PatchStore(str(tmp_path / "missing.h5"), 2)


def test_missing_dataset_and_scale_not_in_store(small_store: Path) -> None:
    path = damaged_copy(small_store, "no_x3.h5")
    with h5py.File(path, "a") as f:
        del f["train/lr_x3"]
    with pytest.raises(UserError, match=r"missing dataset /train/lr_x3"):
        PatchStore(str(path), 3)
    PatchStore(str(path), 2)  # the other scales still open
    with pytest.raises(UserError, match="missing dataset"):
        verify_store(str(path))
    with pytest.raises(UserError, match=r"scales x2, x3, x4, not x5"):
        PatchStore(str(small_store), 5)


def test_other_format_versions_get_a_rebuild_line(small_store: Path) -> None:
    # Version 1 stores (tiles from the top-left only, edges dropped) lack what crops across tiles need.
    for version in (1, 3):
        path = damaged_copy(small_store, f"v{version}.h5")
        with h5py.File(path, "a") as f:
            f.attrs["format_version"] = version
        with pytest.raises(UserError, match=rf"format_version {version}, this edsr-dist reads version 2; rebuild"):
            PatchStore(str(path), 2)


def test_truncated_file(small_store: Path) -> None:
    path = damaged_copy(small_store, "cut.h5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(small_store) // 2)
    with pytest.raises(UserError, match="truncated or damaged"):
        PatchStore(str(path), 2)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x5A]))


def test_flipped_byte_is_refused(small_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = damaged_copy(small_store, "flipped.h5")
    with h5py.File(path, "r") as f:
        tile_offset = f["train/lr_x2"].id.get_chunk_info(2).byte_offset
        valid_offset = f["valid/hr/0000"].id.get_offset()
    flip_byte(path, tile_offset + 100)
    store = PatchStore(str(path), 2)
    store.read_train(1)  # undamaged tiles still read
    with pytest.raises(UserError, match=r"flipped\.h5.*checksum mismatch in /train/lr_x2\[2\].*rebuild"):
        store.read_train(2)
    PatchStore(str(path), 3).read_train(2)  # the x3 tile is intact

    flip_byte(path, valid_offset + 7)
    with pytest.raises(UserError, match=r"checksum mismatch in /valid/hr/0000"):
        store.read_valid(0)
    with pytest.raises(UserError, match=r"2 damaged entries \(/train/lr_x2\[2\], /valid/hr/0000\)"):
        verify_store(str(path))
    assert cli_main(["build-store", "--verify", str(path)]) == 2
    assert "damaged" in capsys.readouterr().err


def _read_in_child(store: PatchStore, queue: "multiprocessing.Queue[object]") -> None:
    queue.put([crc32_of(store.read_train(i)[1]) for i in range(store.num_train_tiles)])


def test_handle_is_reopened_after_fork_and_pickle(small_store: Path) -> None:
    store = PatchStore(str(small_store), 4)
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


# ------------------------------------------------------------------------------------------------ bad builder input


def test_builder_bad_input(tmp_path: Path) -> None:
    hr = make_hr_folder(tmp_path / "hr", [(48, 48), (49, 50)])
    out = str(tmp_path / "out.h5")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    cases = [
        (["--hr-dir", str(tmp_path / "missing"), "--out", out], "does not exist"),
        (["--hr-dir", str(empty), "--out", out], r"holds no images \(it holds 1 other file\(s\), e.g. readme.txt\)"),
        (["--hr-dir", str(tmp_path / "hr"), "--hr-dir", str(tmp_path / "hr" / "."), "--out", out],
         "already given as --hr-dir"),
        (["--hr-dir", str(tmp_path / "hr"), "--valid-hr-dir", str(tmp_path / "hr"), "--out", out],
         "already given as --hr-dir: a folder is used once; use --valid-count"),
        (["--hr-dir", str(tmp_path / "hr"), "--hr-dir", str(empty), "--lr-dir", str(tmp_path / "lr"), "--out", out],
         "2 --hr-dir but 1 --lr-dir"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", out, "--tile-size", "100"], "not divisible by scale 3"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", out, "--scales", "2,x"], "comma-separated"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", str(tmp_path / "no" / "dir" / "s.h5")], "does not exist"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", str(tmp_path)], "is a folder"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", out, "--valid-count", "3"], "exceeds the 2 images"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", out, "--lr-dir", str(tmp_path / "nolr")], "does not exist"),
        (["--hr-dir", str(tmp_path / "hr"), "--out", out, "--valid-hr-dir", str(tmp_path / "hr"),
          "--lr-dir", str(tmp_path / "lr")], "go together"),
        (["--out", out], "--hr-dir is required"),
        (["--hr-dir", str(tmp_path / "hr")], "--out is required"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            build(*args)

    lrs = make_official_lr(tmp_path / "lr", hr, SCALES)
    missing = tmp_path / "lr" / "X3" / "0002x3.png"
    missing.unlink()
    with pytest.raises(UserError, match="0002x3.png for HR 0002.png is missing"):
        build("--hr-dir", str(tmp_path / "hr"), "--lr-dir", str(tmp_path / "lr"), "--out", out)
    write_png(missing, np.zeros((17, 16, 3), np.uint8))  # should be 16 rows x 16 columns
    with pytest.raises(UserError, match=r"0002x3.png is 16x17 \(WxH\) but HR 0002.png / 3 is 16x16"):
        build("--hr-dir", str(tmp_path / "hr"), "--lr-dir", str(tmp_path / "lr"), "--out", out)
    assert lrs and not os.path.exists(out)


def test_output_folder_not_writable(tmp_path: Path) -> None:
    # /proc refuses new files even to root (tests here run as root, so chmod would not stop the write).
    make_hr_folder(tmp_path / "hr", [(48, 48)])
    with pytest.raises(UserError, match=r"writing store /proc/s.h5 failed .*check free space and permissions"):
        build("--hr-dir", str(tmp_path / "hr"), "--out", "/proc/s.h5")


def test_failed_build_leaves_no_file(tmp_path: Path) -> None:
    make_hr_folder(tmp_path / "hr", [(48, 48), (48, 72), (48, 48)])
    broken = tmp_path / "hr" / "0002.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header (size) intact, pixel data cut: fails while writing
    out = tmp_path / "store.h5"
    with pytest.raises(UserError, match="cannot read image .*0002.png"):
        build("--hr-dir", str(tmp_path / "hr"), "--tile-size", str(TILE), "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob("*store.h5.tmp-*"))
    out.write_bytes(b"previous store")  # an existing store is left as it was
    with pytest.raises(UserError):
        build("--hr-dir", str(tmp_path / "hr"), "--tile-size", str(TILE), "--out", str(out))
    assert out.read_bytes() == b"previous store" and not list(tmp_path.glob("*store.h5.tmp-*"))


def test_matlab_style_downscale_close_to_pil_inside() -> None:
    # The two bicubic flavours agree away from the border (docs/STORE.md quantifies the differences).
    image = smooth_image(np.random.default_rng(3), 96, 120)
    for scale in SCALES:
        pil, matlab = pil_bicubic_downscale(image, scale), matlab_style_bicubic_downscale(image, scale)
        assert pil.shape == matlab.shape == (96 // scale, 120 // scale, 3)
        inner = np.abs(pil.astype(int) - matlab.astype(int))[3:-3, 3:-3]
        assert inner.mean() < 0.5 and inner.max() <= 6
    flat = np.full((24, 24, 3), 77, np.uint8)  # a constant image stays constant (weights sum to one)
    assert np.all(matlab_style_bicubic_downscale(flat, 3) == 77)
