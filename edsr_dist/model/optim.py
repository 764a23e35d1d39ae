"""Which Adam a device gets, and the two things the trainer must know about it.

* CUDA: `torch.optim.Adam(fused=True)`: one multi-tensor kernel, and it takes the step's overflow flag
  (`found_inf`) and skips the update on the device, as torch.amp.GradScaler uses it (torch/optim/adam.py:104-107
  `_step_supports_amp_scaling`, :267-268 `found_inf=getattr(self, "found_inf", None)`; the CUDA kernel returns early
  when the flag is 1, aten/src/ATen/native/cuda/fused_adam_utils.cuh:136-138).
* NPU: `torch_npu.optim.NpuFusedAdam` where the installed torch_npu ships it (ModelZoo's EDSR uses it,
  edsr_x2/main_8p.py:198-199). torch's own foreach Adam falls back to one kernel per tensor before Ascend910B1
  (torch_npu/utils/_optim.py:6-16; op-plugin ForeachAddcmulScalarKernelNpuOpApi.cpp:110-115 and its siblings), and
  op-plugin registers no `_fused_adam_` (only `_fused_adamw_`, op_plugin_functions.yaml:615-616, which ignores
  found_inf: FusedAdamWKernelNpuOpApi.cpp:34-35). NpuFusedAdam copies parameters and gradients into one flat
  buffer per dtype on its first step and runs about six elementwise ops on it (npu_fused_optim_base.py:82-84,
  npu_fused_adam.py:175-187); it refuses `zero_grad(set_to_none=True)` (npu_fused_optim_base.py:127-131) and keeps
  `step` as an int (npu_fused_adam.py:56). It has no found_inf, so the NPU's skip stays a host decision.
* CPU: `torch.optim.Adam(fused=True)` as well (torch has a fused CPU kernel, torch/utils/_foreach_utils.py:13-23
  lists "cpu"): on this project's CPU it is 6-10x faster than the foreach default (BENCHMARKS.md, "Optimizer").
  Elsewhere: foreach.
"""

from __future__ import annotations

import torch

from edsr_dist.config import Config
from edsr_dist.parallel import npu

# torch_npu marks its flat-buffer optimizers with this attribute (torch_npu/optim/npu_fused_optim_base.py:25).
FLAT_BUFFER_MARK = "is_fused_optimizer"


def make_optimizer(params, cfg: Config, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The Adam for `device`, and its name for the banner and the bench report."""
    params = list(params)
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.epsilon}
    if device.type == "npu":
        fused = npu.fused_adam_class()
        if fused is not None:
            return fused(params, **hyper), "NpuFusedAdam"
        return torch.optim.Adam(params, **hyper), "Adam (torch_npu's default: foreach from Ascend910B1)"
    if device.type in FUSED_DEVICES:
        return torch.optim.Adam(params, fused=True, **hyper), "Adam (fused)"
    return torch.optim.Adam(params, foreach=True, **hyper), "Adam (foreach)"


# Where torch's fused Adam kernel is used (the CPU from the measurement in BENCHMARKS.md).
FUSED_DEVICES = ("cuda", "cpu")


def skips_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """True where the optimizer can take the overflow flag as a tensor and skip on the device. On the CPU the
    'device' is the host: reading the flag costs nothing there, and the host-side skip keeps the optimizer
    phase out of skipped steps."""
    return device.type != "cpu" and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def uses_flat_buffers(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, FLAT_BUFFER_MARK, False))


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Free the gradients, except under a flat-buffer optimizer: its gradients are views into one buffer, which
    must stay (it refuses set_to_none=True)."""
    if uses_flat_buffers(optimizer):
        optimizer.zero_grad(set_to_none=False)
    else:
        optimizer.zero_grad(set_to_none=True)


def fit_state_to(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A checkpoint's optimizer state for this optimizer: torch's Adam keeps `step` as a tensor, NpuFusedAdam as an
    int (npu_fused_adam.py:56), so a run resumed on the other kind of device converts it."""
    as_int = uses_flat_buffers(optimizer)
    moments = {}
    for key, entry in state.get("state", {}).items():
        entry = dict(entry)
        if "step" in entry:
            step = entry["step"]
            if as_int:
                entry["step"] = int(step.item() if torch.is_tensor(step) else step)
            elif not torch.is_tensor(step):
                entry["step"] = torch.tensor(float(step))
        moments[key] = entry
    return {**state, "state": moments}
