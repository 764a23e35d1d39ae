import json

import pytest

from edsr_dist.errors import UserError
from edsr_dist.parallel.factory import resolve_engine_name
from edsr_dist.parallel.world import World, discover_world


@pytest.mark.parametrize("env,expected", [
    ({}, World()),
    ({"EDSR_DIST_LAUNCHER": "1", "RANK_ID": "9", "RANK_SIZE": "16", "DEVICE_ID": "1", "LOCAL_RANK": "1",
      "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29688",
      # torchrun-style variables are set too by our launcher; the Ascend ones win.
      "RANK": "9", "WORLD_SIZE": "16"},
     World(9, 16, 1, 8, 1, "edsr-dist", "10.0.0.1", 29688, physical_device=1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"},
     World(3, 4, 1, 2, 1, "torchrun", "h", 1234)),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     World(1, 2, 1, 2, 1, "horovod")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1"},
     World(2, 3, 0, 1, 0, "mpi")),
])
def test_world_from_each_launcher(env, expected):
    assert discover_world(env) == expected


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 is not below WORLD_SIZE=2"),
])
def test_bad_environment_is_a_user_error(env, fragment):
    with pytest.raises(UserError, match=fragment):
        discover_world(env)


def test_engine_follows_the_launcher():
    assert resolve_engine_name("auto", World(0, 2, launcher="horovod"), {}) == "horovod"
    assert resolve_engine_name("auto", World(0, 2, launcher="mpi"), {}) == "ddp"
    assert resolve_engine_name("auto", World(0, 2, launcher="mpi"), {"HOROVOD_HOSTNAME": "a"}) == "horovod"
    assert resolve_engine_name("auto", World(0, 2, launcher="torchrun"), {}) == "ddp"
    assert resolve_engine_name("horovod", World(), {}) == "horovod"


# Before issue 20 each of these gave World(rank=0, size=1): every process trained alone, silently.
@pytest.mark.parametrize("env,expected", [
    # A ModelZoo 8p loop that also exports RANK (8 of its 58 RANK-exporting scripts do, without WORLD_SIZE).
    ({"RANK_ID": "3", "RANK_SIZE": "8", "RANK": "3"}, World(3, 8, 3, 8, 3, "ascend-script", physical_device=3)),
    # ResNet50_ID4149 test/train_full_8p.sh: ASCEND_DEVICE_ID=0 exported once, RANK_ID looped, the card on the
    # command line: each rank gets its own card (its position), not card 0.
    ({"RANK_ID": "5", "RANK_SIZE": "8", "ASCEND_DEVICE_ID": "0"}, World(5, 8, 5, 8, 5, "ascend-script",
                                                                        physical_device=5)),
    # DEVICE_ID is the card's own number and wins over a stale ASCEND_DEVICE_ID; logical = its visible position.
    ({"RANK_ID": "1", "RANK_SIZE": "4", "DEVICE_ID": "5", "ASCEND_DEVICE_ID": "0",
      "ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}, World(1, 4, 1, 4, 1, "ascend-script", physical_device=5)),
    # Arcface train_full_8p.sh: RANK and WORLD_SIZE exported with RANK_SIZE, no LOCAL_RANK.
    ({"RANK_ID": "2", "RANK_SIZE": "8", "RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "12581"}, World(2, 8, 2, 8, 2, "ascend-script", "127.0.0.1", 12581, 2)),
    # One process per pod (Volcano pytorch plugin, Kubeflow PyTorchJob): env:// reads a world of WORLD_SIZE.
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "job-master-0.job", "MASTER_PORT": "23456"},
     World(1, 2, 0, 1, 0, "env", "job-master-0.job", 23456)),
    ({"WORLD_SIZE": "1"}, World()),
    # A one-card script: DEVICE_ID alone picks the card.
    ({"DEVICE_ID": "6"}, World(0, 1, 0, 1, 6, "ascend-script", physical_device=6)),
    # mindxdl without-ranktable train_start.sh inside an AscendJob pod: a per-device loop over ASCEND_DEVICE_ID.
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0,1", "MASTER_ADDR": "svc",
      "MASTER_PORT": "2222", "ASCEND_DEVICE_ID": "1", "DEVICE_INDEX": "3", "RANK_SIZE": "2"},
     World(3, 4, 1, 2, 1, "mindxdl", "svc", 2222)),
    # torch_npu_run's workers (its agent sets TORCH_NPU_USE_PARALLEL_TCPSTORE, rendezvous.py:200).
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
      "TORCH_NPU_USE_PARALLEL_TCPSTORE": "True"}, World(1, 2, 1, 2, 1, "torch_npu_run")),
    # Leftover Ascend variables do not override torchrun or horovodrun.
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK_ID": "0", "RANK_SIZE": "8", "DEVICE_ID": "0"},
     World(1, 2, 1, 2, 1, "torchrun")),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "RANK_ID": "0", "RANK_SIZE": "8"}, World(1, 2, 0, 2, 0, "horovod")),
])
def test_partial_launcher_environments_are_read_as_their_launcher_means(env, expected):
    assert discover_world(env) == expected


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "without MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "1"}, "RANK=1 without WORLD_SIZE"),
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 without RANK"),
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 without RANK and WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"},
     "LOCAL_WORLD_SIZE=3 does not divide WORLD_SIZE=8"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
     "LOCAL_WORLD_SIZE=2 without LOCAL_RANK"),
    # AscendJob's own variables (ascend-operator env.go setPytorchEnv) reach `edsr-dist train` directly.
    ({"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0,1,2,3,4,5,6,7",
      "MASTER_ADDR": "svc", "MASTER_PORT": "2222"}, "AscendJob pod's environment.*run `edsr-dist launch`"),
    ({"RANK_SIZE": "8"}, "RANK_SIZE=8 without RANK_ID"),
    ({"RANK_ID": "3"}, "RANK_ID=3 without RANK_SIZE"),
    ({"RANK_ID": "3", "RANK_SIZE": "8", "RANK": "4"}, "RANK_ID=3 and RANK=4 disagree"),
    ({"RANK_ID": "3", "RANK_SIZE": "8", "WORLD_SIZE": "4"}, "RANK_SIZE=8 and WORLD_SIZE=4 disagree"),
    ({"RANK_ID": "8", "RANK_SIZE": "8"}, "RANK_ID=8 is not below RANK_SIZE=8"),
    # The rank's position names a card the process cannot see.
    ({"RANK_ID": "3", "RANK_SIZE": "4", "ASCEND_RT_VISIBLE_DEVICES": "4,5"}, "logical device 3 .* shows 2 card"),
    # torch_npu sees no device for a list that is not ascending (torch_npu/npu/__init__.py).
    ({"RANK_ID": "0", "RANK_SIZE": "2", "DEVICE_ID": "4", "ASCEND_RT_VISIBLE_DEVICES": "5,4"}, "not in ascending"),
    ({"RANK_ID": "0", "RANK_SIZE": "2", "DEVICE_ID": "1", "ASCEND_RT_VISIBLE_DEVICES": "4,5"},
     r"device 1 \(physical id from DEVICE_ID\) is not among ASCEND_RT_VISIBLE_DEVICES=4,5"),
])
def test_contradictory_or_partial_environment_is_one_line(env, fragment):
    with pytest.raises(UserError, match=fragment):
        discover_world(env)


def _table(tmp_path, servers):
    """servers: [(server_id, [(device_id, rank_id), ...]), ...] -> a version 1.0 table file."""
    doc = {"version": "1.0", "status": "completed", "server_count": str(len(servers)), "server_list": [
        {"server_id": sid, "device": [{"device_id": str(d), "device_ip": f"192.168.{i}.{d}", "rank_id": str(r)}
                                      for d, r in devices]} for i, (sid, devices) in enumerate(servers)]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_mindxdl_ranktable_variables_take_the_card_from_the_table(tmp_path):
    # mindxdl-deploy samples/train/basic-training/ranktable/train_start.sh L159-179: RANK = server index,
    # WORLD_SIZE = server count, RANK_ID global, RANK_SIZE per server, no DEVICE_ID or LOCAL_RANK.
    table = _table(tmp_path, [("10.0.0.1", [(0, 0), (1, 1)]), ("10.0.0.2", [(4, 2), (5, 3)])])
    env = {"RANK_TABLE_FILE": table, "RANK_ID": "3", "RANK_SIZE": "2", "RANK": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1"}
    assert discover_world(env) == World(3, 4, 1, 2, 5, "ascend-script", "10.0.0.1", 29500, 5)
    with pytest.raises(UserError, match="RANK=0 contradicts"):
        discover_world({**env, "RANK": "0"})
    with pytest.raises(UserError, match="DEVICE_ID=4 but .* gives RANK_ID=3 device 5"):
        discover_world({**env, "DEVICE_ID": "4"})
    with pytest.raises(UserError, match="RANK_ID=7 is not a rank_id"):
        discover_world({**env, "RANK_ID": "7"})


def test_torchrun_with_a_rank_table_maps_this_server_and_local_rank_to_the_entry(tmp_path):
    table = _table(tmp_path, [("10.9.0.1", [(0, 0), (1, 1)]), ("10.9.0.2", [(7, 3), (6, 2)])])
    base = {"RANK_TABLE_FILE": table, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "j",
            "GROUP_RANK": "1", "MASTER_ADDR": "10.9.0.1", "MASTER_PORT": "29500"}
    # Server 1's devices in rank order: device 6 (rank 2), device 7 (rank 3); the container sees cards 6,7.
    world = discover_world({**base, "RANK": "3", "LOCAL_RANK": "1", "ASCEND_RT_VISIBLE_DEVICES": "6,7"})
    assert (world.rank, world.local_rank, world.physical_device, world.device_index) == (3, 1, 7, 1)
    with pytest.raises(UserError, match="rank_id 2, and HCCL needs the two equal; start it with --node-rank 1"):
        discover_world({**base, "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="--nnodes 2 --nproc-per-node 2"):
        discover_world({**base, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})


KUBEFLOW_POD = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "PET_MASTER_ADDR": "job-master-0",
                "PET_MASTER_PORT": "23456", "PET_NNODES": "2", "PET_NODE_RANK": "1", "RANK": "1"}


@pytest.mark.parametrize("env, fragment", [
    # A TrainJob pod: only torchrun's PET_* flags (kubeflow/trainer torch.go).
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0",
      "PET_MASTER_PORT": "29500"}, "Kubeflow sets these for torchrun.*edsr-dist launch"),
    # A PyTorchJob pod with nprocPerNode 8: WORLD_SIZE = 2 x 8, RANK = the pod's index (training-operator envvar.go).
    (dict(KUBEFLOW_POD, WORLD_SIZE="16", PET_NPROC_PER_NODE="8"), "meant to run 8 workers.*RANK=1 of WORLD_SIZE=16"),
])
def test_a_kubeflow_pod_meant_for_torchrun_is_one_line_not_a_solo_or_hung_worker(env, fragment):
    with pytest.raises(UserError, match=fragment):
        discover_world(env)


def test_a_kubeflow_pod_of_one_process_is_one_rank_of_the_pods():
    world = discover_world(dict(KUBEFLOW_POD, WORLD_SIZE="2", PET_NPROC_PER_NODE="auto"))
    assert (world.rank, world.size, world.local_rank, world.launcher) == (1, 2, 0, "env")
