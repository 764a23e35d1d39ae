"""The measurements of `edsr-dist bench`: the real trainer (through its StepTimer seam), the bare loop, the store
reader, and N workers started by the real launcher."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from edsr_dist.config import Config, config_from_dict
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError
from edsr_dist.model.edsr import build_model
from edsr_dist.model.optim import clear_gradients, make_optimizer
from edsr_dist.model.precision import autocast
from edsr_dist.parallel.npu import memory_format as device_memory_format
from edsr_dist.perf.machine import median_of, peak_memory, synchronizer
from edsr_dist.state.atomic import atomic_write_text
from edsr_dist.train.agreement import TrainingDiverged
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.trainer import Trainer

# Phases of one trainer step, in the order they happen.
PHASES = ("data_wait", "loop_other", "to_device", "forward_backward", "allreduce_wait", "optimizer", "step_other")
PHASE_LABELS = {
    "data_wait": "data wait (prefetch queue)",
    "loop_other": "loop bookkeeping, logging",
    "to_device": "batch to device/float",
    "forward_backward": "forward + backward",
    "allreduce_wait": "all-reduce wait (exposed)",
    "optimizer": "optimizer (Adam)",
    "step_other": "overflow check, zero_grad",
}


class StepClock(StepTimer):
    """Host timestamps of each trainer step and its phases, marked by the trainer itself (see StepTimer)."""

    def __init__(self, phase_syncs: bool = True) -> None:
        self.sync = lambda: None  # set to the trainer's device synchronizer once it exists
        # On a GPU/NPU, timing a phase means waiting for the device at its edges, which keeps the host from queueing
        # ahead and so slows the step itself: the headline figure is taken with syncs at step edges only (as the
        # bare loop does), the breakdown from a second run with them.
        self.phase_syncs = phase_syncs
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.data_wait = 0.0  # prefetch queue wait since the last step began

    def begin_step(self) -> None:
        self.sync()
        self.current = {"start": time.perf_counter(), "data_wait": self.data_wait}
        self.data_wait = 0.0

    def end_step(self, skipped: bool) -> None:
        step, self.current = self.current, None
        self.sync()
        step["end"] = time.perf_counter()
        step["skipped"] = bool(skipped)
        self.steps.append(step)
        self.after_step(step)

    def after_step(self, step: dict) -> None:
        """Runs between two trainer steps, outside both (`InterleavedClock` runs a bare block here)."""


class InterleavedClock(StepClock):
    """A StepClock that, after every `block` timed trainer steps, runs `block` steps of the bare loop right there,
    in the trainer's thread: the two are measured in alternating blocks, each bare block next to the trainer block
    before it, so a burst of load from elsewhere hits a pair, not one side of the comparison. The bare block's time
    is left out of the trainer's (its next step counts from `resume`)."""

    def __init__(self, bare: BareLoop, warmup: int, block: int, phase_syncs: bool = True) -> None:
        super().__init__(phase_syncs)
        self.bare, self.warmup, self.block = bare, warmup, block
        self.bare_blocks: list[float] = []  # seconds of each bare block of `block` steps

    def after_step(self, step: dict) -> None:
        timed = len(self.steps) - self.warmup
        if timed > 0 and timed % self.block == 0:
            self.bare_blocks.append(sum(self.bare.run(self.block)))
            step["resume"] = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the phase's duration (device work included) to the current step; data_wait falls between steps."""
        if name == "data_wait":
            start = time.perf_counter()
            try:
                yield
            finally:
                self.data_wait += time.perf_counter() - start
            return
        step = self.current
        if step is None:
            yield
            return
        sync = self.sync if self.phase_syncs else (lambda: None)
        sync()
        start = time.perf_counter()
        step.setdefault(name + "_first", start)
        try:
            yield
        finally:
            sync()
            step[name] = step.get(name, 0.0) + time.perf_counter() - start


def _time_gradient_allreduce(ddp_model, clock: StepClock) -> None:
    """Record when the last gradient bucket was handed to the all-reduce. Host timestamps of bucket hand-over
    only mean "gradients computed" when kernels run synchronously, i.e. on CPU. The hook is DDP's default
    all-reduce (divide by world size, sum), only timed."""
    def timed_allreduce(state, bucket):
        step = clock.current
        launched = time.perf_counter()
        future = allreduce_hook(state, bucket)
        if step is None:
            return future
        step["last_bucket"] = launched
        step.setdefault("first_bucket", launched)
        step["buckets"] = step.get("buckets", 0) + 1  # micro-steps under no_sync hand over none

        def done(fut):
            step["last_reduced"] = max(step.get("last_reduced", 0.0), time.perf_counter())
            return fut.value()

        return future.then(done)

    ddp_model.register_comm_hook(None, timed_allreduce)


def step_phases(previous_end: float, step: dict) -> dict:
    """Split one step (from the end of the previous train_step to the end of this one) into PHASES, seconds."""
    # finish_gradients starts right after loss.backward() returns: its first timestamp ends the backward pass.
    backward_end = step.get("finish_gradients_first", step["end"])
    gap = max(step["start"] - previous_end, 0.0)
    data_wait = min(step["data_wait"], gap)
    exposed = max(backward_end - step["last_bucket"], 0.0) if "last_bucket" in step else 0.0
    to_device = step.get("to_device", 0.0)
    allreduce = exposed + step.get("finish_gradients", 0.0) + step.get("overflow_check", 0.0)
    optimizer = step.get("optimizer", 0.0)
    inside = step["end"] - step["start"]
    forward_backward = max(backward_end - step["start"] - to_device - exposed, 0.0)
    return {
        "data_wait": data_wait,
        "loop_other": gap - data_wait,
        "to_device": to_device,
        "forward_backward": forward_backward,
        "allreduce_wait": allreduce,
        "optimizer": optimizer,
        "step_other": max(inside - to_device - forward_backward - allreduce - optimizer, 0.0),
        "allreduce_in_flight": (step["last_reduced"] - step["first_bucket"]) if "last_reduced" in step else 0.0,
    }


def measure_trainer(cfg: Config, warmup: int, steps: int, world=None, phase_syncs: bool = True,
                    bare: BareLoop | None = None, block: int = 0) -> dict:
    """Run the real training loop for warmup + steps steps and time it. `world`: None = from the environment.
    phase_syncs False: the device is synchronised at step edges only (phase times then count host time only).
    With `bare` (already warmed up), the bare loop runs `block` steps after every `block` timed trainer steps
    (`InterleavedClock`); "block_ratios" are then trainer/bare throughput of each adjacent pair of blocks."""
    clock = InterleavedClock(bare, warmup, block, phase_syncs) if bare is not None else StepClock(phase_syncs)
    trainer = Trainer(cfg, world, timer=clock)
    try:
        clock.sync = synchronizer(trainer.device)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)  # the bare loop may have run in this process
        if isinstance(trainer.train_model, DistributedDataParallel) and trainer.device.type == "cpu":
            _time_gradient_allreduce(trainer.train_model, clock)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the loop's report lines would spoil --json
                trainer.fit()
        except TrainingDiverged:
            raise UserError(f"the loss became NaN/inf in {trainer.precision} within {warmup + steps} steps; "
                            "bench with --precision bf16 or fp32") from None
        if len(clock.steps) < warmup + steps:
            raise RuntimeError(f"the trainer ran {len(clock.steps)} steps, expected {warmup + steps}")
        timed = clock.steps[warmup:warmup + steps]
        ends = [s["end"] for s in clock.steps]
        starts = [s.get("resume", s["end"]) for s in clock.steps]  # where the next step's time begins
        step_times = [ends[i] - starts[i - 1] for i in range(warmup, warmup + steps)]
        phases = [step_phases(starts[i - 1], clock.steps[i]) for i in range(warmup, warmup + steps)]
        total = sum(step_times)
        mean_phases = {key: sum(p[key] for p in phases) / steps for key in PHASES + ("allreduce_in_flight",)}
        median = median_of(step_times)
        interleaved = {}
        if bare is not None:
            blocks = [sum(step_times[i:i + block]) for i in range(0, len(clock.bare_blocks) * block, block)]
            interleaved = {"bare_block_s": clock.bare_blocks, "trainer_block_s": blocks, "block_steps": block,
                           "block_ratios": [b / t for b, t in zip(clock.bare_blocks, blocks)]}
        return {
            **interleaved,
            "rank": trainer.world.rank,
            "world_size": trainer.world.size,
            "engine": trainer.engine_name,
            "device": str(trainer.device),
            "precision": trainer.precision,
            "optimizer": trainer.optimizer_name,
            "threads": trainer.threads,
            "median_step_s": median,
            "mean_step_s": total / steps,
            "step_times_s": step_times,
            "images_per_s": cfg.batch_size / median,
            "phases_s": mean_phases,
            "skipped_steps": sum(s["skipped"] for s in timed),
            # Gradient buckets all-reduced per optimizer step (CPU DDP only, where the hook counts them): the same
            # with --accumulate N as without, the N-1 micro-steps before the last send nothing.
            "allreduce_buckets_per_step": sum(s.get("buckets", 0) for s in timed) / steps,
            "accumulate": cfg.accumulate,
            "peak_memory_bytes": peak_memory(trainer.device),
        }
    finally:
        trainer.close()


class BareLoop:
    """Plain PyTorch: the same model and optimizer on synthetic tensors already on the device; `run(n)` times n
    steps (the device synchronised at the edges)."""

    def __init__(self, cfg: Config, device, precision: str, channels_last: bool):
        self.sync = synchronizer(device)
        self.device, self.precision = device, precision
        memory_format = device_memory_format(device, channels_last)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(device, memory_format=memory_format)
        self.optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg, device)  # the trainer's
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        p, s, b = cfg.patch_size, cfg.scale, cfg.batch_size
        self.lr = (torch.rand(b, 3, p, p, device=device) * 255).contiguous(memory_format=memory_format)
        self.hr = (torch.rand(b, 3, p * s, p * s, device=device) * 255).contiguous(memory_format=memory_format)

    def step(self) -> None:
        with autocast(self.device, self.precision):
            sr = self.model(self.lr)
        loss = F.l1_loss(sr.float(), self.hr)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        clear_gradients(self.optimizer)

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` steps."""
        times = []
        for _ in range(steps):
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        del self.model, self.optimizer, self.lr, self.hr
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def measure_bare(cfg: Config, device, precision: str, channels_last: bool, warmup: int, steps: int) -> dict:
    """The bare loop alone: warmup + steps steps, the median of the timed ones."""
    loop = BareLoop(cfg, device, precision, channels_last)
    try:
        timed = loop.run(warmup + steps)[warmup:]
    finally:
        loop.close()
    median = median_of(timed)
    return {"precision": precision, "channels_last": channels_last, "optimizer": loop.optimizer_name,
            "median_step_s": median, "step_times_s": timed, "images_per_s": cfg.batch_size / median}


def measure_store(path: str, cfg: Config, seconds: float) -> dict:
    """Patches/s of one reader (this process, one thread): TrainSampler.batch in a loop, as the prefetcher calls it."""
    store = PatchStore(path, cfg.scale)
    try:
        sampler = TrainSampler(store, cfg.batch_size, cfg.patch_size, cfg.seed, steps_per_epoch=0)
        sampler.batch(0, 0)  # opens the file
        batches, start = 0, time.perf_counter()
        while True:
            sampler.batch(0, 1 + batches)
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and batches >= 3:
                break
    finally:
        store.close()
    return {"patches_per_s": batches * cfg.batch_size / elapsed, "batches": batches, "batch_size": cfg.batch_size,
            "tiles": store.num_train_tiles}


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # the folder that holds edsr_dist/


def measure_workers(cfg: Config, nproc: int, threads_each: int, warmup: int, steps: int) -> dict:
    """N ranks started by `edsr-dist launch --nproc N` (pinned to core shares), each timing its own loop."""
    folder = tempfile.mkdtemp(prefix="edsr-bench-workers-")
    worker_cfg = dataclasses.replace(cfg, num_threads=threads_each, out=os.path.join(folder, "out"))
    Path(folder, "job.json").write_text(json.dumps({"config": worker_cfg.to_dict(), "warmup": warmup, "steps": steps}))
    log_dir = os.path.join(folder, "logs")
    command = [sys.executable, "-m", "edsr_dist", "launch", "--nproc", str(nproc), "--log-dir", log_dir, "--exec", "--",
               sys.executable, "-m", "edsr_dist", "bench", "--worker-report", folder]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        # SIGTERM, not SIGKILL: the launcher then stops its workers (each in its own session) in order.
        proc.terminate()
        proc.wait()
        raise
    reports = []
    for rank in range(nproc):
        report_path = Path(folder, f"rank_{rank}.json")
        if report_path.exists():
            reports.append(json.loads(report_path.read_text()))
    if proc.returncode != 0 or len(reports) != nproc:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the {nproc}-worker measurement failed (launcher exit {proc.returncode}: {last}); "
                        f"see the rank logs in {log_dir}")
    shutil.rmtree(folder, ignore_errors=True)
    # Ranks move in lockstep (every step has collectives); the slowest rank's median sets the pace.
    median = max(r["median_step_s"] for r in reports)
    phases = {key: sum(r["phases_s"][key] for r in reports) / nproc for key in reports[0]["phases_s"]}
    return {
        "world_size": nproc, "engine": reports[0]["engine"], "device": reports[0]["device"],
        "precision": reports[0]["precision"], "threads": threads_each, "median_step_s": median,
        "mean_step_s": max(r["mean_step_s"] for r in reports), "step_times_s": reports[0]["step_times_s"],
        "images_per_s": cfg.batch_size / median, "phases_s": phases,
        "skipped_steps": max(r["skipped_steps"] for r in reports),
        "allreduce_buckets_per_step": reports[0]["allreduce_buckets_per_step"], "accumulate": cfg.accumulate,
        "peak_memory_bytes": reports[0]["peak_memory_bytes"],
        "ranks": [{"rank": r["rank"], "median_step_s": r["median_step_s"], "threads": r["threads"]} for r in reports],
    }


def run_worker(folder: str) -> int:
    """One rank of measure_workers: time the trainer, write <folder>/rank_<r>.json."""
    job = json.loads(Path(folder, "job.json").read_text())
    cfg = config_from_dict(job["config"])
    result = measure_trainer(cfg, job["warmup"], job["steps"])  # a UserError here reaches the launcher's log
    atomic_write_text(Path(folder, f"rank_{result['rank']}.json"), json.dumps(result))  # never read half-written
    return 0
