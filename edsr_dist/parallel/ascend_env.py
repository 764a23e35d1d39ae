"""Ascend environment rules that need no torch (the launcher and `rank-table` run without it): which cards a
process sees, physical vs logical device ids, and the HCCL variables and timeouts each worker gets.
docs/ASCEND.md cites the upstream file and line behind each rule (torch_npu = Ascend/pytorch; CANN HCCL).
"""

from __future__ import annotations

import glob
import os
import re

from edsr_dist.errors import UserError

# torch_npu ProcessGroupHCCL.cpp (createHCCLCommEx) warns when a rank table is used with a lower connect timeout.
MIN_HCCL_CONNECT_TIMEOUT_S = 300
DEFAULT_HCCL_CONNECT_TIMEOUT_S = 600
# torch_npu ProcessGroupHCCL.cpp: defaultExecTimeout (line 77) applies when HCCL_EXEC_TIMEOUT is unset, and the
# watchdog (init_process_group's timeout) must be above it (lines 1251-1258) or HCCL's own error and plog are lost.
DEFAULT_HCCL_EXEC_TIMEOUT_S = 1836
WATCHDOG_MARGIN_S = 600


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
