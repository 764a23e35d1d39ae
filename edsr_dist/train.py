"""The training loop: one worker, whatever started it (run_1p.sh, the launcher, torchrun, horovodrun, mpirun).

Reading order: `main` -> `Trainer.__init__` (world, engine, data, model, resume) -> `Trainer.fit`
(`train_step` per batch, `validate` and `save` every few epochs) -> the `Result:` line.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edsr_dist import __version__
from edsr_dist.config import PRESETS, Config, build_config, describe_fields, parse_override_args
from edsr_dist.dist.engine import make_engine, resolve_engine_name
from edsr_dist.dist.launcher import EXIT_COLLECTIVE_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED
from edsr_dist.dist.world import World, discover_world
from edsr_dist.errors import UserError
from edsr_dist.model import build_model
from edsr_dist.precision import LossScaler, autocast, resolve_precision, select_device

CHECKPOINT_FORMAT = 1
# Consecutive steps with a non-finite loss or gradient before the run is declared diverged. fp16 needs
# more room: the loss scaler legitimately overflows a few times while it finds its scale.
MAX_BAD_STEPS = {"fp16": 30, "bf16": 5, "fp32": 5}

TRAIN_HELP = """usage: edsr-dist train [--config FILE] [--preset NAME] [--field-name value ...]

Train EDSR. Without --data, the embedded sample store is built (or reused) in the cache folder.
Every setting below can be given as --field-name value (defaults shown are the old TF script's):
"""


class TrainingDiverged(Exception):
    """Loss or gradients stayed NaN/inf beyond what loss scaling recovers from."""


class Interrupted(Exception):
    """SIGTERM/SIGINT (preemption): stopped at a step boundary after writing a checkpoint."""


def parse_train_args(argv: list[str]) -> Config:
    argv = list(argv)
    preset = config_file = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(TRAIN_HELP + describe_fields() + f"\n\npresets: {', '.join(PRESETS)} (see edsr_dist/config.py)")
            raise SystemExit(0)
        key, eq, value = arg.partition("=")
        if key in ("--preset", "--config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"option {key} needs a value")
                i += 1
                value = argv[i]
            if key == "--preset":
                preset = value
            else:
                config_file = value
        else:
            rest.append(arg)
        i += 1
    return build_config(preset=preset, config_file=config_file, overrides=parse_override_args(rest))


def learning_rate(cfg: Config, step: int) -> float:
    """Staircase decay: lr * decay_rate ** (step // decay_step). Derived from the step alone, so resuming
    can never decay twice."""
    return cfg.lr * cfg.decay_rate ** (step // cfg.decay_step)


def set_threads(cfg: Config) -> int:
    threads = cfg.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


class Prefetcher:
    """Reads the next batches in a background thread so the step never waits on HDF5 and augmentation."""

    def __init__(self, produce, steps, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def run():
            try:
                for step in steps:
                    if self._stop.is_set():
                        return
                    self._queue.put((step, produce(step), None))
            except BaseException as exc:  # handed to the consumer, raised there
                self._queue.put((None, None, exc))
            self._queue.put((None, None, StopIteration()))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            step, batch, exc = self._queue.get()
            if isinstance(exc, StopIteration):
                return
            if exc is not None:
                raise exc
            yield step, batch

    def close(self):
        """Stop and join the reader: a thread left inside HDF5 at interpreter exit can abort the process."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class Trainer:
    def __init__(self, cfg: Config, world: World | None = None):
        self.cfg = cfg
        self.world = world or discover_world()
        if cfg.batch_size % self.world.size:
            raise UserError(f"batch_size {cfg.batch_size} (global) does not divide by the world size {self.world.size}; "
                            f"pass --batch-size as a multiple of {self.world.size}")
        self.out = Path(cfg.out)
        self.device = select_device(cfg.device, self.world.device_index)
        self.precision = resolve_precision(cfg.precision, self.device.type)
        # Training shapes never change, so cuDNN's autotuner pays off; validation turns it off (every image differs).
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        self.threads = set_threads(cfg)
        self.engine_name = resolve_engine_name(cfg.engine, self.world)
        self.engine = make_engine(self.engine_name, self.world, self.device, cfg.dist_timeout)
        self.is_main = self.world.is_main

        if self.is_main:
            check_output_folder(self.out)

        self.store = self._open_store()
        from edsr_dist.data.sampler import TrainSampler

        self.sampler = TrainSampler(self.store, cfg.batch_size, cfg.patch_size, cfg.seed, cfg.steps_per_epoch,
                                    rank=self.world.rank, world_size=self.world.size)
        self.steps_per_epoch = self.sampler.steps_per_epoch

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank, before DDP's broadcast makes sure
        model = build_model(cfg)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=self.memory_format)
        self.model = model  # the bare network: validation and checkpoints use it
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon)
        self.scaler = LossScaler(enabled=self.precision == "fp16")
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_psnr: float | None = None
        self.resumed_from = self._resume(optimizer)
        self.train_model, self.optimizer = self.engine.wrap(model, optimizer)
        self.metrics_file = None
        self.tb = None
        self._bar = None  # tqdm on rank 0 while fit() runs
        self._stop_requested = False  # set by a signal, on this rank, at any moment
        self._stop_agreed = False  # set in a step, on every rank at once: the only one the loop acts on

    # ---- set-up ---------------------------------------------------------------------------------------------

    def _open_store(self):
        from edsr_dist.data.store import PatchStore

        path = self.cfg.data
        if not path:
            from edsr_dist.data.sample import ensure_sample_store

            # Rank 0 builds (or repairs) the cached sample store while the others wait.
            path = ensure_sample_store() if self.is_main else None
            self.engine.barrier()
            path = path or ensure_sample_store()
        elif not Path(path).exists():
            raise UserError(f"store {path} does not exist; build one with `edsr-dist build-store` or omit --data for the sample")
        return PatchStore(path, self.cfg.scale)

    def _resume(self, optimizer) -> str | None:
        if not self.cfg.resume:
            return None
        from edsr_dist.checkpoint import find_checkpoint, load_checkpoint

        where = self.out if self.cfg.resume == "auto" else Path(self.cfg.resume)
        # Rank 0 chooses (and reports skipped damaged files once); everyone resumes from the same file.
        path = self.engine.broadcast_object(find_checkpoint(where) if self.is_main else None)
        if path is None:
            if self.cfg.resume == "auto":
                return None  # nothing yet: a fresh start, so the same command line works for the first run too
            raise UserError(f"no valid checkpoint at {self.cfg.resume}; pass --resume auto or an existing .ckpt file")
        if self.any_rank(not Path(path).exists()):
            # Another server without a shared file system: rank 0 sends the state.
            state = self.engine.broadcast_object(load_checkpoint(path) if self.is_main else None)
        else:
            state = load_checkpoint(path)
        saved = state["config"]
        for key in ("scale", "num_blocks", "num_filters"):
            if saved[key] != getattr(self.cfg, key):
                raise UserError(f"checkpoint {path} has {key}={saved[key]} but this run has {getattr(self.cfg, key)}; "
                                f"pass --{key.replace('_', '-')} {saved[key]} or start a new --out")
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best_psnr = state.get("best_psnr")
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        torch.set_rng_state(state["rng"]["torch"])
        if self.is_main:
            self._drop_metrics_after(self.step)
        return str(path)

    def _drop_metrics_after(self, step: int) -> None:
        """A killed run logged steps past its last checkpoint; the resumed run logs them again."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a line cut short by the kill
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.device)
        return self.engine.all_reduce_max(value).item() > 0

    # ---- reporting ------------------------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if self.is_main:
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def record(self, **entry) -> None:
        if not self.is_main:
            return
        if self.metrics_file is None:
            self.out.mkdir(parents=True, exist_ok=True)  # created with the first thing to put in it
            self.metrics_file = open(self.out / "metrics.jsonl", "a")
            self._open_tensorboard()
        self.metrics_file.write(json.dumps(entry) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in entry.items():
                if key not in ("type", "step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{entry['type']}/{key}", value, entry.get("step", self.step))

    def _open_tensorboard(self) -> None:
        if not (self.is_main and self.cfg.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional extra
            return
        self.tb = SummaryWriter(str(self.out / "tensorboard"))

    # ---- one step -------------------------------------------------------------------------------------------

    def to_device(self, batch_uint8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch_uint8).to(self.device, non_blocking=True)
        # NHWC uint8 -> logical NCHW float; permute keeps the NHWC storage, i.e. channels_last, for free.
        x = x.permute(0, 3, 1, 2).float()
        return x.contiguous(memory_format=self.memory_format)

    def train_step(self, lr_batch: np.ndarray, hr_batch: np.ndarray) -> tuple[torch.Tensor, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        lr_t, hr_t = self.to_device(lr_batch), self.to_device(hr_batch)
        with autocast(self.device, self.precision):
            sr = self.train_model(lr_t)
        loss = F.l1_loss(sr.float(), hr_t)
        self.scaler.scale_loss(loss).backward()
        self.engine.finish_gradients(self.optimizer)
        bad = self.scaler.unscale_(self.model.parameters()) if self.scaler.enabled else (~torch.isfinite(loss.detach())).float()
        # One small all-reduce carries both the overflow flag and a pending stop request, so all ranks
        # skip the same steps and stop at the same step boundary.
        flags = torch.stack([bad.reshape(()), torch.tensor(float(self._stop_requested), device=bad.device)])
        flags = self.engine.all_reduce_max(flags).tolist()
        skipped = flags[0] > 0
        if not skipped:
            self.engine.step(self.optimizer)
        self.scaler.update(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        # Never act on the local flag directly: a signal landing between this all-reduce and the loop's check
        # would stop this rank one step before the others, leaving them waiting in the next step's collectives.
        self._stop_agreed = flags[1] > 0
        return loss.detach(), skipped

    # ---- validation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, write_samples: bool = False) -> dict:
        """Each rank takes every world-size-th image; sums are reduced so rank 0 reports the whole set."""
        from edsr_dist.benchmarks import score_shards, validation_source
        from edsr_dist.infer import super_resolve
        from edsr_dist.metrics import bicubic_upscale
        from edsr_dist.precision import DTYPES

        source = validation_source(self.cfg, self.store)  # the store's images, or cfg.val_benchmark's

        def score_one(index: int) -> dict:
            name, lr, hr = source.load(index)
            sr = super_resolve(self.model, lr, self.device, tile=self.cfg.val_tile or None,
                               dtype=DTYPES[self.precision])
            if write_samples:
                self._write_sample(name, bicubic_upscale(lr, hr.shape), sr, hr)
            return source.score(sr, lr, hr)

        self.model.eval()
        autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        report = score_shards(source.count, self.world.rank, self.world.size, score_one, source.keys,
                              self.engine.all_reduce_sum, self.device)
        self.model.train()
        torch.backends.cudnn.benchmark = autotune
        return {**report, **source.labels}

    def _write_sample(self, name: str, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> None:
        """bicubic | EDSR | ground truth, a centre crop of each, side by side."""
        from PIL import Image

        side = min(256, hr.shape[0], hr.shape[1])
        top, left = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
        crops = [img[top:top + side, left:left + side] for img in (bicubic, sr, hr)]
        gap = np.full((side, 4, 3), 255, np.uint8)
        row = np.concatenate([crops[0], gap, crops[1], gap, crops[2]], axis=1)
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row).save(folder / f"{name}_bicubic_edsr_gt.png")

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save(self, psnr: float | None = None) -> Path | None:
        if not self.is_main:
            return None
        from edsr_dist.checkpoint import save_checkpoint

        if psnr is not None and (self.best_psnr is None or psnr > self.best_psnr):
            self.best_psnr = psnr
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_psnr": self.best_psnr,
            "rng": {"torch": torch.get_rng_state()},
            "config": self.cfg.to_dict(),
            "meta": {"format_version": CHECKPOINT_FORMAT, "world_size": self.world.size, "engine": self.engine_name,
                     "precision": self.precision, "package_version": __version__, "time": time.time()},
        }
        return save_checkpoint(self.out, state, step=self.step, keep_last=self.cfg.keep_last, psnr=psnr)

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        if self.is_main and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.log(self._banner(total_steps))

        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        report: dict = {}
        bad_steps = 0
        save_due = False
        try:
            while self.epoch < cfg.epochs and self.step < total_steps:
                epoch_loss = torch.zeros((), device=self.device)
                epoch_steps = 0
                window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.perf_counter()
                batches = Prefetcher(lambda s: self.sampler.batch(self.epoch, s),
                                     range(self.step_in_epoch, self.steps_per_epoch))
                try:
                    for step_in_epoch, (lr_batch, hr_batch) in batches:
                        loss, skipped = self.train_step(lr_batch, hr_batch)
                        self.step += 1
                        self.step_in_epoch = step_in_epoch + 1
                        if self._bar is not None:
                            self._bar.update(1)
                        if skipped:
                            bad_steps += 1
                            if bad_steps >= MAX_BAD_STEPS[self.precision]:
                                raise TrainingDiverged(self.step)
                        else:
                            bad_steps = 0
                            epoch_loss += loss
                            window_loss += loss
                            epoch_steps += 1
                            window_steps += 1
                        if self.step % cfg.log_every == 0 and window_steps:
                            elapsed = time.perf_counter() - window_start
                            mean = window_loss.item() / window_steps
                            rate = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                            self.log(f"Step nr: [{self.step}/{total_steps}] - Loss: {mean:.5f} - "
                                     f"Lr: {learning_rate(cfg, self.step - 1):.3e}")
                            self.record(type="step", step=self.step, epoch=self.epoch + 1, loss=mean,
                                        lr=learning_rate(cfg, self.step - 1), images_per_s=rate,
                                        loss_scale=self.scaler.scale)
                            window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.perf_counter()
                        if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                            save_due = True
                        # Not during a run of non-finite steps: the weights may be the ones that blew up, and
                        # retention would delete the good checkpoints before divergence is declared.
                        if save_due and not bad_steps:
                            self.save()
                            save_due = False
                        if self._stop_agreed:
                            raise Interrupted()
                        if self.step >= total_steps:
                            break
                finally:
                    batches.close()
                epoch_done = self.step_in_epoch >= self.steps_per_epoch
                last = self.step >= total_steps or (epoch_done and self.epoch + 1 >= cfg.epochs)
                number = self.epoch + 1
                mean_loss = self._mean_over_ranks(epoch_loss, epoch_steps)
                if epoch_done:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if number % cfg.validate_every == 0 or last:
                    report = self.validate(write_samples=last and cfg.samples_png)
                    self.log(f"Epoch nr: [{number}/{cfg.epochs}] - Loss: {mean_loss:.5f} - "
                             f"val PSNR: {report['psnr_y']:.3f} - val SSIM: {report['ssim_y']:.4f}")
                    self.record(type="epoch", step=self.step, epoch=number, loss=mean_loss, **report)
                else:
                    self.log(f"Epoch nr: [{number}/{cfg.epochs}] - Loss: {mean_loss:.5f}")
                    self.record(type="epoch", step=self.step, epoch=number, loss=mean_loss)
                if number % cfg.save_every == 0 or last:
                    self.save(psnr=report.get("psnr_y") if number % cfg.validate_every == 0 or last else None)
        except Interrupted:
            path = self.save()
            self.log(f"Interrupted at step {self.step}; checkpoint {path}. Resume with --resume auto.")
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if self._bar is not None:
                self._bar.close()
            self._bar = None

        if report:
            self.log(f"Result: EDSR {report['psnr_y']:.2f} dB, bicubic {report['bicubic_psnr_y']:.2f} dB "
                     f"(Y-PSNR, {report['images']} held-out images)")
            self.record(type="result", step=self.step, **report)
        return report

    def _mean_over_ranks(self, loss_sum: torch.Tensor, steps: int) -> float:
        both = torch.stack([loss_sum.detach().float(), torch.tensor(float(steps), device=loss_sum.device)])
        both = self.engine.all_reduce_sum(both).cpu()
        return both[0].item() / max(both[1].item(), 1.0)

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _banner(self, total_steps: int) -> str:
        w = self.world
        where = f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "fresh start"
        return (f"edsr-dist {__version__}: EDSR x{self.cfg.scale} {self.cfg.num_blocks}x{self.cfg.num_filters}, "
                f"{w.size} worker(s) via {w.launcher}, engine {self.engine_name}, device {self.device}, "
                f"{self.precision}, {self.threads} thread(s)/worker, global batch {self.cfg.batch_size}, "
                f"{self.steps_per_epoch} steps/epoch, {total_steps} steps; {where}")

    def close(self, clean: bool = True) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
        self.store.close()
        self.engine.shutdown(clean)



def check_output_folder(out: Path) -> None:
    """Fail early if `out` cannot be (or become) a writable folder, without leaving anything behind: the folder
    is created with the first file written into it, so a run stopped by bad input writes nothing."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # nearest existing ancestor (Path.exists is False below a regular file)
    if not existing.is_dir():
        raise UserError(f"output folder {out} cannot be created: {existing} is a file, not a folder; "
                        "pass --out to a writable folder")
    try:
        # A real write, not os.access: as root, access() says yes where the file system still says no.
        tempfile.TemporaryDirectory(dir=existing, prefix=".edsr-write-test-").cleanup()
    except OSError as exc:
        raise UserError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                        "pass --out to a writable folder") from None


def _collective_failure_exit(exc: RuntimeError, cfg: Config, rank: int | None) -> int:
    """Another rank died or hung: one line instead of a traceback from deep inside the backend."""
    from edsr_dist.dist.engine import describe_collective_failure

    message = describe_collective_failure(exc, cfg.dist_timeout)
    if message is None:
        raise exc
    where = f"rank {rank}: " if rank is not None else ""
    print(f"edsr-dist train: error: {where}{message}", file=sys.stderr, flush=True)
    return EXIT_COLLECTIVE_FAILED


def main(argv: list[str]) -> int:
    cfg = parse_train_args(argv)
    try:
        trainer = Trainer(cfg)
    except RuntimeError as exc:  # a collective during set-up (DDP's first broadcast, resume) lost a peer
        return _collective_failure_exit(exc, cfg, None)
    clean = False  # all ranks reached the same point; after an error a peer may be stuck in a collective
    code = 0
    try:
        trainer.fit()
        clean = True
    except Interrupted:
        clean = True
        print(f"edsr-dist train: interrupted at step {trainer.step}; checkpoint saved, continue with --resume auto",
              file=sys.stderr)
        code = EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        clean = True  # every rank saw the same flags and stops at the same step
        from edsr_dist.checkpoint import find_checkpoint

        if trainer.is_main:
            last = find_checkpoint(trainer.out)
            kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written yet"
        else:
            kept = f"rank 0 keeps the last good checkpoint in {trainer.out}"
        fix = "lower --lr" + (" or use --precision fp32" if trainer.precision != "fp32" else "")
        print(f"edsr-dist train: error: loss became NaN/inf for {MAX_BAD_STEPS[trainer.precision]} consecutive steps "
              f"(at step {exc.args[0]}); {kept}; {fix}, then --resume auto or start again", file=sys.stderr)
        code = EXIT_DIVERGED
    except RuntimeError as exc:
        code = _collective_failure_exit(exc, cfg, trainer.world.rank)
    finally:
        trainer.close(clean)
    if trainer.world.distributed:
        _exit_before_interpreter_teardown(code)
    return code


def _exit_before_interpreter_teardown(code: int) -> None:
    """End a distributed worker without Python's finalization. The process group's C++ worker threads release
    the last collectives' tensors a moment after the collective returns; doing so needs the GIL, and a thread
    that asks for it while the interpreter finalizes is torn down mid-destructor: std::terminate, SIGABRT (seen
    at exit of workers pinned to one busy core). Everything of ours is closed and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
