"""torch.npu of the fake torch_npu: device count, logical device selection, bf16 query."""

import os

import torch

from torch_npu.npu import utils  # noqa: F401

_current = [0]


def _visible() -> list[int]:
    """Physical ids of the visible cards, in logical order (ASCEND_RT_VISIBLE_DEVICES remaps them)."""
    count = int(os.environ.get("FAKE_NPU_COUNT", "8"))
    listed = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if listed:
        return [int(x) for x in listed.split(",")]
    return list(range(count))


def _physical(logical: int) -> int:
    return _visible()[logical]


def is_available() -> bool:
    return True


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


def manual_seed_all(seed) -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False
