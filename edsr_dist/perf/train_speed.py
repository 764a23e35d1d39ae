"""`edsr-dist bench`: training throughput, where a step's time goes, and how it compares, all in one run.

What is measured (every figure of a report comes from the same process, machine and settings):
- trainer: the real `Trainer.fit` loop (patch store, prefetch thread, engine, logging), timed through the trainer's
  `StepTimer` seam (each step and its named phases); median step time after warm-up.
- bare loop: the same model, precision, memory format and threads on synthetic tensors in a plain loop
  (no store, no DDP, no logging). trainer / bare is the framework's overhead. With one worker the two are
  interleaved in one process, `--block-steps` trainer steps then as many bare steps, over and over: the ratio is the
  median of the adjacent pairs of blocks, with its spread, so load from elsewhere on a shared machine hits both
  sides of a pair alike.
- --compare-fp32: the bare loop again in fp32 with NCHW tensors.
- --compare-nproc N: 1 worker x T threads against N workers x T/N threads, the workers started by the real
  launcher (`edsr-dist launch --nproc N`); each rank writes its timings to a JSON file. N need not divide the
  global batch: the row names the split (6/5/5), whose largest share sets the pace of every rank.
- --accumulate N / --compare-accumulate N: the trainer with N micro-batches per step (same global batch) against
  one; with several workers the row also counts the gradient buckets all-reduced per step, the same for both
  (DDP's no_sync on the micro-steps: the all-reduce they save).
- store: patches/s that one reader process gets from `TrainSampler.batch`.

With DDP the gradient all-reduce overlaps the backward pass. On CPU a DDP comm hook (the default all-reduce,
timed) records when the last gradient bucket was handed over; the time from there to the end of backward is the
all-reduce wait that the step actually sees. The rest of the all-reduce is hidden behind compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from edsr_dist.config import DEVICES, PRECISIONS, PRESETS, Config, build_config, check_batch_splits, describe_split
from edsr_dist.data.sample_store import ensure_sample_store
from edsr_dist.errors import (
    CommandParser,
    UserError,
    add_device_flags,
    at_least,
)
from edsr_dist.model.precision import resolve_device_and_precision
from edsr_dist.parallel.world import World
from edsr_dist.perf.machine import machine_info, median_interval, median_of, train_flops_per_image
from edsr_dist.perf.measure import (
    PHASE_LABELS,
    PHASES,
    BareLoop,
    measure_bare,
    measure_store,
    measure_trainer,
    measure_workers,
    run_worker,
)
from edsr_dist.train.device import set_threads

PROG = "edsr-dist bench"
DEFAULT_PRESET = "baseline"
# Targets (BENCHMARKS.md), set for a 2-core CPU with native bf16; the ratios are meaningful on any machine.
TARGETS = {
    "overhead_ratio": (">=", 0.97),
    "precision_speedup": (">=", 4.0),
    "scaling_efficiency": (">=", 0.9),
    "data_wait_fraction": ("<=", 0.02),
}
# trainer / bare is decided against its target only when this confidence interval of its median lies on one side.
MEDIAN_CONFIDENCE = 0.95


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, allow_abbrev=False,
                description="Measure training throughput (images/s, achieved TFLOP/s), a step's breakdown, the "
                            "trainer against a bare PyTorch loop, and optionally fp32 NCHW and multi-worker "
                            "scaling. All figures come from one run.")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model/data preset ({', '.join(PRESETS)}); "
                                                             f"default {DEFAULT_PRESET}")
    add_device_flags(p, DEVICES, PRECISIONS, "auto", "default auto (bf16 on CPUs with native bf16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="memory format of activations (default: the preset's, channels_last)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="workers for the trainer measurement (N > 1: through `edsr-dist launch`)")
    p.add_argument("--threads", type=int, default=0, metavar="T",
                   help="CPU threads in total (default: --num-threads of the preset, OMP_NUM_THREADS, or all "
                        "allowed cores); N workers get T/N each")
    p.add_argument("--steps", type=int, default=10, metavar="S", help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="W", help="untimed steps first (default 3, at least 1)")
    p.add_argument("--block-steps", type=int, default=2, metavar="K",
                   help="trainer against bare loop: alternate blocks of K steps of each in one process (default 2; "
                        "one worker)")
    p.add_argument("--compare-fp32", action="store_true", help="also time the bare loop in fp32 with NCHW tensors")
    p.add_argument("--compare-nproc", type=int, metavar="N",
                   help="also time N workers x T/N threads against 1 worker x T threads")
    p.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="micro-batches per step for the trainer measurements (train's --accumulate; default 1)")
    p.add_argument("--compare-accumulate", type=int, metavar="N",
                   help="also time the trainer with N micro-batches per step (same global batch) against "
                        "--accumulate")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="repeat every measurement R times, round robin, and report each one's best repeat "
                        "(for shared machines; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--data", metavar="STORE", help="patch store (default: the embedded sample store)")
    p.add_argument("--batch-size", type=int, metavar="B", help="global batch (default: the preset's)")
    p.add_argument("--patch-size", type=int, metavar="P", help="LR patch side (default: the preset's)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4))
    p.add_argument("--num-blocks", type=int, metavar="N", help="residual blocks (default: the preset's)")
    p.add_argument("--num-filters", type=int, metavar="F", help="filters (default: the preset's)")
    p.add_argument("--store-seconds", type=float, default=1.0, metavar="S",
                   help="how long to read from the store for its patches/s (default 1)")
    # Internal: a rank started by the launcher for --nproc/--compare-nproc; reads DIR/job.json.
    p.add_argument("--worker-report", metavar="DIR", help=argparse.SUPPRESS)
    return p


def parse_bench_args(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if args.worker_report:
        return args
    at_least("--steps", args.steps, 1, "need at least 1 timed step")
    at_least("--warmup", args.warmup, 1, "need at least 1 warm-up step (the first one includes one-off set-up)")
    at_least("--repeat", args.repeat, 1, "need at least 1")
    at_least("--nproc", args.nproc, 1, "need at least 1 worker")
    at_least("--compare-nproc", args.compare_nproc, 2, "compare against at least 2 workers")
    at_least("--threads", args.threads, 0, "must be 1 or more (0 = automatic)")
    at_least("--accumulate", args.accumulate, 1, "need at least 1 (1 = no accumulation)")
    if args.compare_accumulate is not None and (args.compare_accumulate < 1
                                                or args.compare_accumulate == args.accumulate):
        raise UserError(f"--compare-accumulate {args.compare_accumulate}: compare against a count of at least 1 "
                        f"other than --accumulate {args.accumulate}")
    if not 1 <= args.block_steps <= args.steps:
        raise UserError(f"--block-steps {args.block_steps}: must be 1 to --steps ({args.steps})")
    if args.store_seconds <= 0:
        raise UserError(f"--store-seconds {args.store_seconds:g}: must be positive")
    if args.data and not Path(args.data).exists():
        raise UserError(f"store {args.data} does not exist; build one with `edsr-dist build-store` or omit --data "
                        "for the sample store")
    return args


def bench_config(args: argparse.Namespace) -> Config:
    """The training configuration the bench runs: the preset with the bench's overrides and a short, quiet fit
    (`out` is replaced by a scratch folder when the bench runs)."""
    total = args.warmup + args.steps
    overrides: dict = {
        "precision": args.precision, "device": args.device, "data": args.data or "",
        "epochs": 1, "steps_per_epoch": total, "max_steps": total, "resume": "", "accumulate": args.accumulate,
        "max_val_images": 1, "samples_png": False, "progress": False, "tensorboard": False,
    }
    for flag in ("batch_size", "patch_size", "scale", "num_blocks", "num_filters", "channels_last"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.threads:
        overrides["num_threads"] = args.threads
    cfg = build_config(preset=args.preset, overrides=overrides)
    for flag, workers in (("--nproc", args.nproc), ("--compare-nproc", args.compare_nproc)):
        if workers:
            check_batch_splits(cfg.batch_size, workers, max(cfg.accumulate, args.compare_accumulate or 1), flag)
    return cfg


def _check(value: float | None, key: str) -> dict | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    met = value >= target if op == ">=" else value <= target
    return {"value": value, "target": f"{op} {target:g}", "met": met}


def run_bench(args: argparse.Namespace, cfg: Config) -> dict:
    load_before = os.getloadavg()
    scratch = tempfile.mkdtemp(prefix="edsr-bench-")
    try:
        cfg, device, precision, total_threads = _resolved_config(cfg, scratch)
        store = measure_store(cfg.data, cfg, args.store_seconds)  # also checks the store and the patch size first
        plan = _measurement_plan(args, cfg, device, precision, total_threads, scratch)
        runs = _run_round_robin(plan, args.repeat, cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = _assemble_report(args, cfg, device, precision, total_threads, store, runs)
    report["machine"] = machine_info(device)
    report["machine"]["load_average_before"] = load_before[0]
    report["machine"]["load_average_after"] = os.getloadavg()[0]
    return report


def _resolved_config(cfg: Config, scratch: str) -> tuple[Config, torch.device, str, int]:
    """Resolve device, precision, threads and data once, so the trainer runs, workers and bare loops all match."""
    cfg = dataclasses.replace(cfg, out=os.path.join(scratch, "out"), data=cfg.data or ensure_sample_store())
    device, precision = resolve_device_and_precision(cfg.device, cfg.precision)
    # Children and the bare loops use the resolved choices, so every figure describes the same thing.
    cfg = dataclasses.replace(cfg, precision=precision, device=device.type)
    total_threads = set_threads(cfg)
    cfg = dataclasses.replace(cfg, num_threads=total_threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the trainer does, so the bare loop matches it
    return cfg, device, precision, total_threads


def _measurement_plan(args: argparse.Namespace, cfg: Config, device: torch.device, precision: str,
                      total_threads: int, scratch: str) -> dict[str, Callable[[], dict]]:
    """Name every measurement the flags ask for, each a call that measures once (repeats run them again)."""
    runs_started = itertools.count()

    def trainer_with(workers: int, phase_syncs: bool = True, accumulate: int | None = None,
                     interleave: bool = False) -> dict:
        # Every trainer run gets a folder of its own: a run folder holds one run.
        run_cfg = dataclasses.replace(cfg, out=os.path.join(scratch, f"run_{next(runs_started)}"),
                                      accumulate=accumulate or cfg.accumulate)
        if workers > 1:
            return measure_workers(run_cfg, workers, max(1, total_threads // workers), args.warmup, args.steps)
        if not interleave:
            return measure_trainer(run_cfg, args.warmup, args.steps, world=World(), phase_syncs=phase_syncs)
        bare = BareLoop(cfg, device, precision, cfg.channels_last)
        try:
            bare.run(args.warmup)
            return measure_trainer(run_cfg, args.warmup, args.steps, world=World(), phase_syncs=phase_syncs,
                                   bare=bare, block=args.block_steps)
        finally:
            bare.close()

    accelerator = device.type != "cpu"  # where a sync costs something (see StepClock)
    plan = {"bare": lambda: measure_bare(cfg, device, precision, cfg.channels_last, args.warmup, args.steps),
            "trainer": lambda: trainer_with(args.nproc, phase_syncs=not accelerator, interleave=True)}
    if accelerator and args.nproc == 1:
        plan["trainer_phases"] = lambda: trainer_with(1, phase_syncs=True)
    if args.compare_fp32:
        plan["fp32_nchw"] = lambda: measure_bare(cfg, device, "fp32", False, args.warmup, args.steps)
    if args.compare_nproc:
        for workers in sorted({1, args.compare_nproc} - {args.nproc}):
            plan[f"workers_{workers}"] = lambda workers=workers: trainer_with(workers)
    if args.compare_accumulate:
        plan["accumulate"] = lambda: trainer_with(args.nproc, accumulate=args.compare_accumulate)
    return plan


def _run_round_robin(plan: dict[str, Callable[[], dict]], repeat: int, cfg: Config) -> dict[str, list[dict]]:
    """Run each measurement `repeat` times, interleaved, so load from elsewhere spreads over all of them."""
    # Round robin, so that a burst of load from elsewhere hits one repeat of each rather than all of one;
    # the least disturbed repeat (highest images/s) of each measurement is reported.
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    for _ in range(repeat):
        for name, measure in plan.items():
            set_threads(cfg)
            runs[name].append(measure())
    return runs


def _scaling(args: argparse.Namespace, cfg: Config, best: dict[str, dict]) -> dict | None:
    """--compare-nproc: 1 worker against N, whichever of them the main trainer measurement already is."""
    if not args.compare_nproc:
        return None
    n = args.compare_nproc
    trainer = best["trainer"]
    one = trainer if args.nproc == 1 else best["workers_1"]
    many = trainer if args.nproc == n else best[f"workers_{n}"]
    return {"one_worker": _summary(one, cfg), "n_workers": _summary(many, cfg), "nproc": n,
            "efficiency": many["images_per_s"] / one["images_per_s"]}


def _accumulation(args: argparse.Namespace, cfg: Config, best: dict[str, dict]) -> dict | None:
    """--compare-accumulate: the other micro-batch count against the main trainer measurement."""
    if not args.compare_accumulate:
        return None
    trainer, other = best["trainer"], best["accumulate"]
    return {"base": _summary(trainer, cfg), "other": _summary(other, cfg),
            "ratio": other["images_per_s"] / trainer["images_per_s"]}


def _overhead(args: argparse.Namespace, runs: dict[str, list[dict]], trainer: dict,
              bare: dict) -> tuple[float, dict]:
    """trainer / bare loop, from the interleaved block pairs where there are any, with their spread."""
    ratios = sorted(r for m in runs["trainer"] for r in m.get("block_ratios", []))  # every repeat's pairs
    if ratios:
        overhead = median_of(ratios)
        low, high = median_interval(ratios, MEDIAN_CONFIDENCE)
        spread = {"pairs": len(ratios), "block_steps": args.block_steps, "min": ratios[0],
                  "p25": _quantile(ratios, 0.25), "median": overhead, "p75": _quantile(ratios, 0.75),
                  "max": ratios[-1], "median_low": low, "median_high": high, "confidence": MEDIAN_CONFIDENCE,
                  "method": "interleaved blocks, one process"}
    else:  # N workers: the trainer runs in the launcher's processes, the bare loop here, one after the other
        overhead = trainer["images_per_s"] / bare["images_per_s"]
        spread = {"pairs": 0, "method": "separate measurements"}
    return overhead, spread


def _checks(report: dict, overhead: float, spread: dict) -> dict:
    """Each target's verdict; the overhead is decided only when the confidence interval of its median allows it."""
    checks = {key: _check(report.get(key), key) for key in TARGETS}
    if spread["pairs"]:
        # Met or missed only when the whole interval of the median lies on one side of the target; else the noise
        # is larger than the gap. More pairs (--steps) narrow the interval; the spread of single pairs stays.
        target = TARGETS["overhead_ratio"][1]
        low, high = spread["median_low"], spread["median_high"]
        checks["overhead_ratio"]["decided"] = low >= target or high < target
        checks["overhead_ratio"]["met"] = low >= target if checks["overhead_ratio"]["decided"] else overhead >= target
    return {key: value for key, value in checks.items() if value is not None}


def _settings(args: argparse.Namespace, cfg: Config, device: torch.device, precision: str, total_threads: int,
              trainer: dict, bare: dict) -> dict:
    """What was measured, as resolved, so that a report says how to reproduce it."""
    return {
        "preset": args.preset, "scale": cfg.scale, "num_blocks": cfg.num_blocks, "num_filters": cfg.num_filters,
        "batch_size": cfg.batch_size, "patch_size": cfg.patch_size, "precision": precision,
        "channels_last": cfg.channels_last, "device": str(device), "nproc": args.nproc, "threads": total_threads,
        "threads_per_worker": trainer["threads"], "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
        "compare_nproc": args.compare_nproc, "optimizer": trainer.get("optimizer", bare.get("optimizer")),
        "data": cfg.data, "log_every": cfg.log_every, "accumulate": cfg.accumulate,
        "compare_accumulate": args.compare_accumulate, "split": describe_split(cfg.batch_size, args.nproc),
    }


def _assemble_report(args: argparse.Namespace, cfg: Config, device: torch.device, precision: str,
                     total_threads: int, store: dict, runs: dict[str, list[dict]]) -> dict:
    """The report's figures from every run's measurements (all but the machine, which the caller adds)."""
    best = {name: max(results, key=lambda m: m["images_per_s"]) for name, results in runs.items()}
    bare, trainer, fp32 = best["bare"], best["trainer"], best.get("fp32_nchw")
    scaling = _scaling(args, cfg, best)
    accumulation = _accumulation(args, cfg, best)
    flops = train_flops_per_image(cfg)
    phased = best.get("trainer_phases", trainer)  # the breakdown: phases timed with device syncs
    step_total = sum(phased["phases_s"][key] for key in PHASES)
    fractions = {key: phased["phases_s"][key] / step_total for key in PHASES}
    overhead, spread = _overhead(args, runs, trainer, bare)
    report = {
        "images_per_s": trainer["images_per_s"],
        "tflops": trainer["images_per_s"] * flops / 1e12,
        "step_time_ms": trainer["median_step_s"] * 1e3,
        "bare_images_per_s": bare["images_per_s"],
        "bare_tflops": bare["images_per_s"] * flops / 1e12,
        "overhead_ratio": overhead,
        "overhead_ratio_spread": spread,
        "data_wait_fraction": fractions["data_wait"],
        "allreduce_fraction": fractions["allreduce_wait"],
        "breakdown_ms": {key: phased["phases_s"][key] * 1e3 for key in PHASES},
        "breakdown_fraction": fractions,
        "breakdown_step_time_ms": phased["median_step_s"] * 1e3,
        "allreduce_in_flight_ms": phased["phases_s"]["allreduce_in_flight"] * 1e3,
        "skipped_steps": trainer["skipped_steps"],
        "store_patches_per_s": store["patches_per_s"],
        "train_flops_per_image": flops,
        "repeats_images_per_s": {name: [m["images_per_s"] for m in results] for name, results in runs.items()},
        "trainer": trainer,
        "bare": bare,
        "store": store,
    }
    if fp32 is not None:
        report["fp32_nchw_images_per_s"] = fp32["images_per_s"]
        report["precision_speedup"] = bare["images_per_s"] / fp32["images_per_s"]
        report["fp32_nchw"] = fp32
    if scaling is not None:
        report["scaling_efficiency"] = scaling["efficiency"]
        report["scaling"] = scaling
    if accumulation is not None:
        report["accumulation"] = accumulation
    report["checks"] = _checks(report, overhead, spread)
    report["settings"] = _settings(args, cfg, device, precision, total_threads, trainer, bare)
    return report


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method) of a sorted list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(measurement: dict, cfg: Config) -> dict:
    summary = {key: measurement[key] for key in ("world_size", "threads", "images_per_s", "median_step_s",
                                                 "accumulate", "allreduce_buckets_per_step")}
    summary["split"] = describe_split(cfg.batch_size, measurement["world_size"])
    summary["breakdown_ms"] = {key: measurement["phases_s"][key] * 1e3 for key in PHASES}
    summary["allreduce_in_flight_ms"] = measurement["phases_s"]["allreduce_in_flight"] * 1e3
    return summary


def format_report(r: dict) -> str:
    fmt = _memory_format_name(r["settings"])
    return "\n".join(_header_lines(r, fmt) + _throughput_lines(r) + _breakdown_lines(r) + _check_lines(r, fmt))


def _memory_format_name(settings: dict) -> str:
    """The activations' memory format as the table names it (the header and the precision check both say it)."""
    return "channels_last" if settings["channels_last"] else "NCHW"


def _header_lines(r: dict, fmt: str) -> list[str]:
    """What was measured, on what, and how: the lines above the tables."""
    s, m = r["settings"], r["machine"]
    repeats = f", best of {s['repeat']} repeats" if s["repeat"] > 1 else ""
    return [
        f"{PROG}: EDSR x{s['scale']} {s['num_blocks']}x{s['num_filters']} ({s['preset']}), global batch "
        f"{s['batch_size']}, {s['patch_size']}x{s['patch_size']} LR patches, {s['precision']}, {fmt}, {s['device']}, "
        f"{s.get('optimizer')} (trainer and bare loop)",
        f"machine: {m['device_name'] + '; ' if not s['device'].startswith('cpu') else ''}{m['cpus_allowed']} of "
        f"{m['cpus']} CPUs ({m['cpu_model']}{', native bf16' if m['cpu_native_bf16'] else ''}), torch {m['torch']}; "
        f"load average {m['load_average_before']:.2f} before, {m['load_average_after']:.2f} after",
        f"{s['warmup']} warm-up + {s['steps']} timed steps, median step time{repeats}; "
        f"training FLOPs/image {r['train_flops_per_image'] / 1e9:.2f} G (forward x3)",
    ]


def _throughput_row(r: dict, label: str, images_per_s: float) -> str:
    """One row of the throughput table: images/s, the TFLOP/s they mean, and the step time."""
    tflops = images_per_s * r["train_flops_per_image"] / 1e12
    return f"  {label:<38}{images_per_s:>10.2f}{tflops:>10.3f}{r['settings']['batch_size'] / images_per_s * 1e3:>10.1f}"


def _split_note(world_size: int, text: str) -> str:
    """The batch split of several workers, where it is uneven (an even one adds nothing to the label)."""
    return f", {text}" if world_size > 1 and "each" not in text else ""


def _throughput_lines(r: dict) -> list[str]:
    """The throughput table: the trainer, the bare loop and every comparison asked for, then the store."""
    s = r["settings"]
    lines = ["", f"{'throughput':<40}{'img/s':>10}{'TFLOP/s':>10}{'step ms':>10}"]
    workers = f"{s['nproc']} worker{'s' if s['nproc'] > 1 else ''} x {s['threads_per_worker']} thread(s)"
    micro = f", accumulate {s['accumulate']}" if s["accumulate"] > 1 else ""
    lines.append(_throughput_row(r, f"trainer ({workers}{_split_note(s['nproc'], s['split'])}{micro})",
                                 r["images_per_s"]))
    lines.append(_throughput_row(r, f"bare loop (1 process x {s['threads']} thread(s))", r["bare_images_per_s"]))
    if "fp32_nchw_images_per_s" in r:
        lines.append(_throughput_row(r, "bare loop, fp32 NCHW", r["fp32_nchw_images_per_s"]))
    if "scaling" in r:
        for part in (r["scaling"]["one_worker"], r["scaling"]["n_workers"]):
            lines.append(_throughput_row(r, f"trainer, {part['world_size']} worker(s) x {part['threads']} thread(s)"
                                            f"{_split_note(part['world_size'], part['split'])}", part["images_per_s"]))
    if "accumulation" in r:
        other = r["accumulation"]["other"]
        lines.append(_throughput_row(r, f"trainer, accumulate {other['accumulate']}", other["images_per_s"]))
    lines.append(f"  {'store, 1 reader (patches/s)':<38}{r['store_patches_per_s']:>10.0f}")
    return lines


def _breakdown_lines(r: dict) -> list[str]:
    """The step breakdown table (beside the other worker count's with --compare-nproc) and its notes."""
    s = r["settings"]
    # With --compare-nproc, the breakdown of the other trainer measurement sits beside the main one's.
    other = None
    if "scaling" in r:
        key = "n_workers" if r["scaling"]["n_workers"]["world_size"] != s["nproc"] else "one_worker"
        other = r["scaling"][key]
    header = f"{'trainer step breakdown (mean per step)':<40}{'ms':>10}{'share':>10}"
    if other is not None:
        header += f"{str(other['world_size']) + ' worker(s) ms':>18}"
    lines = ["", header]
    for key in PHASES:
        line = f"  {PHASE_LABELS[key]:<38}{r['breakdown_ms'][key]:>10.2f}{r['breakdown_fraction'][key]:>10.1%}"
        if other is not None:
            line += f"{other['breakdown_ms'][key]:>18.2f}"
        lines.append(line)
    in_flight = r["allreduce_in_flight_ms"]
    other_in_flight = other["allreduce_in_flight_ms"] if other is not None else 0.0
    if in_flight or other_in_flight:
        lines.append(f"  {'(all-reduce in flight, overlapped)':<38}{in_flight:>10.2f}{'':>10}"
                     + (f"{other_in_flight:>18.2f}" if other is not None else ""))
    if r["skipped_steps"]:
        lines.append(f"  note: {r['skipped_steps']} timed step(s) skipped by fp16 loss scaling (no optimizer step)")
    return lines + _accumulation_notes(r)


def _accumulation_notes(r: dict) -> list[str]:
    """--compare-accumulate: the all-reduces that no_sync saves (several workers) and the throughput ratio."""
    if "accumulation" not in r:
        return []
    a = r["accumulation"]
    lines = []
    if r["settings"]["nproc"] > 1:
        lines.append(f"  gradient buckets all-reduced per step: {a['base']['allreduce_buckets_per_step']:g} with "
                     f"accumulate {a['base']['accumulate']}, {a['other']['allreduce_buckets_per_step']:g} with "
                     f"accumulate {a['other']['accumulate']} (micro-steps run under no_sync)")
    lines.append(f"  accumulate {a['other']['accumulate']} / accumulate {a['base']['accumulate']}: "
                 f"{a['ratio']:.3f} of the throughput")
    return lines


def _check_lines(r: dict, fmt: str) -> list[str]:
    """The targets table: each check's value, target and verdict, then how the overhead ratio was measured."""
    s = r["settings"]
    lines = ["", f"{'checks':<40}{'value':>10}{'target':>10}"]
    names = {"overhead_ratio": "trainer / bare loop", "precision_speedup": f"{s['precision']} {fmt} / fp32 NCHW",
             "scaling_efficiency": "N workers / 1 worker", "data_wait_fraction": "data wait share of step"}
    for key, check in r["checks"].items():
        verdict = "ok" if check["met"] else "MISSED"
        if not check.get("decided", True):
            verdict = "not decided: the target lies within the interval of the median (more --steps narrow it)"
        lines.append(f"  {names[key]:<38}{check['value']:>10.3f}{check['target']:>10}  {verdict}")
    spread = r.get("overhead_ratio_spread", {})
    if spread.get("pairs"):
        lines.append(f"  (trainer / bare loop: median of {spread['pairs']} adjacent pairs of {spread['block_steps']}-step "
                     f"blocks; {spread['confidence']:.0%} interval of the median {spread['median_low']:.3f}-"
                     f"{spread['median_high']:.3f}; middle half {spread['p25']:.3f}-{spread['p75']:.3f}, all "
                     f"{spread['min']:.3f}-{spread['max']:.3f})")
    return lines


def main(argv: list[str]) -> int:
    args = parse_bench_args(argv)
    if args.worker_report:
        return run_worker(args.worker_report)
    report = run_bench(args, bench_config(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0
