"""`edsr-dist eval`: PSNR/SSIM of every checkpoint of a run (or of one checkpoint or weights file) on a patch
store's validation images or on a folder of HR images (--data), or of several models on the standard benchmark
sets under a named protocol (--benchmarks; edsr_dist/evaluation/benchmark_suite.py).

The numbers are computed exactly as the trainer's validation computes them (same tiling, autocast, memory
format, uint8 rounding and metrics), so evaluating a checkpoint on the store it was trained with repeats the
`val PSNR` of its epoch. For a folder of HR images the LR input is made the way `edsr-dist build-store` makes it:
modcrop to the scale, then `edsr_dist.data.resize.downscale` (bicubic-pil unless --degradation says otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from edsr_dist.config import DEVICES, PRECISIONS, check_trackers, tracker_names
from edsr_dist.data.images import list_images, listing_notes, load_image_rgb, no_images_message
from edsr_dist.data.resize import DEGRADATIONS, downscale, modcrop
from edsr_dist.data.store import PatchStore, verify_store
from edsr_dist.errors import (
    CommandParser,
    UserError,
    add_device_flags,
    add_object_store_flags,
    add_raw_weights_flag,
    add_res_scale_flag,
    at_least,
)
from edsr_dist.evaluation.benchmark_suite import run as run_benchmarks
from edsr_dist.evaluation.candidates import collect_candidates, load_candidate
from edsr_dist.evaluation.metrics import score_sr
from edsr_dist.evaluation.protocols import PROTOCOLS
from edsr_dist.inference.onnx_cache import ExportUnavailable, cached_onnx
from edsr_dist.inference.onnx_runtime import OnnxModel, super_resolve_onnx
from edsr_dist.inference.tiling import TileMemoryError
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.model.precision import resolve_device_and_precision, resolve_precision
from edsr_dist.parallel.npu import memory_format
from edsr_dist.state.atomic import atomic_write_text
from edsr_dist.state.checkpoint_files import CHECKPOINT_DIR
from edsr_dist.state.inputs import FOLDER, STORE, WEIGHTS, local_input

# One evaluation image: its name, LR input and HR ground truth, uint8 HWC RGB.
EvalImage = tuple[str, np.ndarray, np.ndarray]

TABLE_COLUMNS = ("checkpoint", "step", "PSNR-Y", "SSIM-Y", "PSNR-RGB")
# Benchmark downloads keep the ground truth in a subfolder with one of these names (Set5/HR, Urban100/GT ...).
HR_FOLDER_NAMES = ("hr", "gt", "original")
CSV_COLUMNS = ("checkpoint", "step", "scale", "images", "psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y")


# ---- evaluation images --------------------------------------------------------------------------------------

def store_images(path: str, scale: int, max_images: int = 0) -> Iterator[EvalImage]:
    """The validation images of a patch store at `scale` (the first `max_images`, 0 = all)."""
    store = PatchStore(path, scale)
    try:
        count = store.num_valid if not max_images else min(max_images, store.num_valid)
        if count == 0:
            raise UserError(f"patch store {path} has no validation images; build it with --valid-hr-dir or "
                            "--valid-count, or pass a folder of HR PNGs as --data")
        for index in range(count):
            yield store.read_valid(index)
    finally:
        store.close()


def list_hr_images(folder: str | Path, say_notes: bool = False) -> list[Path]:
    """The images of `folder` (PNG, JPEG, BMP, TIFF, WebP); with `say_notes`, print which files were skipped and
    whether lossy JPEGs are among them."""
    folder = Path(folder)
    files, skipped = list_images(folder)
    if not files:
        subfolders = [p.name for p in folder.iterdir() if p.is_dir() and p.name.lower() in HR_FOLDER_NAMES]
        if subfolders:
            raise UserError(f"--data {folder} holds no images; pass {folder / subfolders[0]} or a patch store (.h5)")
        raise UserError(no_images_message("--data", folder, skipped) + " (e.g. Set5's HR images), or a patch store")
    if say_notes:
        for note in listing_notes(folder, files, skipped):
            print(note)
    return files


def folder_images(folder: str | Path, scale: int, degradation: str = "bicubic-pil",
                  max_images: int = 0) -> Iterator[EvalImage]:
    """HR images of a folder, each cropped to a multiple of `scale`, with the LR made as the store builder makes it."""
    files = list_hr_images(folder)
    for path in files[:max_images or None]:
        hr = np.ascontiguousarray(modcrop(load_image_rgb(path), scale))
        if min(hr.shape[:2]) < 4 * scale:
            raise UserError(f"HR image {path} is {hr.shape[1]}x{hr.shape[0]}, too small to evaluate at x{scale}; "
                            "remove it from the folder")
        yield path.stem, downscale(hr, scale, degradation), hr


# ---- one model on a set of images ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate_model(model: nn.Module, images, scale: int, device: torch.device, precision: str = "fp32",
                   tile: int | None = None, ensemble: bool = False, channels_last: bool = True,
                   val_tile: int = 0, onnx_model: OnnxModel | None = None) -> dict:
    """Mean and per-image PSNR-Y, SSIM-Y, PSNR-RGB (and the bicubic PSNR-Y) of `model` on `images`.

    The same inference (`infer.super_resolve`) and scores (`metrics.score_sr`) as Validator.validate, in the
    model's training memory format and autocast. tile None: `val_tile` when set, else automatic (as validation).
    onnx_model: the same network's verified ONNX export, run in ONNX Runtime instead (`--backend onnxruntime`).
    """
    model = model.to(device, memory_format=memory_format(device, channels_last)).eval()
    side = tile if tile is not None else (val_tile or None)
    per_image = []
    for name, lr, hr in images:
        if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
            raise UserError(f"image {name}: HR {hr.shape[1]}x{hr.shape[0]} is not x{scale} of LR "
                            f"{lr.shape[1]}x{lr.shape[0]}; evaluate with a model of the data's scale")
        try:
            if onnx_model is not None:
                sr = super_resolve_onnx(onnx_model, lr, tile=side, ensemble=ensemble)
            else:
                sr = super_resolve(model, lr, device, tile=side, ensemble=ensemble, precision=precision)
        except TileMemoryError as exc:
            raise UserError(f"image {name} ({lr.shape[1]}x{lr.shape[0]} LR) does not fit in {device.type} memory; "
                            f"{exc.advice}") from None
        try:
            per_image.append({"name": name, **score_sr(sr, lr, hr, scale)})
        except ValueError as exc:
            raise UserError(f"image {name}: {exc}; remove it from the evaluation data") from None
    if not per_image:
        raise UserError("no images to evaluate; check --data and --max-images")
    count = len(per_image)
    means = {key: sum(entry[key] for entry in per_image) / count
             for key in ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y")}
    return {"images": count, **means, "per_image": per_image}


def _cached_onnx_model(candidate, args: argparse.Namespace, device: torch.device, precision: str) -> OnnxModel:
    """The candidate's verified ONNX export from the cache (`inference/onnx_cache`), in ONNX Runtime on the CPU."""
    if device.type != "cpu" or precision != "fp32":
        raise UserError(f"--backend onnxruntime evaluates fp32 on the CPU, not {precision} on {device.type}; pass "
                        "--device cpu --precision fp32, or drop --backend")
    try:
        entry = cached_onnx(candidate.path, args.cache_dir, res_scale=None if candidate.is_checkpoint else args.res_scale,
                            raw=args.raw_weights and candidate.is_checkpoint)
    except ExportUnavailable as exc:
        raise UserError(f"no verified ONNX export of {candidate.path} ({exc}); drop --backend onnxruntime") from None
    if entry.exported_seconds is not None:
        print(f"edsr-dist eval: exported {candidate.path} to {entry.path} (verified) in {entry.exported_seconds:.1f} s",
              file=sys.stderr, flush=True)
    return OnnxModel(entry.path, device="cpu", threads=torch.get_num_threads())


# ---- output -------------------------------------------------------------------------------------------------

def format_row(cells) -> str:
    name, step, psnr_y, ssim_y, psnr_rgb = cells
    return f"{name:<28} {step:>9} {psnr_y:>8} {ssim_y:>8} {psnr_rgb:>9}"


def table_row(result: dict) -> str:
    step = "-" if result["step"] is None else str(result["step"])
    return format_row((Path(result["checkpoint"]).name, step, f"{result['psnr_y']:.3f}", f"{result['ssim_y']:.4f}",
                       f"{result['psnr_rgb']:.3f}"))


def _write_report(path: Path, text: str, flag: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); pass {flag} with a writable path") from None


def csv_text(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([r["checkpoint"], "" if r["step"] is None else r["step"], r["scale"], r["images"],
                         f"{r['psnr_y']:.6f}", f"{r['ssim_y']:.6f}", f"{r['psnr_rgb']:.6f}",
                         f"{r['bicubic_psnr_y']:.6f}"])
    return buffer.getvalue()


def default_output_stem(checkpoints: Path, data: Path, ensemble: bool) -> Path:
    """<checkpoint folder>/eval_<data name>[_self-ensemble]; a run folder's checkpoints/ when it has one."""
    if checkpoints.is_file():
        folder = checkpoints.parent
    else:
        folder = checkpoints / CHECKPOINT_DIR if (checkpoints / CHECKPOINT_DIR).is_dir() else checkpoints
    if data.is_file():
        name = data.stem
    else:
        resolved = data.resolve()
        name = resolved.name or "data"
        if name.lower() in HR_FOLDER_NAMES and resolved.parent.name:  # Set5/HR -> Set5_HR
            name = f"{resolved.parent.name}_{name}"
    return folder / f"eval_{name}{'_self-ensemble' if ensemble else ''}"


# ---- the command --------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="edsr-dist eval",
        description="Evaluate checkpoints (PSNR-Y, SSIM-Y, PSNR-RGB with the scale shaved off, as in the EDSR paper) "
                    "on a patch store's validation images or a folder of HR images (--data; prints a table, writes CSV "
                    "and JSON), or several models on the standard benchmark sets under a named protocol "
                    "(--benchmarks; one paper-style table, optional JSON).")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="with --data: one run folder or checkpoints/ folder (every step_*.ckpt, by step), .ckpt file "
                        "or weights file (.pt/.pth/.safetensors, reference or BasicSR names); with --benchmarks: "
                        "any number of them (a run folder means its newest valid checkpoint), each at its own scale")
    p.add_argument("--data", metavar="STORE_OR_FOLDER",
                   help="patch store (.h5; its validation images at the model's scale) or a folder of HR images "
                        "(LR made by bicubic downscaling after cropping to a multiple of the scale)")
    p.add_argument("--benchmarks", metavar="ROOT",
                   help="folder of benchmark sets (Set5/, Set14/, B100/, Urban100/, Manga109/, DIV2K/ in the "
                        "EDSR-PyTorch HR/ + LR_bicubic/X<s>/ layout, BasicSR's GTmod12/ + LRbicx<s>/, or bare HR "
                        "PNGs); prints one paper-style table (see docs/EVALUATION.md)")
    p.add_argument("--sets", metavar="A,B,...", help="with --benchmarks: only these sets (default: all found)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="paper",
                   help="with --benchmarks: paper (Y, border = scale; the EDSR paper), rgb (RGB, border = scale; "
                        "BasicSR's model zoo), edsr-div2k (RGB, border = scale + 6; EDSR-PyTorch on DIV2K)")
    p.add_argument("--dist-timeout", type=int, default=1800, metavar="S",
                   help="with --benchmarks under torchrun/the launcher: collective timeout in seconds")
    p.add_argument("--scale", type=int, default=None,
                   help="expected model scale; a checkpoint of another scale is an error (default: each model's own)")
    p.add_argument("--tile", type=int, default=None,
                   help="LR tile side in pixels, 0 = whole image (default: as validation: val_tile, else whole "
                        "image unless it is too large)")
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x slower)")
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="with --data: pytorch (default: the trainer's own validation numbers, to the last digit) or "
                        "onnxruntime (CPU, fp32: each checkpoint exported once, verified against PyTorch and cached, "
                        "as `sr` does by default; faster, within 1 grey level per pixel)")
    add_device_flags(p, DEVICES, PRECISIONS, None,
                     "autocast dtype of the network (default: with --data each checkpoint's training precision, "
                        "so its val PSNR is repeated, fp32 for weights files; with --benchmarks fp32; auto: as "
                        "training would choose; metrics are always float64)")
    p.add_argument("--degradation", choices=DEGRADATIONS, default="bicubic-pil",
                   help="how LR is made from a folder of HR images (default bicubic-pil, as build-store)")
    add_res_scale_flag(p)
    add_raw_weights_flag(p)
    p.add_argument("--max-images", type=int, default=0, metavar="N", help="only the first N images (0 = all)")
    p.add_argument("--num-threads", type=int, default=0, metavar="N",
                   help="CPU threads (0 = torch's default)")
    add_object_store_flags(p)
    p.add_argument("--csv", metavar="FILE", help="CSV output (default: eval_<data>.csv next to the checkpoints)")
    p.add_argument("--tracker", default="", metavar="NAMES",
                   help="with --benchmarks: also log the results and the table to these trackers (mlflow, wandb; "
                        "docs/TRACKING.md): to the training run of the first checkpoint when its run folder names "
                        "one, else to a new run")
    p.add_argument("--tracker-new-run", action="store_true",
                   help="with --tracker: always a new tracker run, never the checkpoint's")
    p.add_argument("--tracker-project", default="edsr-dist", metavar="NAME",
                   help="with --tracker: the MLflow experiment / W&B project of a new run")
    p.add_argument("--json", metavar="FILE",
                   help="JSON output; with --data per-image numbers (default: eval_<data>.json next to the "
                        "checkpoints), with --benchmarks the protocol and one result per model and set (default: none)")
    return p


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    return run_benchmarks(args) if args.benchmarks is not None else _evaluate_on_data(args)


def _parse_args(argv: list[str]):
    args = _build_parser().parse_args(argv)
    at_least("--tile", args.tile, 0)
    at_least("--max-images", args.max_images, 0)
    if args.scale is not None and args.scale < 2:
        raise UserError(f"--scale must be an integer >= 2, got {args.scale}")
    at_least("--num-threads", args.num_threads, 0)
    if (args.data is None) == (args.benchmarks is None):
        raise UserError("pass exactly one of --data (a store or one folder of HR images) and --benchmarks (a folder "
                        "of benchmark sets)")
    if args.benchmarks is not None:
        data_only = [flag for flag, used in (("--csv", args.csv), ("--max-images", args.max_images),
                                             ("--degradation", args.degradation != "bicubic-pil"),
                                             ("--backend", args.backend != "pytorch")) if used]
        if data_only:
            raise UserError(f"{', '.join(data_only)} only apply to --data; drop them with --benchmarks")
        check_trackers(tracker_names(args.tracker), "--tracker")
        if "tensorboard" in tracker_names(args.tracker):
            raise UserError("--tracker tensorboard applies to training only; eval logs to mlflow or wandb")
    elif args.tracker or args.tracker_new_run:
        raise UserError("--tracker logs the --benchmarks table only; drop it with --data, or score with --benchmarks")
    return args


def _evaluate_on_data(args) -> int:
    """`eval --data`: every candidate on a store's validation images or a folder of HR images, a table, CSV, JSON."""
    data = _local_data(args)
    candidates = collect_candidates(args.checkpoints)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    device, fixed = resolve_device_and_precision(args.device, args.precision or "fp32")
    stem = default_output_stem(Path(args.checkpoints), data, args.self_ensemble)
    csv_path = Path(args.csv) if args.csv else stem.with_suffix(".csv")
    json_path = Path(args.json) if args.json else stem.with_suffix(".json")

    chosen = fixed if args.precision else "as trained"
    print(f"edsr-dist eval: {len(candidates)} model(s) on {data} ({'self-ensemble x8, ' if args.self_ensemble else ''}"
          f"{device}, precision {chosen})", flush=True)
    print(format_row(TABLE_COLUMNS), flush=True)
    results: list[dict] = []
    for candidate in candidates:
        try:
            model, step, cfg = load_candidate(candidate, res_scale=args.res_scale, raw=args.raw_weights,
                                              scale=args.scale)
        except UserError as exc:
            if len(candidates) == 1:
                raise
            # One damaged file must not cost the evaluation of the others.
            print(f"edsr-dist eval: warning: skipping {candidate.path}: {exc}", file=sys.stderr, flush=True)
            continue
        scale = int(model.scale)
        if args.scale is not None and scale != args.scale:
            raise UserError(f"{candidate.path} is a x{scale} model but --scale is {args.scale}; "
                            f"pass --scale {scale} or the checkpoints of a x{args.scale} run")
        # By default a checkpoint's own precision: its validation ran in it, so eval repeats its val PSNR.
        precision = fixed if args.precision else resolve_precision(cfg.precision if cfg else "fp32", device.type)
        images = (folder_images(data, scale, args.degradation, args.max_images) if data.is_dir()
                  else store_images(str(data), scale, args.max_images))
        start = time.perf_counter()
        onnx_model = None
        if args.backend == "onnxruntime":
            onnx_model = _cached_onnx_model(candidate, args, device, precision)
        metrics = evaluate_model(model, images, scale, device, precision=precision, tile=args.tile,
                                 ensemble=args.self_ensemble,
                                 channels_last=cfg.channels_last if cfg is not None else True,
                                 val_tile=cfg.val_tile if cfg is not None else 0, onnx_model=onnx_model)
        result = {"checkpoint": str(candidate.path), "step": step, "scale": scale, "precision": precision,
                  "backend": args.backend, **metrics,
                  "seconds": round(time.perf_counter() - start, 3)}
        results.append(result)
        print(table_row(result), flush=True)
    if not results:
        raise UserError(f"no readable checkpoint in {args.checkpoints}; every file was damaged (see the warnings)")
    _report(args, data, device, chosen, results, csv_path, json_path)
    return 0


def _local_data(args) -> Path:
    """The local copy of --data (fetched when a URL), checked before any model loads; --checkpoints, one value
    here, becomes its local path too (args.checkpoints is set to it)."""
    if len(args.checkpoints) != 1:
        raise UserError("--data takes one --checkpoints value; use --benchmarks to score several models")
    args.checkpoints = local_input(args.checkpoints[0], WEIGHTS, args.cache_dir, args.endpoint_url)
    # A store object (.h5) is fetched whole and CRC-checked; any other URL is a prefix of HR images.
    data = Path(local_input(args.data, STORE if args.data.endswith(".h5") else FOLDER, args.cache_dir,
                            args.endpoint_url, verify_store=verify_store))
    if not data.exists():
        raise UserError(f"--data {data} does not exist; pass a patch store (.h5) or a folder of HR PNG images")
    if data.is_dir():
        list_hr_images(data, say_notes=True)  # fail before loading any model
    return data


def _report(args, data: Path, device, chosen: str, results: list[dict], csv_path: Path, json_path: Path) -> None:
    print(f"bicubic baseline: PSNR-Y {results[-1]['bicubic_psnr_y']:.3f} dB on {results[-1]['images']} image(s)")
    if not args.precision:
        used = sorted({r["precision"] for r in results})
        print(f"precision {', '.join(used)}: as each checkpoint was trained and validated (fp32 for weights files)"
              f"{'; --precision fp32 scores the weights without autocast' if used != ['fp32'] else ''}")
    report = {"data": str(data), "self_ensemble": args.self_ensemble, "precision": chosen, "device": str(device),
              "tile": args.tile, "degradation": args.degradation if data.is_dir() else None, "results": results}
    _write_report(csv_path, csv_text(results), "--csv")
    _write_report(json_path, json.dumps(report, indent=1) + "\n", "--json")
    print(f"wrote {csv_path} and {json_path}")
