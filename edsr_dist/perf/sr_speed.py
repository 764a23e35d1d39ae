"""`edsr-dist bench-sr`: inference speed of the PyTorch and ONNX Runtime backends, same images, same run.

The model (a checkpoint or weights file, or a randomly initialised EDSR of a given shape: speed does not depend
on the weights) is exported to a temporary, verified .onnx file; both backends then super-resolve the same
images through the same code (`infer.super_resolve`, `onnx_backend.super_resolve_onnx`, i.e. the `sr` command's
path, tiling and self-ensemble included) with the same number of threads; `default` is what `sr` runs when
`--backend` is left out (`inference/command.fastest_backend`), through its own cache (`inference/onnx_cache`, a
scratch one, so the first call's export is timed too). Each backend first runs every image
once untimed (first-call setup), then `--repeat` timed passes over all images, alternating backends, so a burst
of load on a shared machine hits one pass of each; the best pass counts.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edsr_dist.data.images import collect_inputs, read_rgb
from edsr_dist.data.sample_store import load_sample_image
from edsr_dist.errors import CommandParser, at_least
from edsr_dist.inference.command import fastest_backend
from edsr_dist.inference.onnx_cache import cached_onnx
from edsr_dist.inference.onnx_export import export_onnx, verification_image
from edsr_dist.inference.onnx_runtime import OnnxModel, onnxruntime_module, super_resolve_onnx
from edsr_dist.inference.torch_runtime import frozen_cpu_network, load_inference_model, super_resolve
from edsr_dist.model.edsr import EDSR

DEFAULT_IMAGES = ("chelsea", "coffee", "astronaut")  # the sample store's validation photos, used as LR input


def _images(inputs: list[str]) -> list[tuple[str, np.ndarray]]:
    if inputs:
        return [(str(p), read_rgb(p)) for p in collect_inputs(inputs)]
    return [(name, load_sample_image(name)) for name in DEFAULT_IMAGES]


def _model(args) -> tuple[torch.nn.Module, str]:
    if args.checkpoint:
        return load_inference_model(args.checkpoint).eval(), args.checkpoint
    torch.manual_seed(0)
    res_scale = 0.1 if args.num_filters >= 256 else 1.0
    model = EDSR(scale=args.scale, num_blocks=args.num_blocks, num_filters=args.num_filters, res_scale=res_scale)
    return model.eval(), f"random EDSR x{args.scale} {args.num_blocks}x{args.num_filters}"


def measure(runners: dict, images: list[tuple[str, np.ndarray]], repeat: int) -> dict:
    """{backend: [seconds of each timed pass over all images]}, after one untimed pass per backend."""
    for run in runners.values():
        for _, img in images:
            run(img)
    passes: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            for _, img in images:
                run(img)
            passes[name].append(time.perf_counter() - start)
    return passes


def _build_parser() -> CommandParser:
    parser = CommandParser(prog="edsr-dist bench-sr", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="IN",
                        help="LR images or folders (default: scikit-image's chelsea, coffee and astronaut photos)")
    parser.add_argument("--checkpoint", help="a .ckpt, run folder or weights file (default: random weights)")
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), default=2, help="random model: scale (default 2)")
    parser.add_argument("--num-blocks", type=int, default=16, help="random model: residual blocks (default 16)")
    parser.add_argument("--num-filters", type=int, default=64, help="random model: filters (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both backends (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per backend (default 3)")
    parser.add_argument("--tile", type=int, default=None, help="LR tile side, as in `sr` (default: automatic)")
    parser.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble, as in `sr`")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv: list[str]) -> int:
    args = _build_parser().parse_args(argv)
    at_least("--repeat", args.repeat, 1)
    at_least("--threads", args.threads, 0)
    threads = args.threads or torch.get_num_threads()
    images = _images(args.inputs)
    model, model_name = _model(args)
    load_before = os.getloadavg()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="edsr-bench-sr-") as folder:
            default_backend, default_cost, runners = _runners(args, model, Path(folder), threads)
            passes = measure(runners, images, args.repeat)
    finally:
        torch.set_num_threads(threads_before)  # the command can run inside another process (tests)
    report = _report(args, model, model_name, images, threads, passes, load_before[0], default_backend, default_cost)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    _print_table(report, report["results"], model_name, len(images), threads, args.repeat, load_before[0])
    return 0


def _sr_default(args, model: torch.nn.Module, folder: Path, threads: int) -> tuple[str, dict, OnnxModel | None]:
    """The backend `sr` picks when --backend is left out, what its cache costs, and its session if it is ONNX."""
    # What `sr` runs by default, through its own choice and cache (a scratch cache: the first call's export
    # and check are part of the figure).
    weights = args.checkpoint or str(folder / "weights.pt")
    if not args.checkpoint:
        torch.save(model.state_dict(), weights)
    default_backend = fastest_backend(weights, "cpu", "fp32")
    if default_backend != "cached-onnx":
        return default_backend, {}, None
    first = cached_onnx(weights, str(folder / "cache"))
    start = time.perf_counter()
    cached_onnx(weights, str(folder / "cache"))
    default_cost = {"first_call_export_s": first.exported_seconds, "cached_call_s": time.perf_counter() - start}
    return default_backend, default_cost, OnnxModel(first.path, device="cpu", threads=threads)


def _runners(args, model: torch.nn.Module, folder: Path, threads: int) -> tuple[str, dict, dict]:
    """Every backend compared, as a call that super-resolves one image the way `sr` would with it."""
    path = folder / "model.onnx"
    export_onnx(model, path, verification_image(None)[0])
    session = OnnxModel(path, device="cpu", threads=threads)
    default_backend, default_cost, default_session = _sr_default(args, model, folder, threads)
    frozen_model = copy.deepcopy(model)  # frozen_cpu_network turns its model channels_last
    frozen = frozen_cpu_network(frozen_model, "fp32")
    bf16_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    runners = {
        "default": (lambda img: super_resolve_onnx(default_session, img, tile=args.tile,
                                                   ensemble=args.self_ensemble))
        if default_backend == "cached-onnx" else
        (lambda img: super_resolve(frozen_model, img, "cpu", tile=args.tile, ensemble=args.self_ensemble,
                                   compiled=frozen)),
        # `sr --backend pytorch`: fp32 through the frozen oneDNN graph on the CPU.
        "pytorch": lambda img: super_resolve(frozen_model, img, "cpu", tile=args.tile,
                                             ensemble=args.self_ensemble, compiled=frozen),
        "onnxruntime": lambda img: super_resolve_onnx(session, img, tile=args.tile,
                                                      ensemble=args.self_ensemble),
        # For comparison: the eager fp32 model (sr's path before the frozen graph), and bf16 autocast
        # (`sr --precision bf16`; needs native bf16 to be fast).
        "pytorch_eager": lambda img: super_resolve(model, img, "cpu", tile=args.tile,
                                                   ensemble=args.self_ensemble),
        "pytorch_bf16": lambda img: super_resolve(bf16_model, img, "cpu", tile=args.tile,
                                                  ensemble=args.self_ensemble, precision="bf16"),
    }
    return default_backend, default_cost, runners


def _report(args, model: torch.nn.Module, model_name: str, images: list[tuple[str, np.ndarray]], threads: int,
            passes: dict, load_before: float, default_backend: str, default_cost: dict) -> dict:
    """Each backend's best pass as images/s and megapixels/s, with the ratios the targets are set on."""
    scale = int(model.scale)
    lr_megapixels = sum(img.shape[0] * img.shape[1] for _, img in images) / 1e6
    sr_megapixels = lr_megapixels * scale * scale
    results = {}
    for name, seconds in passes.items():
        best = min(seconds)
        results[name] = {"images_per_s": len(images) / best, "sr_megapixels_per_s": sr_megapixels / best,
                         "lr_megapixels_per_s": lr_megapixels / best, "pass_seconds": seconds}
    return {
        "model": model_name, "scale": scale, "images": [f"{n} {i.shape[1]}x{i.shape[0]}" for n, i in images],
        "tile": args.tile, "self_ensemble": args.self_ensemble, "threads": threads, "repeat": args.repeat,
        "torch": torch.__version__, "onnxruntime": onnxruntime_module().__version__,
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "results": results,
        "onnxruntime_speedup": results["onnxruntime"]["images_per_s"] / results["pytorch"]["images_per_s"],
        "default_backend": "onnxruntime (cached verified export)" if default_backend == "cached-onnx" else "pytorch",
        **default_cost,
        # `sr`'s default against the fastest fp32 backend: the target is <= 1.2.
        "default_vs_fastest_fp32": max(results[n]["images_per_s"] for n in ("pytorch", "onnxruntime", "pytorch_eager"))
        / results["default"]["images_per_s"],
    }


def _print_table(report: dict, results: dict, model_name: str, images: int, threads: int, repeat: int,
                 load_before: float) -> None:
    print(f"{model_name}, {images} images ({', '.join(report['images'])}), {threads} thread(s), fp32, "
          f"best of {repeat} passes; load average {load_before:.1f} -> {report['load_average_after']:.1f}")
    print(f"{'backend':<14} {'images/s':>9} {'SR MP/s':>8} {'LR MP/s':>8}  passes (s)")
    for name, r in results.items():
        print(f"{name:<14} {r['images_per_s']:9.3f} {r['sr_megapixels_per_s']:8.3f} {r['lr_megapixels_per_s']:8.3f}  "
              + " ".join(f"{s:.2f}" for s in r["pass_seconds"]))
    print(f"onnxruntime / pytorch: {report['onnxruntime_speedup']:.2f}x; fastest fp32 / sr's default "
          f"({report['default_backend']}): {report['default_vs_fastest_fp32']:.2f}x")
    if "first_call_export_s" in report:
        print(f"sr's default, first call: the export and its check took {report['first_call_export_s']:.1f} s; "
              f"later calls find it cached in {report['cached_call_s']:.2f} s")
