"""PSNR and SSIM as super-resolution papers compute them (EDSR, RCAN, BasicSR's MATLAB-compatible path).

- SR output is rounded to uint8 before any metric (`data/images.to_uint8`), so reported numbers match saved PNGs.
- Y channel of BT.601 YCbCr, unrounded float64: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
- `shave` pixels (the scale) are cropped from every border before comparing.
- SSIM: 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2, C2 = (0.03*255)^2, population
  statistics, averaged over the "valid" positions where the whole window lies inside the image
  (numerically the same as scikit-image's gaussian_weights=True, use_sample_covariance=False).
  About 0.5 s for a 2040x1356 DIV2K image on one core.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.ndimage import correlate1d

from edsr_dist.data.images import PIXEL_MAX

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: int(3.5 * sigma + 0.5), the truncation scikit-image and MATLAB use
SSIM_C1 = (0.01 * PIXEL_MAX) ** 2
SSIM_C2 = (0.03 * PIXEL_MAX) ** 2
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


def rgb_to_y(img_uint8_hwc: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] as float64 (not rounded)."""
    img = np.asarray(img_uint8_hwc)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image shaped (H, W, 3), got {img.shape}")
    return 16.0 + img.astype(np.float64) @ _Y_WEIGHTS


def psnr(a, b, data_range: float = PIXEL_MAX) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical inputs."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def _check_pair(sr: np.ndarray, hr: np.ndarray, shave: int) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        # Metrics on unrounded floats read a little higher than the PNG the user gets; refuse them.
        raise TypeError(f"metrics take uint8 images (round SR with to_uint8 first), got {sr.dtype} and {hr.dtype}")
    if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[2] != 3:
        raise ValueError(f"metrics need two (H, W, 3) images of the same size, got {sr.shape} and {hr.shape}")
    if shave < 0 or 2 * shave >= min(sr.shape[0], sr.shape[1]):
        raise ValueError(f"shave {shave} leaves nothing of a {sr.shape[0]}x{sr.shape[1]} image")
    if shave:
        sr, hr = sr[shave:-shave, shave:-shave], hr[shave:-shave, shave:-shave]
    return sr, hr


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR on the Y channel after cropping `shave` pixels from each border (the papers' number)."""
    sr, hr = _check_pair(sr, hr, shave)
    return psnr(rgb_to_y(sr), rgb_to_y(hr))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR over all three RGB channels after cropping `shave` pixels from each border."""
    sr, hr = _check_pair(sr, hr, shave)
    return psnr(sr, hr)


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-(x * x) / (2.0 * SSIM_SIGMA * SSIM_SIGMA))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray) -> np.ndarray:
    """Separable Gaussian filtering, keeping only windows that lie fully inside the image.

    scipy (a scikit-image dependency) filters in C; the border mode is irrelevant after the crop.
    """
    taps = _gaussian_taps()
    out = correlate1d(image, taps, axis=0, mode="reflect")
    out = correlate1d(out, taps, axis=1, mode="reflect")
    return out[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two single-channel float images (no border crop; at least 11x11)."""
    if min(x.shape[0], x.shape[1]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs at least 11x11 pixels after the border crop, got {x.shape[0]}x{x.shape[1]}")
    mu_x, mu_y, xx, yy, xy = (_filter_valid(m) for m in (x, y, x * x, y * y, x * y))
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    ssim_map = ((2.0 * mu_x * mu_y + SSIM_C1) * (2.0 * cov + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return float(ssim_map.mean())


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """Mean SSIM on the Y channel after cropping `shave` pixels from each border."""
    sr, hr = _check_pair(sr, hr, shave)
    return ssim(rgb_to_y(sr), rgb_to_y(hr))


def ssim_rgb(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """SSIM of each RGB channel, averaged (BasicSR's calculate_ssim with test_y_channel=False)."""
    sr, hr = _check_pair(sr, hr, shave)
    return float(np.mean([ssim(sr[..., c].astype(np.float64), hr[..., c].astype(np.float64)) for c in range(3)]))


def bicubic_upscale(lr: np.ndarray, hr_shape) -> np.ndarray:
    """The baseline every report compares against: Pillow's bicubic of the LR image to the HR size."""
    return np.asarray(Image.fromarray(lr).resize((hr_shape[1], hr_shape[0]), Image.BICUBIC))


def score_sr(sr: np.ndarray, lr: np.ndarray, hr: np.ndarray, scale: int) -> dict:
    """PSNR-Y, SSIM-Y, PSNR-RGB of an SR result and the bicubic baseline's PSNR-Y, `scale` pixels shaved.
    Validation and `edsr-dist eval` both report these, so their numbers agree."""
    return {"psnr_y": psnr_y(sr, hr, scale), "ssim_y": ssim_y(sr, hr, scale), "psnr_rgb": psnr_rgb(sr, hr, scale),
            "bicubic_psnr_y": psnr_y(bicubic_upscale(lr, hr.shape), hr, scale)}
