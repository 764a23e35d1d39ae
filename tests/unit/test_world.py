import pytest

from edsr_dist.parallel.factory import resolve_engine_name
from edsr_dist.parallel.world import World, discover_world
from edsr_dist.errors import UserError


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
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "outside the world of size 2"),
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
