"""Super-resolution with a trained PyTorch model: the torch side of `tiling` (tiles, x8 self-ensemble), the
receptive field that makes tiles exact, and loading a model for inference.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edsr_dist.data.images import to_uint8
from edsr_dist.errors import UserError
from edsr_dist.inference import tiling
from edsr_dist.inference.tiling import ArrayOps, check_rgb_uint8
from edsr_dist.inference.weights import checkpoint_model, model_from_weights
from edsr_dist.model.edsr import bare_model
from edsr_dist.model.precision import autocast
from edsr_dist.state.checkpoint_files import follow_pointer, is_checkpoint_file


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


def torch_ops(device: torch.device) -> ArrayOps:
    """`tiling`'s array operations on torch tensors, with the network on `device`."""
    return ArrayOps(
        new_output=lambda shape, like: torch.empty(shape, dtype=torch.float32, device=like.device),
        rot90=lambda x, k: torch.rot90(x, k, dims=(-2, -1)),
        flip=lambda x: x.flip(-1),
        float32=lambda x: x.float(),
        to_network=lambda window: torch.from_numpy(np.ascontiguousarray(window)).to(device).permute(2, 0, 1)[None]
        .float(),
        to_uint8=to_uint8,
    )


def forward_tiled(model: nn.Module, lr: torch.Tensor, tile: int, pad: int, scale: int) -> torch.Tensor:
    """(N, 3, H, W) LR in [0, 255] -> (N, 3, sH, sW) float32, tile by tile (tile = LR side, 0 = whole image)."""
    return tiling.forward_tiled(model, lr, tile=tile, pad=pad, scale=scale, ops=torch_ops(lr.device))


def self_ensemble(model_fn: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor) -> torch.Tensor:
    """Geometric x8 self-ensemble: 4 rotations x (no flip, horizontal flip), undone on the outputs, averaged."""
    return tiling.self_ensemble(model_fn, lr, torch_ops(lr.device))


# Where a device cannot say how much memory it has free (a torch_npu without mem_get_info), what a window may take.
UNKNOWN_DEVICE_FREE_BYTES = 8 * tiling.GIB


def free_bytes(device: torch.device) -> int:
    """The memory a window can take on `device`: the host's (`tiling.host_free_bytes`) for the CPU, else the device's
    free memory plus what torch's caching allocator holds unused (torch.cuda.mem_get_info; torch_npu's torch.npu
    mirrors it)."""
    if device.type == "cpu":
        return tiling.host_free_bytes()
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "mem_get_info"):
        return UNKNOWN_DEVICE_FREE_BYTES
    free, _ = backend.mem_get_info(device)
    return free + backend.memory_reserved(device) - backend.memory_allocated(device)


def model_scale(model: nn.Module) -> int:
    scale = getattr(bare_model(model), "scale", None)
    if scale is None:
        raise ValueError("the model has no `scale` attribute; pass an EDSR")
    return int(scale)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The layout the model's convolutions were put in (a 3x3 kernel tells channels_last from NCHW)."""
    kernel = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    return torch.channels_last if not kernel.is_contiguous() else torch.contiguous_format


def frozen_cpu_network(model: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For fp32 inference on the CPU: the network as a frozen TorchScript graph in channels_last, whose convolutions
    oneDNN runs with prepacked weights (torch.jit.freeze + torch.jit.optimize_for_inference); None elsewhere (the
    eager model then runs). The eager fp32 path reorders activations and weights for oneDNN in every convolution:
    on this project's CPU it was 1.6-3.5x slower than ONNX Runtime, the frozen graph about 1.1x (BENCHMARKS.md).
    Only for fixed weights (`sr`, `eval`, `bench-sr`), not for validation during training."""
    bare = bare_model(model)
    if precision != "fp32" or next(bare.parameters()).device.type != "cpu":
        return None
    example = torch.zeros(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated in torch 2.13 (DeprecationWarning) but still the way to oneDNN's prepacked inference
    # convolutions without a C++ compiler (torch.compile needs one on the CPU); where it is gone, the eager model runs.
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            layout = bare.to(memory_format=torch.channels_last)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(layout.eval(), example)))
    except (AttributeError, RuntimeError):
        return None

    def network(t: torch.Tensor) -> torch.Tensor:
        return graph(t.contiguous(memory_format=torch.channels_last))

    return network


def super_resolve(model: nn.Module, lr_uint8_hwc: np.ndarray, device, tile: int | None = None, pad: int | None = None,
                  ensemble: bool = False, precision: str = "fp32",
                  compiled: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """One RGB uint8 (H, W, 3) image -> (sH, sW, 3) uint8. The model must already be on `device`.

    The one inference path: validation, `eval` and `sr` all call it.
    tile None = the whole image unless it does not fit the free memory, then the largest tile that does
    (`tiling.auto_tile`), 0 = always whole; out of memory raises `tiling.TileMemoryError` saying what would fit;
    pad None = the model's receptive-field radius (tiles then match the whole-image result);
    precision (fp32, bf16, fp16; resolved, not auto) is the network's autocast, as in training;
    compiled: a faster forward of the same model (`frozen_cpu_network`), used instead of the eager one.
    """
    img = check_rgb_uint8(lr_uint8_hwc)
    device = torch.device(device)
    bare = bare_model(model)
    scale = model_scale(bare)
    if pad is None:
        pad = receptive_field_radius(bare)
    memory_format = _memory_format(bare)

    def network(t: torch.Tensor) -> torch.Tensor:
        if compiled is not None:
            return compiled(t)
        return bare(t.contiguous(memory_format=memory_format))

    with torch.inference_mode(), autocast(device, precision):
        return tiling.upscale(network, img, scale=scale, num_filters=bare.head[0].out_channels, pad=pad, tile=tile,
                              ensemble=ensemble, ops=torch_ops(device), free_bytes=lambda: free_bytes(device),
                              on_host=device.type == "cpu")


def load_inference_model(path: str, res_scale: float | None = None, raw: bool = False,
                         scale: int | None = None) -> nn.Module:
    """A run folder or .ckpt (config inside; its EMA weights unless raw), or plain weights (.pt/.pth/.safetensors;
    shape read from them). `scale`: the --scale asked for; plain weights of another scale are refused before their
    description is printed (one line, not two)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint {p} does not exist; pass a .ckpt file, a run folder or a weights file")
    p = follow_pointer(p)
    if p.is_dir() or is_checkpoint_file(p):
        model, _ = checkpoint_model(p, raw=raw)
        return model
    model, arch = model_from_weights(p, res_scale=res_scale)
    if scale is not None and arch["scale"] != scale:
        raise UserError(f"{p} is a x{arch['scale']} model but --scale is {scale}; pass --scale {arch['scale']} or "
                        f"the checkpoints of a x{scale} run")
    print(f"weights {p}: x{arch['scale']}, {arch['num_blocks']} blocks, {arch['num_filters']} filters, "
          f"res_scale {arch['res_scale']}", file=sys.stderr)
    return model
