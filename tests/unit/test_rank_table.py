"""Rank tables: both formats, every rejected shape, and the `rank-table check|make` commands."""

from __future__ import annotations

import pytest
from helpers import REPO, v1, write_table

from edsr_dist.errors import UserError
from edsr_dist.launcher.table_command import parse_device_list
from edsr_dist.parallel.rank_table import Device, load_rank_table


@pytest.mark.parametrize("numbers_as", [str, int])
def test_v1_two_servers(tmp_path, numbers_as):
    table = load_rank_table(write_table(tmp_path, v1([("10.0.0.1", [0, 1]), ("10.0.0.2", [0, 1])], numbers_as)))
    assert table.format == "1.0"
    assert [s.server_id for s in table.servers] == ["10.0.0.1", "10.0.0.2"]
    assert table.servers[1].devices[0] == Device(device_id=0, device_ip="192.168.100.102", rank_id=2)
    assert table.rank_size == 4


def test_shipped_examples_are_valid():
    sizes = {"hccl_1p.json": (1, 1), "hccl_8p.json": (1, 8), "hccl_16p_2server.json": (2, 16)}
    for name, (servers, ranks) in sizes.items():
        table = load_rank_table(REPO / "rank_table" / name)
        assert (len(table.servers), table.rank_size) == (servers, ranks)


def old_format() -> dict:
    # Instances listed out of order: HCCL numbers ranks by server_id (string order), then device_id.
    return {
        "status": "completed", "group_count": "1",
        "group_list": [{
            "group_name": "edsr", "device_count": "4", "instance_count": "2",
            "instance_list": [
                {"pod_name": "edsr-job-10", "server_id": "10.0.0.2",
                 "devices": [{"device_id": "0", "device_ip": "192.168.100.102"},
                             {"device_id": "1", "device_ip": "192.168.101.102"}]},
                {"pod_name": "edsr-job-9", "server_id": "10.0.0.1",
                 "devices": [{"device_id": 0, "device_ip": "192.168.100.101"},
                             {"device_id": 1, "device_ip": "192.168.101.101"}]},
            ],
        }],
    }


def test_old_format_ranks_follow_server_then_device(tmp_path):
    table = load_rank_table(write_table(tmp_path, old_format()))
    assert table.format == "group_list"
    assert [s.server_id for s in table.servers] == ["10.0.0.1", "10.0.0.2"]  # pod 9 before pod 10 (numeric)
    assert [[d.rank_id for d in s.devices] for s in table.servers] == [[0, 1], [2, 3]]
    assert table.servers[1].devices[1].device_ip == "192.168.101.102"


def _mutate(change):
    doc = v1([("10.0.0.1", [0, 1]), ("10.0.0.2", [0, 1])])
    change(doc)
    return doc


def _set(doc, keys, value):
    target = doc
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


def _drop(doc, keys):
    target = doc
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]


def _swap_ranks(doc):
    # Ranks 0,1 on the second server and 2,3 on the first: all present, but not in server order.
    for s, base in ((0, 2), (1, 0)):
        for j, dev in enumerate(doc["server_list"][s]["device"]):
            dev["rank_id"] = str(base + j)


INVALID = [
    ("bad_json", '{"version": "1.0",\n  "status": "completed",,\n}', "invalid JSON at line 2"),
    ("not_object", "[1, 2]", "top level must be a JSON object"),
    ("neither_format", {"version": "1.0", "status": "completed"}, "neither server_list"),
    ("status", _mutate(lambda d: _set(d, ["status"], "initializing")), "status is 'initializing'"),
    ("no_status", _mutate(lambda d: _drop(d, ["status"])), "missing field 'status'"),
    ("no_version", _mutate(lambda d: _drop(d, ["version"])), "missing field 'version'"),
    ("bad_version", _mutate(lambda d: _set(d, ["version"], "2.0")), "unsupported version '2.0'"),
    ("server_count", _mutate(lambda d: _set(d, ["server_count"], "3")), "server_count is 3 but server_list has 2"),
    ("empty_servers", _mutate(lambda d: (_set(d, ["server_list"], []), _set(d, ["server_count"], "0"))),
     "server_list is empty"),
    ("empty_devices", _mutate(lambda d: _set(d, ["server_list", 1, "device"], [])),
     r"server_list\[1\] \(10.0.0.2\): device is empty"),
    ("no_server_id", _mutate(lambda d: _drop(d, ["server_list", 0, "server_id"])),
     r"server_list\[0\]: missing field 'server_id'"),
    ("no_device_ip", _mutate(lambda d: _drop(d, ["server_list", 1, "device", 0, "device_ip"])),
     r"server_list\[1\] \(10.0.0.2\) device\[0\]: missing device_ip in a multi-server table"),
    ("bad_device_ip", _mutate(lambda d: _set(d, ["server_list", 0, "device", 1, "device_ip"], "card1")),
     "device_ip 'card1' is not an IP address"),
    ("no_rank", _mutate(lambda d: _drop(d, ["server_list", 0, "device", 1, "rank_id"])),
     r"device\[1\]: missing field 'rank_id'"),
    ("no_device_id", _mutate(lambda d: _drop(d, ["server_list", 0, "device", 0, "device_id"])),
     "missing field 'device_id'"),
    ("word_number", _mutate(lambda d: _set(d, ["server_list", 0, "device", 0, "rank_id"], "zero")),
     "rank_id must be a whole number, got 'zero'"),
    ("negative", _mutate(lambda d: _set(d, ["server_list", 0, "device", 0, "device_id"], -1)),
     "device_id must be a whole number, got -1"),
    ("bool_number", _mutate(lambda d: _set(d, ["server_list", 0, "device", 0, "device_id"], True)),
     "device_id must be a whole number"),
    ("device_range", _mutate(lambda d: _set(d, ["server_list", 0, "device", 1, "device_id"], "16")),
     "device_id 16 is out of range 0-7"),
    ("duplicate_device", _mutate(lambda d: _set(d, ["server_list", 1, "device", 1, "device_id"], "0")),
     r"server_list\[1\] \(10.0.0.2\) device\[1\]: duplicate device_id 0 \(also device\[0\]\)"),
    ("duplicate_rank", _mutate(lambda d: _set(d, ["server_list", 1, "device", 1, "rank_id"], "1")),
     r"device\[1\]: duplicate rank_id 1"),
    ("missing_rank", _mutate(lambda d: _set(d, ["server_list", 1, "device", 1, "rank_id"], "7")),
     "rank_id 3 missing: 4 devices need ranks 0..3"),
    ("rank_order", _mutate(_swap_ranks), "ranks must follow server order"),
    ("old_same_pod_name", None, "duplicate pod_name"),
    ("old_device_count", None, "device_count is 5 but its instances list 4 devices"),
    ("old_not_ready", None, "not ready yet"),
]


def _old_variant(case: str) -> dict:
    doc = old_format()
    instances = doc["group_list"][0]["instance_list"]
    if case == "old_same_pod_name":
        instances[0]["pod_name"] = instances[1]["pod_name"]
    elif case == "old_device_count":
        doc["group_list"][0]["device_count"] = "5"
    elif case == "old_not_ready":
        doc["status"] = "pending"
    return doc


@pytest.mark.parametrize("case,doc,message", INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_tables(tmp_path, case, doc, message):
    path = write_table(tmp_path, _old_variant(case) if doc is None else doc)
    with pytest.raises(UserError, match=message) as info:
        load_rank_table(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text  # names the file
    assert "; " in text  # and says how to fix it


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_rank_table(tmp_path / "nope.json")
    with pytest.raises(UserError, match="is a directory"):
        load_rank_table(tmp_path)



@pytest.mark.parametrize("spec,expected", [("0-7", list(range(8))), ("0,2,4", [0, 2, 4]), ("4-5,0", [0, 4, 5])])
def test_device_list(spec, expected):
    assert parse_device_list(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "0,0", "0-16", "1-"])
def test_device_list_rejects(spec):
    with pytest.raises(UserError):
        parse_device_list(spec)


def test_multi_server_table_without_device_ip_is_valid_with_host_ip(tmp_path):
    """HCCL's GetSingleDevice (topoinfo_ranktableConcise.cc) reads device_ip only when the server's host_ip is
    invalid: a server that gives host_ip needs no device_ip."""
    doc = v1([("10.0.0.1", [0, 1]), ("10.0.0.2", [0, 1])])
    for server in doc["server_list"]:
        server["host_ip"] = server["server_id"]
        for device in server["device"]:
            del device["device_ip"]
    table = load_rank_table(write_table(tmp_path, doc))
    assert table.rank_size == 4
    del doc["server_list"][1]["host_ip"]
    with pytest.raises(UserError, match=r"server_list\[1\] \(10.0.0.2\) device\[0\]: missing device_ip"):
        load_rank_table(write_table(tmp_path, doc))
