"""Horovod/Open MPI hostfiles (`hostname slots=N`) and the horovodrun command built from them.

horovodrun's own hostfile parser rejects comment and blank lines, so we read the file ourselves
(comments and blank lines allowed) and hand horovodrun the inline `-H host:slots,...` form instead.
"""

from __future__ import annotations

import os
import re

from edsr_dist.errors import UserError

_LINE = re.compile(r"(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots\s*=\s*(?P<slots>\S+)")


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """`hostname slots=N` lines -> [(hostname, N)]; `#` comments and blank lines are skipped."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"hostfile {path} not found; write one `hostname slots=N` line per machine") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"hostfile {path} cannot be read ({exc}); check the file and its permissions") from None
    hosts: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.fullmatch(line)
        if not match:
            raise UserError(f"{path}:{number}: cannot read {raw.strip()!r}; write it as `hostname slots=N`")
        host, slots_text = match.group("host"), match.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise UserError(f"{path}:{number}: slots={slots_text!r} is not a positive whole number; "
                            f"write the number of devices on {host}, like `{host} slots=4`")
        if host in first_line:
            raise UserError(f"{path}:{number}: host {host} already listed on line {first_line[host]}; "
                            "list each host once with its total slots")
        first_line[host] = number
        hosts.append((host, int(slots_text)))
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts; add one `hostname slots=N` line per machine")
    return hosts


def horovodrun_command(hosts: list[tuple[str, int]], worker_argv: list[str], np: int | None = None) -> list[str]:
    """`horovodrun -np N -H h1:4,h2:4 <worker_argv...>`; N defaults to all slots."""
    total = sum(slots for _, slots in hosts)
    if np is None:
        np = total
    if not 1 <= np <= total:
        raise UserError(f"-np {np} does not fit the hostfile's {total} slots; use 1..{total} or add hosts")
    if not worker_argv:
        raise UserError("no worker command for horovodrun; give the train arguments after `--`")
    inline = ",".join(f"{host}:{slots}" for host, slots in hosts)
    return ["horovodrun", "-np", str(np), "-H", inline, *worker_argv]
