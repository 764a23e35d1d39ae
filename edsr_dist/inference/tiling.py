"""Tiled forward passes and the x8 self-ensemble, shared by every inference backend (PyTorch, ONNX Runtime), and how
large a tile the free memory allows.

Numpy and psutil only at import: the ONNX Runtime backend serves without torch. A backend hands in its network as a
function from an (N, 3, h, w) LR array in [0, 255] to the (N, 3, sh, sw) output, and an `ArrayOps` for the few
operations that differ between torch tensors and numpy arrays.

Tiling: each LR tile is cut with `pad` extra LR pixels of real context on every side (fewer at the image
border), run through the network, and only the tile's own part of the output is kept. With `pad` at least
the network's receptive-field radius the result equals the whole-image pass up to float rounding, because
no output pixel that is kept ever sees the zero padding at a tile's cut edge. Every window has the same size
(tile + 2 pad, or the image side): windows at the border and the last, shorter tile are shifted inwards and
carry more context instead, so one image (and every image at least that large) runs one input shape, which a
just-in-time compiling device (Ascend before 910B1) compiles once.

Memory: `upscale` keeps the image in uint8 from end to end. Each window is made float on its way into the network,
its self-ensemble (when asked for) is summed for that window alone, and its kept part is rounded to uint8 into the
uint8 output as soon as it is done, so the peak is the uint8 input and output plus one window's working set, whatever
the image size. `auto_tile` sizes that window from the memory that is free.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil

Network = Callable[[Any], Any]

GIB = 2 ** 30
SMALLEST_TILE = 16
# Rows of a tile's output rounded to uint8 at a time: the rounding works in float64 (`to_uint8`), so a whole large
# window at once would briefly take 2-3 times the window's float32 output.
ROUND_ROWS = 256


@dataclass(frozen=True)
class ArrayOps:
    """The array operations tiling and self-ensemble need, for one array library."""

    new_output: Callable[[tuple, Any], Any]  # (shape, a network output) -> float32 array on its device
    rot90: Callable[[Any, int], Any]  # (x, k) -> x turned k quarter turns over the last two axes
    flip: Callable[[Any], Any]  # mirror the last axis
    float32: Callable[[Any], Any]
    to_network: Callable[[np.ndarray], Any]  # (h, w, 3) uint8 numpy -> (1, 3, h, w) float32 where the network runs
    to_uint8: Callable[[Any], np.ndarray]  # (1, 3, h, w) output -> (h, w, 3) uint8 numpy, clamped and rounded


class TileMemoryError(MemoryError):
    """A window or the output did not fit; `advice` says what would (a smaller --tile, or the memory needed)."""

    def __init__(self, advice: str):
        super().__init__(advice)
        self.advice = advice


def windows(height: int, width: int, tile: int, pad: int) -> Iterator[tuple[int, int, int, int, int, int, int, int]]:
    """(top, bottom, left, right) of each tile with (y0, y1, x0, x1) of its input window; tile 0 = one whole window."""
    if tile <= 0 or (tile >= height and tile >= width):
        yield 0, height, 0, width, 0, height, 0, width
        return
    pad = max(int(pad), 0)
    for top in range(0, height, tile):
        bottom = min(top + tile, height)
        for left in range(0, width, tile):
            right = min(left + tile, width)
            yield (top, bottom, left, right) + _window(top, bottom, tile, pad, height) + _window(left, right, tile,
                                                                                               pad, width)


def forward_tiled(network: Network, lr, tile: int, pad: int, scale: int, ops: ArrayOps):
    """(N, 3, H, W) LR in [0, 255] -> (N, 3, sH, sW) float32, tile by tile (tile = LR side, 0 = whole image).

    The float form of `upscale`'s tiling, with the same windows: what the exactness of tiles is checked on."""
    n, _, height, width = lr.shape
    if tile <= 0 or (tile >= height and tile >= width):
        return ops.float32(network(lr))
    out = None
    for top, bottom, left, right, y0, y1, x0, x1 in windows(height, width, tile, pad):
        piece = network(lr[:, :, y0:y1, x0:x1])
        if out is None:
            out = ops.new_output((n, piece.shape[1], height * scale, width * scale), piece)
        oy, ox = (top - y0) * scale, (left - x0) * scale
        out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
            ops.float32(piece[:, :, oy:oy + (bottom - top) * scale, ox:ox + (right - left) * scale])
    return out


def _window(start: int, stop: int, tile: int, pad: int, side: int) -> tuple[int, int]:
    """The input window for the tile [start, stop): tile + 2 pad wide (at most the side), covering the tile and at
    least `pad` real pixels on each side where the image has them."""
    size = min(tile + 2 * pad, side)
    first = min(max(start - pad, 0), side - size)
    return first, first + size


def self_ensemble(network: Network, lr, ops: ArrayOps):
    """Geometric x8 self-ensemble: 4 rotations x (no flip, horizontal flip), undone on the outputs, averaged."""
    total = None
    for flip in (False, True):
        for turns in range(4):
            x = ops.flip(lr) if flip else lr
            x = ops.rot90(x, turns)
            y = ops.rot90(ops.float32(network(x)), -turns)
            y = ops.flip(y) if flip else y
            total = y if total is None else total + y
    return total / 8.0


def upscale(network: Network, img: np.ndarray, scale: int, num_filters: int, pad: int, tile: int | None,
            ensemble: bool, ops: ArrayOps, free_bytes: Callable[[], int], on_host: bool) -> np.ndarray:
    """The whole inference of one RGB uint8 (H, W, 3) image -> (sH, sW, 3) uint8: window by window, each one's
    self-ensemble when asked for (a window holds the context its kept part depends on, so ensembling it equals
    ensembling the whole image), each finished tile rounded straight into the uint8 output.

    tile None: `auto_tile` from `free_bytes()`, the memory the windows run in (`on_host`: the host's, which the
    output takes its share of first); out of memory raises `TileMemoryError` saying what would fit."""
    height, width = img.shape[:2]
    output_bytes = height * scale * width * scale * 3
    if tile is None:
        tile = auto_tile(img.shape, scale, num_filters, pad, free_bytes() - (output_bytes if on_host else 0), ensemble,
                         on_host)
    failed = False
    try:
        out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
        for top, bottom, left, right, y0, y1, x0, x1 in windows(height, width, tile, pad):
            x = ops.to_network(img[y0:y1, x0:x1])
            y = self_ensemble(network, x, ops) if ensemble else network(x)
            oy, ox = (top - y0) * scale, (left - x0) * scale
            rows, cols = (bottom - top) * scale, (right - left) * scale
            for band in range(0, rows, ROUND_ROWS):
                stop = min(band + ROUND_ROWS, rows)
                out[top * scale + band:top * scale + stop, left * scale:right * scale] = \
                    ops.to_uint8(y[:, :, oy + band:oy + stop, ox:ox + cols])
            del x, y
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        failed = True  # advised below, once the failed window's memory is released with the exception
    if failed:
        out = None
        raise TileMemoryError(memory_advice(img.shape, scale, num_filters, pad, tile, free_bytes(), ensemble))
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError is a RuntimeError saying "out of memory"; torch's CPU allocator says "can't allocate
    # memory"; ONNX Runtime says "Failed to allocate"; numpy raises MemoryError.
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        words in text for words in ("out of memory", "can't allocate memory", "failed to allocate"))


# ---- how large a tile fits --------------------------------------------------------------------------------------

# Live fp32 maps of `num_filters` channels per LR pixel of a window in an EDSR forward (the block's input, its two
# convolutions' outputs, the global skip, the layout copies oneDNN makes around a convolution), and those of the
# upsampler, per scale^2 (its maps have scale^2 times the channels, or the pixels). Measured peaks on the CPU were
# 36 B per pixel and filter at x2 and 147 at x4 (64 filters, eager and frozen graph alike; BENCHMARKS.md "sr
# memory"); these give 52 and 160.
MAPS_PER_FILTER = 4
UPSAMPLER_MAPS_PER_FILTER = 2.25
# What `--tile` left out lets one window on the host take at most: with the process's own ~0.3 GB (torch, the model) the peak
# then stays within the uint8 output + 1 GB (the target BENCHMARKS.md "sr memory" measures; ONNX Runtime's windows
# take up to 1.3x this estimate), at the price of recomputing the pad around tiles of images larger than this
# (`--tile 0` runs them whole).
# A wide model's window may take more, up to a tile of AUTO_MIN_TILE_PADS pads, so that no more than (1 + 2/8)^2 =
# 1.56 times the pixels are computed.
AUTO_WINDOW_BYTES = 3 * GIB // 8
AUTO_MIN_TILE_PADS = 8


def window_bytes(height: int, width: int, scale: int, num_filters: int, ensemble: bool = False) -> int:
    """Estimated peak working memory of one (height x width) LR window through EDSR of this width and scale."""
    pixels = height * width
    features = pixels * num_filters * 4 * (MAPS_PER_FILTER + UPSAMPLER_MAPS_PER_FILTER * scale * scale)
    images = pixels * 3 * 4 * (1 + scale * scale * (6 if ensemble else 4))  # input; output, copies (ensemble sum)
    return int(features + images)


def largest_tile(shape, scale: int, num_filters: int, pad: int, budget: int, ensemble: bool = False) -> int:
    """0 (the whole image) when its one window fits `budget` bytes, else the largest tile whose window does, evened
    out so the image's longer side splits into equal tiles (least padding recomputed); SMALLEST_TILE - 1 (below any
    tile) when not even that fits."""
    height, width = shape[:2]
    if window_bytes(height, width, scale, num_filters, ensemble) <= budget:
        return 0
    per_pixel = window_bytes(1, 1, scale, num_filters, ensemble)
    largest = int(math.isqrt(max(budget, 0) // per_pixel)) - 2 * pad
    if largest < SMALLEST_TILE:
        return SMALLEST_TILE - 1
    side = max(height, width)
    return -(-side // -(-side // largest))  # ceil(side / the fewest tiles of at most `largest`)


def auto_tile(shape, scale: int, num_filters: int, pad: int, free_bytes: int, ensemble: bool = False,
              on_host: bool = True) -> int:
    """The tile `--tile` left out means: the whole image if its window fits half of `free_bytes` (the other half
    for the estimate's error and for what other processes take meanwhile) and, on the host, AUTO_WINDOW_BYTES (or a
    window of AUTO_MIN_TILE_PADS pads), else the largest tile that does. A device's windows are bounded by its own
    memory only: the host's peak target does not apply to them, and whole images are the fastest pass."""
    budget = free_bytes // 2
    if on_host:
        window = (AUTO_MIN_TILE_PADS + 2) * pad
        budget = min(max(AUTO_WINDOW_BYTES, window_bytes(window, window, scale, num_filters, ensemble)), budget)
    tile = largest_tile(shape, scale, num_filters, pad, budget, ensemble)
    return tile if tile == 0 else max(tile, SMALLEST_TILE)


def memory_advice(shape, scale: int, num_filters: int, pad: int, tile: int, free_bytes: int,
                  ensemble: bool = False) -> str:
    """What would fit after `tile` (0 = whole) did not: a smaller --tile, or the memory one would need. Never `tile`."""
    height, width = shape[:2]
    fit = largest_tile(shape, scale, num_filters, pad, free_bytes // 2, ensemble)
    tried = tile if 0 < tile < max(height, width) else max(height, width)
    if fit == 0 or fit >= tried:  # the estimate said it fits: halve what failed instead
        fit = tried // 2
    if fit >= SMALLEST_TILE:
        return f"pass --tile {fit}"
    window = min(SMALLEST_TILE + 2 * pad, height), min(SMALLEST_TILE + 2 * pad, width)
    need = 2 * window_bytes(*window, scale, num_filters, ensemble)
    return (f"even --tile {SMALLEST_TILE} needs about {need / GIB:.1f} GiB free and {free_bytes / GIB:.1f} GiB is; "
            "free memory, or run on a machine with more")


def host_free_bytes() -> int:
    """Memory this process can still take: what the machine has available (psutil), within this process's address
    space limit (ulimit -v) and its cgroup's memory limit (a container's) where those are set."""
    free = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        free = min(free, soft - psutil.Process().memory_info().vms)
    free = min(free, _cgroup_headroom())
    return max(free, 0)


def _cgroup_headroom() -> int:
    """cgroup v2's memory.max - memory.current (the kernel's cgroup-v2 interface files); unlimited elsewhere."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        used = int((folder / "memory.current").read_text())
    except (OSError, ValueError):
        return 2 ** 62
    return 2 ** 62 if limit == "max" else int(limit) - used


def check_rgb_uint8(img) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image as a writable, C-contiguous array; ValueError for anything else."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"super-resolution takes an RGB uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if not (img.flags.writeable and img.flags.c_contiguous):  # e.g. np.asarray of a PIL image
        img = img.copy()
    return img
