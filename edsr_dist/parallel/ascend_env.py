"""Ascend environment rules that need no torch (the launcher and `rank-table` run without it): which cards a
process sees, physical vs logical device ids, and the HCCL variables and timeouts each worker gets.
docs/ASCEND.md cites the upstream file and line behind each rule (torch_npu = Ascend/pytorch; CANN HCCL).
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import tempfile

from edsr_dist.errors import UserError

# torch_npu ProcessGroupHCCL.cpp (createHCCLCommEx) warns when a rank table is used with a lower connect timeout.
MIN_HCCL_CONNECT_TIMEOUT_S = 300
DEFAULT_HCCL_CONNECT_TIMEOUT_S = 600
# torch_npu ProcessGroupHCCL.cpp: defaultExecTimeout (line 77) applies when HCCL_EXEC_TIMEOUT is unset, and the
# watchdog (init_process_group's timeout) must be above it (lines 1251-1258) or HCCL's own error and plog are lost.
DEFAULT_HCCL_EXEC_TIMEOUT_S = 1836
WATCHDOG_MARGIN_S = 600


def parse_visible_devices(listed: str) -> list[int]:
    """ASCEND_RT_VISIBLE_DEVICES as torch_npu reads it, or a one-line error where torch_npu would silently read
    something else than what is written (torch_npu/npu/__init__.py, _parse_visible_devices and
    _device_count_ascend_hal): entries are physical card ids separated by ',' only; torch_npu stops reading at the
    first other character or empty entry, and sees no device at all when the ids are not strictly ascending.
    Logical device k (what set_device takes) is the k-th entry."""
    name = f"ASCEND_RT_VISIBLE_DEVICES={listed!r}"
    if listed == "":
        return []
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", listed):
        readable = re.match(r"[0-9,]*", listed).group(0)
        kept = [int(part) for part in readable.split(",")[:(readable.split(",") + [""]).index("")] if part]
        raise UserError(f"{name}: torch_npu reads only ids separated by commas and stops at the first other "
                        f"character or empty entry (it would see {kept or 'no card'}); write it like 0,1,2,3")
    ids = [int(part) for part in listed.split(",")]
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise UserError(f"{name}: the ids are not in ascending order, and torch_npu then sees no NPU at all; "
                        f"write them ascending ({','.join(map(str, sorted(set(ids))))})")
    return ids


def visible_devices(env: dict | None = None) -> list[int] | None:
    """Physical ids of the cards this process can use, in logical order; None when nothing says (all cards)."""
    env = os.environ if env is None else env
    if "ASCEND_RT_VISIBLE_DEVICES" in env:
        return parse_visible_devices(env["ASCEND_RT_VISIBLE_DEVICES"])
    # A container given some cards sees only their device nodes (/dev/davinci4 ...), numbered as on the host;
    # the runtime numbers the visible ones 0.. in that order.
    nodes = sorted(int(m.group(1)) for m in (re.fullmatch(r"/dev/davinci([0-9]+)", p)
                                              for p in glob.glob("/dev/davinci[0-9]*")) if m)
    return nodes or None


def _visible_source(visible: list[int], env: dict) -> str:
    if "ASCEND_RT_VISIBLE_DEVICES" in env:
        return f"ASCEND_RT_VISIBLE_DEVICES={env['ASCEND_RT_VISIBLE_DEVICES']}"
    return "the visible cards (/dev/davinci" + ",".join(map(str, visible)) + ")"


def logical_device(physical: int, env: dict | None = None, source: str = "the rank table") -> int:
    """The index `torch.npu.set_device` takes for the card whose own number (rank table, DEVICE_ID) is
    `physical`: its position among the visible cards."""
    env = os.environ if env is None else env
    visible = visible_devices(env)
    if visible is None:
        return physical
    if physical not in visible:
        raise UserError(f"device {physical} (physical id from {source}) is not among "
                        f"{_visible_source(visible, env)}; give the process that card or fix {source}")
    return visible.index(physical)


def physical_device(logical: int, env: dict | None = None, source: str = "LOCAL_RANK") -> int:
    """The card's own number for logical index `logical` (the k-th visible card)."""
    env = os.environ if env is None else env
    visible = visible_devices(env)
    if visible is None:
        return logical
    if logical >= len(visible):
        raise UserError(f"logical device {logical} (from {source}) does not exist: {_visible_source(visible, env)} "
                        f"shows {len(visible)} card(s) (logical 0..{len(visible) - 1}); start fewer workers or "
                        "give the process more cards")
    return visible[logical]


_CLAIMS: list = []  # open lock files: held (flock) until the process ends, released by the kernel even on SIGKILL


def claim_card(physical: int, logical: int, rank: int, job: str, folder: str | None = None) -> None:
    """Refuse a second rank of the same job on one card of this host before HCCL starts (HCCL puts one rank per
    device; two on one card fail or hang inside the communicator). An exclusive lock per (job, card) in the
    temporary folder: local by nature (two ranks can share a card only on one host, and a container's card ids
    and /tmp are its own), released by the kernel when the process dies (no stale claims after a crash), and
    known before any collective, which a check through the rendezvous store after init would not be."""
    folder = folder or tempfile.gettempdir()
    safe_job = re.sub(r"[^A-Za-z0-9_.-]", "_", job)
    path = os.path.join(folder, f"edsr-dist-{safe_job}-npu{physical}.lock")
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another rank"
        handle.close()
        raise UserError(f"rank {rank}: card {physical} (logical {logical}) is already used by {holder} of this job; "
                        "two ranks cannot share a card: give each rank its own DEVICE_ID (or RANK_ID position on "
                        "its server) in the launch script; `edsr-dist world` shows each rank's card") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"rank {rank} (pid {os.getpid()})")
    handle.flush()
    _CLAIMS.append(handle)


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
