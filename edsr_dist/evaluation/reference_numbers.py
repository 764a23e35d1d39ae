"""Published PSNR/SSIM of EDSR, so `edsr-dist eval --benchmarks` can print "ours / paper / difference".

Every number carries its source, the protocol it was measured under and, where the source used part of a set, how
many images; it is compared with ours only when protocol, image count, model (blocks x filters, scale) and
self-ensemble all agree.

Sources (Lim, Son, Kim, Nah, Lee, "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPR
Workshops 2017, arXiv:1707.02921; the PDF could not be opened where this file was written, so every value was read
from transcriptions of the paper in public repositories, and the benchmark values from two independent ones):
- PAPER_TABLE3: Table 3 "Public benchmark test results and DIV2K validation results", columns Bicubic and EDSR.
  Section 4.5: "we measure PSNR and SSIM on the y channel and ignore the same amount of pixels as scales from the
  border. We used MATLAB functions for evaluation" -> protocol `paper`. The x4 EDSR values are also cited by
  ESRGAN (Wang et al. 2018), Table 2. One transcription has 0.9653 for Urban100 x3 SSIM, the other 0.8653.
- PAPER_TABLE2: Table 2 "Performance comparison between architectures on the DIV2K validation set", columns
  "Our baseline (Single-scale)" (16 x 64), EDSR and EDSR+. Section 4.4: "Evaluation is conducted on the 10 images of
  DIV2K validation set ... we use full RGB channels and ignore the (6 + scale) pixels from the border" -> protocol
  `edsr-div2k`, 10 images (0801-0810). Table 3's DIV2K EDSR column repeats these values ("acquired from published
  demo codes").
- EDSR_REPO: the README of the authors' PyTorch code (sanghyun-son/EDSR-PyTorch): EDSR_baseline_x2/x3/x4 and
  EDSR_x2/x3/x4 PSNR "using DIV2K 0801 ~ 0900, RGB channels, without self-ensemble. (scale + 2) pixels from the
  image boundary are ignored" (its src/utility.py crops scale + 6; we compare under `edsr-div2k`). 100 images, no SSIM.
The paper's EDSR+ values on Set5-Urban100 and all MDSR values are left out: they could not be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_TABLE3 = "EDSR paper (Lim et al. 2017), Table 3"
PAPER_TABLE2 = "EDSR paper (Lim et al. 2017), Table 2 (DIV2K 0801-0810)"
EDSR_REPO = "EDSR-PyTorch README (DIV2K 0801-0900)"
DIV2K_NAMES = ("div2k", "div2k100", "div2k_valid", "div2k_valid_hr")


@dataclass(frozen=True)
class Reference:
    model: str  # "EDSR" (32x256) | "EDSR baseline" (16x64) | "bicubic"
    set: str  # canonical lower-case name
    scale: int
    psnr: float
    ssim: float | None
    protocol: str
    source: str
    self_ensemble: bool = False
    images: int | None = None  # None: the whole set


def _table(model: str, protocol: str, source: str, rows: dict, self_ensemble: bool = False,
           images: int | None = None) -> list[Reference]:
    return [Reference(model, name, scale, psnr, ssim, protocol, source, self_ensemble, images)
            for (name, scale), (psnr, ssim) in rows.items()]


REFERENCES: list[Reference] = [
    *_table("EDSR", "paper", PAPER_TABLE3, {
        ("set5", 2): (38.11, 0.9601), ("set14", 2): (33.92, 0.9195), ("b100", 2): (32.32, 0.9013),
        ("urban100", 2): (32.93, 0.9351),
        ("set5", 3): (34.65, 0.9282), ("set14", 3): (30.52, 0.8462), ("b100", 3): (29.25, 0.8093),
        ("urban100", 3): (28.80, 0.8653),
        ("set5", 4): (32.46, 0.8968), ("set14", 4): (28.80, 0.7876), ("b100", 4): (27.71, 0.7420),
        ("urban100", 4): (26.64, 0.8033),
    }),
    *_table("bicubic", "paper", PAPER_TABLE3, {
        ("set5", 2): (33.66, 0.9299), ("set14", 2): (30.24, 0.8688), ("b100", 2): (29.56, 0.8431),
        ("urban100", 2): (26.88, 0.8403),
        ("set5", 3): (30.39, 0.8682), ("set14", 3): (27.55, 0.7742), ("b100", 3): (27.21, 0.7385),
        ("urban100", 3): (24.46, 0.7349),
        ("set5", 4): (28.42, 0.8104), ("set14", 4): (26.00, 0.7027), ("b100", 4): (25.96, 0.6675),
        ("urban100", 4): (23.14, 0.6577),
    }),
    *_table("EDSR baseline", "edsr-div2k", PAPER_TABLE2, {
        ("div2k", 2): (34.55, 0.9671), ("div2k", 3): (30.90, 0.9298), ("div2k", 4): (28.94, 0.8963),
    }, images=10),
    *_table("EDSR", "edsr-div2k", PAPER_TABLE2, {
        ("div2k", 2): (35.03, 0.9695), ("div2k", 3): (31.26, 0.9340), ("div2k", 4): (29.25, 0.9017),
    }, images=10),
    *_table("EDSR", "edsr-div2k", PAPER_TABLE2, {
        ("div2k", 2): (35.12, 0.9699), ("div2k", 3): (31.39, 0.9351), ("div2k", 4): (29.38, 0.9032),
    }, self_ensemble=True, images=10),
    *_table("EDSR baseline", "edsr-div2k", EDSR_REPO, {
        ("div2k", 2): (34.61, None), ("div2k", 3): (30.92, None), ("div2k", 4): (28.95, None),
    }, images=100),
    *_table("EDSR", "edsr-div2k", EDSR_REPO, {
        ("div2k", 2): (35.03, None), ("div2k", 3): (31.26, None), ("div2k", 4): (29.25, None),
    }, images=100),
]

# blocks x filters of the published models
MODELS = {(32, 256): "EDSR", (16, 64): "EDSR baseline"}


def canonical_set(name: str) -> str:
    key = name.lower()
    if key == "bsds100":
        return "b100"
    if key in DIV2K_NAMES:
        return "div2k"
    return key


def published_model(num_blocks: int, num_filters: int) -> str | None:
    return MODELS.get((num_blocks, num_filters))


def lookup(model: str | None, set_name: str, scale: int, protocol: str, images: int,
           self_ensemble: bool = False) -> Reference | None:
    """The published number for this model on this set (of `images` images) at this scale under this protocol."""
    if model is None:
        return None
    key = canonical_set(set_name)
    for ref in REFERENCES:
        if (ref.model, ref.set, ref.scale, ref.protocol, ref.self_ensemble) == (
                model, key, scale, protocol, self_ensemble) and ref.images in (None, images):
            return ref
    return None
