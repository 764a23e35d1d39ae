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


def fused_adam_class():
    """torch_npu.optim.NpuFusedAdam where the installed torch_npu ships it (torch_npu/optim/__init__.py:3,11), else
    None."""
    optim = getattr(import_torch_npu(), "optim", None)
    return getattr(optim, "NpuFusedAdam", None)


# torch_npu's SocVersion enum (csrc/core/npu/NpuVariables.h:5-35): 910PremiumA=100 .. Ascend910B=104, 310P*=200,
# Ascend910B1=220 and later.
FIRST_BINARY_DEFAULT_SOC = 220


def use_binary_kernels() -> str:
    """Binary (precompiled) operator kernels instead of just-in-time compilation, where torch_npu would otherwise
    compile: its default is JIT before Ascend910B1 (csrc/framework/interface/EnvVariables.cpp:172-186,
    CheckJitDisableInner), and ModelZoo's scripts switch it off with set_compile_mode(jit_compile=False)
    (torch_npu/npu/npu_config.py:98-102). Returns what was done, for the banner."""
    torch_npu = import_torch_npu()
    soc = torch_npu.npu.get_soc_version() if hasattr(torch_npu.npu, "get_soc_version") else None
    if soc is not None and soc >= FIRST_BINARY_DEFAULT_SOC:
        return "binary kernels (torch_npu's default on this SoC)"
    try:
        torch_npu.npu.set_compile_mode(jit_compile=False)
    except RuntimeError as exc:  # ACL_OP_INIT_MODE=2 refuses the change (EnvVariables.cpp:193-198)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"JIT compile kept ({first})"
    return "binary kernels (set_compile_mode(jit_compile=False))"
