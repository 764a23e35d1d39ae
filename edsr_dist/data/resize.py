"""Bicubic downscaling used to make LR images when no official LR folder is given.

Two flavours (docs/STORE.md compares them):

* ``bicubic-pil``: Pillow's ``Image.resize(..., BICUBIC)``. Antialiased (the cubic kernel is stretched by the
  scale factor), Keys kernel with a = -0.5, pixel-centre alignment. Fast (C), but it rounds to uint8 between
  the horizontal and the vertical pass and renormalises the kernel at the image border.
* ``bicubic-matlab-style``: a float64 NumPy re-implementation of the algorithm MATLAB's ``imresize`` documents
  (same kernel and alignment, symmetric padding at the border, one rounding at the end). Slower; use it when
  LR images should match the usual MATLAB-made benchmark LR as closely as possible.

Both downscale by an integer factor after cropping the image to a multiple of that factor (bottom/right),
so the LR image is exactly ``(H // s, W // s)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEGRADATIONS = ("bicubic-pil", "bicubic-matlab-style")


def modcrop(image: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom/right edge so both sides are multiples of ``multiple``."""
    height = image.shape[0] - image.shape[0] % multiple
    width = image.shape[1] - image.shape[1] % multiple
    return image[:height, :width]


def downscale(image: np.ndarray, scale: int, method: str = "bicubic-pil") -> np.ndarray:
    """Downscale a uint8 HWC RGB image by an integer factor (after modcrop to the factor)."""
    if method == "bicubic-pil":
        return pil_bicubic_downscale(image, scale)
    if method == "bicubic-matlab-style":
        return matlab_style_bicubic_downscale(image, scale)
    raise ValueError(f"unknown downscaling method {method!r}; choose one of {', '.join(DEGRADATIONS)}")


def pil_bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    cropped = np.ascontiguousarray(modcrop(image, scale))
    height, width = cropped.shape[:2]
    resized = Image.fromarray(cropped).resize((width // scale, height // scale), Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _cubic(x: np.ndarray) -> np.ndarray:
    # Keys cubic convolution kernel with a = -0.5 (the one MATLAB and Pillow use).
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _matlab_contributions(in_length: int, out_length: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices (out, taps) into the input and their weights for a resize by `factor` (out/in).

    Downscaling stretches the kernel by 1/factor (antialiasing, as imresize does by default); upscaling uses it
    as it is."""
    antialias = factor < 1
    kernel_width = 4.0 / factor if antialias else 4.0
    out_pos = np.arange(1, out_length + 1, dtype=np.float64)
    centre = out_pos / factor + 0.5 * (1.0 - 1.0 / factor)  # 1-based input coordinate of each output pixel
    left = np.floor(centre - kernel_width / 2.0)
    taps = int(np.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based
    if antialias:
        weights = factor * _cubic(factor * (centre[:, None] - indices))
    else:
        weights = _cubic(centre[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric (mirror) padding at both borders, as MATLAB does.
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    zero_based = mirror[np.mod(indices.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)
    return zero_based[:, keep], weights[:, keep]


def _matlab_style_resize(image: np.ndarray, out_height: int, out_width: int, factor: float) -> np.ndarray:
    pixels = image.astype(np.float64)
    # Rows first, then columns, in float64; one rounding at the end.
    indices, weights = _matlab_contributions(pixels.shape[0], out_height, factor)
    rows = np.zeros((indices.shape[0],) + pixels.shape[1:], dtype=np.float64)
    for tap in range(indices.shape[1]):
        rows += weights[:, tap, None, None] * pixels[indices[:, tap]]
    indices, weights = _matlab_contributions(pixels.shape[1], out_width, factor)
    out = np.zeros((rows.shape[0], indices.shape[0], rows.shape[2]), dtype=np.float64)
    for tap in range(indices.shape[1]):
        out += weights[None, :, tap, None] * rows[:, indices[:, tap]]
    # MATLAB rounds halves away from zero (np.round would round them to even).
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def matlab_style_bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    cropped = modcrop(image, scale)
    return _matlab_style_resize(cropped, cropped.shape[0] // scale, cropped.shape[1] // scale, 1.0 / scale)


def matlab_style_bicubic_upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline of SR papers: imresize(lr, scale, 'bicubic') of a uint8 HWC image."""
    return _matlab_style_resize(image, image.shape[0] * scale, image.shape[1] * scale, float(scale))
