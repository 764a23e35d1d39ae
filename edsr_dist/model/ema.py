"""An exponential moving average of the model's weights, the way BasicSR keeps one
(basicsr/models/base_model.py, `model_ema`: ema = decay * ema + (1 - decay) * weights after every optimizer step;
basicsr/models/sr_model.py starts it as a copy of the network and uses it for validation and saving; BasicSR's
default decay is 0.999).

Every rank updates its own copy from its own weights after each optimizer step. The weights are identical on every
rank after the step (the gradients were all-reduced), so the averages are too, with no communication; a skipped
(non-finite) step changes no weight and does not update the average either: the trainer either skips the call
(host-side skip) or passes the step's device-side overflow flag, which turns the update into a no-op without the
host reading it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edsr_dist.model.edsr import bare_model


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(bare_model(model)).eval()
        # A device counter: a step with a device-side skip cannot tell the host whether it counted.
        self._updates = torch.zeros((), dtype=torch.int64, device=next(self.model.parameters()).device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average again from `model`'s weights (after loading initial weights into it)."""
        for ema, now in zip(self._tensors(self.model), self._tensors(bare_model(model))):
            ema.copy_(now)
        self._updates.zero_()

    @property
    def updates(self) -> int:
        return int(self._updates)

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """`skipped`: the step's global overflow flag on the device (> 0: the step was skipped, so is this)."""
        ema_tensors = self._tensors(self.model)
        now_tensors = self._tensors(bare_model(model))
        floats = [(e, n) for e, n in zip(ema_tensors, now_tensors) if e.is_floating_point()]
        taken = None if skipped is None else (skipped <= 0)
        if floats:
            ema_floats, now_floats = [e for e, _ in floats], [n for _, n in floats]
            if taken is None:
                torch._foreach_lerp_(ema_floats, now_floats, 1.0 - self.decay)
            else:  # a weight of 0 on a skipped step; per-tensor weights, since a tensor Scalar would be read (.item())
                weight = taken.float() * (1.0 - self.decay)
                torch._foreach_lerp_(ema_floats, now_floats, [weight.to(e.dtype).expand_as(e) for e in ema_floats])
        for e, n in zip(ema_tensors, now_tensors):
            if not e.is_floating_point():  # counters and the like are copied, not averaged
                e.copy_(n if taken is None else torch.where(taken, n, e))
        self._updates += 1 if taken is None else taken.long()

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"], strict=True)
        self._updates.fill_(int(state["updates"]))
