"""Cut DIV2K-style image folders (or the embedded sample photos) into an HDF5 patch store (the command line is
`edsr-dist build-store`, edsr_dist/data/build_store.py).

A store is made from one or more folders (DF2K is DIV2K + Flickr2K), each recorded with its role and image count.
Training images, cropped to a multiple of lcm(scales), are covered whole by HR tiles: one every T pixels from the
top-left corner, the last row and column anchored at the bottom and right edges (edsr_dist/data/store.py
`tile_starts`). Images smaller than one tile give none and are named in the summary. LR tiles are cut from the LR
of the whole image, so LR tile i covers exactly the region of HR tile i. Validation images are stored whole, HR
cropped (bottom/right) to a multiple of lcm(scales) so that every LR size is exact.

Building streams: one image (and one row of its tiles) is in memory at a time. The file is written to a temporary
file and renamed over `<out>` only when complete (edsr_dist/state/atomic.py).
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from edsr_dist import __version__
from edsr_dist.data.images import find_image, image_size, list_images, listing_notes, load_image_rgb, no_images_message
from edsr_dist.data.resize import downscale
from edsr_dist.data.store import CHECKSUM, FORMAT_VERSION, crc32_of, lr_name, tile_starts, valid_key
from edsr_dist.errors import DiskFull, UserError
from edsr_dist.state.atomic import atomic_path

DEFAULT_TILE_SIZE = 192
DEFAULT_SCALES = (2, 3, 4)
OFFICIAL_DEGRADATION = "official"


@dataclass
class SourceFolder:
    """One folder of images and its role in the store ("train" or "valid"); `hr`/`lr` say where they came from,
    `skipped` names the files of the folder that were not images."""

    role: str
    hr: str
    images: list["SourceImage"]
    lr: str | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, for the user (skipped files, lossy JPEGs)


@dataclass
class SourceImage:
    """One image to store: its name, HR size (height, width), how to load it and, for official LR, where."""

    name: str
    size: tuple[int, int]
    load_hr: Callable[[], np.ndarray]
    lr_files: dict[int, Path] | None = None  # scale -> official LR file; None means generate

    def load_lr(self, scale: int, hr: np.ndarray, method: str) -> np.ndarray:
        if self.lr_files is None:
            return downscale(hr, scale, method)
        lr = load_image_rgb(self.lr_files[scale])
        expected = (hr.shape[0] // scale, hr.shape[1] // scale)
        if lr.shape[:2] != expected:
            raise UserError(_lr_size_message(self.lr_files[scale], lr.shape[:2], expected, self.name, scale))
        return lr


def _lr_size_message(path: Path, got: tuple[int, ...], expected: tuple[int, int], name: str, scale: int) -> str:
    return (
        f"LR image {path} is {got[1]}x{got[0]} (WxH) but HR {name} / {scale} is {expected[1]}x{expected[0]}; "
        f"check that the LR folder matches the HR folder and scale"
    )


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


def _list_folder(folder: str, flag: str) -> tuple[list[Path], list[Path]]:
    path = Path(folder)
    if not path.exists():
        raise UserError(f"{flag} {folder} does not exist; pass the folder that holds the HR images")
    if not path.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass the folder that holds the HR images")
    files, skipped = list_images(path)
    if not files:
        raise UserError(no_images_message(flag, path, skipped))
    return files, skipped


def _official_lr_files(hr_files: list[Path], lr_dir: str, flag: str, scales: Sequence[int]) -> list[dict[int, Path]]:
    """Locate `<lr_dir>/X{s}/<stem>x{s}.<image suffix>` for every HR image and check its size (header only)."""
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
        height, width = image_size(hr_path)
        files = {}
        for scale in scales:
            lr_path = find_image(subfolders[scale], f"{hr_path.stem}x{scale}")
            if lr_path is None:
                raise UserError(
                    f"LR image {subfolders[scale] / f'{hr_path.stem}x{scale}.png'} for HR {hr_path.name} is "
                    f"missing; complete {flag} or drop it to generate bicubic LR"
                )
            got = image_size(lr_path)
            expected = (height // scale, width // scale)
            if got != expected:
                raise UserError(_lr_size_message(lr_path, got, expected, hr_path.name, scale))
            files[scale] = lr_path
        result.append(files)
    return result


def folder_source(
    role: str, hr_dir: str, lr_dir: str | None, scales: Sequence[int], hr_flag: str = "--hr-dir",
    lr_flag: str = "--lr-dir",
) -> SourceFolder:
    """A folder of HR images (any format in edsr_dist/data/images.py), with official LR from `lr_dir` or None."""
    hr_files, skipped = _list_folder(hr_dir, hr_flag)
    lr_files: list[dict[int, Path] | None]
    if lr_dir:
        lr_files = list(_official_lr_files(hr_files, lr_dir, lr_flag, scales))
    else:
        lr_files = [None] * len(hr_files)
    images = [SourceImage(hr_path.stem, image_size(hr_path), lambda p=hr_path: load_image_rgb(p), lr)
              for hr_path, lr in zip(hr_files, lr_files)]
    return SourceFolder(role, os.path.abspath(hr_dir), images, os.path.abspath(lr_dir) if lr_dir else None,
                        [p.name for p in skipped], listing_notes(Path(hr_dir), hr_files, skipped))


def covered_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The part of an image a store keeps: cropped bottom/right to a multiple of lcm(scales), so that every
    tile origin (and every LR size) is exact at every scale."""
    return size[0] - size[0] % multiple, size[1] - size[1] % multiple


def check_output_file(out: str) -> None:
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {path / 'store.h5'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: folder {parent} is not writable; choose another --out")


STORE_SPACE_MARGIN = 1 << 20  # bytes beyond the tiles and images: HDF5's own structures, the checksums
_NEVER_FREED: list[BaseException] = []  # see write_store


def write_store(
    out: str,
    folders: Sequence[SourceFolder],
    scales: Sequence[int],
    tile_size: int,
    degradation: str,
    source: str,
    resize_method: str = "bicubic-pil",
    progress: bool = False,
) -> dict[str, object]:
    """Write a complete store atomically (edsr_dist/state/atomic.py) from `folders` (in order). Returns a summary of
    what was written: counts, the images too small for a tile, and one record per folder (also stored, as JSON,
    in the `sources` attribute)."""
    out = os.fspath(out)
    scales = sorted(int(s) for s in scales)
    check_tile_size(tile_size, scales)
    check_output_file(out)
    multiple = math.lcm(*scales)
    train, valid, records = _place_tiles(folders, tile_size, multiple)
    num_tiles = sum(len(ys) * len(xs) for _, _, ys, xs in train)
    side = {0: tile_size}
    side.update({s: tile_size // s for s in scales})
    groups = {0: "hr"}
    groups.update({s: lr_name(s) for s in scales})
    bytes_per_tile = sum(3 * length * length for length in side.values())
    total_bytes = num_tiles * bytes_per_tile + sum(_valid_bytes(img, multiple, scales) for _, img in valid)
    total_images = len(train) + len(valid)

    _check_free_space(out, total_bytes)
    started = time.monotonic()
    try:
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f:
                _write_attributes(f, scales, tile_size, degradation, source, records)
                train_group = _create_train_group(f, train, multiple)
                bar = tqdm(total=total_bytes, desc="build-store", unit="B", unit_scale=True, unit_divisor=1024,
                           disable=not progress)
                done_images = _write_train(train_group, train, groups, side, num_tiles, resize_method, bar,
                                           total_images, bytes_per_tile)
                valid_group = _create_valid_group(f, valid)
                _write_valid(valid_group, valid, groups, multiple, resize_method, bar, done_images, total_images,
                             scales)
                bar.close()
    except OSError as exc:
        raise _write_failure(out, exc) from None
    return {
        "out": out,
        "degradation": degradation,
        "train_images": len(train),
        "train_tiles": num_tiles,
        "skipped_small": [name for record in records for name in record["skipped_small"]],
        "valid_images": len(valid),
        "sources": records,
        "bytes": os.path.getsize(out),
        "seconds": time.monotonic() - started,
    }


def _valid_bytes(img: SourceImage, multiple: int, scales: list[int]) -> int:
    """Bytes a validation image takes in the store: the HR crop and its LR versions (for the progress bar and the
    free-space check)."""
    height, width = covered_size(img.size, multiple)
    return 3 * height * width + sum(3 * (height // s) * (width // s) for s in scales)


def _check_free_space(out: str, total_bytes: int) -> None:
    """Refuse before writing when the store cannot fit: HDF5 that hits a full disk mid-write leaves its objects in a
    state whose release crashes the process."""
    folder = os.path.dirname(os.path.abspath(out))
    free = shutil.disk_usage(folder).free
    if free < total_bytes + STORE_SPACE_MARGIN:
        raise DiskFull(f"writing store {out} failed (it needs about {(total_bytes + STORE_SPACE_MARGIN) / 2**20:.1f} "
                       f"MiB, {folder} has {free / 2**20:.1f} MiB free); check free space and permissions of its "
                       "folder, or pass --out elsewhere; nothing was written")


def _create_train_group(f, train: list, multiple: int):
    """The `train` group with its per-image index (names, covered sizes, source folders); tiles come after."""
    train_group = f.create_group("train")
    train_group.create_dataset("names", data=np.asarray([img.name for _, img, _, _ in train], dtype=object),
                               dtype=h5py.string_dtype("utf-8"))
    train_group.create_dataset("image_size", data=np.asarray(
        [covered_size(img.size, multiple) for _, img, _, _ in train], dtype=np.int32).reshape(-1, 2))
    train_group.create_dataset("source_index", data=np.asarray([n for n, _, _, _ in train], np.int32))
    return train_group


def _create_valid_group(f, valid: list):
    """The `valid` group with its per-image index (names, source folders); the images come after."""
    valid_group = f.create_group("valid")
    valid_group.create_dataset("names", data=np.asarray([img.name for _, img in valid], dtype=object),
                               dtype=h5py.string_dtype("utf-8"))
    valid_group.create_dataset("source_index", data=np.asarray([n for n, _ in valid], np.int32))
    return valid_group


def _write_failure(out: str, exc: OSError) -> UserError:
    """The one-line error for a store write that failed (DiskFull for a full disk or quota), marked to end the
    process at once. h5py objects of a file whose writes failed crash the process when freed (a segmentation fault,
    seen with h5py 3 on a full tmpfs): keep them (the exception's frames hold them) until the process ends, and have
    it end without freeing them. The temporary file is already removed (atomic_path)."""
    _NEVER_FREED.append(exc)
    reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
    kind = DiskFull if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else UserError
    failure = kind(f"writing store {out} failed ({reason}); check free space and permissions of its "
                   "folder; nothing was written")
    failure.end_process_at_once = True
    return failure


def _write_attributes(f, scales: list[int], tile_size: int, degradation: str, source: str, records: list) -> None:
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["scales"] = np.asarray(scales, dtype=np.int64)
    f.attrs["tile_size"] = tile_size
    f.attrs["degradation"] = degradation
    f.attrs["source"] = source
    f.attrs["sources"] = json.dumps(records)
    f.attrs["checksum"] = CHECKSUM
    f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    f.attrs["builder_version"] = f"edsr-dist {__version__}"


def _place_tiles(folders: Sequence[SourceFolder], tile_size: int, multiple: int):
    """(train images with their tile origins, validation images, one record per folder), in folder order."""
    train: list[tuple[int, SourceImage, list[int], list[int]]] = []  # (folder, image, tile y origins, x origins)
    valid: list[tuple[int, SourceImage]] = []
    records: list[dict[str, object]] = []
    for number, folder in enumerate(folders):
        if folder.role not in ("train", "valid"):
            raise ValueError(f"folder role {folder.role!r} is neither 'train' nor 'valid'")
        small: list[str] = []
        tiles = 0
        for img in folder.images:
            height, width = covered_size(img.size, multiple)
            if folder.role == "valid":
                if height == 0 or width == 0:
                    raise UserError(
                        f"validation image {img.name} is {img.size[1]}x{img.size[0]}, smaller than "
                        f"lcm(scales)={multiple}; remove it"
                    )
                valid.append((number, img))
                continue
            ys, xs = tile_starts(height, tile_size), tile_starts(width, tile_size)
            if not ys or not xs:
                small.append(f"{img.name} ({img.size[1]}x{img.size[0]})")
                continue
            train.append((number, img, ys, xs))
            tiles += len(ys) * len(xs)
        records.append({"role": folder.role, "hr": folder.hr, "lr": folder.lr,
                        "images": len(folder.images) - len(small), "tiles": tiles,
                        "skipped_small": small, "skipped_files": list(folder.skipped)})
    return train, valid, records


def _write_train(train_group, train, groups: dict[int, str], side: dict[int, int], num_tiles: int, resize_method,
                 bar, total_images: int, bytes_per_tile: int) -> int:
    """The train tiles of every scale with their CRCs, image index and origins; returns the images written."""
    tile_ds = {}
    for key, name in groups.items():
        shape = (num_tiles, side[key], side[key], 3)
        # One tile per chunk (a read touches exactly one chunk); maxshape lets an empty store be chunked too.
        tile_ds[key] = train_group.create_dataset(
            name, shape=shape, dtype=np.uint8, chunks=(1,) + shape[1:], maxshape=(None,) + shape[1:]
        )
    tile_crc = {key: np.zeros(num_tiles, dtype=np.uint32) for key in groups}
    image_index = np.zeros(num_tiles, dtype=np.int32)
    tile_origin = np.zeros((num_tiles, 2), dtype=np.int32)

    done_images = 0
    cursor = 0
    for number, (_, img, ys, xs) in enumerate(train):
        hr = _loaded_hr(img)
        for key in groups:
            image = hr if key == 0 else img.load_lr(key, hr, resize_method)
            factor = max(key, 1)
            for row, y in enumerate(ys):
                # One row of tiles at a time: memory stays at one image plus one row, whatever its size.
                tiles = np.stack([image[y // factor: y // factor + side[key],
                                        x // factor: x // factor + side[key]] for x in xs])
                start = cursor + row * len(xs)
                tile_ds[key][start:start + len(xs)] = tiles
                tile_crc[key][start:start + len(xs)] = [crc32_of(t) for t in tiles]
            del image
        count = len(ys) * len(xs)
        image_index[cursor:cursor + count] = number
        tile_origin[cursor:cursor + count] = [(y, x) for y in ys for x in xs]
        cursor += count
        done_images += 1
        bar.set_postfix_str(f"{done_images}/{total_images} images", refresh=False)
        bar.update(count * bytes_per_tile)
    for key, name in groups.items():
        train_group.create_dataset(f"{name}_crc32", data=tile_crc[key])
    train_group.create_dataset("image_index", data=image_index)
    train_group.create_dataset("tile_origin", data=tile_origin)
    return done_images


def _write_valid(valid_group, valid, groups: dict[int, str], multiple: int, resize_method, bar, done_images: int,
                 total_images: int, scales: list[int]) -> None:
    """The validation images, whole (cropped to a multiple of every scale), with their CRCs."""
    valid_crc = {key: np.zeros(len(valid), dtype=np.uint32) for key in groups}
    for name in groups.values():
        valid_group.create_group(name)
    for index, (_, img) in enumerate(valid):
        hr = _loaded_hr(img)
        height, width = covered_size(img.size, multiple)
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
        done_images += 1
        bar.set_postfix_str(f"{done_images}/{total_images} images", refresh=False)
        bar.update(_valid_bytes(img, multiple, scales))
    for key, name in groups.items():
        valid_group.create_dataset(f"{name}_crc32", data=valid_crc[key])


def _loaded_hr(img: SourceImage) -> np.ndarray:
    hr = img.load_hr()
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise UserError(
            f"image {img.name} decoded to {hr.dtype}{hr.shape}, expected uint8 RGB; convert it to 8-bit RGB"
        )
    if tuple(hr.shape[:2]) != tuple(img.size):
        raise UserError(f"image {img.name} changed size while building ({hr.shape[:2]} vs {img.size}); rerun the build")
    return hr
