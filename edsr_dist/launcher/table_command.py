"""`edsr-dist rank-table check|make`: check a rank table as HCCL will read it, or make one for this server."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil

from edsr_dist.errors import CommandParser, UserError
from edsr_dist.parallel.rank_table import MAX_DEVICE_ID, Device, RankTable, Server, load_rank_table, select_server
from edsr_dist.state.atomic import atomic_write_text

HCCN_CONF = "/etc/hccn.conf"
HCCN_TOOL_DEFAULT = "/usr/local/Ascend/driver/tools/hccn_tool"  # where the Ascend driver installs it
HCCN_TIMEOUT_S = 15


def parse_device_list(spec: str) -> list[int]:
    """`0-7`, `0,1,2,3` or `0-3,6` -> sorted distinct device ids."""
    devices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match:
            raise UserError(f"--devices {spec!r}: {part!r} is not a device number or range; write it like 0-7 or 0,1,2,3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if last < first:
            raise UserError(f"--devices {spec!r}: range {part} runs backwards; write it like {last}-{first}")
        devices.extend(range(first, last + 1))
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices {spec!r} names a device twice; list each device once")
    if max(devices) > MAX_DEVICE_ID:
        raise UserError(f"--devices {spec!r}: device {max(devices)} is out of range 0-{MAX_DEVICE_ID}; "
                        "use the numbers `npu-smi info` shows")
    return sorted(devices)


def read_hccn_conf(path: str) -> dict[int, str]:
    """`address_N=IP` lines of /etc/hccn.conf (written by hccn_tool) -> {N: IP}."""
    addresses: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = re.fullmatch(r"\s*address_([0-9]+)\s*=\s*(\S+)\s*", line)
            if match:
                addresses[int(match.group(1))] = match.group(2)
    return addresses


def guess_server_ip() -> str:
    """The address this host uses to reach others (no packet is sent), else a non-loopback IPv4, else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # documentation address: only picks the outgoing interface
            address = probe.getsockname()[0]
            if address and not address.startswith("127."):
                return address
    except OSError:
        pass
    try:
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                    return addr.address
    except ImportError:
        pass
    return "127.0.0.1"


def make_rank_table(devices: list[int], server_ip: str, device_ips: list[str], path: str = "<new>") -> RankTable:
    if len(device_ips) != len(devices):
        raise UserError(f"{len(devices)} devices but {len(device_ips)} device IPs; give one --device-ips entry per device")
    devices_out = [Device(d, ip, rank) for rank, (d, ip) in enumerate(zip(devices, device_ips))]
    return RankTable(path=path, servers=[Server(server_ip, devices_out)])


def _write_table(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: folder {folder} does not exist; create it first")
    atomic_write_text(path, text)


def _cmd_make(args: argparse.Namespace) -> int:
    if args.out and os.path.exists(args.out) and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace it, or another --out")
    devices = parse_device_list(args.devices)
    server_ip = args.server_ip or guess_server_ip()
    if args.device_ips:
        # An explicit flag wins over /etc/hccn.conf: it is what the user just typed.
        device_ips = [ip.strip() for ip in args.device_ips.split(",") if ip.strip()]
        source = "--device-ips"
    elif os.path.exists(args.hccn_conf):
        known = read_hccn_conf(args.hccn_conf)
        missing = [d for d in devices if d not in known]
        if missing:
            raise UserError(f"{args.hccn_conf} has no address_{missing[0]}= line for device {missing[0]}; "
                            f"set it with `hccn_tool -i {missing[0]} -ip -s address ... netmask ...` or pass --device-ips")
        device_ips = [known[d] for d in devices]
        source = args.hccn_conf
    else:
        raise UserError(f"no device IPs: {args.hccn_conf} not found; pass --device-ips with one address per device "
                        f"({len(devices)} needed)")
    table = make_rank_table(devices, server_ip, device_ips, path=args.out or "<stdout>")
    text = json.dumps(table.to_v1(), indent=4) + "\n"
    # Check what we are about to write with the same reader the launcher uses.
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "rank_table.json")
        with open(probe, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            load_rank_table(probe)
        except UserError as exc:
            raise UserError(str(exc).replace(probe, f"new table (device IPs from {source})")) from None
    if args.out:
        _write_table(args.out, text)
        print(f"wrote {args.out}: 1 server ({server_ip}), {len(devices)} devices, {len(devices)} ranks", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def format_table(table: RankTable) -> str:
    rows = [("server", "server_id", "device_id", "device_ip", "rank_id")]
    for i, server in enumerate(table.servers):
        for dev in server.devices:
            rows.append((str(i), server.server_id, str(dev.device_id), dev.device_ip, str(dev.rank_id)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    n_servers = len(table.servers)
    lines.append(f"{n_servers} server{'s' if n_servers != 1 else ''}, {table.rank_size} device"
                 f"{'s' if table.rank_size != 1 else ''}, {table.rank_size} rank{'s' if table.rank_size != 1 else ''}")
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace) -> int:
    table = load_rank_table(args.file, sixteen_devices={"910b": True, "910": False}.get(args.chip))
    print(f"{table.path}: format {table.format}")
    print(format_table(table))
    if table.is_symlink:
        print(f"note: {table.path} is a symlink to {table.real_path}; torch_npu refuses symlinks, so point "
              f"RANK_TABLE_FILE at the real file (`edsr-dist launch` does this itself)")
    if args.preflight:
        print(preflight(table, args.server_index))
    return 0


def _hccn_tool() -> str | None:
    return shutil.which("hccn_tool") or (HCCN_TOOL_DEFAULT if os.access(HCCN_TOOL_DEFAULT, os.X_OK) else None)


def _hccn_query(tool: str, device: int, what: str) -> str:
    """`hccn_tool -i N -link -g` answers `link status: UP`; `-net_health -g` answers `net health status: Success`
    (or Init, Socket fail, Receive timeout, ...): the value after the last colon."""
    try:
        done = subprocess.run([tool, "-i", str(device), f"-{what}", "-g"], capture_output=True, text=True,
                              timeout=HCCN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer within {HCCN_TIMEOUT_S} s"
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[-1].rsplit(":", 1)[-1].strip() if text else f"no output (exit {done.returncode})"


def preflight(table: RankTable, server_index: int | None = None) -> str:
    """Ask hccn_tool about the RoCE link and network health of this server's cards before a multi-server job,
    instead of HCCL timing out minutes later. Returns a summary line; a bad card is a UserError naming it."""
    if len(table.servers) == 1:
        return "preflight: one server, HCCL uses no RoCE link between servers; nothing to check"
    tool = _hccn_tool()
    if tool is None:
        return "preflight: hccn_tool not found (PATH, " + HCCN_TOOL_DEFAULT + "); links not checked"
    index = select_server(table, server_index=server_index)
    server = table.servers[index]
    problems = []
    for device in sorted(server.devices, key=lambda d: d.device_id):
        link = _hccn_query(tool, device.device_id, "link")
        health = _hccn_query(tool, device.device_id, "net_health")
        card = f"card {device.device_id} ({device.device_ip or 'no device_ip'})"
        if link != "UP":
            problems.append(f"{card}: link {link}")
        elif health != "Success":
            problems.append(f"{card}: net health {health}")
    if problems:
        raise UserError(f"preflight on server {index} ({server.server_id}): {'; '.join(problems)}; HCCL would time "
                        "out on these cards: check the cable and switch port (`hccn_tool -i N -link -g`), the card's "
                        "address and detect IP (`hccn_tool -i N -ip -g`, `-netdetect -g`) before starting")
    return (f"preflight on server {index} ({server.server_id}): {len(server.devices)} card(s), every link UP and "
            "net health Success")


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="edsr-dist rank-table", description="Check or make an Ascend HCCL rank table.")
    sub = parser.add_subparsers(dest="action", metavar="check|make")
    check = sub.add_parser("check", help="validate a table and print its servers, devices and ranks")
    check.add_argument("file", help="rank table JSON (version 1.0 or group_list format)")
    check.add_argument("--chip", choices=("auto", "910", "910b"), default="auto",
                       help="the servers' chip: 910b (also A3) allows device ids 8-15 (default: this host's)")
    check.add_argument("--preflight", action="store_true",
                       help="also ask hccn_tool for the link and network health of this server's cards "
                            "(multi-server tables) and name a card that is down")
    check.add_argument("--server-index", type=int, metavar="K",
                       help="with --preflight: this server's position in the table (default: match a local address)")
    make = sub.add_parser("make", help="write a version 1.0 table for this server")
    make.add_argument("--devices", required=True, help="device ids, like 0-7 or 0,1,2,3")
    make.add_argument("--server-ip", default="", help="this host's address (default: the outgoing interface's)")
    make.add_argument("--device-ips", default="",
                      help=f"comma-separated card addresses, one per device (default: address_N= lines of {HCCN_CONF})")
    make.add_argument("--hccn-conf", default=HCCN_CONF, help=f"where to read card addresses (default {HCCN_CONF})")
    make.add_argument("--out", default="", help="output file (default: print to stdout)")
    make.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.action == "check":
        return _cmd_check(args)
    if args.action == "make":
        return _cmd_make(args)
    raise UserError("choose an action: `edsr-dist rank-table check FILE` or `edsr-dist rank-table make --devices 0-7`")
