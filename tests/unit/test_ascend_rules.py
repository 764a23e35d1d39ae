"""Rank tables read as HCCL and torch_npu read them: group_list order, what HCCL refuses, tables that complete
later, the version 1.0 copy for workers, stale Ascend variables, the watchdog timeout. (The launcher's environment
from a table, in real `launch --dry-run` processes, is in tests/e2e/test_ascend_tables.py.)"""

import threading
import time

import pytest
from helpers import REAL_RANK_TABLES, REPO, cloud_table, v1_with_ips, write_table

from edsr_dist.errors import UserError
from edsr_dist.parallel.rank_table import load_rank_table
from edsr_dist.parallel.world import discover_world

# ---- item 3: HCCL's order for group_list tables ------------------------------------------------------------

def test_group_list_ranks_follow_server_id_string_order_then_device_id(tmp_path):
    # Hosts .9 and .10: string order puts .10 first (std::map in HCCL); devices listed 5,6,7,0 sort to 0,5,6,7.
    table = load_rank_table(write_table(tmp_path, cloud_table([("job-0", "10.0.0.9", [5, 6, 7, 0]),
                                                         ("job-1", "10.0.0.10", [0, 1])])))
    order = [(s.server_id, d.device_id, d.rank_id) for s in table.servers for d in s.devices]
    assert order == [("10.0.0.10", 0, 0), ("10.0.0.10", 1, 1), ("10.0.0.9", 0, 2), ("10.0.0.9", 5, 3),
                     ("10.0.0.9", 6, 4), ("10.0.0.9", 7, 5)]


def test_group_list_pod_name_without_number_and_lab_mode_are_accepted(tmp_path):
    table = load_rank_table(write_table(tmp_path, cloud_table([("tacotron2", "10.0.0.1", list(range(8)))])))
    assert table.rank_size == 8
    lab = {"status": "completed", "deploy_mode": "lab", "group_count": "1", "group_list": [
        {"group_name": "hccl_world_group", "device_num": "2", "server_num": "1", "instance_count": "2",
         "instance_list": [{"rank_id": "1", "server_id": "10.0.0.1", "devices": [{"device_id": "0", "device_ip": "192.168.0.1"}]},
                           {"rank_id": "0", "server_id": "10.0.0.1", "devices": [{"device_id": "1", "device_ip": "192.168.1.1"}]}]}]}
    table = load_rank_table(write_table(tmp_path, lab, "lab.json"))
    assert [(d.device_id, d.rank_id) for d in table.servers[0].devices] == [(1, 0), (0, 1)]


def test_group_list_cloud_mode_refuses_device_ids_above_7(tmp_path):
    with pytest.raises(UserError, match="device_id 8 is out of range 0-7"):
        load_rank_table(write_table(tmp_path, cloud_table([("job-0", "10.0.0.1", [8])])))


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
        load_rank_table(write_table(tmp_path, v1_with_ips([("10.0.0.1", [(0, "192.168.0.1")]),
                                                           ("10.0.0.1", [(1, "192.168.0.2")])])))
    with pytest.raises(UserError, match="duplicate device_ip 192.168.0.1"):
        load_rank_table(write_table(tmp_path, v1_with_ips([("10.0.0.1", [(0, "192.168.0.1")]),
                                                           ("10.0.0.2", [(0, "192.168.0.1")])])))
    # No device_ip, no server_count:
    single = load_rank_table(write_table(tmp_path, v1_with_ips([("10.0.0.1", [(0, ""), (1, "")])])))
    assert single.rank_size == 2
    doc = v1_with_ips([("10.0.0.1", [(0, "192.168.0.1")])])
    doc["version"] = "1.2"
    with pytest.raises(UserError, match="version 1.2 .* not supported"):
        load_rank_table(write_table(tmp_path, doc))


# ---- item 8: Kubernetes tables that are not complete yet -----------------------------------------------------

def test_wait_for_a_table_that_completes_later(tmp_path):
    from edsr_dist.parallel.rank_table import wait_for_rank_table

    doc = v1_with_ips([("10.0.0.1", [(0, "192.168.0.1")])])
    path = write_table(tmp_path, {"status": "initializing"})

    def complete():
        time.sleep(0.5)
        write_table(tmp_path, doc)

    threading.Thread(target=complete).start()
    assert wait_for_rank_table(str(path), timeout_s=10, poll_s=0.1).rank_size == 1


# ---- real tables from public repositories (tests/data/rank_tables/SOURCES.md) ------------------------------

def test_written_v1_copy_has_hccls_ranks_and_is_a_regular_file(tmp_path):
    from edsr_dist.launcher.workers import write_v1

    table = load_rank_table(REAL_RANK_TABLES / "group_cloud_2instance_16p_bert.json")
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
