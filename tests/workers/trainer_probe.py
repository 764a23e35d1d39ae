"""Runs a real Trainer in one rank of a Gloo group (started by tests with torchrun-style variables)
and writes what it observed to <out>/probe_rank<r>.json.

Modes:
  overflow  fp16 with loss scaling; rank 1 gets an inf gradient at step 3 (after the all-reduce),
            so only that rank sees it locally: all ranks must still skip that step together.
  overflow-micro  the same, but the inf goes into rank 1's local gradient after the first micro-step of step 3
            (--accumulate > 1): the whole optimizer step must be skipped on every rank, once.
  kill      SIGKILL to this process itself after the first micro-step of step KILL_AT_STEP (mid-accumulation).
  validate  validation only, on the seed's initial weights.
  clip      a run with --grad-clip-norm and --ema-decay (rank 1 gets the same inf gradient at step 3): each
            step's gradient norm before and after clipping, the skipped steps, the number of EMA updates, and
            digests of the final weights and of their EMA.
"""

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from edsr_dist.config import parse_train_args
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.trainer import Trainer

INJECT_AT_STEP = 3
KILL_AT_STEP = 7


class OverflowProbe(StepTimer):
    """Through the trainer's phase seam: after the gradients are final on rank 1 at INJECT_AT_STEP, puts an inf
    into one of them; records each step's local overflow, whether the step was skipped, and the loss scale."""

    def __init__(self, mode: str = "overflow"):
        self.mode = mode
        self.trainer = None
        self.micro_steps: list[int] = []  # micro-batches of each optimizer step
        self.local_flags, self.skipped, self.scales = [], [], []
        self.norms_before, self.norms_after = [], []

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item()

    def begin_step(self):
        self.micro_steps.append(0)

    def _micro_step_begins(self):
        """At each to_device, the seam's mark of a micro-batch: the second one of a step follows the first
        micro-step's backward."""
        self.micro_steps[-1] += 1
        if self.micro_steps[-1] == 2:
            self._after_first_micro_step()

    def _after_first_micro_step(self):
        trainer = self.trainer
        if self.mode == "overflow-micro" and trainer.world.rank == 1 and trainer.step + 1 == INJECT_AT_STEP:
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            grads[0][(0,) * grads[0].dim()] = float("inf")
        if self.mode == "kill" and trainer.step + 1 == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def phase(self, name):
        if name == "to_device":
            self._micro_step_begins()
        if name == "optimizer":  # clipping and the step happen inside this phase
            self.norms_before.append(self._grad_norm())
        yield
        if name == "optimizer":
            self.norms_after.append(self._grad_norm())
        if name != "finish_gradients":
            return
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        if self.mode in ("overflow", "clip") and trainer.world.rank == 1 and trainer.step + 1 == INJECT_AT_STEP:
            grads[0][(0,) * grads[0].dim()] = float("inf")
        self.local_flags.append(float(not all(torch.isfinite(g).all() for g in grads)))

    def end_step(self, skipped):
        if skipped:
            self.skipped.append(self.trainer.step + 1)
        self.scales.append(self.trainer.scaler.scale)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    mode, out, *train_args = sys.argv[1:]
    cfg = parse_train_args(train_args + ["--out", out])
    probe = OverflowProbe(mode)
    trainer = Trainer(cfg, timer=probe)
    probe.trainer = trainer
    rank = trainer.world.rank
    observed: dict = {"rank": rank}
    if mode in ("overflow", "overflow-micro"):
        trainer.fit()
        observed.update(skipped=probe.skipped, scales=probe.scales, local_flags=probe.local_flags,
                        micro_steps=probe.micro_steps,
                        params=[p.detach().double().sum().item() for p in trainer.model.parameters()])
    elif mode == "kill":
        trainer.fit()  # never returns: the probe kills this process mid-accumulation
    elif mode == "clip":
        trainer.fit()
        observed.update(norms_before=probe.norms_before, norms_after=probe.norms_after, skipped=probe.skipped,
                        ema_updates=trainer.ema.updates,
                        weights=digest(trainer.model.state_dict().values()),
                        ema=digest(trainer.ema.model.state_dict().values()))
    elif mode == "validate":
        observed.update(trainer.validator.validate())
    trainer.close()
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"probe_rank{rank}.json").write_text(json.dumps(observed))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
