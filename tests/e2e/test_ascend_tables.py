"""Rank tables and the launcher's Ascend environment, checked against HCCL's and torch_npu's rules."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edsr_dist.errors import UserError
from edsr_dist.parallel.rank_table import load_rank_table
from edsr_dist.parallel.world import discover_world

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, doc: dict, name: str = "table.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def cloud_table(hosts_devices: list[tuple[str, str, list[int]]]) -> dict:
    """group_list ("cloud" mode) table: (pod_name, server_id, device ids) per instance."""
    instances = [{"pod_name": pod, "server_id": host,
                  "devices": [{"device_id": str(d), "device_ip": f"192.168.{i}.{d + 1}"} for d in devices]}
                 for i, (pod, host, devices) in enumerate(hosts_devices)]
    return {"status": "completed", "group_count": "1", "group_list": [
        {"group_name": "job", "device_count": str(sum(len(d) for _, _, d in hosts_devices)),
         "instance_count": str(len(instances)), "instance_list": instances}]}


def v1(servers: list[tuple[str, list[tuple[int, str]]]]) -> dict:
    rank = 0
    out = []
    for host, devices in servers:
        entries = []
        for device_id, ip in devices:
            entry = {"device_id": str(device_id), "rank_id": str(rank)}
            if ip:
                entry["device_ip"] = ip
            entries.append(entry)
            rank += 1
        out.append({"server_id": host, "device": entries})
    return {"version": "1.0", "status": "completed", "server_list": out}


# ---- item 3: HCCL's order for group_list tables ------------------------------------------------------------

def test_group_list_ranks_follow_server_id_string_order_then_device_id(tmp_path):
    # Hosts .9 and .10: string order puts .10 first (std::map in HCCL); devices listed 5,6,7,0 sort to 0,5,6,7.
    table = load_rank_table(write(tmp_path, cloud_table([("job-0", "10.0.0.9", [5, 6, 7, 0]),
                                                         ("job-1", "10.0.0.10", [0, 1])])))
    order = [(s.server_id, d.device_id, d.rank_id) for s in table.servers for d in s.devices]
    assert order == [("10.0.0.10", 0, 0), ("10.0.0.10", 1, 1), ("10.0.0.9", 0, 2), ("10.0.0.9", 5, 3),
                     ("10.0.0.9", 6, 4), ("10.0.0.9", 7, 5)]


def test_group_list_pod_name_without_number_and_lab_mode_are_accepted(tmp_path):
    table = load_rank_table(write(tmp_path, cloud_table([("tacotron2", "10.0.0.1", list(range(8)))])))
    assert table.rank_size == 8
    lab = {"status": "completed", "deploy_mode": "lab", "group_count": "1", "group_list": [
        {"group_name": "hccl_world_group", "device_num": "2", "server_num": "1", "instance_count": "2",
         "instance_list": [{"rank_id": "1", "server_id": "10.0.0.1", "devices": [{"device_id": "0", "device_ip": "192.168.0.1"}]},
                           {"rank_id": "0", "server_id": "10.0.0.1", "devices": [{"device_id": "1", "device_ip": "192.168.1.1"}]}]}]}
    table = load_rank_table(write(tmp_path, lab, "lab.json"))
    assert [(d.device_id, d.rank_id) for d in table.servers[0].devices] == [(1, 0), (0, 1)]


def test_group_list_cloud_mode_refuses_device_ids_above_7(tmp_path):
    with pytest.raises(UserError, match="device_id 8 is out of range 0-7"):
        load_rank_table(write(tmp_path, cloud_table([("job-0", "10.0.0.1", [8])])))


def launch_dry_run(args: list[str], env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "RANK", "ASCEND_RT"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "edsr_dist", "launch", *args, "--dry-run", "--exec", "--", "true"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def worker_envs(stdout: str) -> list[dict]:
    envs = []
    for line in stdout.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        envs.append(dict(part.split("=", 1) for part in line.split() if "=" in part and part[0].isupper()))
    return envs


def test_launcher_exports_a_v1_copy_of_a_group_list_table(tmp_path):
    path = write(tmp_path, cloud_table([("job-0", "127.0.0.1", [0, 1])]))
    result = launch_dry_run(["--rank-table", str(path), "--log-dir", str(tmp_path / "logs")])
    assert result.returncode == 0, result.stderr
    envs = worker_envs(result.stdout)
    assert [e["RANK_TABLE_FILE"] for e in envs] == [str(tmp_path / "logs" / "rank_table_v1.json")] * 2
    assert "group_list table: workers get a version 1.0 copy" in result.stdout


# ---- items 4 and 7: logical devices and HCCL defaults in --dry-run ------------------------------------------

def test_dry_run_shows_physical_and_logical_devices_and_hccl_defaults(tmp_path):
    path = write(tmp_path, v1([("127.0.0.1", [(4, "192.168.0.5"), (5, "192.168.1.5")]),
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
    path = write(tmp_path, v1([("127.0.0.1", [(0, "192.168.0.1")])]))
    result = launch_dry_run(["--rank-table", str(path), "--log-dir", str(tmp_path)], {"HCCL_CONNECT_TIMEOUT": "1200"})
    assert result.returncode == 0, result.stderr
    assert "HCCL_CONNECT_TIMEOUT" not in worker_envs(result.stdout)[0]  # inherited as set, not overridden
    assert "HCCL_IF_IP" not in worker_envs(result.stdout)[0]  # one server: nothing to choose


# ---- item 5: stale Ascend variables ----------------------------------------------------------------------

def test_stale_rank_id_does_not_override_torchrun():
    world = discover_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "TORCHELASTIC_RUN_ID": "x",
                            "RANK_ID": "0", "RANK_SIZE": "8"})
    assert (world.rank, world.launcher) == (3, "torchrun")
    world = discover_world({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "RANK_ID": "0", "RANK_SIZE": "8"})
    assert (world.rank, world.size, world.launcher) == (2, 4, "mpi")
    assert discover_world({"RANK_ID": "1", "RANK_SIZE": "2"}).launcher == "ascend-script"  # a per-device loop


# ---- item 6: what HCCL refuses or accepts ------------------------------------------------------------------

def test_checker_agrees_with_hccl(tmp_path):
    with pytest.raises(UserError, match="duplicate server_id 10.0.0.1"):
        load_rank_table(write(tmp_path, v1([("10.0.0.1", [(0, "192.168.0.1")]), ("10.0.0.1", [(1, "192.168.0.2")])])))
    with pytest.raises(UserError, match="duplicate device_ip 192.168.0.1"):
        load_rank_table(write(tmp_path, v1([("10.0.0.1", [(0, "192.168.0.1")]), ("10.0.0.2", [(0, "192.168.0.1")])])))
    single = load_rank_table(write(tmp_path, v1([("10.0.0.1", [(0, ""), (1, "")])])))  # no device_ip, no server_count
    assert single.rank_size == 2
    doc = v1([("10.0.0.1", [(0, "192.168.0.1")])])
    doc["version"] = "1.2"
    with pytest.raises(UserError, match="version 1.2 .* not supported"):
        load_rank_table(write(tmp_path, doc))


# ---- item 8: Kubernetes tables that are not complete yet -----------------------------------------------------

def test_wait_for_a_table_that_completes_later(tmp_path):
    from edsr_dist.parallel.rank_table import wait_for_rank_table

    doc = v1([("10.0.0.1", [(0, "192.168.0.1")])])
    path = write(tmp_path, {"status": "initializing"})

    def complete():
        time.sleep(0.5)
        write(tmp_path, doc)

    threading.Thread(target=complete).start()
    assert wait_for_rank_table(str(path), timeout_s=10, poll_s=0.1).rank_size == 1


def test_a_table_that_stays_initializing_is_one_line(tmp_path):
    path = write(tmp_path, {"status": "initializing"})
    result = launch_dry_run(["--rank-table", str(path), "--wait-table", "0.3"])
    assert result.returncode == 2
    assert "was still not 'completed' after --wait-table 0.3 s" in result.stderr
    assert "Traceback" not in result.stderr


# ---- real tables from public repositories (tests/data/rank_tables/SOURCES.md) ------------------------------

REAL = REPO / "tests" / "data" / "rank_tables"
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


def test_written_v1_copy_has_hccls_ranks_and_is_a_regular_file(tmp_path):
    from edsr_dist.launcher.workers import write_v1

    table = load_rank_table(REAL / "group_cloud_2instance_16p_bert.json")
    target = tmp_path / "rank_table_v1.json"
    write_v1(table, str(target))
    assert target.is_file() and not target.is_symlink()
    again = load_rank_table(target)
    assert again.format == "1.0"
    assert [(s.server_id, [(d.device_id, d.rank_id) for d in s.devices]) for s in again.servers] == \
        [(s.server_id, [(d.device_id, d.rank_id) for d in s.devices]) for s in table.servers]


# ---- item 7: torch_npu's watchdog must outlast HCCL_EXEC_TIMEOUT ------------------------------------------

def test_watchdog_timeout_stays_above_hccl_exec_timeout():
    from edsr_dist.parallel.ascend_env import watchdog_timeout

    assert watchdog_timeout(1800, {}) == (2436, watchdog_timeout(1800, {})[1])  # HCCL's default exec timeout 1836
    assert "not above HCCL_EXEC_TIMEOUT 1836" in watchdog_timeout(1800, {})[1]
    assert watchdog_timeout(3600, {"HCCL_EXEC_TIMEOUT": "3600"})[0] == 4200
    assert watchdog_timeout(4200, {"HCCL_EXEC_TIMEOUT": "3600"}) == (4200, "")
    assert watchdog_timeout(60, {"HCCL_EXEC_TIMEOUT": "0"}) == (60, "")


# ---- item 10: installs never pull a torch-npu that mismatches the installed torch ---------------------------

def test_no_extra_pulls_an_unpinned_torch_npu():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    npu = [r for r in requirements if r.replace("_", "-").lower().startswith("torch-npu")]
    # torch-npu pins torch==<its version> (its setup.py): only an exact pair would be safe, and that is the user's.
    assert npu == [], f"torch-npu in the package requirements: {npu}"
