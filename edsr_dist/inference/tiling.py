"""Tiled forward passes and the x8 self-ensemble, shared by every inference backend (PyTorch, ONNX Runtime).

Numpy only at import: the ONNX Runtime backend serves without torch. A backend hands in its network as a
function from an (N, 3, h, w) LR array in [0, 255] to the (N, 3, sh, sw) output, and an `ArrayOps` for the few
operations that differ between torch tensors and numpy arrays.

Tiling: each LR tile is cut with `pad` extra LR pixels of real context on every side (fewer at the image
border), run through the network, and only the tile's own part of the output is kept. With `pad` at least
the network's receptive-field radius the result equals the whole-image pass up to float rounding, because
no output pixel that is kept ever sees the zero padding at a tile's cut edge. Every window has the same size
(tile + 2 pad, or the image side): windows at the border and the last, shorter tile are shifted inwards and
carry more context instead, so one image (and every image at least that large) runs one input shape, which a
just-in-time compiling device (Ascend before 910B1) compiles once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Network = Callable[[Any], Any]


@dataclass(frozen=True)
class ArrayOps:
    """The array operations tiling and self-ensemble need, for one array library."""

    new_output: Callable[[tuple, Any], Any]  # (shape, a network output) -> float32 array on its device
    rot90: Callable[[Any, int], Any]  # (x, k) -> x turned k quarter turns over the last two axes
    flip: Callable[[Any], Any]  # mirror the last axis
    float32: Callable[[Any], Any]


NUMPY_OPS = ArrayOps(
    new_output=lambda shape, like: np.empty(shape, dtype=np.float32),
    rot90=lambda x, k: np.rot90(x, k, axes=(-2, -1)),
    flip=lambda x: np.flip(x, -1),
    float32=lambda x: np.asarray(x, dtype=np.float32),
)


def forward_tiled(network: Network, lr, tile: int, pad: int, scale: int, ops: ArrayOps):
    """(N, 3, H, W) LR in [0, 255] -> (N, 3, sH, sW) float32, tile by tile (tile = LR side, 0 = whole image)."""
    n, _, height, width = lr.shape
    if tile <= 0 or (tile >= height and tile >= width):
        return ops.float32(network(lr))
    pad = max(int(pad), 0)
    out = None
    for top in range(0, height, tile):
        bottom = min(top + tile, height)
        for left in range(0, width, tile):
            right = min(left + tile, width)
            y0, y1 = _window(top, bottom, tile, pad, height)
            x0, x1 = _window(left, right, tile, pad, width)
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


def run_tiled(network: Network, lr, scale: int, tile: int, pad: int, ensemble: bool, ops: ArrayOps):
    """The whole inference of one batch: tiles, and the self-ensemble around them when asked for."""
    def tiled(x):
        return forward_tiled(network, x, tile=tile, pad=pad, scale=scale, ops=ops)

    return self_ensemble(tiled, lr, ops) if ensemble else tiled(lr)


def auto_tile(lr_shape, num_filters: int, device_type: str) -> int:
    """Whole image (0) when its feature maps fit comfortably, else 256-px LR tiles."""
    height, width = lr_shape[:2]
    feature_bytes = height * width * num_filters * 4 * 4  # a few live fp32 feature maps
    budget = 8 * 2 ** 30 if device_type != "cpu" else 4 * 2 ** 30
    return 0 if feature_bytes <= budget else 256


def check_rgb_uint8(img) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image as a writable, C-contiguous array; ValueError for anything else."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"super-resolution takes an RGB uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if not (img.flags.writeable and img.flags.c_contiguous):  # e.g. np.asarray of a PIL image
        img = img.copy()
    return img
