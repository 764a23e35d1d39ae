"""Device selection, autocast dtype per device kind, and dynamic loss scaling for fp16.

auto precision: fp16 with dynamic loss scaling on Ascend NPUs (as Ascend's own recipes train),
bf16 on GPUs that support it and on CPUs with native bf16 instructions, fp32 otherwise.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from edsr_dist.errors import UserError
from edsr_dist.parallel import npu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _npu_present() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        npu.import_torch_npu()
        return bool(torch.npu.is_available())
    except Exception:  # a broken CANN install means "no NPU" for auto-selection; asking for npu explains it
        return False


def select_device(requested: str, device_index: int, physical: int | None = None) -> torch.device:
    """`device_index` is the logical index on this host (local rank; on Ascend the position of the rank table's
    physical card among the visible ones); `physical`, when known, is the card's own number, for messages."""
    if requested == "auto":
        if _npu_present():
            requested = "npu"
        elif torch.cuda.is_available():
            requested = "cuda"
        else:
            requested = "cpu"

    if requested == "npu":
        npu.import_torch_npu()
        if not torch.npu.is_available():
            raise UserError("--device npu: no Ascend NPU is visible (CANN runtime missing or driver not loaded); "
                            "check `npu-smi info` and source CANN's set_env.sh, or pass --device cpu")
        count = torch.npu.device_count()
        if device_index >= count:
            card = f"card {physical} (logical {device_index})" if physical is not None else f"device {device_index}"
            raise UserError(f"{card} is not visible: this process sees {count} NPUs; check ASCEND_RT_VISIBLE_DEVICES "
                            "and the cards given to the container, or fix the rank table")
        torch.npu.set_device(device_index)
        return torch.device("npu", device_index)
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible (or this torch is a CPU build); "
                            "install a CUDA build of torch or pass --device cpu")
        count = torch.cuda.device_count()
        if device_index >= count:
            raise UserError(f"local rank {device_index} has no GPU: this host has {count}; start at most {count} workers per host")
        torch.cuda.set_device(device_index)
        return torch.device("cuda", device_index)
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(requested: str, device_type: str) -> str:
    if requested != "auto":
        if requested == "bf16" and device_type == "npu" and not npu.bf16_supported():
            # torch_npu NpuVariables.cpp IsBF16Supported: SocVersion >= Ascend910B1 (Atlas A2 and later).
            raise UserError("--precision bf16 needs an Ascend910B1 or later chip (Atlas A2/A3 training series; "
                            "torch.npu.is_bf16_supported() is False on this one); use --precision fp16 or auto")
        return requested
    if device_type == "npu":
        return "fp16"
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_device_and_precision(device: str, precision: str, device_index: int = 0,
                                 physical_device: int | None = None) -> tuple[torch.device, str]:
    """The one place where the --device and --precision choices (config.DEVICES, config.PRECISIONS) become a
    device and a concrete precision: train, eval, sr and bench all call it."""
    chosen = select_device(device, device_index, physical_device)
    return chosen, resolve_precision(precision, chosen.type)


def autocast(device: torch.device, precision: str):
    """Context manager for the forward pass; fp32 runs with autocast disabled."""
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss, unscale the gradients, skip steps that overflowed.

    The overflow decision is made by the trainer after reducing the flag over all ranks, so every rank
    skips the same steps and changes its scale in lockstep (`update` gets the global flag).
    Disabled (scale 1, never skips) for fp32 and bf16, whose range makes scaling unnecessary.

    The scale and the count of good steps live on the device and `update` is tensor arithmetic, as in
    torch.amp.GradScaler.update (torch/amp/grad_scaler.py, "we do not check the scale factor value to avoid
    synchronizations"): a step never reads them on the host. `scale` (logs) and `state_dict` (checkpoints) do.
    """

    # 2**10 rather than the usual 2**16: EDSR works on pixel values in [0, 255], so its gradients are large and a
    # 2**16 start overflows for the first several steps (Ascend's own fp16 EDSR recipe uses a static 128).
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 10, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0,
                 device: torch.device | None = None):
        self.enabled = enabled
        device = device or torch.device("cpu")
        self._scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self._good_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale

    @property
    def scale(self) -> float:
        """The current scale, read on the host (a device sync): for logs and probes, not for the step."""
        return float(self._scale)

    @property
    def good_steps(self) -> int:
        return int(self._good_steps)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale if self.enabled else loss

    def unscale_(self, params) -> torch.Tensor:
        """Divide gradients by the scale in place; return a 0-d float tensor, 1.0 if any gradient is inf/nan."""
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
        if not grads:
            return found_inf[0]
        if self.enabled:
            # The scale is a power of two, so its float32 reciprocal is exact.
            inv = self._scale.reciprocal().reshape(1)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        else:
            norms = torch._foreach_norm(grads)
            found_inf = (~torch.isfinite(torch.stack(norms).sum())).float().reshape(1)
        return found_inf[0]

    def update(self, found_inf) -> None:
        """`found_inf`: the step's global overflow flag, a bool or a 0-d device tensor (> 0: overflow)."""
        if not self.enabled:
            return
        if not torch.is_tensor(found_inf):
            found_inf = torch.tensor(float(found_inf))
        overflow = found_inf.to(self._scale.device) > 0
        counted = self._good_steps + 1
        grown = counted >= self.growth_interval
        backed_off = (self._scale * self.backoff_factor).clamp(min=self.min_scale)
        new_scale = torch.where(overflow, backed_off, torch.where(grown, self._scale * self.growth_factor, self._scale))
        new_good = torch.where(overflow | grown, torch.zeros_like(counted), counted)
        self._scale.copy_(new_scale)
        self._good_steps.copy_(new_good)

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("enabled") == self.enabled:
            self._scale.fill_(float(state["scale"]))
            self._good_steps.fill_(int(state["good_steps"]))
