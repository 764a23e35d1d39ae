"""How a super-resolved image is scored, by name, so numbers can be put next to published ones.

Every protocol rounds the SR output to uint8 first (`data/images.to_uint8`) and crops `border` pixels from each side
of both images. They differ in the channel and the border:

- ``paper``: Y of BT.601 YCbCr, border = scale. The EDSR paper's benchmark tables (Lim et al. 2017) and the
  authors' code for benchmark sets: EDSR-PyTorch src/utility.py, calc_psnr, `shave = scale` and the gray
  coefficients 65.738/129.057/25.064 over 256 when `dataset.benchmark` (the same Y as ours: 65.481/255 ==
  65.738/256 to 5 digits). SSIM on Y as in metrics.py.
- ``rgb``: RGB, border = scale. BasicSR's EDSR model zoo (docs/ModelZoo.md: "We crop `scale` border pixels in each
  border; Evaluated on RGB channels"; options/test/EDSR/test_EDSR_Mx2.yml: crop_border 2, test_y_channel false);
  SSIM per channel, averaged (basicsr/metrics/psnr_ssim.py, calculate_ssim).
- ``edsr-div2k``: RGB, border = scale + 6. The EDSR paper's DIV2K protocol (section 4.4: "full RGB channels and
  ignore the (6 + scale) pixels from the border", Table 2) and how EDSR-PyTorch scores DIV2K validation
  (src/utility.py, calc_psnr: `shave = scale + 6` when the set is not a benchmark, no Y conversion). Its README
  says "(scale + 2) pixels from the image boundary are ignored" for the DIV2K numbers it publishes; the code says
  scale + 6, and we follow the code. SSIM is not computed there; ours is per RGB channel, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edsr_dist.errors import UserError
from edsr_dist.evaluation.metrics import psnr_rgb, psnr_y, ssim_rgb, ssim_y


@dataclass(frozen=True)
class Protocol:
    name: str
    channel: str  # "y" (BT.601 luma) or "rgb"
    extra_border: int  # border = scale + extra_border
    source: str

    def border(self, scale: int) -> int:
        return scale + self.extra_border

    def psnr(self, sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
        return (psnr_y if self.channel == "y" else psnr_rgb)(sr, hr, self.border(scale))

    def ssim(self, sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
        return (ssim_y if self.channel == "y" else ssim_rgb)(sr, hr, self.border(scale))

    def describe(self) -> dict:
        return {"name": self.name,
                "channel": "Y (BT.601, 16 + (65.481 R + 128.553 G + 24.966 B) / 255, unrounded)"
                if self.channel == "y" else "RGB",
                "border": f"scale + {self.extra_border}" if self.extra_border else "scale",
                "rounding": "SR clamped to [0, 255] and rounded half to even to uint8 before scoring",
                "ssim": ("11x11 Gaussian window, sigma 1.5, valid positions only, "
                         + ("on Y" if self.channel == "y" else "per RGB channel, averaged")),
                "source": self.source}


PROTOCOLS = {
    "paper": Protocol("paper", "y", 0,
                      "EDSR paper (Lim et al., CVPRW 2017) benchmark tables; EDSR-PyTorch src/utility.py calc_psnr "
                      "for benchmark sets (Y, shave = scale)"),
    "rgb": Protocol("rgb", "rgb", 0,
                    "BasicSR model zoo (docs/ModelZoo.md; options/test/EDSR/*.yml: crop_border = scale, "
                    "test_y_channel false)"),
    "edsr-div2k": Protocol("edsr-div2k", "rgb", 6,
                           "EDSR paper section 4.4 / Table 2 (DIV2K: RGB, 6 + scale border); EDSR-PyTorch "
                           "src/utility.py calc_psnr for DIV2K (shave = scale + 6)"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
