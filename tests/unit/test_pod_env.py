"""A Kubernetes pod's operator variables as `edsr-dist launch` reads them (launcher/pod_env.py): each operator's
environment, as its source writes it (docs/KUBERNETES.md), gives the job's pods, this pod's index and the workers
per pod; a contradictory one is a one-line error before anything starts."""

from __future__ import annotations

import argparse

import pytest

from edsr_dist.errors import UserError
from edsr_dist.launcher.command import _parser
from edsr_dist.launcher.plan import build_plan
from edsr_dist.launcher.pod_env import ASCEND, PET, VOLCANO, read_pod_env, workers_per_pod

VOLCANO_POD = {"MASTER_ADDR": "edsr-master-0.edsr", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}
# training-operator >= 1.7 with nprocPerNode "8": WORLD_SIZE = pods x 8, RANK = PET_NODE_RANK = pod index.
PYTORCHJOB_POD = {"MASTER_ADDR": "edsr-master-0", "PET_MASTER_ADDR": "edsr-master-0", "MASTER_PORT": "23456",
                  "PET_MASTER_PORT": "23456", "WORLD_SIZE": "16", "RANK": "1", "PET_NODE_RANK": "1",
                  "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"}
TRAINJOB_POD = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
                "PET_MASTER_ADDR": "edsr-node-0-0.edsr", "PET_MASTER_PORT": "29500"}
ASCENDJOB_POD = {"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "LOCAL_RANK": "0,1,2,3,4,5,6,7", "RANK": "1",
                 "MASTER_ADDR": "10.96.0.10", "MASTER_PORT": "2222", "ASCEND_VISIBLE_DEVICES": "8,9,10,11,12,13,14,15"}


@pytest.mark.parametrize("env, operator, per_pod, port", [
    (VOLCANO_POD, VOLCANO, None, 23456),
    (PYTORCHJOB_POD, PET, 8, 23456),
    (TRAINJOB_POD, PET, 8, 29500),
    (ASCENDJOB_POD, ASCEND, 8, 2222),
])
def test_each_operator_gives_pods_index_and_count(env, operator, per_pod, port):
    job = read_pod_env(env)
    assert (job.operator, job.pods, job.pod_index, job.per_pod, job.master_port) == (operator, 2, 1, per_pod, port)
    assert job.master_addr == env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR"))


def test_ascendjob_keeps_the_pods_chips():
    assert read_pod_env(ASCENDJOB_POD).cards == tuple(range(8, 16))


def test_no_operator_variables_is_a_job_of_this_machine():
    assert read_pod_env({"MASTER_PORT": "29500", "PATH": "/bin"}) is None
    # A launcher's own worker (EDSR_DIST_LAUNCHER=1) carries RANK/WORLD_SIZE of the job, not of a pod.
    assert read_pod_env({**VOLCANO_POD, "EDSR_DIST_LAUNCHER": "1"}) is None


def test_pytorchjob_without_nproc_counts_the_pods_devices():
    env = dict(PYTORCHJOB_POD, WORLD_SIZE="2")
    del env["PET_NPROC_PER_NODE"]
    assert read_pod_env(env).per_pod is None


@pytest.mark.parametrize("env, says", [
    (dict(VOLCANO_POD, RANK="2"), "RANK=2 is not below the job's 2 pod(s)"),
    ({k: v for k, v in VOLCANO_POD.items() if k != "WORLD_SIZE"}, "RANK is set but WORLD_SIZE is not"),
    (dict(VOLCANO_POD, LOCAL_RANK="1"), "LOCAL_RANK='1' is one worker's variable"),
    ({k: v for k, v in VOLCANO_POD.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
    (dict(VOLCANO_POD, WORLD_SIZE="two"), "WORLD_SIZE='two' is not a whole number"),
    (dict(ASCENDJOB_POD, WORLD_SIZE="12"), "LOCAL_WORLD_SIZE=8 does not divide WORLD_SIZE=12"),
    (dict(ASCENDJOB_POD, RANK="2"), "RANK=2 is not below the job's 2 pod(s)"),
    (dict(ASCENDJOB_POD, LOCAL_RANK="3"), "LOCAL_RANK='3' with LOCAL_WORLD_SIZE=8"),
    (dict(ASCENDJOB_POD, LOCAL_WORLD_SIZE="0"), "LOCAL_WORLD_SIZE=0"),
    (dict(ASCENDJOB_POD, ASCEND_VISIBLE_DEVICES="0,1"), "lists 2 chip(s) but LOCAL_WORLD_SIZE=8"),
    (dict(PYTORCHJOB_POD, WORLD_SIZE="2"), "WORLD_SIZE=2 but PET_NNODES=2 x PET_NPROC_PER_NODE=8 = 16"),
    (dict(PYTORCHJOB_POD, RANK="0"), "RANK=0 but PET_NODE_RANK=1"),
    (dict(TRAINJOB_POD, PET_NNODES="1:4"), "is an elastic range"),
    (dict(TRAINJOB_POD, PET_NODE_RANK="2"), "PET_NODE_RANK=2 is not below the job's 2 pod(s)"),
    (dict(TRAINJOB_POD, PET_NPROC_PER_NODE="many"), "PET_NPROC_PER_NODE='many' is neither a number"),
])
def test_contradictory_pod_is_one_line(env, says):
    with pytest.raises(UserError) as err:
        read_pod_env(env)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_workers_per_pod_order():
    ascend = read_pod_env(ASCENDJOB_POD)
    assert workers_per_pod(ascend, None, {}, "auto") == (8, "LOCAL_WORLD_SIZE")
    assert workers_per_pod(ascend, 8, {}, "auto") == (8, "LOCAL_WORLD_SIZE")
    with pytest.raises(UserError, match="--nproc 4 but LOCAL_WORLD_SIZE=8"):
        workers_per_pod(ascend, 4, {}, "auto")
    volcano = read_pod_env(VOLCANO_POD)
    assert workers_per_pod(volcano, 3, {}, "auto") == (3, "--nproc")
    # No count from the operator: the pod's devices (here NPUs the device plugin gave it), one on a CPU pod.
    assert workers_per_pod(volcano, None, {"ASCEND_VISIBLE_DEVICES": "4,5,6"}, "auto") == (3, "ASCEND_VISIBLE_DEVICES")
    assert workers_per_pod(volcano, None, {"ASCEND_VISIBLE_DEVICES": "4,5,6"}, "cpu")[0] == 1


def plan_in(monkeypatch, env: dict, launch: list[str], train: list[str] | None = None):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK_TABLE_FILE", "MASTER_ADDR",
                 "MASTER_PORT", "EDSR_DIST_LAUNCHER", *TRAINJOB_POD, "ASCEND_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args: argparse.Namespace = _parser().parse_args(launch)
    return build_plan(args, train or ["--preset", "sample", "--out", "runs/k8s"])


def test_plan_numbers_ranks_by_pod(monkeypatch):
    plan = plan_in(monkeypatch, TRAINJOB_POD, [])
    assert [w.rank for w in plan.workers] == list(range(8, 16)) and plan.world_size == 16
    assert (plan.master_addr, plan.master_port, plan.servers, plan.server_index) == ("edsr-node-0-0.edsr", 29500, 2, 1)
    assert {w.env["WORLD_SIZE"] for w in plan.workers} == {"16"} and plan.workers[0].env["LOCAL_RANK"] == "0"
    assert "pod 1 of 2" in plan.summary and "ranks 8-15 of 16" in plan.summary
    # The first pod's launcher is the one that claims the run folder (rank 0 is its first worker).
    assert plan_in(monkeypatch, dict(TRAINJOB_POD, PET_NODE_RANK="0"), []).workers[0].rank == 0


def test_plan_refuses_restarts_across_pods(monkeypatch):
    with pytest.raises(UserError, match="--max-restarts 1 in pod 1 of a 2-pod"):
        plan_in(monkeypatch, ASCENDJOB_POD, ["--max-restarts", "1"])
    # One pod: the launcher holds every worker of the job, so its own restarts stay.
    single = dict(ASCENDJOB_POD, WORLD_SIZE="8", RANK="0")
    assert plan_in(monkeypatch, single, ["--max-restarts", "1"]).world_size == 8


def test_plan_without_pod_variables_is_unchanged(monkeypatch):
    plan = plan_in(monkeypatch, {}, ["--nproc", "2"])
    assert plan.master_addr == "127.0.0.1" and plan.world_size == 2 and plan.pod is None and plan.servers == 1
