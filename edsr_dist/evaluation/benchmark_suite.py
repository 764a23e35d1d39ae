"""`edsr-dist eval --benchmarks ROOT`: every model on every benchmark set at its own scale, one paper-style table.

Rows are sets; each model (a x2, a x3 and a x4 checkpoint, say) gets a group of columns: bicubic, ours, ours with
x8 self-ensemble (EDSR+, with --self-ensemble) and, when the model and protocol match a published number
(`reference_numbers`), the paper's value and our difference to it. Cells are PSNR/SSIM.
Under torchrun or `edsr-dist launch --exec` every rank scores every world-size-th image of each set and the sums are
all-reduced (`benchmarks.score_shards`, the trainer's validation mechanism); rank 0 prints and writes the JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edsr_dist.config import tracker_names
from edsr_dist.errors import UserError
from edsr_dist.evaluation.benchmark_sets import (
    SCORE_KEYS,
    BenchmarkSet,
    find_sets,
    protocol_scores,
    score_shards,
)
from edsr_dist.evaluation.candidates import Candidate, load_candidate
from edsr_dist.evaluation.protocols import Protocol, get_protocol
from edsr_dist.evaluation.reference_numbers import lookup, published_model
from edsr_dist.inference.tiling import TileMemoryError
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.model.precision import resolve_device_and_precision
from edsr_dist.parallel.factory import make_engine, resolve_engine_name
from edsr_dist.parallel.npu import memory_format
from edsr_dist.parallel.world import discover_world
from edsr_dist.state.atomic import atomic_write_text
from edsr_dist.state.checkpoint import find_checkpoint
from edsr_dist.state.checkpoint_files import CHECKPOINT_DIR, file_sha256, follow_pointer, is_checkpoint_file
from edsr_dist.state.run_folder import TRACKER_FILE
from edsr_dist.tracking.channel import RunIds, open_channels

ENSEMBLE_KEYS = ("self_ensemble_psnr", "self_ensemble_ssim")


@dataclass
class LoadedModel:
    path: Path
    model: nn.Module
    step: int | None
    channels_last: bool
    num_blocks: int
    num_filters: int

    @property
    def scale(self) -> int:
        return int(self.model.scale)

    @property
    def label(self) -> str:
        return f"x{self.scale} {self.path.name}"


def load_model(text: str, res_scale: float | None, raw: bool = False) -> LoadedModel:
    """A checkpoint file, a run folder (its newest valid checkpoint) or a weights file."""
    path = Path(text)
    if not path.exists():
        raise UserError(f"--checkpoints {path} does not exist; pass checkpoint files, run folders or weights files")
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise UserError(f"--checkpoints {path} holds no valid checkpoint; pass a run folder or a .ckpt file")
        path = Path(found)
    path = follow_pointer(path)
    model, step, cfg = load_candidate(Candidate(path, is_checkpoint_file(path)), res_scale=res_scale, raw=raw)
    # The body is the residual blocks plus one closing convolution.
    return LoadedModel(path, model.eval(), step, cfg.channels_last if cfg is not None else True,
                       len(model.body) - 1, model.head[0].out_channels)


def evaluate_set(loaded: LoadedModel, benchmark: BenchmarkSet, protocol: Protocol, device: torch.device,
                 precision: str, tile: int | None, ensemble: bool, world, engine, show_progress: bool) -> dict:
    """Means over the set of PSNR/SSIM (ours, bicubic, and with `ensemble` the self-ensemble's) under `protocol`."""
    scale = loaded.scale
    count = len(benchmark.hr_files)

    def score_one(index: int) -> dict:
        name, lr, hr = benchmark.load(index, scale)
        try:
            sr = super_resolve(loaded.model, lr, device, tile=tile, precision=precision)
            plus = super_resolve(loaded.model, lr, device, tile=tile, precision=precision, ensemble=True) if ensemble else None
        except TileMemoryError as exc:
            raise UserError(f"{benchmark.name}/{name} ({lr.shape[1]}x{lr.shape[0]} LR) does not fit in {device.type} "
                            f"memory; {exc.advice}") from None
        try:
            scores = protocol_scores(protocol, sr, lr, hr, scale)
            if plus is not None:
                scores.update(zip(ENSEMBLE_KEYS, (protocol.psnr(plus, hr, scale), protocol.ssim(plus, hr, scale))))
        except ValueError as exc:  # too small for the border and the SSIM window
            raise UserError(f"{benchmark.name}/{name}: {exc}; remove the image from the set") from None
        return scores

    bar = None
    if show_progress:
        bar = tqdm(total=len(range(world.rank, count, world.size)), desc=f"{loaded.label} {benchmark.name}",
                   unit="img", leave=False, dynamic_ncols=True)
    try:
        return score_shards(count, world.rank, world.size, score_one, SCORE_KEYS + (ENSEMBLE_KEYS if ensemble else ()),
                            engine.all_reduce_sum, device, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


# ---- the table ----------------------------------------------------------------------------------------------

def _cell(psnr: float | None, ssim: float | None) -> str:
    if psnr is None:
        return "-"
    return f"{psnr:.2f}/{ssim:.4f}" if ssim is not None else f"{psnr:.2f}/-"


def _diff(psnr: float, ssim: float, ref) -> str:
    return f"{psnr - ref.psnr:+.2f}/" + (f"{ssim - ref.ssim:+.4f}" if ref.ssim is not None else "-")


def format_table(results: list[dict], protocol: Protocol, ensemble: bool) -> str:
    """Rows: sets; per model: bicubic, ours, (ours+), and paper / ours-paper where a published number matches."""
    sets = list(dict.fromkeys(r["set"] for r in results))
    models = list(dict.fromkeys(r["checkpoint"] for r in results))
    by_key = {(r["checkpoint"], r["set"]): r for r in results}
    columns: list[tuple[str, str, list[str]]] = []  # (group title, column title, one cell per set)
    short = [Path(c).name for c in models]
    for checkpoint, file_name in zip(models, short):
        rows = [by_key.get((checkpoint, name)) for name in sets]
        first = next(r for r in rows if r is not None)
        group = f"x{first['scale']} {file_name if short.count(file_name) == 1 else checkpoint}"
        name = first["model"] or f"{first['num_blocks']}x{first['num_filters']}"
        columns.append((group, "bicubic", [_cell(r["bicubic_psnr"], r["bicubic_ssim"]) if r else "-" for r in rows]))
        columns.append((group, name, [_cell(r["psnr"], r["ssim"]) if r else "-" for r in rows]))
        if ensemble:
            columns.append((group, name + "+", [_cell(r["self_ensemble_psnr"], r["self_ensemble_ssim"]) if r else "-"
                                                for r in rows]))
        for plus in (False, True) if ensemble else (False,):
            suffix, prefix = ("+", "self_ensemble_") if plus else ("", "")
            refs = [lookup(first["model"], r["set"], first["scale"], protocol.name, r["images"], plus) if r else None
                    for r in rows]
            if any(refs):
                columns.append((group, "paper" + suffix, [_cell(ref.psnr, ref.ssim) if ref else "-" for ref in refs]))
                columns.append((group, f"ours{suffix}-paper{suffix}", [
                    _diff(r[prefix + "psnr"], r[prefix + "ssim"], ref) if ref else "-" for r, ref in zip(rows, refs)]))
    counts = [str(next(r["images"] for r in results if r["set"] == s)) for s in sets]
    width = [max(len(title), *(len(c) for c in cells)) for _, title, cells in columns]
    set_width = max(len("set"), *(len(s) for s in sets))
    groups_line = f"{'':<{set_width}} {'':>6}"
    for group in dict.fromkeys(g for g, _, _ in columns):
        span = sum(w + 2 for (g, _, _), w in zip(columns, width) if g == group) - 2
        groups_line += f"  {group[:span]:<{span}}"
    header = f"{'set':<{set_width}} {'images':>6}" + "".join(f"  {t:>{w}}" for (_, t, _), w in zip(columns, width))
    lines = [groups_line.rstrip(), header]
    for row, name in enumerate(sets):
        lines.append(f"{name:<{set_width}} {counts[row]:>6}"
                     + "".join(f"  {cells[row]:>{w}}" for (_, _, cells), w in zip(columns, width)))
    return "\n".join(lines)


# ---- trackers ---------------------------------------------------------------------------------------------

def run_folder_of(checkpoint: Path) -> Path | None:
    """RUN/checkpoints/step_*.ckpt -> RUN; None for a file outside a run folder (weights, a copied checkpoint)."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else None


def log_to_trackers(args, results: list[dict], table: str, protocol: str) -> None:
    """Each result as metrics (benchmark/PROTOCOL/SET/xSCALE/psnr ..., at the checkpoint's step) and the table as
    a text file, in the first checkpoint's training run (its run folder's tracker.json, read only) or a new run."""
    folder = run_folder_of(Path(results[0]["checkpoint"]))
    continued = folder is not None and (folder / TRACKER_FILE).is_file() and not args.tracker_new_run
    ids = RunIds(folder / TRACKER_FILE, writable=False) if continued else RunIds(None)
    params = {"command": "eval --benchmarks", "protocol": protocol, "self_ensemble": bool(args.self_ensemble),
              "checkpoints": ",".join(sorted({r["checkpoint"] for r in results})),
              "sets": ",".join(dict.fromkeys(r["set"] for r in results))}
    channels = open_channels(tracker_names(args.tracker), args.tracker_project, f"eval {protocol}",
                             folder if continued else Path.cwd(), ids, params)
    for result in results:
        values = {f"benchmark/{protocol}/{result['set']}/x{result['scale']}/{key}": float(value)
                  for key, value in result.items()
                  if key in SCORE_KEYS + ENSEMBLE_KEYS and isinstance(value, (int, float))}
        for channel in channels:
            channel.metrics(values, result["step"] or 0)
    for channel in channels:
        channel.text(table + "\n", f"benchmarks_{protocol}.txt")
        problem = channel.close(completed=True, kept_in="the table above (and --json) holds them all")
        if problem:
            print(f"edsr-dist eval: warning: {problem}", file=sys.stderr, flush=True)


# ---- the command --------------------------------------------------------------------------------------------

def run(args) -> int:
    """`edsr-dist eval --benchmarks ...` with the arguments parsed by evaluate.py."""
    protocol, sets, models = _checked_inputs(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    world = discover_world()
    # Fixed, not each model's: the table compares models (and published numbers) under one precision.
    device, precision = resolve_device_and_precision(args.device, args.precision or "fp32", world.device_index)
    engine = make_engine(resolve_engine_name("auto", world), world, device, args.dist_timeout)
    show_progress = world.is_main and sys.stderr.isatty()
    say = print if world.is_main else (lambda *a, **k: None)
    say(f"edsr-dist eval: {len(models)} model(s) x {len(sets)} set(s), protocol {protocol.name} "
        f"({protocol.describe()['channel'].split(' (')[0]}, border {protocol.describe()['border']}), {device}, "
        f"{precision}, {world.size} rank(s){', self-ensemble x8' if args.self_ensemble else ''}", flush=True)
    results: list[dict] = []
    start = time.perf_counter()
    for loaded in models:
        loaded.model.to(device, memory_format=memory_format(device, loaded.channels_last))
        sha256 = file_sha256(loaded.path)
        for benchmark in sets:
            set_start = time.perf_counter()
            scores = evaluate_set(loaded, benchmark, protocol, device, precision, args.tile,
                                  args.self_ensemble, world, engine, show_progress)
            results.append({"checkpoint": str(loaded.path), "set": benchmark.name, "scale": loaded.scale, **scores,
                            "step": loaded.step, "sha256": sha256, "model": published_model(loaded.num_blocks,
                                                                                            loaded.num_filters),
                            "num_blocks": loaded.num_blocks, "num_filters": loaded.num_filters,
                            "layout": benchmark.layout, "lr_source": benchmark.lr_source(loaded.scale),
                            "seconds": round(time.perf_counter() - set_start, 3)})
        loaded.model.to("cpu")
    seconds = time.perf_counter() - start
    engine.shutdown(True)
    if not world.is_main:
        return 0
    table = format_table(results, protocol, args.self_ensemble)
    print(table)
    print(f"{sum(r['images'] for r in results)} image evaluations in {seconds:.1f} s", flush=True)
    if args.tracker:
        log_to_trackers(args, results, table, protocol.name)
    if args.json:
        _write_json(args, protocol, precision, device, world.size, sets, results, seconds)
    return 0


def _checked_inputs(args) -> tuple[Protocol, list[BenchmarkSet], list[LoadedModel]]:
    """The protocol, the benchmark sets and the loaded models, after every check that can fail on the user's
    input (scales that do not match, a set without the scale, a --json folder that is not there), so a mistake
    fails before any scoring: (protocol, sets, models)."""
    protocol = get_protocol(args.protocol)
    names = [n.strip() for n in args.sets.split(",") if n.strip()] if args.sets else None
    sets = find_sets(args.benchmarks, names)
    models = [load_model(text, args.res_scale, args.raw_weights) for text in args.checkpoints]
    if args.scale is not None:
        wrong = [m for m in models if m.scale != args.scale]
        if wrong:
            raise UserError(f"{wrong[0].path} is a x{wrong[0].scale} model but --scale is {args.scale}; "
                            "drop --scale to score each model at its own scale")
    for loaded in models:
        for benchmark in sets:
            benchmark.check(loaded.scale)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist; create it or "
                        "pass another path")
    return protocol, sets, models


def _write_json(args, protocol: Protocol, precision: str, device: torch.device, ranks: int, sets: list[BenchmarkSet],
                results: list[dict], seconds: float) -> None:
    """--json: the results with the protocol they were scored under, spelled out, written atomically."""
    report = {"protocol": {**protocol.describe(),
                           "lr_source": "per result: files where the set has an LR folder for the scale, else "
                                        "MATLAB-style bicubic of the HR image cropped to a multiple of the scale",
                           "modcrop": "HR cropped bottom/right to a multiple of the scale before LR is made "
                                      "or compared",
                           "grayscale": "replicated to 3 channels; alpha dropped",
                           "bicubic": "MATLAB-style bicubic upscaling of the LR input",
                           "self_ensemble": bool(args.self_ensemble), "precision": precision,
                           "device": str(device), "ranks": ranks, "tile": args.tile,
                           "images_per_set": {b.name: len(b.hr_files) for b in sets}},
              "results": results, "seconds": round(seconds, 3)}
    try:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write --json {args.json} ({exc.strerror}); pass a writable path") from None
    print(f"wrote {args.json}")
