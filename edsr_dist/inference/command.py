"""The `sr` command: super-resolve image files with a trained model, on PyTorch or on ONNX Runtime.

Nothing here imports torch at module level: `--backend onnxruntime` serves an exported .onnx model on machines
without torch. Both backends share the tiling and self-ensemble code (`tiling`).
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from edsr_dist.config import DEVICES, PRECISIONS
from edsr_dist.data.images import collect_inputs, open_image
from edsr_dist.errors import (
    CommandParser,
    UserError,
    add_device_flags,
    add_object_store_flags,
    add_raw_weights_flag,
    add_res_scale_flag,
    at_least,
)
from edsr_dist.inference.onnx_runtime import OnnxModel, super_resolve_onnx
from edsr_dist.inference.tiling import TileMemoryError
from edsr_dist.locations import is_url
from edsr_dist.state.atomic import atomic_path
from edsr_dist.state.remote import fetch_file

BACKENDS = ("pytorch", "onnxruntime")


@dataclass
class Upscaler:
    """One loaded model behind one backend: RGB uint8 (H, W, 3) -> (sH, sW, 3) uint8."""

    backend: str
    scale: int
    device: str
    run: Callable[[np.ndarray], np.ndarray]


def pytorch_upscaler(checkpoint: str, device: str = "auto", precision: str = "fp32", res_scale: float | None = None,
                     tile: int | None = None, pad: int | None = None, ensemble: bool = False,
                     raw: bool = False) -> Upscaler:
    if importlib.util.find_spec("torch") is None:
        raise UserError("--backend pytorch needs PyTorch; install it (pip install -r requirements-cpu.txt), or "
                        "export the model to ONNX and pass --backend onnxruntime")
    # torch is optional for `sr` (ONNX Runtime serves without it), so the PyTorch side is imported when chosen.
    from edsr_dist.inference.torch_runtime import frozen_cpu_network, load_inference_model, model_scale, super_resolve
    from edsr_dist.model.precision import resolve_device_and_precision

    torch_device, precision = resolve_device_and_precision(device, precision)
    model = load_inference_model(checkpoint, res_scale=res_scale, raw=raw).to(torch_device).eval()
    compiled = frozen_cpu_network(model, precision)

    def run(lr: np.ndarray) -> np.ndarray:
        return super_resolve(model, lr, torch_device, tile=tile, pad=pad, ensemble=ensemble, precision=precision,
                             compiled=compiled)

    return Upscaler("pytorch", model_scale(model), torch_device.type, run)


def onnx_upscaler(path: str, device: str = "auto", threads: int = 0, tile: int | None = None,
                  pad: int | None = None, ensemble: bool = False) -> Upscaler:
    if Path(path).suffix != ".onnx":
        raise UserError(f"--backend onnxruntime runs an exported .onnx model, not {path}; "
                        "make one with `edsr-dist export --checkpoint C --out model.onnx`")
    model = OnnxModel(path, device=device, threads=threads)

    def run(lr: np.ndarray) -> np.ndarray:
        return super_resolve_onnx(model, lr, tile=tile, pad=pad, ensemble=ensemble)

    return Upscaler("onnxruntime", model.scale, model.session.get_providers()[0], run)


def fastest_backend(checkpoint: str, device: str, precision: str) -> str:
    """The backend `--backend` left out means for a checkpoint or weights file: ONNX Runtime on its cached, verified
    export (`cached-onnx`) where that is the faster one, fp32 on the CPU with onnxruntime, onnx and torch installed
    (BENCHMARKS.md "bench-sr"); else pytorch. (An .onnx file needs `--backend onnxruntime` said.)"""
    if any(importlib.util.find_spec(name) is None for name in ("torch", "onnx", "onnxruntime")):
        return "pytorch"
    from edsr_dist.model.precision import resolve_device_and_precision

    torch_device, resolved = resolve_device_and_precision(device, precision)
    return "cached-onnx" if torch_device.type == "cpu" and resolved == "fp32" else "pytorch"


def cached_onnx_upscaler(checkpoint: str, cache_dir: str, res_scale: float | None, raw: bool, tile: int | None,
                         pad: int | None, ensemble: bool) -> Upscaler | None:
    """ONNX Runtime on the checkpoint's verified export from the cache (made on first use); None, with a note, when
    no export can be made or cached (its check failed, the cache folder is not writable): PyTorch runs then. A
    checkpoint that cannot be loaded is its one-line error, as with PyTorch."""
    from edsr_dist.inference.onnx_cache import ExportUnavailable, cached_onnx

    try:
        entry = cached_onnx(checkpoint, cache_dir, res_scale=res_scale, raw=raw)
    except ExportUnavailable as exc:
        print(f"edsr-dist sr: note: no ONNX export for the default backend ({exc}); running PyTorch instead",
              file=sys.stderr, flush=True)
        return None
    made = "cached" if entry.exported_seconds is None else f"exported and verified in {entry.exported_seconds:.1f} s"
    print(f"backend onnxruntime: {entry.path} (the export of {entry.source}, {made}); --backend pytorch to use "
          "PyTorch", file=sys.stderr, flush=True)
    return onnx_upscaler(str(entry.path), device="cpu", tile=tile, pad=pad, ensemble=ensemble)


@dataclass
class SourceImage:
    """An input split into what the network sees (RGB) and what it does not (alpha), with how it was read."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, or None
    gray: bool  # written back as one channel
    note: str  # what was done to it, for the output line ("" for plain RGB)


def read_source(path: Path) -> SourceImage:
    """Grayscale (L, 1, I;16) is replicated to RGB, as the reference code feeds gray images, and written back as L;
    alpha (RGBA, LA, a palette with transparency) is kept apart and upscaled on its own."""
    im = open_image(path)
    notes = []
    if im.mode == "P":
        notes.append("palette expanded")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        notes.append("16-bit reduced to 8 bits")
        im = Image.fromarray((np.array(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if im.mode == "PA":
        im = im.convert("RGBA")
    gray = im.mode in ("1", "L", "LA", "F")
    alpha = np.array(im.getchannel("A")) if im.mode in ("RGBA", "LA") else None
    if gray:
        notes.append("grayscale in, grayscale out")
    if alpha is not None:
        notes.append("alpha upscaled by bicubic")
    rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # convert() would copy an RGB image once more
    return SourceImage(rgb, alpha, gray, ", ".join(notes))


def compose_output(src: SourceImage, sr: np.ndarray) -> Image.Image | np.ndarray:
    """The network's RGB output back in the input's form: L for gray, with the upscaled alpha when it had one; a
    plain RGB input's output stays the array, which `write_rgb_png` encodes without a copy (Pillow would hold the
    image once more, at 4 bytes a pixel: 0.5 GB for a 6000x6000 input at x2).

    Alpha is a coverage mask, not a photo: the network never saw one in training and would sharpen its edges into
    halos, so it is resized with bicubic, as image editors resize layers' masks."""
    if not src.gray and src.alpha is None:
        return sr
    out = Image.fromarray(sr)
    if src.gray:
        out = out.convert("L")  # ITU-R 601 luma; the three channels of a gray input come out nearly equal
    if src.alpha is not None:
        size = (sr.shape[1], sr.shape[0])
        alpha = Image.fromarray(src.alpha).resize(size, Image.Resampling.BICUBIC)  # clips to 0..255
        out.putalpha(alpha)  # L -> LA, RGB -> RGBA
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BAND_ROWS = 256  # rows filtered and compressed at a time


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_rgb_png(rgb: np.ndarray, path: Path) -> None:
    """An RGB uint8 (H, W, 3) array as an 8-bit RGB PNG, band by band: the PNG specification's IHDR, IDAT (zlib at
    Pillow's default level 6) and IEND chunks, each row "Sub"-filtered (filter type 1: a byte minus the byte one pixel
    to its left, modulo 256), so no copy of the whole image is made (PNG spec, W3C, sections 5, 9.2, 11.2)."""
    height, width = rgb.shape[:2]
    compressor = zlib.compressobj(6)
    with open(path, "wb") as handle:
        handle.write(PNG_SIGNATURE)
        handle.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        for start in range(0, height, PNG_BAND_ROWS):
            band = rgb[start:start + PNG_BAND_ROWS].reshape(-1, width * 3)
            rows = np.empty((band.shape[0], 1 + width * 3), dtype=np.uint8)
            rows[:, 0] = 1  # Sub
            rows[:, 1:4] = band[:, :3]
            np.subtract(band[:, 3:], band[:, :-3], out=rows[:, 4:])  # uint8 arithmetic wraps modulo 256
            data = compressor.compress(rows.tobytes())
            if data:
                handle.write(_png_chunk(b"IDAT", data))
        handle.write(_png_chunk(b"IDAT", compressor.flush()))
        handle.write(_png_chunk(b"IEND", b""))


def _write_png(img: Image.Image | np.ndarray, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            if isinstance(img, np.ndarray):
                write_rgb_png(img, tmp)
            else:
                img.save(tmp, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); free space or pass another --out") from None


def _how(tile: int | None) -> str:
    return " in one piece" if tile == 0 else f" in {tile}-pixel tiles" if tile else ""


def _build_parser() -> CommandParser:
    parser = CommandParser(
        prog="edsr-dist sr",
        description="Super-resolve PNG/JPEG images with a trained EDSR; writes <stem>_x<scale>.png into --out. "
                    "Grayscale stays grayscale; alpha is kept, upscaled by bicubic (the network sees RGB only).")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of .png/.jpg images")
    parser.add_argument("--checkpoint", required=True,
                        help="a .ckpt file, a run folder (newest valid checkpoint) or weights (.pt/.pth/.safetensors); "
                             "with --backend onnxruntime a .onnx file from `edsr-dist export`")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    add_object_store_flags(parser, inputs="an s3:// --checkpoint", cached="an s3:// --checkpoint is cached")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="pytorch, or onnxruntime (an exported .onnx; torch not needed); default: the fastest "
                             "installed, ONNX Runtime on the CPU (the checkpoint exported once, verified against "
                             "PyTorch and cached), else PyTorch")
    parser.add_argument("--tile", type=int, default=None,
                        help="LR tile side in pixels, 0 = whole image (default: whole if it fits the free memory, "
                             "else the largest tile that does)")
    parser.add_argument("--tile-pad", type=int, default=None,
                        help="LR context pixels around each tile (default: the receptive field, exact result)")
    parser.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x slower)")
    add_device_flags(parser, DEVICES, PRECISIONS, "fp32",
                     "PyTorch backend: autocast dtype of the network (fp32 = none; auto: as training would choose); "
                     "an ONNX model's precision is chosen at export")
    add_res_scale_flag(parser)
    add_raw_weights_flag(parser)
    return parser


def main(argv: list[str]) -> int:
    args = _build_parser().parse_args(argv)
    at_least("--tile", args.tile, 0)
    at_least("--tile-pad", args.tile_pad, 0)
    if args.backend == "onnxruntime" and args.precision != "fp32":
        raise UserError(f"--precision {args.precision} applies to the PyTorch backend; for ONNX Runtime export an "
                        "fp16 model with `edsr-dist export --precision fp16`")
    if args.backend != "onnxruntime" and Path(args.checkpoint).suffix == ".onnx":  # a file, not a checkpoint
        raise UserError(f"--checkpoint {args.checkpoint} is an ONNX model; pass --backend onnxruntime")

    files = collect_inputs(args.inputs)
    if is_url(args.checkpoint):
        # Size and ETag checked here; a .ckpt's SHA-256 when the PyTorch backend loads it (torch stays optional).
        args.checkpoint = str(fetch_file(args.checkpoint, args.cache_dir, args.endpoint_url, what="weights"))
    backend = args.backend or fastest_backend(args.checkpoint, args.device, args.precision)
    upscaler = None
    if backend == "cached-onnx":
        upscaler = cached_onnx_upscaler(args.checkpoint, args.cache_dir, res_scale=args.res_scale,
                                        raw=args.raw_weights, tile=args.tile, pad=args.tile_pad,
                                        ensemble=args.self_ensemble)
    if backend == "onnxruntime":
        upscaler = onnx_upscaler(args.checkpoint, device=args.device, tile=args.tile, pad=args.tile_pad,
                                 ensemble=args.self_ensemble)
    elif upscaler is None:
        upscaler = pytorch_upscaler(args.checkpoint, device=args.device, precision=args.precision,
                                    res_scale=args.res_scale, tile=args.tile, pad=args.tile_pad,
                                    ensemble=args.self_ensemble, raw=args.raw_weights)
    targets = _output_files(files, Path(args.out), upscaler.scale)
    for src, dst in targets.items():
        image = read_source(src)
        lr, note = image.rgb, image.note
        height, width = lr.shape[:2]
        start = time.perf_counter()
        try:
            sr = upscaler.run(lr)
        except TileMemoryError as exc:
            raise UserError(f"{src} ({width}x{height}) does not fit in {upscaler.device} memory"
                            f"{_how(args.tile)}; {exc.advice}") from None
        out = compose_output(image, sr)
        del sr, image, lr  # what the encoder needs is in `out`
        _write_png(out, dst)
        size, mode = ((out.shape[1], out.shape[0]), "RGB") if isinstance(out, np.ndarray) else (out.size, out.mode)
        print(f"{src} ({width}x{height}) -> {dst} ({size[0]}x{size[1]} {mode}) "
              f"in {time.perf_counter() - start:.2f} s{'; ' + note if note else ''}", flush=True)
    return 0


def _output_files(files: list[Path], out_dir: Path, scale: int) -> dict[Path, Path]:
    """input -> `<out>/<stem>_x<scale>.png`, every name once; the output folder made before the first image."""
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
    return targets
