"""Ascend NPU rules that need torch (read from torch_npu = Ascend/pytorch, and op-plugin).

* importing torch_npu, with a one-line error whatever goes wrong;
* memory format: NPU tensors are contiguous only;
* bf16 support and the float-status overflow flag of saturation-mode chips (910A class).
The torch-free rules (device ids, HCCL environment) are in ascend_env.py; docs/ASCEND.md cites the upstream
file and line behind each rule.
"""

from __future__ import annotations

import torch

from edsr_dist.errors import UserError


def import_torch_npu():
    """torch_npu registers the `npu` device and the `hccl` backend; it is optional. It raises RuntimeError (not
    ImportError) on a CUDA build of torch and OSError when CANN's libraries are not on the path."""
    try:
        import torch_npu  # noqa: F401  (import registers the device)
    except Exception as exc:  # noqa: BLE001  any failure is the same fix for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"an NPU was requested but torch_npu cannot be imported ({type(exc).__name__}: {first}); install the "
            "torch-npu release that matches your torch and CANN (docs/ASCEND.md lists the pairs), source CANN's "
            "set_env.sh, or pass --device cpu"
        ) from None
    return torch_npu


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last where asked and the device has it; torch_npu creates contiguous NPU tensors only."""
    if device.type == "npu":
        return torch.contiguous_format
    return torch.channels_last if channels_last else torch.contiguous_format


def bf16_supported() -> bool:
    return bool(import_torch_npu().npu.is_bf16_supported())


def saturation_mode(device: torch.device) -> bool:
    """True on chips where fp16 overflow saturates (910A class): only the float-status flag reports it."""
    if device.type != "npu":
        return False
    return not import_torch_npu().npu.utils.is_support_inf_nan()


def clear_overflow_flag() -> None:
    """Reset the float-status flag before a step, as torch_npu's GradScaler.scale() does: the NPU's overflow check
    reports the flag, so an overflow from earlier work (fp16 validation) would be charged to this step. Only for
    devices in saturation_mode."""
    import_torch_npu().npu.utils.clear_npu_overflow_flag()
