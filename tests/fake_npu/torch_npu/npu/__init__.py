"""torch.npu of the fake torch_npu: device count, logical device selection, bf16 query."""

import os

import torch

from torch_npu.npu import utils  # noqa: F401

_current = [0]


def _parse_visible(listed: str) -> list[int]:
    """torch_npu/npu/__init__.py _parse_visible_devices: ids separated by ',' only; reading stops at the first
    other character and at the first empty entry."""
    readable = ""
    for char in listed:
        if not (char.isdigit() or char == ","):
            break
        readable += char
    ids = []
    for part in readable.split(","):
        if not part:
            break
        ids.append(int(part))
    return ids


def _visible() -> list[int]:
    """Physical ids of the visible cards, in logical order, as torch_npu counts them (_device_count_ascend_hal):
    none when the ids are not strictly ascending; cut at the first id the machine does not have."""
    count = int(os.environ.get("FAKE_NPU_COUNT", "8"))
    if "ASCEND_RT_VISIBLE_DEVICES" not in os.environ:
        return list(range(count))
    ids = _parse_visible(os.environ["ASCEND_RT_VISIBLE_DEVICES"])
    if any(b <= a for a, b in zip(ids, ids[1:])):
        return []
    return [i for i in ids[:next((k for k, i in enumerate(ids) if i >= count), len(ids))]]


def _physical(logical: int) -> int:
    return _visible()[logical]


def is_available() -> bool:
    return device_count() > 0


def is_initialized() -> bool:
    return True


def device_count() -> int:
    return len(_visible())


def set_device(device) -> None:
    index = torch.device(device).index if not isinstance(device, int) else device
    if not 0 <= index < device_count():
        raise RuntimeError(f"Invalid device ID {index}: {device_count()} visible devices (logical ids 0.."
                           f"{device_count() - 1})")
    _current[0] = index


def current_device() -> int:
    return _current[0]


def synchronize(device=None) -> None:
    pass


def is_bf16_supported(including_emulation: bool = False) -> bool:
    return utils.is_support_inf_nan()  # both start at Ascend910B1 in torch_npu's NpuVariables


def get_amp_supported_dtype():
    return [torch.float16, torch.bfloat16]


def get_device_name(device=None) -> str:
    return os.environ.get("FAKE_NPU_SOC", "Ascend910A")


# torch_npu's SocVersion values (csrc/core/npu/NpuVariables.h:5-35) for the names the tests use.
_SOC_VERSIONS = {"Ascend910PremiumA": 100, "Ascend910ProA": 101, "Ascend910A": 102, "Ascend910ProB": 103,
                 "Ascend910B": 104, "Ascend910B1": 220, "Ascend910B2": 221, "Ascend910B3": 223, "Ascend910B4": 224,
                 "Ascend910_9391": 250}
_compile = {"jit_compile": None}  # None: never set, torch_npu's per-SoC default applies


def get_soc_version() -> int:
    return _SOC_VERSIONS[get_device_name()]


def set_compile_mode(jit_compile=False) -> None:
    """torch_npu/npu/npu_config.py:98-102; the choice is recorded for the tests."""
    from torch_npu import _record
    _compile["jit_compile"] = bool(jit_compile)
    _record.event("compile_mode", jit_compile=bool(jit_compile))


def is_jit_compile_false() -> bool:
    """EnvVariables.cpp:172-186: unset means binary kernels from Ascend910B1 only."""
    if _compile["jit_compile"] is None:
        return get_soc_version() >= 220
    return not _compile["jit_compile"]


def manual_seed_all(seed) -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False
