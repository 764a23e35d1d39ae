"""torch_npu.npu.utils of the fake torch_npu: the float-status flag of saturation mode (910A-class chips)."""

import os
import warnings

_state = {"flag": False, "checks": 0}


# SoCs before Ascend910B1 in torch_npu's SocVersion order: saturation mode, no bf16 (NpuVariables.cpp:74-107).
SATURATION_SOCS = ("Ascend910A", "Ascend910ProA", "Ascend910PremiumA", "Ascend910ProB", "Ascend910B")


def is_support_inf_nan() -> bool:
    return os.environ.get("FAKE_NPU_SOC", "Ascend910A") not in SATURATION_SOCS


def is_bf16_supported(including_emulation: bool = False) -> bool:
    return is_support_inf_nan()


def clear_npu_overflow_flag() -> None:
    if is_support_inf_nan():
        warnings.warn("When soc_version >= Ascend910B1, clear_npu_overflow_flag is useless. Please remove it.", stacklevel=2)
        return
    _state["flag"] = False


def get_npu_overflow_flag() -> bool:
    if is_support_inf_nan():
        raise RuntimeError("Unsupported api when soc_version >= Ascend910B1, please use npu_check_overflow")
    return _state["flag"]


def _raise_flag() -> None:
    _state["flag"] = True


def _flag_is_set() -> bool:
    return _state["flag"]


def _count_check() -> None:
    """Injection: FAKE_NPU_OVERFLOW_STEPS="rank:n,..." overflows this rank's n-th fp16 step."""
    _state["checks"] += 1
    rank = os.environ.get("RANK_ID", os.environ.get("RANK", "0"))
    wanted = [item.split(":") for item in os.environ.get("FAKE_NPU_OVERFLOW_STEPS", "").split(",") if item]
    if [rank, str(_state["checks"])] in [list(pair) for pair in wanted]:
        _raise_flag()
