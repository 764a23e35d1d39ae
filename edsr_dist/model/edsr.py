"""EDSR (Lim et al., 2017), laid out so that the reference PyTorch implementation's
state dicts load with strict=True: head.0, body.{i}.body.{0,2}, body.{B}, tail.0.*, tail.1,
sub_mean, add_mean.

The network works on pixel values in [0, 255], as the reference does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
RGB_RANGE = 255.0


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv that subtracts (sign=-1) or adds (sign=+1) the dataset mean.

    A conv rather than a plain buffer so the parameter names match the reference implementation.
    """

    def __init__(self, sign: int, rgb_mean=DIV2K_RGB_MEAN, rgb_range: float = RGB_RANGE):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean))
        for p in self.parameters():
            p.requires_grad = False


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


class ResBlock(nn.Module):
    def __init__(self, num_filters: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(conv3x3(num_filters, num_filters), nn.ReLU(inplace=True),
                                  conv3x3(num_filters, num_filters))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsampler(nn.Sequential):
    """conv F->4F + PixelShuffle(2) per factor 2; conv F->9F + PixelShuffle(3) for x3."""

    def __init__(self, scale: int, num_filters: int):
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(num_filters, 4 * num_filters), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [conv3x3(num_filters, 9 * num_filters), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"unsupported scale {scale}")
        super().__init__(*layers)


class EDSR(nn.Module):
    def __init__(self, scale: int = 2, num_blocks: int = 32, num_filters: int = 256, res_scale: float = 0.1):
        super().__init__()
        self.scale = scale
        self.sub_mean = MeanShift(-1)
        self.add_mean = MeanShift(+1)
        self.head = nn.Sequential(conv3x3(3, num_filters))
        self.body = nn.Sequential(*[ResBlock(num_filters, res_scale) for _ in range(num_blocks)],
                                  conv3x3(num_filters, num_filters))
        self.tail = nn.Sequential(Upsampler(scale, num_filters), conv3x3(num_filters, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.tail(x))


def build_model(cfg) -> EDSR:
    return EDSR(scale=cfg.scale, num_blocks=cfg.num_blocks, num_filters=cfg.num_filters, res_scale=cfg.res_scale)


def bare_model(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or similar) wrapper; the model itself when unwrapped."""
    return getattr(model, "module", model)


def count_trainable_parameters(model: nn.Module) -> int:
    """Parameters without the fixed mean-shift layers, as published counts are given."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_image(cfg, lr_height: int, lr_width: int) -> int:
    """Multiply-adds x2 of one forward pass on an LR image of the given size (convs only)."""
    f, b, s = cfg.num_filters, cfg.num_blocks, cfg.scale
    pix = lr_height * lr_width
    macs = pix * 9 * 3 * f  # head
    macs += pix * 9 * f * f * (2 * b + 1)  # residual blocks and body conv
    if s == 3:
        macs += pix * 9 * f * 9 * f
    else:
        for k in range(int(math.log2(s))):
            macs += pix * (4 ** k) * 9 * f * 4 * f
    macs += pix * s * s * 9 * f * 3  # tail conv on the HR grid
    return 2 * macs
