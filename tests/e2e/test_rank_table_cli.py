"""`edsr-dist rank-table check|make` from the command line."""

from __future__ import annotations

import json
import os

from helpers import REPO, run_cli, v1, write_table

from edsr_dist.parallel.rank_table import load_rank_table


def rank_table_cli(*args: str):
    return run_cli(["rank-table", *args], cwd=REPO, timeout=60)


def test_symlink_is_resolved(tmp_path):
    real = write_table(tmp_path, v1([("10.0.0.1", [0])]), "real.json")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    table = load_rank_table(link)
    assert table.is_symlink and table.real_path == os.path.realpath(real)
    result = rank_table_cli("check", str(link))
    assert result.returncode == 0
    assert "symlink" in result.stdout


def test_check_prints_table_and_summary():
    result = rank_table_cli("check", "rank_table/hccl_16p_2server.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "2 servers, 16 devices, 16 ranks"
    assert any(line.split()[:5] == ["1", "10.0.0.2", "7", "192.168.107.102", "15"] for line in lines)


def test_check_bad_table_is_one_line_exit_2(tmp_path):
    path = write_table(tmp_path, dict(v1([("10.0.0.1", [0, 1]), ("10.0.0.2", [0, 1])]), server_count="3"))
    result = rank_table_cli("check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "server_count is 3" in result.stderr


def test_make_with_flags_round_trips(tmp_path):
    out = tmp_path / "made.json"
    result = rank_table_cli("make", "--devices", "0-1,3", "--server-ip", "10.0.0.7",
                     "--device-ips", "192.168.100.107,192.168.101.107,192.168.103.107",
                     "--hccn-conf", str(tmp_path / "absent.conf"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["version"] == "1.0" and doc["server_count"] == "1"
    assert doc["server_list"][0]["device"][2] == {"device_id": "3", "device_ip": "192.168.103.107", "rank_id": "2"}
    check = rank_table_cli("check", str(out))
    assert check.returncode == 0 and check.stdout.strip().endswith("1 server, 3 devices, 3 ranks")


def test_make_reads_hccn_conf(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.100.101\nnetmask_0=255.255.255.0\naddress_1=192.168.101.101\n")
    result = rank_table_cli("make", "--devices", "0,1", "--server-ip", "10.0.0.1", "--hccn-conf", str(conf))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [d["device_ip"] for d in doc["server_list"][0]["device"]] == ["192.168.100.101", "192.168.101.101"]
    missing = rank_table_cli("make", "--devices", "0-2", "--hccn-conf", str(conf))
    assert missing.returncode == 2 and "no address_2= line" in missing.stderr


def test_make_without_device_ips_fails_cleanly(tmp_path):
    out = tmp_path / "made.json"
    result = rank_table_cli("make", "--devices", "0-7", "--hccn-conf", str(tmp_path / "absent.conf"),
                     "--out", str(out))
    assert result.returncode == 2
    assert "--device-ips" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    wrong = rank_table_cli("make", "--devices", "0-1", "--device-ips", "192.168.100.101",
                    "--hccn-conf", str(tmp_path / "absent.conf"))
    assert wrong.returncode == 2 and "2 devices but 1 device IPs" in wrong.stderr


def stand_in_hccn_tool(tmp_path, down: int) -> dict:
    """An `hccn_tool` on PATH answering as the driver's does (`link status: UP`, `net health status: Success`),
    with card `down`'s link DOWN."""
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "hccn_tool"
    tool.write_text(f"""#!/bin/sh
case "$3" in
  -link) if [ "$2" = "{down}" ]; then echo "link status: DOWN"; else echo "link status: UP"; fi ;;
  -net_health) echo "net health status: Success" ;;
esac
""")
    tool.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_preflight_names_the_card_whose_link_is_down(tmp_path):
    table = write_table(tmp_path, v1([("127.0.0.1", [0, 1]), ("10.0.0.2", [0, 1])]))
    result = run_cli(["rank-table", "check", "--preflight", str(table)], tmp_path, env=stand_in_hccn_tool(tmp_path, 1))
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "preflight on server 0 (127.0.0.1): card 1 (192.168.101.101): link DOWN" in line
    healthy = run_cli(["rank-table", "check", "--preflight", str(table)], tmp_path,
                      env=stand_in_hccn_tool(tmp_path / "ok", 7) if (tmp_path / "ok").mkdir() is None else None)
    assert healthy.returncode == 0, healthy.stderr
    assert "2 card(s), every link UP and net health Success" in healthy.stdout
