"""Forward and backward of this rank's share of a step, one micro-batch at a time (--accumulate)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from edsr_dist.model.precision import LossScaler, autocast
from edsr_dist.train.data import TrainingData
from edsr_dist.train.step_timer import StepTimer


class MicroSteps:
    """Gradients add up in .grad and are all-reduced on the last micro-step only. Each micro-batch's mean loss is
    weighted by its share of the global batch (Engine.gradient_weight), so the averaged gradient is the full-batch
    mean whatever the split over ranks and micro-steps."""

    def __init__(self, engine, scaler: LossScaler, data: TrainingData, timer: StepTimer, device: torch.device,
                 precision: str, batch_size: int):
        self.engine, self.scaler, self.data, self.timer = engine, scaler, data, timer
        self.device, self.precision, self.batch_size = device, precision, batch_size

    def run(self, model: torch.nn.Module, micro_batches: list) -> torch.Tensor:
        """Backward of every micro-batch through `model` (the engine's wrapper); returns the share's mean loss
        (detached)."""
        share = self.data.sampler.local_batch_size
        total = None
        for index, (lr_batch, hr_batch) in enumerate(micro_batches):
            samples = len(lr_batch)
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.engine.accumulating(model):
                with self.timer.phase("to_device"):
                    lr_t, hr_t = self.data.to_device(lr_batch), self.data.to_device(hr_batch)
                with autocast(self.device, self.precision):
                    sr = model(lr_t)
                loss = F.l1_loss(sr.float(), hr_t)
                weight = self.engine.gradient_weight(samples, self.batch_size)
                # An even split without accumulation has weight 1: the loss is left as it was.
                self.scaler.scale_loss(loss if weight == 1 else loss * weight).backward()
            part = loss.detach() if samples == share else loss.detach() * (samples / share)
            total = part if total is None else total + part
        return total
