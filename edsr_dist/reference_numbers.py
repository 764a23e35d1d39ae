"""Published PSNR/SSIM of EDSR, so `edsr-dist eval --benchmarks` can print "ours / paper / difference".

Every number carries its source and the protocol it was measured under; a number is only compared with ours when
the protocols agree (channel, border) and the model matches (blocks x filters, scale, self-ensemble).

Sources:
- PAPER_TABLE: Lim, Son, Kim, Nah, Lee, "Enhanced Deep Residual Networks for Single Image Super-Resolution",
  CVPR Workshops 2017 (arXiv:1707.02921), Table 3 "Public benchmark test results and DIV2K validation results
  (PSNR(dB) / SSIM)", columns Bicubic and EDSR (32 blocks x 256 filters). Y channel, border = scale for the
  benchmark sets. The table does not state the DIV2K protocol; its EDSR x2 value (35.03) is the one the authors'
  code reports in RGB (EDSR_REPO below), so the DIV2K row is compared under `edsr-div2k` only.
  The paper PDF could not be opened where this file was written; the values were checked against two independent
  transcriptions of that table in public repositories (one of them with the typo 0.9653 for Urban100 x3 SSIM,
  0.8653 in the other) and, for x4, against ESRGAN (Wang et al. 2018) Table 2, which cites EDSR's x4 numbers.
  EDSR+ (self-ensemble) and the paper's baseline numbers are left out: they could not be checked here.
- EDSR_REPO: the README of the authors' code, sanghyun-son/EDSR-PyTorch: EDSR_baseline_x2/x3/x4 (16 x 64) and
  EDSR_x2/x3/x4 PSNR on "DIV2K 0801 ~ 0900, RGB channels, without self-ensemble" (its border note says
  scale + 2 while src/utility.py crops scale + 6; see docs/EVALUATION.md). No SSIM.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "EDSR paper (Lim et al. 2017), Table 3"
EDSR_REPO = "EDSR-PyTorch README (DIV2K 0801-0900, RGB)"
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


def _table(model: str, protocol: str, source: str, rows: dict) -> list[Reference]:
    return [Reference(model, name, scale, psnr, ssim, protocol, source)
            for (name, scale), (psnr, ssim) in rows.items()]


REFERENCES: list[Reference] = [
    *_table("EDSR", "paper", PAPER, {
        ("set5", 2): (38.11, 0.9601), ("set14", 2): (33.92, 0.9195), ("b100", 2): (32.32, 0.9013),
        ("urban100", 2): (32.93, 0.9351),
        ("set5", 3): (34.65, 0.9282), ("set14", 3): (30.52, 0.8462), ("b100", 3): (29.25, 0.8093),
        ("urban100", 3): (28.80, 0.8653),
        ("set5", 4): (32.46, 0.8968), ("set14", 4): (28.80, 0.7876), ("b100", 4): (27.71, 0.7420),
        ("urban100", 4): (26.64, 0.8033),
    }),
    *_table("EDSR", "edsr-div2k", PAPER, {
        ("div2k", 2): (35.03, 0.9695), ("div2k", 3): (31.26, 0.9340), ("div2k", 4): (29.25, 0.9017),
    }),
    *_table("bicubic", "paper", PAPER, {
        ("set5", 2): (33.66, 0.9299), ("set14", 2): (30.24, 0.8688), ("b100", 2): (29.56, 0.8431),
        ("urban100", 2): (26.88, 0.8403),
        ("set5", 3): (30.39, 0.8682), ("set14", 3): (27.55, 0.7742), ("b100", 3): (27.21, 0.7385),
        ("urban100", 3): (24.46, 0.7349),
        ("set5", 4): (28.42, 0.8104), ("set14", 4): (26.00, 0.7027), ("b100", 4): (25.96, 0.6675),
        ("urban100", 4): (23.14, 0.6577),
    }),
    *_table("bicubic", "edsr-div2k", PAPER, {
        ("div2k", 2): (31.01, 0.9393), ("div2k", 3): (28.22, 0.8906), ("div2k", 4): (26.66, 0.8521),
    }),
    *_table("EDSR baseline", "edsr-div2k", EDSR_REPO, {
        ("div2k", 2): (34.61, None), ("div2k", 3): (30.92, None), ("div2k", 4): (28.95, None),
    }),
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


def lookup(model: str | None, set_name: str, scale: int, protocol: str) -> Reference | None:
    """The published number for this model on this set at this scale under this protocol, if there is one."""
    if model is None:
        return None
    key = canonical_set(set_name)
    for ref in REFERENCES:
        if ref.model == model and ref.set == key and ref.scale == scale and ref.protocol == protocol:
            return ref
    return None
