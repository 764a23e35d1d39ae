import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from edsr_dist.data.images import to_uint8
from edsr_dist.evaluation.metrics import psnr, psnr_rgb, psnr_y, rgb_to_y, ssim_y


def _pair(seed=0, shape=(48, 64, 3), noise=12):
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so SSIM is neither ~0 nor ~1
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = 128 + 80 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] + rng.normal(0, 10, shape)
    hr = np.clip(base, 0, 255).astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)
    return sr, hr


def test_y_of_known_colours():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = rgb_to_y(colours)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)


def test_identical_images():
    sr, _ = _pair()
    assert psnr_y(sr, sr.copy(), 2) == math.inf
    assert psnr_rgb(sr, sr.copy(), 2) == math.inf
    assert ssim_y(sr, sr.copy(), 2) == pytest.approx(1.0, abs=1e-12)


def test_known_mse_gives_known_psnr():
    a = np.zeros((8, 8), np.float64)
    b = np.full((8, 8), 10.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255.0 ** 2 / 100.0), abs=1e-12)  # 28.1308 dB
    # RGB: every channel off by 5 -> MSE 25
    img = np.full((10, 10, 3), 100, np.uint8)
    assert psnr_rgb(img, img + 5, 0) == pytest.approx(10 * math.log10(255.0 ** 2 / 25.0), abs=1e-12)
    # Y: grey +5 on all channels moves Y by 5 * 219/255
    dy = 5 * 219.0 / 255.0
    assert psnr_y(img, img + 5, 0) == pytest.approx(10 * math.log10(255.0 ** 2 / dy ** 2), abs=1e-9)


def test_shave_crops_the_border():
    sr, _ = _pair()
    hr = sr.copy()
    hr[:3, :, :] = 0  # damage only a 3-pixel band at the top
    hr[:, -3:, :] = 255
    assert psnr_y(sr, hr, 3) == math.inf
    assert psnr_y(sr, hr, 2) < 40
    assert ssim_y(sr, hr, 3) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_scikit_image():
    for seed, shave in ((0, 2), (1, 3), (2, 4)):
        sr, hr = _pair(seed)
        ours = ssim_y(sr, hr, shave)
        crop = (slice(shave, -shave), slice(shave, -shave))
        ref = structural_similarity(rgb_to_y(sr[crop]), rgb_to_y(hr[crop]), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
        assert 0.2 < ours < 0.99
        assert ours == pytest.approx(ref, abs=1e-9)


def test_metric_inputs_are_checked():
    sr, hr = _pair()
    with pytest.raises(TypeError):
        psnr_y(sr.astype(np.float32), hr, 2)
    with pytest.raises(ValueError):
        psnr_y(sr[:-1], hr, 2)
    with pytest.raises(ValueError):
        ssim_y(sr[:14, :14], hr[:14, :14], 2)


def test_to_uint8_clamps_and_rounds():
    arr = np.array([[[-3.0, 0.4, 0.6], [2.5, 254.6, 300.0]]])
    np.testing.assert_array_equal(to_uint8(arr), [[[0, 0, 1], [2, 255, 255]]])  # 2.5 -> 2: half to even
    tensor = torch.tensor(arr).permute(2, 0, 1)[None]  # (1, C, H, W) -> (H, W, C)
    out = to_uint8(tensor)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out, to_uint8(arr))
    assert to_uint8(torch.tensor(arr).permute(2, 0, 1).to(torch.bfloat16)).shape == (1, 2, 3)
