"""ONNX export of a trained EDSR, verified with ONNX Runtime before the file appears.

The graph has one input `lr` and one output `sr`: float32 NCHW RGB in [0, 255] (the range the network trains
in), with dynamic batch, height and width. The fp16 variant keeps that float32 interface and casts inside, so
every runtime feeds both variants the same way.

Opset 13 (the default) because the deployment tool chains accept it: Ascend's ATC takes opsets 9 to 13 from CANN
5.0 on and 9 to 18 from CANN 7.0 on, TensorRT's ONNX parser takes opset 9 and later. The network needs nothing
newer (Conv, Relu, Add, Mul, DepthToSpace in CRD mode, Cast). docs/DEPLOY.md gives the sources.

torch 2.13 has two exporters. The torch.export-based one (the default, needs onnxscript) emits opset 18 and cannot
convert this graph down (onnx's version converter has no Relu 14 -> 13 adapter), so opsets below 18 go through the
TorchScript-based exporter (`dynamo=False`), which writes the requested opset directly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edsr_dist.data.images import read_rgb, to_uint8
from edsr_dist.data.sample_store import load_sample_image
from edsr_dist.errors import UserError
from edsr_dist.inference.torch_runtime import load_inference_model, model_scale, receptive_field_radius
from edsr_dist.model.edsr import bare_model
from edsr_dist.state.atomic import atomic_path, make_parent_folder

OPSET = 13
OPSETS = (11, 12, 13, 14, 15, 16, 17, 18)  # 11: the first with DepthToSpace's CRD mode, which PixelShuffle needs
FIRST_TORCH_EXPORT_OPSET = 18  # the torch.export-based exporter writes no lower opset for this graph
PRECISIONS = ("fp32", "fp16")
INPUT_NAME, OUTPUT_NAME = "lr", "sr"
# LR crops (height, width) the check runs at: even and odd sides; the first one as a batch of two.
VERIFY_SIZES = ((32, 48), (27, 41), (45, 30))
# Share of output pixel values (after rounding to uint8) that must be within 1 grey level of PyTorch fp32.
REQUIRED_WITHIN_ONE = {"fp32": 0.999, "fp16": 0.99}


@dataclass
class SizeCheck:
    batch: int
    height: int
    width: int
    within_one: float  # share of uint8 values within 1 grey level of PyTorch
    max_grey_levels: int
    max_abs_float: float


def _check_options(precision: str, opset: int) -> None:
    """Bad options and missing packages are reported before any model is loaded or file written."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if opset not in OPSETS:
        raise UserError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    _onnx_modules()


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs the onnx and onnxruntime packages ({exc.name} is missing); "
                        "pip install 'edsr-dist[onnx]'") from None
    return onnx, onnxruntime


class _Float16Inside(nn.Module):
    """fp16 weights and activations behind the float32 `lr` -> `sr` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.model(lr.half()).float()


def _write_graph(network: nn.Module, path: Path, opset: int) -> None:
    example = torch.rand(1, 3, 24, 20) * 255.0
    if opset >= FIRST_TORCH_EXPORT_OPSET:
        batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
        with contextlib.redirect_stdout(io.StringIO()):  # progress lines, even with verbose=False
            torch.onnx.export(network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: batch, 2: height, 3: width},))
        return
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; the module docstring says why
        # it is used.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUT_NAME: {0: "batch", 2: "sr_height", 3: "sr_width"}})


def _crops(image: np.ndarray, sizes) -> list[np.ndarray]:
    """(N, 3, h, w) float32 batches cut from the image: the first size twice (a batch of 2), the others once."""
    height, width = image.shape[:2]
    batches = []
    for index, (h, w) in enumerate(sizes):
        if h > height or w > width:
            raise UserError(f"the verification image is {width}x{height}, smaller than the {w}x{h} check; "
                            "pass a larger --verify-image or smaller --verify-sizes")
        starts = [((height - h) // 2, (width - w) // 2)]
        if index == 0:
            starts.append((0, 0))
        batch = np.stack([image[y:y + h, x:x + w] for y, x in starts]).transpose(0, 3, 1, 2)
        batches.append(np.ascontiguousarray(batch, dtype=np.float32))
    return batches


def verify(path: Path, reference: nn.Module, image: np.ndarray, sizes) -> list[SizeCheck]:
    """Run the file in ONNX Runtime (CPU) and the float32 PyTorch model on crops of a real image; compare."""
    _, ort = _onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = []
    for lr in _crops(image, sizes):
        got = session.run([OUTPUT_NAME], {INPUT_NAME: lr})[0]
        with torch.inference_mode():
            want = reference(torch.from_numpy(lr)).numpy()
        if got.shape != want.shape:
            raise UserError(f"ONNX Runtime gave shape {got.shape} for input {lr.shape}, PyTorch {want.shape}; "
                            "the export is broken, report it with your torch and onnx versions")
        grey = np.abs(to_uint8(got).astype(np.int16) - to_uint8(want).astype(np.int16))
        checks.append(SizeCheck(batch=lr.shape[0], height=lr.shape[2], width=lr.shape[3],
                                within_one=float((grey <= 1).mean()), max_grey_levels=int(grey.max()),
                                max_abs_float=float(np.abs(got - want).max())))
    return checks


def _metadata(model: nn.Module, precision: str, opset: int) -> dict:
    return {"format": "edsr-dist", "scale": str(model_scale(model)),
            "num_filters": str(model.head[0].out_channels),
            "receptive_field_radius": str(receptive_field_radius(model)),
            "precision": precision, "opset": str(opset),
            "io": f"{INPUT_NAME} -> {OUTPUT_NAME}: float32 NCHW RGB in [0, 255]"}


def _write_file(network: nn.Module, path: Path, metadata: dict, opset: int) -> None:
    """The exporter's graph, with our metadata, checked by onnx."""
    onnx, _ = _onnx_modules()
    try:
        _write_graph(network.eval(), path, opset)
    except (RuntimeError, ValueError, TypeError) as exc:  # the exporters raise RuntimeError subclasses
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"torch.onnx could not export the model at opset {opset} ({type(exc).__name__}: "
                        f"{reason}); try another --opset") from None
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def export_onnx(model: nn.Module, out_path: str | Path, image: np.ndarray, precision: str = "fp32",
                opset: int = OPSET, sizes=VERIFY_SIZES) -> list[SizeCheck]:
    """Write `model` as ONNX to out_path, verified first: a temporary file in the same folder is checked with
    ONNX Runtime against the model in PyTorch float32 on crops of `image`, then renamed into place. On any
    failure nothing but the temporary file was written, and it is removed.

    `model` is whatever nn.Module the caller loaded (the weights it holds are the weights exported); it is
    copied, not changed.
    """
    _check_options(precision, opset)
    reference = copy.deepcopy(bare_model(model)).float().cpu().eval()
    reference = reference.to(memory_format=torch.contiguous_format)
    network = _Float16Inside(copy.deepcopy(reference)) if precision == "fp16" else reference
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            _write_file(network, tmp, _metadata(reference, precision, opset), opset)
            checks = verify(tmp, reference, image, sizes)
            required = REQUIRED_WITHIN_ONE[precision]
            worst = min(checks, key=lambda c: c.within_one)
            if worst.within_one < required:
                raise UserError(
                    f"verification failed: ONNX Runtime matches PyTorch within 1 grey level on only "
                    f"{100 * worst.within_one:.3f}% of values at {worst.batch}x3x{worst.height}x{worst.width} "
                    f"(needs {100 * required:g}%, max {worst.max_grey_levels} levels); {out_path} was not written, "
                    "try another --opset or export .safetensors")
    except OSError as exc:
        raise UserError(f"cannot write {out_path} ({exc.strerror or exc}); free space or pass another --out") from None
    return checks


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"32x48,27x41" -> ((32, 48), (27, 41)): LR height x width."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--verify-sizes {text!r}: write HEIGHTxWIDTH pairs separated by commas, e.g. 32x48,27x41")
        sizes.append((int(parts[0]), int(parts[1])))
    return tuple(sizes)


def verification_image(path: str | None) -> tuple[np.ndarray, str]:
    """The photo the export is checked on: a user's PNG/JPEG, or scikit-image's bundled "chelsea" photo."""
    if path is not None:
        return read_rgb(Path(path)), path
    return load_sample_image("chelsea"), "scikit-image's chelsea photo"


def export_command(args) -> Path:
    """`edsr-dist export ... --out X.onnx`: load what --checkpoint names, export, verify, print the figures."""
    precision, opset = args.precision or "fp32", args.opset or OPSET
    _check_options(precision, opset)
    make_parent_folder(args.out)  # an uncreatable --out folder is reported before the model is loaded
    sizes = parse_sizes(args.verify_sizes) if args.verify_sizes else VERIFY_SIZES
    image, image_name = verification_image(args.verify_image)
    model = load_inference_model(args.checkpoint, res_scale=args.res_scale, raw=args.raw_weights)
    checks = export_onnx(model, args.out, image, precision=precision, opset=opset, sizes=sizes)
    print(f"verified with ONNX Runtime against PyTorch fp32 on {image_name} "
          f"(share of values within 1 grey level after rounding; max difference):")
    for c in checks:
        print(f"  {c.batch}x3x{c.height}x{c.width}: {100 * c.within_one:.4f}%; {c.max_grey_levels} grey level(s), "
              f"{c.max_abs_float:.2e} before rounding")
    return Path(args.out)
