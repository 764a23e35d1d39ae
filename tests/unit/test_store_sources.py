"""Stores from several folders (DF2K-shaped), every pixel of every training image reachable by a crop, crops
uniform over the image, bounded memory while building and verifying, other image formats, too-small images."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import make_hr_folder, make_official_lr, smooth_image
from PIL import Image

import edsr_dist.data.store as store_module
from edsr_dist.config import Config
from edsr_dist.data.build_store import main as build_main
from edsr_dist.data.builder import SourceFolder, SourceImage, write_store
from edsr_dist.data.resize import pil_bicubic_downscale
from edsr_dist.data.sample_store import default_sample_store_path, ensure_sample_store
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.data.store import PatchStore, store_info, verify_store
from edsr_dist.errors import UserError
from edsr_dist.evaluation.benchmark_sets import validation_source
from edsr_dist.evaluation.command import folder_images

TILE = 24
SCALES = (2, 3, 4)


def build(*args: str) -> int:
    return build_main([*args, "--no-progress"])


def test_df2k_shaped_store_from_two_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    div2k = make_hr_folder(tmp_path / "DIV2K_train_HR", [(48, 72), (60, 48)], seed=1)
    flickr = make_hr_folder(tmp_path / "Flickr2K_HR", [(72, 72), (48, 48), (36, 96)], seed=2)
    valid = make_hr_folder(tmp_path / "DIV2K_valid_HR", [(48, 60)], seed=3)
    for folder, images, seed in (("DIV2K_train_LR", div2k, 4), ("Flickr2K_LR", flickr, 5), ("DIV2K_valid_LR", valid, 6)):
        make_official_lr(tmp_path / folder, images, SCALES, seed=seed)
    out = tmp_path / "df2k.h5"
    assert build("--hr-dir", str(tmp_path / "DIV2K_train_HR"), "--lr-dir", str(tmp_path / "DIV2K_train_LR"),
                 "--hr-dir", str(tmp_path / "Flickr2K_HR"), "--lr-dir", str(tmp_path / "Flickr2K_LR"),
                 "--valid-hr-dir", str(tmp_path / "DIV2K_valid_HR"), "--valid-lr-dir", str(tmp_path / "DIV2K_valid_LR"),
                 "--tile-size", str(TILE), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "33 training tiles of 24px from 5 images, 1 validation images" in printed
    info = store_info(str(out))
    roles = [(s["role"], Path(s["hr"]).name, Path(s["lr"]).name, s["images"]) for s in info["sources"]]
    assert roles == [("train", "DIV2K_train_HR", "DIV2K_train_LR", 2), ("train", "Flickr2K_HR", "Flickr2K_LR", 3),
                     ("valid", "DIV2K_valid_HR", "DIV2K_valid_LR", 1)]
    assert json.loads(info["attrs"]["sources"]) == info["sources"]  # stored as an HDF5 attribute
    # Each image's tiles: DIV2K 48x72 -> 2x3, 60x48 -> 3x2; Flickr 72x72 -> 3x3, 48x48 -> 2x2, 36x96 -> 2x4.
    assert [s["tiles"] for s in info["sources"]] == [12, 21, 0] and info["num_train_tiles"] == 33
    with h5py.File(out, "r") as f:
        assert f["train/source_index"][()].tolist() == [0, 0, 1, 1, 1]
        assert [n.decode() for n in f["train/names"][()]] == ["0001", "0002", "0001", "0002", "0003"]
        assert f["valid/source_index"][()].tolist() == [2] and f["valid/names"][()].tolist() == [b"0001"]
    # Validation apart: the validation image is the validation folder's, whole; training tiles come from the others.
    store = PatchStore(str(out), 2)
    name, _, valid_hr = store.read_valid(0)
    np.testing.assert_array_equal(valid_hr, valid["0001"])
    assert store.num_train_images == 5 and store.train_image_size.tolist() == [[48, 72], [60, 48], [72, 72],
                                                                               [48, 48], [36, 96]]
    assert "2 images, 12 tiles" in printed and "3 images, 21 tiles" in printed
    assert verify_store(str(out))["checked"] == 4 * (33 + 1)


def tile_store(tmp_path: Path, sizes: list[tuple[int, int]], scales=(2,), tile: int = TILE) -> tuple[Path, list]:
    rng = np.random.default_rng(11)
    images = [smooth_image(rng, h, w) for h, w in sizes]
    sources = [SourceImage(f"img{i}", img.shape[:2], lambda img=img: img) for i, img in enumerate(images)]
    path = tmp_path / "tiles.h5"
    write_store(str(path), [SourceFolder("train", "synthetic", sources)], scales, tile, "bicubic-pil", "test")
    return path, images


def test_every_pixel_of_every_training_image_is_reachable(tmp_path: Path) -> None:
    # Sizes that are no multiple of the tile: the last row/column of tiles overlaps the one before.
    path, images = tile_store(tmp_path, [(60, 84), (24, 24), (50, 31)])
    store = PatchStore(str(path), 2)
    patch = 5
    sampler = TrainSampler(store, 4, patch, seed=0, steps_per_epoch=0)
    for image, hr in enumerate(images):
        height, width = hr.shape[0] // 2, hr.shape[1] // 2  # LR size (the store crops to a multiple of 2)
        lr_whole = pil_bicubic_downscale(hr, 2)
        # 1. The positions the sampler can choose: the union over the image's anchor tiles of their strata
        #    (each stratum is every integer between its ends) is every position of the image.
        tiles = np.flatnonzero(store.train_image_index == image)
        reachable_y, reachable_x = set(), set()
        for tile in tiles:
            _, y0, x0 = sampler.crop_position(int(tile), 0, 0)
            _, y1, x1 = sampler.crop_position(int(tile), 2**32 - 1, 2**32 - 1)
            reachable_y |= set(range(y0, y1 + 1))
            reachable_x |= set(range(x0, x1 + 1))
        assert reachable_y == set(range(height - patch + 1)) and reachable_x == set(range(width - patch + 1))
        # 2. Every crop at every position holds exactly the image's pixels there (LR and HR), so the crops
        #    together show every pixel: share of pixels reachable = 100 %.
        seen = np.zeros((height, width), dtype=bool)
        for y in sorted(reachable_y):
            for x in sorted(reachable_x):
                lr, hr_crop = store.read_train_crop(image, y, x, patch)
                assert lr.tobytes() == lr_whole[y:y + patch, x:x + patch].tobytes()
                assert hr_crop.tobytes() == hr[2 * y:2 * (y + patch), 2 * x:2 * (x + patch)].tobytes()
                seen[y:y + patch, x:x + patch] = True
        assert seen.all()


def test_crop_positions_are_uniform_over_the_image(tmp_path: Path) -> None:
    # One 60x84 image at x2: LR 30x42, tiles 12 (3 x 4 grid, the last ones overlapping), patch 5: 26 x 38 positions.
    path, _ = tile_store(tmp_path, [(60, 84)])
    sampler = TrainSampler(PatchStore(str(path), 2), 4, 5, seed=0, steps_per_epoch=0)
    rng = np.random.default_rng(0)
    draws = 26 * 38 * 40
    counts = np.zeros((26, 38))
    tiles = rng.integers(0, sampler.num_tiles, draws)  # anchors uniform, as over a pass
    words = rng.integers(0, 2**32, (draws, 2))
    for tile, (word_y, word_x) in zip(tiles, words):
        _, y, x = sampler.crop_position(int(tile), int(word_y), int(word_x))
        counts[y, x] += 1
    # Chi-square against the uniform distribution over all 988 positions: 987 degrees of freedom, mean 987 and
    # standard deviation about 44; crops confined to their tile (format 1) give about 28,000 here.
    expected = draws / counts.size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 987 + 6 * 44, chi2


def test_too_small_images_are_named_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_hr_folder(tmp_path / "hr", [(48, 48), (20, 60), (60, 23), (30, 30)])
    out = tmp_path / "s.h5"
    assert build("--hr-dir", str(tmp_path / "hr"), "--tile-size", str(TILE), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert ("note: 2 image(s) smaller than one 24px tile were left out: 0002 (60x20), 0003 (23x60); a smaller "
            "--tile-size keeps them") in printed
    info = store_info(str(out))
    assert info["sources"][0]["skipped_small"] == ["0002 (60x20)", "0003 (23x60)"]
    assert info["num_train_images"] == 2 and info["num_train_tiles"] == 4 + 1  # 48x48: 2x2; 30x30 -> 24x24: 1


def traced_peak(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_building_and_verifying_keep_memory_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Images are decoded one at a time as the build reaches them, so the peak does not grow with their number.
    image = smooth_image(np.random.default_rng(5), 240, 360)

    def build_from(count: int) -> Path:
        sources = [SourceImage(f"i{k}", image.shape[:2], lambda: image.copy()) for k in range(count)]
        out = tmp_path / f"n{count}.h5"
        write_store(str(out), [SourceFolder("train", "synthetic", sources)], SCALES, 48, "bicubic-pil", "test")
        return out

    few = traced_peak(lambda: build_from(2))
    many_store: list[Path] = []
    many = traced_peak(lambda: many_store.append(build_from(12)))
    one_image = image.nbytes
    assert many < few + one_image, (few, many)  # 10 more images cost less than one more image
    # --verify reads the tiles in blocks: with 256 KiB blocks it never holds a fifth of this 4.7 MiB store.
    size = many_store[0].stat().st_size
    assert size > 4 << 20
    whole = traced_peak(lambda: verify_store(str(many_store[0])))  # the default 64 MiB block: all of it at once
    monkeypatch.setattr(store_module, "VERIFY_BLOCK_BYTES", 1 << 18)
    blocks = traced_peak(lambda: verify_store(str(many_store[0])))
    assert blocks < size / 5 < whole, (blocks, size, whole)


def test_jpeg_and_other_formats_as_training_and_evaluation_data(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(9)
    folder = tmp_path / "photos"
    folder.mkdir()
    images = {}
    for stem, suffix in (("a", ".jpg"), ("b", ".JPEG"), ("c", ".bmp"), ("d", ".tiff"), ("e", ".webp"), ("f", ".png")):
        images[stem] = smooth_image(rng, 48, 72)
        options = {"lossless": True} if suffix == ".webp" else {}
        Image.fromarray(images[stem]).save(folder / f"{stem}{suffix}", **options)
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\0" * 10)
    out = tmp_path / "photos.h5"
    assert build("--hr-dir", str(folder), "--tile-size", str(TILE), "--valid-count", "1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"note: {folder}: skipped 2 file(s) that are not images (Thumbs.db, notes.txt)" in printed
    assert f"note: {folder}: 2 of 6 images are JPEG (lossy); their compression artefacts become part of the " \
           "ground truth" in printed
    store = PatchStore(str(out), 2)
    assert store.num_train_images == 5 and store.valid_names == ["f"]
    # Lossless formats arrive bit for bit: the first tile of the BMP image (third in name order) is its corner.
    _, hr_tile = store.read_train(int(store.train_first_tile[2]))
    np.testing.assert_array_equal(hr_tile, images["c"][:TILE, :TILE])
    # Folder evaluation reads the same formats (names in sorted order, JPEG decoded by Pillow).
    names = [name for name, _, _ in folder_images(folder, 2)]
    assert names == ["a", "b", "c", "d", "e", "f"]


def test_a_store_without_validation_images_is_refused_for_training(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    make_hr_folder(tmp_path / "hr", [(48, 48)])
    out = tmp_path / "novalid.h5"
    assert build("--hr-dir", str(tmp_path / "hr"), "--tile-size", str(TILE), "--out", str(out)) == 0
    assert "note: no validation images in this store; `edsr-dist train` refuses it" in capsys.readouterr().out
    store = PatchStore(str(out), 2)
    with pytest.raises(UserError, match=r"has no validation images, so training would have nothing to report; "
                                        r"rebuild it with --valid-count K or --valid-hr-dir DIR, or pass "
                                        r"--val-benchmark"):
        validation_source(Config(), store)
    benchmark = tmp_path / "Set1"
    make_hr_folder(benchmark, [(48, 48)], seed=3)
    assert validation_source(Config(val_benchmark=str(benchmark)), store).count == 1  # validates on that set


def test_cached_sample_store_of_another_format_is_rebuilt(tmp_path: Path, sample_store: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDSR_DIST_CACHE", str(tmp_path))
    path = Path(default_sample_store_path())
    assert path.parent == tmp_path and f"_v{store_module.FORMAT_VERSION}_" in path.name  # a new version, a new file
    path.write_bytes(sample_store.read_bytes())
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1  # as if an older edsr-dist had cached it under this name
    assert ensure_sample_store() == str(path)
    assert store_info(str(path))["attrs"]["format_version"] == store_module.FORMAT_VERSION


def test_progress_bar_shows_images_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = smooth_image(np.random.default_rng(2), 48, 72)
    sources = [SourceImage(f"i{k}", image.shape[:2], lambda: image) for k in range(3)]
    write_store(str(tmp_path / "p.h5"), [SourceFolder("train", "synthetic", sources[:2]),
                                         SourceFolder("valid", "synthetic", sources[2:])],
                (2,), TILE, "bicubic-pil", "test", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # 2 x 6 tiles of 24x24 HR + 12x12 LR (25,920 bytes) and one whole 48x72 image with its LR (12,960): 38 KiB.
    assert "build-store: 100%" in bar and "38.0k/38.0k" in bar and "3/3 images" in bar, bar
