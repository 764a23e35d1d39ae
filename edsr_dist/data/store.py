"""The HDF5 patch store: format constants, the per-process reader and a full checksum pass.

Format version 2 (docs/STORE.md has the full description)::

    /                 attrs: format_version=2, scales, tile_size, degradation, source, sources (JSON: each folder,
                             its role and image count), checksum="crc32", created, builder_version
    /train/hr         (N, T, T, 3) uint8, one tile per chunk, uncompressed
    /train/lr_x{s}    (N, T/s, T/s, 3) uint8, LR tile i is exactly the downscale region of HR tile i
    /train/hr_crc32, /train/lr_x{s}_crc32   (N,) uint32, CRC32 of each tile's bytes (C order)
    /train/image_index (N,) int32 index into /train/names; /train/tile_origin (N, 2) int32 HR (y, x)
    /train/names      (M,) str; /train/image_size (M, 2) int32 covered HR (h, w); /train/source_index (M,) int32
    /valid/hr/{i:04d}, /valid/lr_x{s}/{i:04d}   whole images, HR cropped to a multiple of lcm(scales)
    /valid/names, /valid/source_index, /valid/hr_crc32, /valid/lr_x{s}_crc32

Each training image (cropped to a multiple of lcm(scales)) is covered whole by a row-major grid of tiles: a
tile every T pixels from the top-left corner, the last row and column anchored at the bottom and right edges
(overlapping the one before). `tile_starts` and `axis_segments` are that geometry, shared by builder and reader.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Callable

import h5py
import numpy as np
from tqdm import tqdm

from edsr_dist.errors import UserError

FORMAT_VERSION = 2
CHECKSUM = "crc32"
REBUILD_HINT = "rebuild it with `edsr-dist build-store`"

# Each training tile is read once per visit at a random position, so a chunk cache only adds a copy: with a
# cache smaller than one chunk HDF5 reads uncompressed chunks straight into the caller's buffer.
_CHUNK_CACHE_BYTES = 0
# `--verify` reads this many bytes of tiles at a time: a store of tens of GB is never read whole.
VERIFY_BLOCK_BYTES = 64 << 20


def lr_name(scale: int) -> str:
    return f"lr_x{scale}"


def valid_key(index: int) -> str:
    return f"{index:04d}"


def tile_starts(length: int, tile: int) -> list[int]:
    """Tile origins along one axis that cover [0, length) whole: every `tile` pixels from 0, the last one anchored
    at the end (overlapping the one before it). None when `length < tile`."""
    if length < tile:
        return []
    count = -(-length // tile)
    return [k * tile for k in range(count - 1)] + [length - tile]


def axis_segments(start: int, size: int, length: int, tile: int) -> list[tuple[int, int, int, int]]:
    """How [start, start + size) of an axis of `length` tiled by `tile_starts` is read: (tile number, offset in
    that tile, offset in the output, count) per piece. Pixel u is read from tile min(u // tile, last), so the
    overlap of the last tile is never read twice."""
    last = -(-length // tile) - 1
    pieces = []
    position, stop = start, start + size
    while position < stop:
        k = min(position // tile, last)
        origin = k * tile if k < last else length - tile
        end = (k + 1) * tile if k < last else length
        count = min(end, stop) - position
        pieces.append((k, position - origin, position - start, count))
        position += count
    return pieces


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles covering an image of that (covered) size."""
    return len(tile_starts(height, tile)), len(tile_starts(width, tile))


def crc32_of(array: np.ndarray) -> int:
    """CRC32 of an array's bytes in C order (how tiles are laid out in their chunk)."""
    return zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _open_h5(path: str) -> Any:
    """Open read-only, turning every way a file can be unreadable into a one-line UserError."""
    if not os.path.exists(path):
        raise UserError(f"patch store {path} does not exist; build one with `edsr-dist build-store` (or --sample)")
    if os.path.isdir(path):
        raise UserError(
            f"patch store {path} is a folder, not a file; pass the .h5 file built by `edsr-dist build-store`"
        )
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise UserError(f"patch store {path} cannot be read ({exc}); check the path and its permissions") from None
    if not is_hdf5:
        raise UserError(f"patch store {path} is not an HDF5 file; pass a store built by `edsr-dist build-store`")
    try:
        return h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
    except OSError as exc:
        # A file cut short (copy interrupted, disk full) fails here: HDF5 compares the end-of-file address.
        detail = " ".join(str(exc).split())
        raise UserError(f"patch store {path} is truncated or damaged ({detail}); {REBUILD_HINT}") from None


def _read_layout(f: Any, path: str, scales: list[int] | None) -> dict[str, Any]:
    """Check attributes and datasets (for `scales`, or every scale when None); return the metadata."""
    attrs = f.attrs
    store_scales, tile_size = _check_attributes(attrs, path)
    wanted = store_scales if scales is None else scales
    for scale in wanted:
        if scale not in store_scales:
            have = ", ".join(f"x{s}" for s in store_scales)
            raise UserError(
                f"patch store {path} holds scales {have}, not x{scale}; choose one of those scales "
                f"or build a store with --scales including {scale}"
            )
    num_tiles, num_images, image_size, image_index = _check_train(f, path, tile_size, wanted)
    valid_names = _check_valid(f, path, wanted)
    return {
        "scales": store_scales,
        "tile_size": tile_size,
        "num_train_tiles": num_tiles,
        "num_train_images": num_images,
        "train_image_size": image_size,
        "train_image_index": np.asarray(image_index, dtype=np.int64),
        "valid_names": valid_names,
        "degradation": _decode(attrs.get("degradation", "")),
        "source": _decode(attrs.get("source", "")),
        "sources": _sources(attrs, path),
    }


def _check_attributes(attrs: Any, path: str) -> tuple[list[int], int]:
    """The store's format version, scales, tile size and checksum kind, each present and one this reader knows:
    (scales, tile size)."""
    if "format_version" not in attrs:
        raise UserError(f"patch store {path} has no format_version attribute (not an edsr-dist store); {REBUILD_HINT}")
    version = int(attrs["format_version"])
    if version != FORMAT_VERSION:
        raise UserError(
            f"patch store {path} has format_version {version}, this edsr-dist reads version {FORMAT_VERSION}; "
            f"{REBUILD_HINT}"
        )
    for key in ("scales", "tile_size", "checksum"):
        if key not in attrs:
            raise UserError(f"patch store {path} lacks the {key!r} attribute; {REBUILD_HINT}")
    store_scales = [int(s) for s in np.atleast_1d(attrs["scales"])]
    tile_size = int(attrs["tile_size"])
    if _decode(attrs["checksum"]) != CHECKSUM:
        raise UserError(
            f"patch store {path} uses checksum {_decode(attrs['checksum'])!r}, expected {CHECKSUM!r}; {REBUILD_HINT}"
        )
    return store_scales, tile_size


def _dataset(f: Any, path: str, name: str) -> Any:
    """Dataset or group `name` of the store, which must be there."""
    obj = f.get(name)
    if obj is None:
        raise UserError(f"patch store {path} is missing dataset /{name}; {REBUILD_HINT}")
    return obj


def _dataset_of_shape(f: Any, path: str, name: str, shape: tuple[int, ...]) -> Any:
    """Dataset `name` of the store, which must be there with exactly that shape."""
    ds = _dataset(f, path, name)
    if tuple(ds.shape) != shape:
        raise UserError(
            f"patch store {path}: /{name} has shape {tuple(ds.shape)}, expected {shape}; {REBUILD_HINT}"
        )
    return ds


def _check_train(f: Any, path: str, tile_size: int, wanted: list[int]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The training tiles: every dataset there with matching shapes, and the tiles stored in the order of each
    image's grid. Returns (tiles, images, covered image sizes, image of each tile)."""
    hr = _dataset(f, path, "train/hr")
    if len(hr.shape) != 4 or tuple(hr.shape[1:]) != (tile_size, tile_size, 3) or hr.dtype != np.uint8:
        raise UserError(
            f"patch store {path}: /train/hr is {hr.dtype}{tuple(hr.shape)}, expected uint8 (N, {tile_size}, "
            f"{tile_size}, 3); {REBUILD_HINT}"
        )
    num_tiles = int(hr.shape[0])
    _dataset_of_shape(f, path, "train/hr_crc32", (num_tiles,))
    image_index = _dataset_of_shape(f, path, "train/image_index", (num_tiles,))[()]
    train_names = _dataset(f, path, "train/names")
    num_images = int(train_names.shape[0])
    image_size = np.asarray(_dataset_of_shape(f, path, "train/image_size", (num_images, 2))[()], dtype=np.int64)
    _dataset_of_shape(f, path, "train/source_index", (num_images,))
    _dataset_of_shape(f, path, "train/tile_origin", (num_tiles, 2))
    # The reader finds an image's tiles by counting its grid: the stored order must be exactly that.
    counts = [rows * cols for rows, cols in (tile_grid(int(h), int(w), tile_size) for h, w in image_size)]
    if sum(counts) != num_tiles or not np.array_equal(np.repeat(np.arange(num_images), counts), image_index):
        raise UserError(f"patch store {path}: /train/image_index does not match the tile grids of "
                        f"/train/image_size; {REBUILD_HINT}")
    for scale in wanted:
        lr_tile = tile_size // scale
        _dataset_of_shape(f, path, f"train/{lr_name(scale)}", (num_tiles, lr_tile, lr_tile, 3))
        _dataset_of_shape(f, path, f"train/{lr_name(scale)}_crc32", (num_tiles,))
    return num_tiles, num_images, image_size, image_index


def _check_valid(f: Any, path: str, wanted: list[int]) -> list[str]:
    """The validation images: indexes of the right length, and each image's low-resolution versions the size
    its scale makes of the high-resolution one. Returns the images' names."""
    valid_names = [_decode(n) for n in _dataset(f, path, "valid/names")[()]]
    num_valid = len(valid_names)
    _dataset_of_shape(f, path, "valid/hr_crc32", (num_valid,))
    _dataset_of_shape(f, path, "valid/source_index", (num_valid,))
    for scale in wanted:
        _dataset_of_shape(f, path, f"valid/{lr_name(scale)}_crc32", (num_valid,))
    for index in range(num_valid):
        hr_img = _dataset(f, path, f"valid/hr/{valid_key(index)}")
        height, width = hr_img.shape[:2]
        for scale in wanted:
            _dataset_of_shape(f, path, f"valid/{lr_name(scale)}/{valid_key(index)}",
                              (height // scale, width // scale, 3))
    return valid_names


def _sources(attrs: Any, path: str) -> list[dict[str, Any]]:
    if "sources" not in attrs:
        raise UserError(f"patch store {path} lacks the 'sources' attribute; {REBUILD_HINT}")
    try:
        sources = json.loads(_decode(attrs["sources"]))
    except ValueError:
        raise UserError(f"patch store {path}: the 'sources' attribute is not JSON; {REBUILD_HINT}") from None
    return sources


def _read_or_fail(path: str, what: str, reader: Callable[[], np.ndarray]) -> np.ndarray:
    try:
        return reader()
    except OSError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(
            f"patch store {path}: reading {what} failed ({detail}); the file is damaged; {REBUILD_HINT}"
        ) from None


def _check_crc(path: str, what: str, data: np.ndarray, expected: int) -> None:
    actual = crc32_of(data)
    if actual != expected:
        raise UserError(
            f"patch store {path}: checksum mismatch in {what} (stored {expected:08x}, read {actual:08x}); "
            f"the file is damaged; {REBUILD_HINT}"
        )


class PatchStore:
    """Reader for one scale of a patch store. Safe to pickle and to use after fork: the HDF5 handle is opened
    lazily in the process that reads and reopened when the process id changes."""

    def __init__(self, path: str, scale: int) -> None:
        self.path = os.fspath(path)
        self.scale = int(scale)
        with _open_h5(self.path) as f:
            layout = _read_layout(f, self.path, [self.scale])
            lr = lr_name(self.scale)
            # Checksums are small (4 bytes a tile); keep them in memory for every read.
            self._train_hr_crc = np.asarray(f["train/hr_crc32"][()], dtype=np.uint32)
            self._train_lr_crc = np.asarray(f[f"train/{lr}_crc32"][()], dtype=np.uint32)
            self._valid_hr_crc = np.asarray(f["valid/hr_crc32"][()], dtype=np.uint32)
            self._valid_lr_crc = np.asarray(f[f"valid/{lr}_crc32"][()], dtype=np.uint32)
        self.scales: list[int] = layout["scales"]
        self.tile_size: int = layout["tile_size"]
        self.lr_tile_size: int = self.tile_size // self.scale
        self.num_train_tiles: int = layout["num_train_tiles"]
        # Per training image: covered HR size, tile grid and first tile (a few bytes each, kept in memory).
        self.train_image_size: np.ndarray = layout["train_image_size"]
        self.train_image_index: np.ndarray = layout["train_image_index"]
        self.num_train_images: int = layout["num_train_images"]
        grids = [tile_grid(int(h), int(w), self.tile_size) for h, w in self.train_image_size]
        self.train_grid: np.ndarray = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
        counts = self.train_grid[:, 0] * self.train_grid[:, 1]
        self.train_first_tile: np.ndarray = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.sources: list[dict[str, Any]] = layout["sources"]
        self.valid_names: list[str] = layout["valid_names"]
        self.num_valid: int = len(self.valid_names)
        self.degradation: str = layout["degradation"]
        self.source: str = layout["source"]
        self._file: Any = None
        self._pid: int | None = None
        self._hr_ds: Any = None
        self._lr_ds: Any = None

    def __repr__(self) -> str:
        return (
            f"PatchStore({self.path!r}, scale={self.scale}, tiles={self.num_train_tiles}, "
            f"tile_size={self.tile_size}, valid={self.num_valid})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _hr_ds=None, _lr_ds=None)
        return state

    def _handle(self) -> Any:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # A handle inherited through fork shares HDF5 state with the parent: never use it, open a new one.
            self._file = self._hr_ds = self._lr_ds = None
            self._file = _open_h5(self.path)
            self._pid = pid
            self._hr_ds = self._file["train/hr"]
            self._lr_ds = self._file[f"train/{lr_name(self.scale)}"]
        return self._file

    def read_train(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, hr) uint8 HWC tiles of training tile `index`, checksums verified."""
        if not 0 <= index < self.num_train_tiles:
            raise IndexError(f"training tile {index} out of range 0..{self.num_train_tiles - 1}")
        self._handle()
        lr_path = f"/train/{lr_name(self.scale)}"
        hr = _read_or_fail(self.path, f"/train/hr[{index}]", lambda: self._hr_ds[index])
        lr = _read_or_fail(self.path, f"{lr_path}[{index}]", lambda: self._lr_ds[index])
        _check_crc(self.path, f"/train/hr[{index}]", hr, int(self._train_hr_crc[index]))
        _check_crc(self.path, f"{lr_path}[{index}]", lr, int(self._train_lr_crc[index]))
        return lr, hr

    def read_train_crop(self, image: int, y: int, x: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, hr) of the `size`-square LR crop at LR (y, x) of training image `image` and the HR region it
        covers, put together from the (at most four) tiles it spans; checksums verified."""
        s, lr_tile = self.scale, self.lr_tile_size
        height, width = (int(v) // s for v in self.train_image_size[image])
        if not (0 <= y <= height - size and 0 <= x <= width - size):
            raise IndexError(f"crop {size} at ({y}, {x}) outside LR image {image} of {height}x{width}")
        cols = int(self.train_grid[image, 1])
        first = int(self.train_first_tile[image])
        lr = np.empty((size, size, 3), dtype=np.uint8)
        hr = np.empty((size * s, size * s, 3), dtype=np.uint8)
        for row, src_y, dst_y, count_y in axis_segments(y, size, height, lr_tile):
            for col, src_x, dst_x, count_x in axis_segments(x, size, width, lr_tile):
                lr_part, hr_part = self.read_train(first + row * cols + col)
                lr[dst_y:dst_y + count_y, dst_x:dst_x + count_x] = \
                    lr_part[src_y:src_y + count_y, src_x:src_x + count_x]
                hr[dst_y * s:(dst_y + count_y) * s, dst_x * s:(dst_x + count_x) * s] = \
                    hr_part[src_y * s:(src_y + count_y) * s, src_x * s:(src_x + count_x) * s]
        return lr, hr

    def read_valid(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(name, lr, hr) of validation image `index`, whole, checksums verified."""
        if not 0 <= index < self.num_valid:
            raise IndexError(f"validation image {index} out of range 0..{self.num_valid - 1}")
        f = self._handle()
        hr_path = f"/valid/hr/{valid_key(index)}"
        lr_path = f"/valid/{lr_name(self.scale)}/{valid_key(index)}"
        hr = _read_or_fail(self.path, hr_path, lambda: f[hr_path][()])
        lr = _read_or_fail(self.path, lr_path, lambda: f[lr_path][()])
        _check_crc(self.path, hr_path, hr, int(self._valid_hr_crc[index]))
        _check_crc(self.path, lr_path, lr, int(self._valid_lr_crc[index]))
        return self.valid_names[index], lr, hr

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._hr_ds = self._lr_ds = None
        self._pid = None

    def __enter__(self) -> "PatchStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_info(path: str) -> dict[str, Any]:
    """Attributes and sizes of a store (all scales checked structurally, no checksum pass)."""
    with _open_h5(os.fspath(path)) as f:
        layout = _read_layout(f, os.fspath(path), None)
        layout["attrs"] = {
            key: (_decode(v) if isinstance(v, (bytes, str)) else np.asarray(v).tolist()) for key, v in f.attrs.items()
        }
    return layout


def verify_store(path: str, progress: bool = False) -> dict[str, Any]:
    """Full checksum pass over every tile and validation image of every scale.

    Returns the store's layout plus `checked` (entries verified). Raises UserError naming the damaged
    entries (the first few and the count) when any checksum differs or a read fails.
    """
    path = os.fspath(path)
    damaged: list[str] = []
    checked = 0
    with _open_h5(path) as f:
        layout = _read_layout(f, path, None)
        groups = ["hr"] + [lr_name(s) for s in layout["scales"]]
        total = layout["num_train_tiles"] * len(groups) + len(layout["valid_names"]) * len(groups)
        with tqdm(total=total, desc="verify", unit="entry", disable=not progress, leave=False) as bar:
            for group in groups:
                ds = f[f"train/{group}"]
                crcs = np.asarray(f[f"train/{group}_crc32"][()], dtype=np.uint32)
                # Read in blocks of tiles: a full pass is I/O bound, and one call per tile costs more.
                block = max(1, VERIFY_BLOCK_BYTES // max(1, int(np.prod(ds.shape[1:]))))
                for start in range(0, ds.shape[0], block):
                    stop = min(start + block, ds.shape[0])
                    try:
                        tiles = ds[start:stop]
                    except OSError:
                        tiles = None
                    for offset in range(stop - start):
                        index = start + offset
                        if tiles is None:
                            try:
                                tile = ds[index]
                            except OSError:
                                damaged.append(f"/train/{group}[{index}] (unreadable)")
                                continue
                        else:
                            tile = tiles[offset]
                        if crc32_of(tile) != int(crcs[index]):
                            damaged.append(f"/train/{group}[{index}]")
                        checked += 1
                    bar.update(stop - start)
            for group in groups:
                crcs = np.asarray(f[f"valid/{group}_crc32"][()], dtype=np.uint32)
                for index in range(len(layout["valid_names"])):
                    name = f"/valid/{group}/{valid_key(index)}"
                    try:
                        image = f[name][()]
                    except OSError:
                        damaged.append(f"{name} (unreadable)")
                        continue
                    if crc32_of(image) != int(crcs[index]):
                        damaged.append(name)
                    checked += 1
                    bar.update(1)
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise UserError(f"patch store {path}: {len(damaged)} damaged entries ({shown}); {REBUILD_HINT}")
    layout["checked"] = checked
    return layout
