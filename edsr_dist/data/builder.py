"""Cut DIV2K-style PNG folders (or the embedded sample photos) into an HDF5 patch store (the command line is
`edsr-dist build-store`, edsr_dist/data/build_store.py).

Training images become non-overlapping HR tiles laid from the top-left corner; the partial tiles at the right and
bottom edges are dropped (an image smaller than one tile gives none). LR tiles are cut from the LR of the whole
image, so LR tile i covers exactly the region of HR tile i. Validation images are stored whole, HR cropped
(bottom/right) to a multiple of lcm(scales) so that every LR size is exact.

The file is written to a temporary file and renamed over `<out>` only when complete (edsr_dist/atomic.py).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from edsr_dist import __version__
from edsr_dist.atomic import atomic_path
from edsr_dist.data.resize import downscale
from edsr_dist.data.store import CHECKSUM, FORMAT_VERSION, crc32_of, lr_name, valid_key
from edsr_dist.errors import UserError

DEFAULT_TILE_SIZE = 192
DEFAULT_SCALES = (2, 3, 4)
OFFICIAL_DEGRADATION = "official"


@dataclass
class SourceImage:
    """One image to store: its name, HR size (height, width), how to load it and, for official LR, where."""

    name: str
    size: tuple[int, int]
    load_hr: Callable[[], np.ndarray]
    lr_files: dict[int, Path] | None = None  # scale -> official LR PNG; None means generate

    def load_lr(self, scale: int, hr: np.ndarray, method: str) -> np.ndarray:
        if self.lr_files is None:
            return downscale(hr, scale, method)
        lr = load_png_rgb(self.lr_files[scale])
        expected = (hr.shape[0] // scale, hr.shape[1] // scale)
        if lr.shape[:2] != expected:
            raise UserError(_lr_size_message(self.lr_files[scale], lr.shape[:2], expected, self.name, scale))
        return lr


def _lr_size_message(path: Path, got: tuple[int, ...], expected: tuple[int, int], name: str, scale: int) -> str:
    return (
        f"LR image {path} is {got[1]}x{got[0]} (WxH) but HR {name} / {scale} is {expected[1]}x{expected[0]}; "
        f"check that the LR folder matches the HR folder and scale"
    )


def load_png_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HWC RGB (grey, palette and alpha images are converted)."""
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); replace or remove the file") from None


def _png_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); replace or remove the file") from None
    return height, width


def parse_scales(text: str) -> list[int]:
    try:
        scales = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(
            f"--scales {text!r} is not a comma-separated list of integers; use e.g. --scales 2,3,4"
        ) from None
    if not scales or any(s < 2 for s in scales):
        raise UserError(f"--scales {text!r}: every scale must be an integer >= 2; use e.g. --scales 2,3,4")
    return scales


def check_tile_size(tile_size: int, scales: Sequence[int]) -> None:
    if tile_size <= 0:
        raise UserError(f"--tile-size {tile_size} must be positive; use e.g. --tile-size 192")
    bad = [s for s in scales if tile_size % s]
    if bad:
        multiple = math.lcm(*scales)
        raise UserError(
            f"--tile-size {tile_size} is not divisible by scale {bad[0]}; use a multiple of {multiple} "
            f"(e.g. {max(multiple, tile_size // multiple * multiple)})"
        )


def _list_pngs(folder: str, flag: str) -> list[Path]:
    path = Path(folder)
    if not path.exists():
        raise UserError(f"{flag} {folder} does not exist; pass the folder that holds the HR PNG images")
    if not path.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass the folder that holds the HR PNG images")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise UserError(f"{flag} {folder} holds no .png files; pass the folder with the HR PNG images (DIV2K_train_HR)")
    return files


def _official_lr_files(hr_files: list[Path], lr_dir: str, flag: str, scales: Sequence[int]) -> list[dict[int, Path]]:
    """Locate `<lr_dir>/X{s}/<stem>x{s}.png` for every HR image and check its size (header only)."""
    root = Path(lr_dir)
    if not root.is_dir():
        raise UserError(f"{flag} {lr_dir} does not exist or is not a folder; pass the DIV2K LR folder holding X2/X3/X4")
    subfolders: dict[int, Path] = {}
    for scale in scales:
        for candidate in (root / f"X{scale}", root / f"x{scale}"):
            if candidate.is_dir():
                subfolders[scale] = candidate
                break
        else:
            raise UserError(
                f"{flag} {lr_dir} has no X{scale} subfolder; expected the DIV2K layout X{scale}/0001x{scale}.png, "
                f"or drop {flag} to generate bicubic LR"
            )
    result = []
    for hr_path in hr_files:
        height, width = _png_size(hr_path)
        files = {}
        for scale in scales:
            lr_path = subfolders[scale] / f"{hr_path.stem}x{scale}.png"
            if not lr_path.is_file():
                raise UserError(
                    f"LR image {lr_path} for HR {hr_path.name} is missing; complete {flag} "
                    f"or drop it to generate bicubic LR"
                )
            got = _png_size(lr_path)
            expected = (height // scale, width // scale)
            if got != expected:
                raise UserError(_lr_size_message(lr_path, got, expected, hr_path.name, scale))
            files[scale] = lr_path
        result.append(files)
    return result


def images_from_folder(
    hr_dir: str, lr_dir: str | None, scales: Sequence[int], hr_flag: str = "--hr-dir", lr_flag: str = "--lr-dir"
) -> list[SourceImage]:
    hr_files = _list_pngs(hr_dir, hr_flag)
    lr_files: list[dict[int, Path] | None]
    if lr_dir:
        lr_files = list(_official_lr_files(hr_files, lr_dir, lr_flag, scales))
    else:
        lr_files = [None] * len(hr_files)
    images = []
    for hr_path, lr in zip(hr_files, lr_files):
        images.append(SourceImage(hr_path.stem, _png_size(hr_path), lambda p=hr_path: load_png_rgb(p), lr))
    return images


def _tiles(image: np.ndarray, side: int, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, side, side, C) tiles in row-major order from the top-left corner."""
    channels = image.shape[2]
    block = image[: rows * side, : cols * side].reshape(rows, side, cols, side, channels)
    return np.ascontiguousarray(block.transpose(0, 2, 1, 3, 4).reshape(-1, side, side, channels))


def check_output_file(out: str) -> None:
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {path / 'store.h5'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: folder {parent} is not writable; choose another --out")


def write_store(
    out: str,
    train: Sequence[SourceImage],
    valid: Sequence[SourceImage],
    scales: Sequence[int],
    tile_size: int,
    degradation: str,
    source: str,
    resize_method: str = "bicubic-pil",
    progress: bool = False,
) -> dict[str, object]:
    """Write a complete store atomically (edsr_dist/atomic.py). Returns a summary of what was written."""
    out = os.fspath(out)
    scales = sorted(int(s) for s in scales)
    check_tile_size(tile_size, scales)
    check_output_file(out)
    multiple = math.lcm(*scales)
    grid = [(img.size[0] // tile_size, img.size[1] // tile_size) for img in train]
    num_tiles = sum(rows * cols for rows, cols in grid)
    for img in valid:
        if img.size[0] < multiple or img.size[1] < multiple:
            raise UserError(
                f"validation image {img.name} is {img.size[1]}x{img.size[0]}, smaller than "
                f"lcm(scales)={multiple}; remove it"
            )

    started = time.monotonic()
    try:
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["scales"] = np.asarray(scales, dtype=np.int64)
                f.attrs["tile_size"] = tile_size
                f.attrs["degradation"] = degradation
                f.attrs["source"] = source
                f.attrs["checksum"] = CHECKSUM
                f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                f.attrs["builder_version"] = f"edsr-dist {__version__}"

                text = h5py.string_dtype("utf-8")
                train_group = f.create_group("train")
                train_group.create_dataset("names", data=np.asarray([img.name for img in train], dtype=object),
                                           dtype=text)
                side = {0: tile_size}
                side.update({s: tile_size // s for s in scales})
                groups = {0: "hr"}
                groups.update({s: lr_name(s) for s in scales})
                tile_ds = {}
                for key, name in groups.items():
                    shape = (num_tiles, side[key], side[key], 3)
                    # One tile per chunk (a read touches exactly one chunk); maxshape lets an empty store be
                    # chunked too.
                    tile_ds[key] = train_group.create_dataset(
                        name, shape=shape, dtype=np.uint8, chunks=(1,) + shape[1:], maxshape=(None,) + shape[1:]
                    )
                tile_crc = {key: np.zeros(num_tiles, dtype=np.uint32) for key in groups}
                image_index = np.zeros(num_tiles, dtype=np.int32)
                tile_origin = np.zeros((num_tiles, 2), dtype=np.int32)

                bar = tqdm(total=len(train) + len(valid), desc="build-store", unit="img", disable=not progress)
                cursor = 0
                for number, (img, (rows, cols)) in enumerate(zip(train, grid)):
                    count = rows * cols
                    if count:
                        hr = _loaded_hr(img)
                        stop = cursor + count
                        for key in groups:
                            image = hr if key == 0 else img.load_lr(key, hr, resize_method)
                            tiles = _tiles(image, side[key], rows, cols)
                            tile_ds[key][cursor:stop] = tiles
                            tile_crc[key][cursor:stop] = [crc32_of(t) for t in tiles]
                        image_index[cursor:stop] = number
                        ys, xs = np.meshgrid(np.arange(rows) * tile_size, np.arange(cols) * tile_size, indexing="ij")
                        tile_origin[cursor:stop] = np.stack([ys.ravel(), xs.ravel()], axis=1)
                        cursor = stop
                    bar.update(1)
                for key, name in groups.items():
                    train_group.create_dataset(f"{name}_crc32", data=tile_crc[key])
                train_group.create_dataset("image_index", data=image_index)
                train_group.create_dataset("tile_origin", data=tile_origin)

                valid_group = f.create_group("valid")
                valid_group.create_dataset("names", data=np.asarray([img.name for img in valid], dtype=object),
                                           dtype=text)
                valid_crc = {key: np.zeros(len(valid), dtype=np.uint32) for key in groups}
                for key, name in groups.items():
                    valid_group.create_group(name)
                for index, img in enumerate(valid):
                    hr = _loaded_hr(img)
                    height = hr.shape[0] - hr.shape[0] % multiple
                    width = hr.shape[1] - hr.shape[1] % multiple
                    hr_cropped = np.ascontiguousarray(hr[:height, :width])
                    for key, name in groups.items():
                        if key == 0:
                            image = hr_cropped
                        elif img.lr_files is None:
                            image = img.load_lr(key, hr_cropped, resize_method)
                        else:
                            # The official LR covers the uncropped HR; its top-left part matches the crop exactly.
                            full_lr = img.load_lr(key, hr, resize_method)
                            image = np.ascontiguousarray(full_lr[: height // key, : width // key])
                        valid_group[name].create_dataset(valid_key(index), data=image)
                        valid_crc[key][index] = crc32_of(image)
                    bar.update(1)
                bar.close()
                for key, name in groups.items():
                    valid_group.create_dataset(f"{name}_crc32", data=valid_crc[key])
    except BaseException as exc:
        if isinstance(exc, OSError):
            raise UserError(
                f"writing store {out} failed ({exc}); check free space and permissions of its folder"
            ) from None
        raise
    return {
        "out": out,
        "degradation": degradation,
        "train_images": len(train),
        "train_tiles": num_tiles,
        "skipped_small": sum(1 for rows, cols in grid if rows * cols == 0),
        "valid_images": len(valid),
        "bytes": os.path.getsize(out),
        "seconds": time.monotonic() - started,
    }


def _loaded_hr(img: SourceImage) -> np.ndarray:
    hr = img.load_hr()
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise UserError(
            f"image {img.name} decoded to {hr.dtype}{hr.shape}, expected uint8 RGB; convert it to 8-bit RGB PNG"
        )
    if tuple(hr.shape[:2]) != tuple(img.size):
        raise UserError(f"image {img.name} changed size while building ({hr.shape[:2]} vs {img.size}); rerun the build")
    return hr
