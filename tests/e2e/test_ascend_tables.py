"""The launcher's Ascend environment from rank tables (`launch --dry-run`, `rank-table check`), checked against
HCCL's and torch_npu's rules. The table parser's own cases are in tests/unit/test_ascend_rules.py."""

import os
import subprocess
import sys

import pytest
from helpers import REAL_RANK_TABLES, REPO, cloud_table, launch_dry_run, v1_with_ips, write_table

from edsr_dist.parallel.rank_table import load_rank_table


def worker_envs(stdout: str) -> list[dict]:
    envs = []
    for line in stdout.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        envs.append(dict(part.split("=", 1) for part in line.split() if "=" in part and part[0].isupper()))
    return envs


def test_launcher_exports_a_v1_copy_of_a_group_list_table(tmp_path):
    path = write_table(tmp_path, cloud_table([("job-0", "127.0.0.1", [0, 1])]))
    result = launch_dry_run(["--rank-table", str(path), "--log-dir", str(tmp_path / "logs")])
    assert result.returncode == 0, result.stderr
    envs = worker_envs(result.stdout)
    assert [e["RANK_TABLE_FILE"] for e in envs] == [str(tmp_path / "logs" / "rank_table_v1.json")] * 2
    assert "group_list table: workers get a version 1.0 copy" in result.stdout


# ---- items 4 and 7: logical devices and HCCL defaults in --dry-run ------------------------------------------

def test_dry_run_shows_physical_and_logical_devices_and_hccl_defaults(tmp_path):
    path = write_table(tmp_path, v1_with_ips([("127.0.0.1", [(4, "192.168.0.5"), (5, "192.168.1.5")]),
                               ("10.9.9.9", [(4, "192.168.2.5"), (5, "192.168.3.5")])]))
    result = launch_dry_run(["--rank-table", str(path), "--server-index", "0", "--log-dir", str(tmp_path)],
                            {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7", "HCCL_EXEC_TIMEOUT": "1800"})
    assert result.returncode == 0, result.stderr
    envs = worker_envs(result.stdout)
    assert [(e["DEVICE_ID"], e["ASCEND_DEVICE_ID"]) for e in envs] == [("4", "0"), ("5", "1")]
    assert all(e["HCCL_CONNECT_TIMEOUT"] == "600" and e["HCCL_IF_IP"] == "127.0.0.1" for e in envs)
    assert all(e["RANK_TABLE_FILE"] == str(path) for e in envs)
    assert "# rank 0: device 4 (logical 0)" in result.stdout
    assert "# passed through to every worker: ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 HCCL_EXEC_TIMEOUT=1800" in result.stdout


def test_user_hccl_settings_win(tmp_path):
    path = write_table(tmp_path, v1_with_ips([("127.0.0.1", [(0, "192.168.0.1")])]))
    result = launch_dry_run(["--rank-table", str(path), "--log-dir", str(tmp_path)], {"HCCL_CONNECT_TIMEOUT": "1200"})
    assert result.returncode == 0, result.stderr
    assert "HCCL_CONNECT_TIMEOUT" not in worker_envs(result.stdout)[0]  # inherited as set, not overridden
    assert "HCCL_IF_IP" not in worker_envs(result.stdout)[0]  # one server: nothing to choose


# ---- item 8: Kubernetes tables that are not complete yet -----------------------------------------------------

def test_a_table_that_stays_initializing_is_one_line(tmp_path):
    path = write_table(tmp_path, {"status": "initializing"})
    result = launch_dry_run(["--rank-table", str(path), "--wait-table", "0.3"])
    assert result.returncode == 2
    assert "was still not 'completed' after --wait-table 0.3 s" in result.stderr
    assert "Traceback" not in result.stderr


# ---- real tables from public repositories (tests/data/rank_tables/SOURCES.md) ------------------------------

REAL = REAL_RANK_TABLES
# file: (servers, ranks)
REAL_TABLES = {
    "v1_1server_1p_waveglow.json": (1, 1),
    "v1_1server_8p_jasper.json": (1, 8),
    "v1_2server_16p_gnmt.json": (2, 16),
    "group_cloud_1instance_8p_tacotron2.json": (1, 8),
    "group_cloud_2instance_16p_bert.json": (2, 16),
    "group_lab_2p_edvr.json": (1, 2),
    "group_lab_2server_16p_widedeep.json": (2, 16),
}


@pytest.mark.parametrize("name", sorted(REAL_TABLES))
def test_real_tables_pass_check(name):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "rank-table", "check", str(REAL / name)],
                            env=env, capture_output=True, text=True, timeout=60)
    servers, ranks = REAL_TABLES[name]
    assert result.returncode == 0, result.stderr
    assert f"{servers} server{'s' if servers > 1 else ''}, {ranks} device" in result.stdout


def test_a_real_table_hccl_refuses_is_refused():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "rank-table", "check",
                             str(REAL / "refused_duplicate_device_ip_widedeep.json")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "duplicate device_ip 192.1.2.8" in result.stderr


@pytest.mark.parametrize("name", sorted(REAL_TABLES))
def test_real_tables_dry_run(tmp_path, name):
    path = REAL / name
    table = load_rank_table(path)
    last = len(table.servers) - 1
    result = launch_dry_run(["--rank-table", str(path), "--server-index", str(last), "--log-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    envs = worker_envs(result.stdout)
    server = table.servers[last]
    assert [int(e["RANK_ID"]) for e in envs] == sorted(d.rank_id for d in server.devices)
    assert [e["DEVICE_ID"] for e in envs] == [str(d.device_id) for d in sorted(server.devices, key=lambda d: d.rank_id)]
    assert all(e["ASCEND_DEVICE_ID"] == e["DEVICE_ID"] for e in envs)  # all cards visible: logical = physical
    assert all(e["RANK_SIZE"] == str(table.rank_size) and e["HCCL_CONNECT_TIMEOUT"] == "600" for e in envs)
    exported = envs[0]["RANK_TABLE_FILE"]
    if table.format == "1.0":
        assert exported == str(path)
    else:
        assert exported == str(tmp_path / "rank_table_v1.json")
    if len(table.servers) > 1:
        assert all(e["HCCL_IF_IP"] == server.server_id for e in envs)
    else:
        assert "HCCL_IF_IP" not in envs[0]
