"""Runs a real Trainer in one rank of a Gloo group (started by tests with torchrun-style variables)
and writes what it observed to <out>/probe_rank<r>.json.

Modes:
  overflow  fp16 with loss scaling; rank 1 gets an inf gradient at step 3 (after the all-reduce),
            so only that rank sees it locally: all ranks must still skip that step together.
  validate  validation only, on the seed's initial weights.
"""

import json
import sys
from pathlib import Path

import torch

from edsr_dist.train import Trainer, parse_train_args

INJECT_AT_STEP = 3


def main() -> None:
    mode, out, *train_args = sys.argv[1:]
    cfg = parse_train_args(train_args + ["--out", out])
    trainer = Trainer(cfg)
    rank = trainer.world.rank
    observed: dict = {"rank": rank}
    if mode == "overflow":
        real_finish = trainer.engine.finish_gradients

        def finish_and_inject(optimizer):
            real_finish(optimizer)
            if rank == 1 and trainer.step + 1 == INJECT_AT_STEP:
                grad = next(p for p in trainer.model.parameters() if p.grad is not None).grad
                grad[(0,) * grad.dim()] = float("inf")

        trainer.engine.finish_gradients = finish_and_inject
        real_step = trainer.train_step
        skipped_steps, scales = [], []

        def recording_step(lr_batch, hr_batch):
            loss, skipped = real_step(lr_batch, hr_batch)
            if skipped:
                skipped_steps.append(trainer.step + 1)
            scales.append(trainer.scaler.scale)
            return loss, skipped

        trainer.train_step = recording_step
        real_unscale = trainer.scaler.unscale_
        local_flags = []

        def recording_unscale(params):
            found = real_unscale(params)
            local_flags.append(found.item())
            return found

        trainer.scaler.unscale_ = recording_unscale
        trainer.fit()
        observed.update(skipped=skipped_steps, scales=scales, local_flags=local_flags,
                        params=[p.detach().double().sum().item() for p in trainer.model.parameters()])
    elif mode == "validate":
        observed.update(trainer.validate())
    trainer.close()
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"probe_rank{rank}.json").write_text(json.dumps(observed))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
