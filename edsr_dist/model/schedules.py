"""Learning-rate schedules, each a pure function of the step, so a resumed run can never decay twice or miss a
milestone: the trainer sets the rate from the step before every optimizer step.

- staircase (the default, the old TF script's): lr * decay_rate ** (step // decay_step). The paper's schedule is
  this staircase with x0.5 every 200k steps (Lim et al. 2017, section 4.2: "halved at every 2 x 10^5 minibatch
  updates").
- multistep (BasicSR's MultiStepLR, basicsr/models/lr_scheduler.py): lr * gamma ** (milestones passed).
- cosine: from lr down to min_lr along half a cosine, from the end of the warm-up to the end of the run.
Any of them can start with a linear warm-up from 0 (warmup_steps), as BasicSR's `warmup_iter` does
(basicsr/models/base_model.py, update_learning_rate: lr / warmup_iter * current_iter).

Larger global batches: with scale_lr the base rate (and min_lr) is multiplied by batch_size / 16, the linear
scaling rule of Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), relative to the paper's batch of 16. Goyal et
al. pair it with a gradual warm-up (5 epochs), so pass --warmup-steps as well.
"""

from __future__ import annotations

import math

from edsr_dist.config import Config

PAPER_BATCH = 16  # the batch size the paper's rate 1e-4 belongs to


def base_lr(cfg: Config) -> float:
    """The peak rate: cfg.lr, times batch_size / 16 when linear scaling is switched on."""
    return cfg.lr * (cfg.batch_size / PAPER_BATCH if cfg.scale_lr else 1.0)


def parse_milestones(text: str) -> list[int]:
    """"200000,400000" -> [200000, 400000] (checked by Config.check, so here it is well formed)."""
    return sorted(int(float(part)) for part in text.replace(" ", "").split(",") if part)


def learning_rate(cfg: Config, step: int, horizon: int) -> float:
    """The rate for the optimizer step that follows `step` completed steps; `horizon` is the run's length in steps
    (epochs x steps per epoch; the cosine ends there). Depends on nothing but its arguments."""
    peak = base_lr(cfg)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "multistep":
        passed = sum(1 for milestone in parse_milestones(cfg.milestones) if step >= milestone)
        return peak * cfg.gamma ** passed
    if cfg.lr_schedule == "cosine":
        floor = cfg.min_lr * (peak / cfg.lr)
        span = max(horizon - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * cfg.decay_rate ** (step // cfg.decay_step)
