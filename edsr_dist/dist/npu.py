"""Ascend NPU rules in one place (read from torch_npu = Ascend/pytorch, and the CANN HCCL sources).

* importing torch_npu, with a one-line error whatever goes wrong;
* physical device ids (rank tables, DEVICE_ID) vs the logical index `torch.npu.set_device` takes;
* memory format: NPU tensors are contiguous only;
* bf16 support and the float-status overflow flag of saturation-mode chips (910A class);
* the HCCL environment defaults the launcher gives each worker.
docs/ASCEND.md cites the upstream file and line behind each rule.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from edsr_dist.errors import UserError

# torch_npu ProcessGroupHCCL.cpp (createHCCLCommEx) warns when a rank table is used with a lower connect timeout.
MIN_HCCL_CONNECT_TIMEOUT_S = 300
DEFAULT_HCCL_CONNECT_TIMEOUT_S = 600
# torch_npu ProcessGroupHCCL.cpp: defaultExecTimeout (line 77) applies when HCCL_EXEC_TIMEOUT is unset, and the
# watchdog (init_process_group's timeout) must be above it (lines 1251-1258) or HCCL's own error and plog are lost.
DEFAULT_HCCL_EXEC_TIMEOUT_S = 1836
WATCHDOG_MARGIN_S = 600


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


def visible_devices(env: dict | None = None) -> list[int] | None:
    """Physical ids of the cards this process can use, in logical order; None when nothing says (all cards)."""
    env = os.environ if env is None else env
    listed = env.get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    if listed:
        try:
            return [int(part) for part in listed.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"ASCEND_RT_VISIBLE_DEVICES={listed!r} is not a comma-separated list of device "
                            "numbers; fix or unset it") from None
    # A container given some cards sees only their device nodes (/dev/davinci4 ...), numbered as on the host;
    # the runtime numbers the visible ones 0.. in that order.
    nodes = sorted(int(m.group(1)) for m in (re.fullmatch(r"/dev/davinci([0-9]+)", p)
                                              for p in glob.glob("/dev/davinci[0-9]*")) if m)
    return nodes or None


def logical_device(physical: int, env: dict | None = None) -> int:
    """The index `torch.npu.set_device` takes for the card the rank table calls `physical`."""
    visible = visible_devices(env)
    if visible is None:
        return physical
    if physical not in visible:
        source = ("ASCEND_RT_VISIBLE_DEVICES=" + ",".join(map(str, visible))
                  if (os.environ if env is None else env).get("ASCEND_RT_VISIBLE_DEVICES") else
                  "the visible cards (/dev/davinci" + ",".join(map(str, visible)) + ")")
        raise UserError(f"device {physical} (physical id from the rank table) is not among {source}; give the "
                        "container that card or fix the rank table")
    return visible.index(physical)


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


def clear_overflow_flag(device: torch.device) -> None:
    """Reset the float-status flag before a step, as torch_npu's GradScaler.scale() does: the NPU's overflow check
    reports the flag, so an overflow from earlier work (fp16 validation) would be charged to this step."""
    if saturation_mode(device):
        import_torch_npu().npu.utils.clear_npu_overflow_flag()


def watchdog_timeout(dist_timeout_s: int, env: dict | None = None) -> tuple[int, str]:
    """The collective timeout for an HCCL process group: --dist-timeout, raised above HCCL_EXEC_TIMEOUT when it is
    not, so that HCCL reports a stuck collective (with its plog) before torch_npu's watchdog kills the process.
    Returns (seconds, a note for the log or "")."""
    env = os.environ if env is None else env
    raw = env.get("HCCL_EXEC_TIMEOUT", "")
    exec_s = int(raw) if raw.strip().isdigit() else DEFAULT_HCCL_EXEC_TIMEOUT_S
    if exec_s == 0 or dist_timeout_s > exec_s:  # 0: HCCL never times out; the watchdog is the only bound
        return dist_timeout_s, ""
    raised = exec_s + WATCHDOG_MARGIN_S
    return raised, (f"--dist-timeout {dist_timeout_s} s is not above HCCL_EXEC_TIMEOUT {exec_s} s; using {raised} s "
                    "so that HCCL reports a stuck collective before torch_npu's watchdog ends the process")


def hccl_env(server_id: str, multi_server: bool, env: dict | None = None) -> dict[str, str]:
    """HCCL variables a worker gets when the user has not set them (the user's own HCCL_* pass through)."""
    env = os.environ if env is None else env
    out = {}
    if not env.get("HCCL_CONNECT_TIMEOUT"):
        out["HCCL_CONNECT_TIMEOUT"] = str(DEFAULT_HCCL_CONNECT_TIMEOUT_S)
    if multi_server and not env.get("HCCL_IF_IP"):
        out["HCCL_IF_IP"] = server_id
    return out
