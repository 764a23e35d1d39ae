"""Super-resolution with a trained model: tiled forward passes, x8 self-ensemble, and the `sr` command.

Tiling: each LR tile is cut with `pad` extra LR pixels of real context on every side (fewer at the image
border), run through the network, and only the tile's own part of the output is kept. With `pad` at least
the network's receptive-field radius the result equals the whole-image pass up to float rounding, because
no output pixel that is kept ever sees the zero padding at a tile's cut edge.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from edsr_dist.atomic import atomic_path
from edsr_dist.checkpoint import follow_pointer, is_checkpoint_file
from edsr_dist.errors import CommandParser, UserError
from edsr_dist.metrics import to_uint8
from edsr_dist.config import DEVICES, PRECISIONS
from edsr_dist.model import bare_model
from edsr_dist.precision import autocast, resolve_device_and_precision
from edsr_dist.weights import checkpoint_model, model_from_weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def receptive_field_radius(model: nn.Module) -> int:
    """How many LR pixels on each side can influence an output pixel, for plain conv/PixelShuffle chains.

    Walks the convolutions and PixelShuffles in registration order (EDSR registers them in execution
    order; its skips add no reach) backwards from one LR pixel's s x s block of outputs: a k x k conv
    widens the interval by (k-1)/2 * dilation at its own resolution, a PixelShuffle(f) maps it back
    to the f-times coarser grid by floor division.
    """
    layers = [m for m in bare_model(model).modules() if isinstance(m, (nn.Conv2d, nn.PixelShuffle))]
    factor = 1
    for layer in layers:
        if isinstance(layer, nn.PixelShuffle):
            factor *= layer.upscale_factor
    lo, hi = 0, factor - 1  # output positions of LR pixel 0, on the output grid
    for layer in reversed(layers):
        if isinstance(layer, nn.PixelShuffle):
            f = layer.upscale_factor
            lo, hi = lo // f, hi // f
        else:
            kh, kw = layer.kernel_size
            dh, dw = layer.dilation
            reach = max((kh - 1) // 2 * dh, (kw - 1) // 2 * dw)
            lo, hi = lo - reach, hi + reach
    return max(-lo, hi)


def forward_tiled(model: nn.Module, lr: torch.Tensor, tile: int, pad: int, scale: int) -> torch.Tensor:
    """(N, 3, H, W) LR in [0, 255] -> (N, 3, sH, sW) float32, tile by tile (tile = LR side, 0 = whole image)."""
    n, _, height, width = lr.shape
    if tile <= 0 or (tile >= height and tile >= width):
        return model(lr).float()
    pad = max(int(pad), 0)
    out = None
    for top in range(0, height, tile):
        bottom = min(top + tile, height)
        for left in range(0, width, tile):
            right = min(left + tile, width)
            y0, y1 = max(top - pad, 0), min(bottom + pad, height)
            x0, x1 = max(left - pad, 0), min(right + pad, width)
            piece = model(lr[:, :, y0:y1, x0:x1])
            if out is None:
                out = torch.empty((n, piece.shape[1], height * scale, width * scale), dtype=torch.float32,
                                  device=piece.device)
            oy, ox = (top - y0) * scale, (left - x0) * scale
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                piece[:, :, oy:oy + (bottom - top) * scale, ox:ox + (right - left) * scale].float()
    return out


def self_ensemble(model_fn: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor) -> torch.Tensor:
    """Geometric x8 self-ensemble: 4 rotations x (no flip, horizontal flip), undone on the outputs, averaged."""
    total = None
    for flip in (False, True):
        for turns in range(4):
            x = lr.flip(-1) if flip else lr
            x = torch.rot90(x, turns, dims=(-2, -1))
            y = torch.rot90(model_fn(x).float(), -turns, dims=(-2, -1))
            y = y.flip(-1) if flip else y
            total = y if total is None else total + y
    return total / 8.0


def model_scale(model: nn.Module) -> int:
    scale = getattr(bare_model(model), "scale", None)
    if scale is None:
        raise ValueError("the model has no `scale` attribute; pass an EDSR")
    return int(scale)


def auto_tile(lr_shape, num_filters: int, device: torch.device) -> int:
    """Whole image (0) when its feature maps fit comfortably, else 256-px LR tiles."""
    height, width = lr_shape[:2]
    feature_bytes = height * width * num_filters * 4 * 4  # a few live fp32 feature maps
    budget = 8 * 2 ** 30 if device.type != "cpu" else 4 * 2 ** 30
    return 0 if feature_bytes <= budget else 256


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The layout the model's convolutions were put in (a 3x3 kernel tells channels_last from NCHW)."""
    kernel = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    return torch.channels_last if not kernel.is_contiguous() else torch.contiguous_format


def super_resolve(model: nn.Module, lr_uint8_hwc: np.ndarray, device, tile: int | None = None, pad: int | None = None,
                  ensemble: bool = False, precision: str = "fp32") -> np.ndarray:
    """One RGB uint8 (H, W, 3) image -> (sH, sW, 3) uint8. The model must already be on `device`.

    The one inference path: validation, `eval` and `sr` all call it.
    tile None = the whole image unless it is too large (`auto_tile`), 0 = always whole;
    pad None = the model's receptive-field radius (tiles then match the whole-image result);
    precision (fp32, bf16, fp16; resolved, not auto) is the network's autocast, as in training.
    """
    img = np.asarray(lr_uint8_hwc)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"super_resolve takes an RGB uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    device = torch.device(device)
    bare = bare_model(model)
    scale = model_scale(bare)
    if pad is None:
        pad = receptive_field_radius(bare)
    if tile is None:
        tile = auto_tile(img.shape, bare.head[0].out_channels, device)
    memory_format = _memory_format(bare)
    if not (img.flags.writeable and img.flags.c_contiguous):  # e.g. np.asarray of a PIL image
        img = img.copy()
    x = torch.from_numpy(img).to(device).permute(2, 0, 1)[None].float()

    def run(t: torch.Tensor) -> torch.Tensor:
        return forward_tiled(bare, t.contiguous(memory_format=memory_format), tile=tile, pad=pad, scale=scale)

    with torch.inference_mode(), autocast(device, precision):
        sr = self_ensemble(run, x) if ensemble else run(x)
    return to_uint8(sr[0])


# ---- the `sr` command -------------------------------------------------------------------------------------

def _collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {path} has no .png/.jpg images; pass image files or a folder of images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; pass existing image files or folders")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); pass PNG or JPEG files") from None


def _write_png(img: np.ndarray, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); free space or pass another --out") from None


def load_inference_model(path: str, res_scale: float | None = None) -> nn.Module:
    """A run folder or .ckpt (config inside), or plain weights (.pt/.pth/.safetensors; shape read from them)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint {p} does not exist; pass a .ckpt file, a run folder or a weights file")
    p = follow_pointer(p)
    if p.is_dir() or is_checkpoint_file(p):
        model, _ = checkpoint_model(p)
        return model
    model, arch = model_from_weights(p, res_scale=res_scale)
    print(f"weights {p}: x{arch['scale']}, {arch['num_blocks']} blocks, {arch['num_filters']} filters, "
          f"res_scale {arch['res_scale']}", file=sys.stderr)
    return model


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="edsr-dist sr",
        description="Super-resolve PNG/JPEG images with a trained EDSR; writes <stem>_x<scale>.png into --out.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of .png/.jpg images")
    parser.add_argument("--checkpoint", required=True,
                        help="a .ckpt file, a run folder (newest valid checkpoint) or weights (.pt/.pth/.safetensors)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--tile", type=int, default=None,
                        help="LR tile side in pixels, 0 = whole image (default: whole unless the image is too large)")
    parser.add_argument("--tile-pad", type=int, default=None,
                        help="LR context pixels around each tile (default: the receptive field, exact result)")
    parser.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x slower)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast dtype of the network (default fp32 = none; auto: as training would choose)")
    parser.add_argument("--res-scale", type=float, default=None,
                        help="residual scaling for plain weight files (default 0.1 for 256 filters, else 1.0)")
    args = parser.parse_args(argv)
    if args.tile is not None and args.tile < 0:
        raise UserError(f"--tile must be >= 0, got {args.tile}")
    if args.tile_pad is not None and args.tile_pad < 0:
        raise UserError(f"--tile-pad must be >= 0, got {args.tile_pad}")

    files = _collect_inputs(args.inputs)
    device, precision = resolve_device_and_precision(args.device, args.precision)
    model = load_inference_model(args.checkpoint, res_scale=args.res_scale).to(device).eval()
    scale = model_scale(model)
    out_dir = Path(args.out)
    targets: dict[Path, Path] = {}
    for src in files:
        dst = out_dir / f"{src.stem}_x{scale}.png"
        if dst in targets.values():
            other = next(k for k, v in targets.items() if v == dst)
            raise UserError(f"inputs {other} and {src} would both be written to {dst}; rename one of them")
        targets[src] = dst
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out_dir} ({exc.strerror}); pass another --out") from None

    for src, dst in targets.items():
        lr = _read_rgb(src)
        start = time.perf_counter()
        try:
            sr = super_resolve(model, lr, device, tile=args.tile, pad=args.tile_pad,
                               ensemble=args.self_ensemble, precision=precision)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "out of memory" not in str(exc).lower():
                raise
            raise UserError(f"{src} ({lr.shape[1]}x{lr.shape[0]}) does not fit in {device.type} memory in one piece; "
                            "pass --tile 256 (or smaller)") from None
        _write_png(sr, dst)
        print(f"{src} ({lr.shape[1]}x{lr.shape[0]}) -> {dst} ({sr.shape[1]}x{sr.shape[0]}) "
              f"in {time.perf_counter() - start:.2f} s", flush=True)
    return 0
