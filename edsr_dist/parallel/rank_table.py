"""Ascend HCCL rank tables: read and check them as HCCL does, and write the version 1.0 copy workers get.

Two formats are read, with the rules of HCCL's own parsers (CANN HCCL sources; docs/ASCEND.md cites them):
  * version 1.0: server_list[] -> device[] with explicit rank_id (what Huawei's tools write;
    topoinfo_ranktableConcise.cc): server_id and device_ip unique, server_count optional, device_ip optional
    on a single server;
  * the older group_list[] -> instance_list[] -> devices[] (Kubernetes job controllers;
    topoinfo_ranktableStandard.cc). Without "deploy_mode" ("cloud" mode) HCCL numbers ranks by server_id
    (string order, std::map), then device_id, and pod names need only be unique; with "deploy_mode"
    ("lab" mode) each instance carries its rank_id. Cloud mode allows device ids 0-7 only.

Choices:
  * device_id above 7: HCCL accepts 8-15 only on 910B / A3 chips (GetSingleDevice in
    topoinfo_ranktableConcise.cc). The chip is the hardware's to say: allowed when this host has more than 8
    device nodes (/dev/davinci8 ...) or when `check --chip 910b` says so; 0-7 otherwise.
  * A symlinked table is accepted: torch_npu refuses symlinks, so the launcher exports the resolved path
    in RANK_TABLE_FILE, and `check` says so.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import socket
import time
from dataclasses import dataclass

import psutil

from edsr_dist.errors import UserError

MAX_DEVICE_ID = 15  # MAX_MODULE_DEVICE_NUM - 1: 910B / A3 chips
MAX_DEVICE_ID_910 = 7  # HCCL_AISERVER_DEVICE_NUM - 1: 910 (A) chips, and every group_list "cloud" table


@dataclass(frozen=True)
class Device:
    device_id: int  # physical card on the server
    device_ip: str  # the card's own NIC address (HCCL traffic)
    rank_id: int  # global rank


@dataclass(frozen=True)
class Server:
    server_id: str  # the host's address
    devices: list[Device]


@dataclass(frozen=True)
class RankTable:
    path: str
    servers: list[Server]
    format: str = "1.0"  # "1.0" or "group_list"
    real_path: str = ""  # path with symlinks resolved; what RANK_TABLE_FILE must name for torch_npu

    @property
    def rank_size(self) -> int:
        return sum(len(s.devices) for s in self.servers)

    @property
    def is_symlink(self) -> bool:
        return bool(self.real_path) and os.path.realpath(self.path) != os.path.abspath(self.path)

    def to_v1(self) -> dict:
        """The table as a version 1.0 document, numbers as strings like Huawei's tools write them."""
        return {
            "version": "1.0",
            "status": "completed",
            "server_count": str(len(self.servers)),
            "server_list": [
                {"server_id": s.server_id,
                 "device": [{"device_id": str(d.device_id), "device_ip": d.device_ip, "rank_id": str(d.rank_id)}
                            for d in s.devices]}
                for s in self.servers
            ],
        }


class _Problems:
    """Builds the one-line errors: `<file>: <entry>: <problem>; <fix>`."""

    def __init__(self, path: str):
        self.path = path
        self.host_ip_servers: set[str] = set()  # entries whose server gives host_ip (device_ip then optional)

    def __call__(self, where: str, problem: str, fix: str) -> UserError:
        prefix = f"rank table {self.path}: " + (f"{where}: " if where else "")
        return UserError(f"{prefix}{problem}; {fix}")


def _whole_number(value, name: str, where: str, err: _Problems) -> int:
    # Huawei's tools write numbers as strings; hand-written tables often use integers.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        return int(value)
    raise err(where, f"{name} must be a whole number, got {value!r}", f'write it like "{name}": "0"')


def _field(entry: dict, name: str, where: str, err: _Problems, example: str):
    if not isinstance(entry, dict):
        raise err(where, f"expected an object, got {type(entry).__name__}", "see rank_table/README.md for the layout")
    if name not in entry:
        raise err(where, f"missing field {name!r}", f"add {example}")
    return entry[name]


def _nonempty_list(value, name: str, where: str, err: _Problems, example: str) -> list:
    if not isinstance(value, list):
        raise err(where, f"{name} must be a list, got {type(value).__name__}", f"write {example}")
    if not value:
        raise err(where, f"{name} is empty", f"list at least one entry, like {example}")
    return value


def _address(value, name: str, where: str, err: _Problems) -> str:
    if not isinstance(value, str) or not value.strip():
        raise err(where, f"{name} must be a non-empty string, got {value!r}", f'write it like "{name}": "192.168.100.101"')
    if name == "device_ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise err(where, f"device_ip {value!r} is not an IP address",
                      "use the card's address from /etc/hccn.conf (address_N=) or `hccn_tool -i N -ip -g`") from None
    return value


def _read_json(path: str, err: _Problems) -> dict:
    if not os.path.exists(path):
        raise UserError(f"rank table {path} not found; pass the path of an existing table "
                        f"or make one with `edsr-dist rank-table make --devices 0-7 --out FILE`")
    if os.path.isdir(path):
        raise UserError(f"rank table {path} is a directory; pass the JSON file inside it")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"rank table {path} cannot be read ({exc}); check the file and its permissions") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise err("", f"invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})",
                  "fix the syntax (a trailing comma or a missing quote is the usual cause)") from None
    if not isinstance(doc, dict):
        raise err("", f"the top level must be a JSON object, got {type(doc).__name__}",
                  "see rank_table/README.md for the layout")
    return doc


def _check_status(doc: dict, err: _Problems) -> None:
    status = _field(doc, "status", "", err, '"status": "completed"')
    if status != "completed":
        raise err("", f"status is {status!r}, not 'completed': the table is not ready yet",
                  "wait for the job controller to finish it, or set \"status\": \"completed\" in a hand-made table")


def _parse_devices(raw: list, where: str, err: _Problems, with_rank: bool,
                   max_id: int = MAX_DEVICE_ID) -> list[tuple[int, str, int | None, str]]:
    """(device_id, device_ip or "", rank_id or None, entry name) per device; checks fields and per-server
    duplicates. A missing device_ip is allowed here; `_check_device_ips` requires it on multi-server tables."""
    out = []
    seen: dict[int, str] = {}
    for j, entry in enumerate(raw):
        here = f"{where} device[{j}]"
        device_id = _whole_number(_field(entry, "device_id", here, err, '"device_id": "0"'), "device_id", here, err)
        if device_id > max_id:
            raise err(here, f"device_id {device_id} is out of range 0-{max_id}",
                      "use the card's number as `npu-smi info` shows it (0-7 on most servers)")
        if device_id in seen:
            raise err(here, f"duplicate device_id {device_id} (also {seen[device_id]})",
                      "each card may appear once per server; remove or renumber one of them")
        seen[device_id] = f"device[{j}]"
        device_ip = entry.get("device_ip", "")
        if device_ip != "":
            # HCCL splits the field on commas (one address per NIC of the card).
            for address in str(device_ip).split(","):
                _address(address, "device_ip", here, err)
        rank_id = None
        if with_rank:
            rank_id = _whole_number(_field(entry, "rank_id", here, err, '"rank_id": "0"'), "rank_id", here, err)
        out.append((device_id, device_ip, rank_id, here))
    return out


def _parse_v1(doc: dict, err: _Problems, max_id: int) -> list[tuple[str, list[tuple[int, str, int, str]], str]]:
    version = _field(doc, "version", "", err, '"version": "1.0"')
    if str(version) == "1.2":
        raise err("", "version 1.2 (Atlas A3 super-pod) tables are not supported",
                  "write a version 1.0 table for the servers of this job (`edsr-dist rank-table make`)")
    if str(version) != "1.0":
        raise err("", f"unsupported version {version!r}", 'write "version": "1.0" (or use the group_list format)')
    _check_status(doc, err)
    servers = _nonempty_list(_field(doc, "server_list", "", err, '"server_list": [...]'), "server_list", "", err,
                             '[{"server_id": "10.0.0.1", "device": [...]}]')
    _check_count(doc, "server_count", len(servers), f"server_list has {len(servers)} entries", "", err,
                 " or add the missing servers")  # optional for HCCL
    parsed = []
    seen_servers: dict[str, str] = {}
    for i, entry in enumerate(servers):
        where = f"server_list[{i}]"
        server_id = _address(_field(entry, "server_id", where, err, '"server_id": "10.0.0.1"'), "server_id", where, err)
        _once(seen_servers, server_id, f"server_id {server_id}", where, err,
              "HCCL refuses a table listing a server twice; merge the two entries into one")
        where = f"server_list[{i}] ({server_id})"
        raw = _nonempty_list(_field(entry, "device", where, err, '"device": [...]'), "device", where, err,
                             '[{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}]')
        if entry.get("host_ip", "") != "":
            # HCCL's GetSingleDevice reads device_ip only when the server's host_ip is invalid (missing).
            _address(entry["host_ip"], "host_ip", where, err)
            err.host_ip_servers.add(where)
        parsed.append((server_id, _parse_devices(raw, where, err, with_rank=True, max_id=max_id), where))
    return parsed


def _once(seen: dict[str, str], key: str, shown: str, where: str, err: _Problems, fix: str) -> None:
    """`key` must not repeat an earlier entry's (`seen`: key -> where it was)."""
    if key in seen:
        raise err(where, f"duplicate {shown} (also {seen[key]})", fix)
    seen[key] = where


def _check_count(entry: dict, key: str, listed: int, what: str, where: str, err: _Problems, fix_more: str = "") -> None:
    """An optional "<key>" count (HCCL accepts a table without one) must equal the number of entries listed."""
    if key not in entry:
        return
    count = _whole_number(entry[key], key, where, err)
    if count != listed:
        raise err(where, f"{key} is {count} but {what}", f'set "{key}": "{listed}"{fix_more}')


def _parse_group_list(doc: dict, err: _Problems, max_id: int) -> list[tuple[str, list[tuple[int, str, int, str]], str]]:
    _check_status(doc, err)
    groups = _nonempty_list(_field(doc, "group_list", "", err, '"group_list": [...]'), "group_list", "", err,
                            '[{"instance_list": [...]}]')
    _check_count(doc, "group_count", len(groups), f"group_list has {len(groups)} entries", "", err)
    lab = "deploy_mode" in doc  # HCCL's GetDeployMode: the key's presence alone selects lab mode
    by_server: dict[str, list[tuple[int, str, int | None, str]]] = {}
    seen_pods: dict[str, str] = {}
    for g, group in enumerate(groups):
        gwhere = f"group_list[{g}]"
        raw_instances = _nonempty_list(_field(group, "instance_list", gwhere, err, '"instance_list": [...]'),
                                       "instance_list", gwhere, err, '[{"pod_name": "job-0", ...}]')
        _check_count(group, "instance_count", len(raw_instances), f"instance_list has {len(raw_instances)} entries",
                     gwhere, err)
        group_devices = 0
        for i, inst in enumerate(raw_instances):
            where = f"{gwhere} instance_list[{i}]"
            server_id = _address(_field(inst, "server_id", where, err, '"server_id": "10.0.0.1"'),
                                 "server_id", where, err)
            rank = None
            if lab:
                rank = _whole_number(_field(inst, "rank_id", where, err, '"rank_id": "0"'), "rank_id", where, err)
                where = f"{where} (rank {rank}, {server_id})"
            else:
                pod = str(_field(inst, "pod_name", where, err, '"pod_name": "job-0"'))
                _once(seen_pods, pod, f"pod_name {pod!r}", where, err, "give every instance its own pod_name")
                where = f"{where} ({pod}, {server_id})"
            raw = _nonempty_list(_field(inst, "devices", where, err, '"devices": [...]'), "devices", where, err,
                                 '[{"device_id": "0", "device_ip": "192.168.100.101"}]')
            devices = _parse_devices(raw, where, err, with_rank=False, max_id=max_id if lab else MAX_DEVICE_ID_910)
            if lab and len(devices) != 1:
                raise err(where, f"a lab-mode instance lists {len(devices)} devices",
                          "list one device per instance, each with its rank_id")
            group_devices += len(devices)
            by_server.setdefault(server_id, []).extend((d, ip, rank, here) for d, ip, _, here in devices)
        _check_count(group, "device_count", group_devices, f"its instances list {group_devices} devices", gwhere, err)
    if lab:
        servers = sorted(by_server.items(), key=lambda item: min(rank for _, _, rank, _ in item[1]))
        return [(server_id, sorted(devices, key=lambda d: d[2]), f"server {server_id}") for server_id, devices in servers]
    # Cloud mode: HCCL's GetSortClouldRankList walks a std::map keyed by server_id (string order) and each server's
    # devices by device_id, numbering ranks 0.. in that order.
    parsed = []
    rank = 0
    for server_id in sorted(by_server):
        numbered = []
        for device_id, device_ip, _, here in sorted(by_server[server_id], key=lambda d: d[0]):
            numbered.append((device_id, device_ip, rank, here))
            rank += 1
        parsed.append((server_id, numbered, f"server {server_id}"))
    return parsed


def _check_device_ips(parsed: list, err: _Problems) -> None:
    """HCCL (GetSingleDeviceIp): device_ip may be left out on a single server, or where the server gives host_ip
    (GetSingleDevice reads device_ip only when host_ip is invalid); every address it lists is unique in the whole
    table (CheckUniqueAndInsertPool)."""
    owner: dict[str, str] = {}
    for _, devices, server_where in parsed:
        for _, ip, _, here in devices:
            if not ip:
                if len(parsed) > 1 and server_where not in err.host_ip_servers:
                    raise err(here, "missing device_ip in a multi-server table",
                              "add the card's address from /etc/hccn.conf (address_N=) or `hccn_tool -i N -ip -g`, "
                              "or the server's host_ip")
                continue
            for address in ip.split(","):
                if address in owner:
                    raise err(here, f"duplicate device_ip {address} (also {owner[address]})",
                              "HCCL refuses a table with two cards on one address; use each card's own address")
                owner[address] = here


def _check_ranks(parsed: list, err: _Problems) -> None:
    owner: dict[int, str] = {}
    for _, devices, _ in parsed:
        for _, _, rank, here in devices:
            if rank in owner:
                raise err(here, f"duplicate rank_id {rank} (also {owner[rank]})", "give every device its own rank_id")
            owner[rank] = here
    total = len(owner)
    missing = sorted(set(range(total)) - set(owner))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise err("", f"rank_id {shown} missing: {total} devices need ranks 0..{total - 1}",
                  "number the devices 0..N-1 without gaps")
    previous_max = -1
    for _, devices, _ in parsed:
        ranks = [rank for _, _, rank, _ in devices]
        if min(ranks) < previous_max:
            bad = next(here for _, _, rank, here in devices if rank < previous_max)
            raise err(bad, f"rank_id {min(ranks)} is lower than a rank of an earlier server ({previous_max})",
                      "ranks must follow server order: the first server gets 0..k-1, the next k.., and so on")
        previous_max = max(ranks)


def host_has_16_devices() -> bool:
    """910B / A3 servers expose device nodes above davinci7."""
    return any(re.fullmatch(r"/dev/davinci([89]|1[0-5])", p) for p in glob.glob("/dev/davinci[0-9]*"))


def load_rank_table(path: str, sixteen_devices: bool | None = None) -> RankTable:
    """Read and check a rank table; any problem is a one-line UserError naming the file and entry.
    sixteen_devices: the chips take device ids 8-15 (910B / A3); None = ask this host."""
    path = os.fspath(path)
    max_id = MAX_DEVICE_ID if (host_has_16_devices() if sixteen_devices is None else sixteen_devices) else MAX_DEVICE_ID_910
    err = _Problems(path)
    doc = _read_json(path, err)
    if doc.get("status", "completed") != "completed":  # Kubernetes' first version holds nothing else yet
        _check_status(doc, err)
    if "server_list" in doc:
        kind, parsed = "1.0", _parse_v1(doc, err, max_id)
    elif "group_list" in doc:
        kind, parsed = "group_list", _parse_group_list(doc, err, max_id)
    else:
        raise err("", "neither server_list (version 1.0) nor group_list (older format) found",
                  "see rank_table/README.md, or make one with `edsr-dist rank-table make`")
    _check_ranks(parsed, err)
    _check_device_ips(parsed, err)
    servers = [Server(server_id, [Device(d, ip, r) for d, ip, r, _ in devices]) for server_id, devices, _ in parsed]
    return RankTable(path=path, servers=servers, format=kind, real_path=os.path.realpath(path))


def wait_for_rank_table(path: str, timeout_s: float, poll_s: float = 1.0) -> RankTable:
    """Kubernetes writes the table as {"status": "initializing"} and completes it seconds later (mindxdl's
    rank_table.sh polls for "completed"): read it until its status is "completed" or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return load_rank_table(path)
        except UserError as exc:
            if "not ready yet" not in str(exc) or time.monotonic() >= deadline:
                if "not ready yet" in str(exc):
                    raise UserError(f"rank table {path} was still not 'completed' after --wait-table {timeout_s:g} s; "
                                    "check the job controller (or the hand-made table's \"status\")") from None
                raise
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def local_addresses() -> set[str]:
    """Every address of this host's interfaces (IPv4 and IPv6), loopback included, and its hostname."""
    found = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.split("%", 1)[0])  # drop an IPv6 zone suffix like fe80::1%eth0
    return found


def select_server(table, server_id: str | None = None, server_index: int | None = None,
                  addresses: set[str] | None = None) -> int:
    """Index of this server's entry in the table: explicit index, explicit id, or the one local address match."""
    ids = [s.server_id for s in table.servers]
    listed = ", ".join(f"[{i}] {sid}" for i, sid in enumerate(ids))
    if server_index is not None:
        if not 0 <= server_index < len(ids):
            raise UserError(f"--server-index {server_index} is out of range: {table.path} has {len(ids)} server(s) "
                            f"({listed}); pass 0..{len(ids) - 1}")
        if server_id is not None and ids[server_index] != server_id:
            raise UserError(f"--server-index {server_index} is {ids[server_index]}, not --server-id {server_id}; "
                            "pass only one of them")
        return server_index
    if server_id is not None:
        matches = [i for i, sid in enumerate(ids) if sid == server_id]
        if not matches:
            raise UserError(f"--server-id {server_id} is not in {table.path} (servers: {listed}); "
                            "pass one of those, or --server-index")
    else:
        addresses = local_addresses() if addresses is None else addresses
        matches = [i for i, sid in enumerate(ids) if sid in addresses]
        if not matches:
            mine = ", ".join(sorted(a for a in addresses if ":" not in a)[:6])
            raise UserError(f"this host ({mine}) is not in {table.path} (servers: {listed}); run the launcher on a "
                            "listed server, pass --server-id/--server-index, or make a table for this host with "
                            "`edsr-dist rank-table make --devices 0-7 --out FILE`")
    if len(matches) > 1:
        raise UserError(f"{table.path} lists this host {len(matches)} times (entries "
                        f"{', '.join(map(str, matches))}); pass --server-index to say which entry this launcher runs")
    return matches[0]
