"""The manifests of examples/kubernetes/ as their operators would run them: each pod's environment is derived from
the manifest by that operator's rule (OPERATORS below, one function per operator citing its source), the pods
start as local processes on Gloo, and the job trains the sample to one `Result:` line, one job of the right size,
one run in the output folder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY, clean_env, free_port

MANIFESTS = REPO / "examples" / "kubernetes"
DEVICES_IN_TEST = 2  # the manifests ask for 8 devices per pod; the test gives each pod 2 workers
TRAIN_ARGS = [*TINY, "--steps-per-epoch", "10"]
# Everything an operator or a launcher may have left in the test's own environment.
POD_VARS = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT",
            "LOCAL_WORLD_SIZE", "ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "TORCHELASTIC_RUN_ID")


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


# ---- what each operator writes into a pod (pods in the order of their RANK / node rank)

def volcano_pods(job: dict) -> list[tuple[dict, dict]]:
    """volcano-sh/volcano pkg/controllers/job/plugins/distributed-framework/pytorch/pytorch.go: OnPodCreate
    (L91-146): MASTER_ADDR = <master task pod 0>.<job> (generateMasterAddr L159-171), MASTER_PORT = --port
    (L101-107), WORLD_SIZE = master + worker replicas (L122-130, getTotalReplicas L148-157), RANK = 0 for the master,
    index + 1 for workers (L109-117, L132-142)."""
    flags = dict(arg.lstrip("-").split("=", 1) for arg in job["spec"]["plugins"]["pytorch"])
    tasks = {t["name"]: t for t in job["spec"]["tasks"]}
    master, worker = tasks[flags.get("master", "master")], tasks[flags.get("worker", "worker")]
    pods = [(master, i) for i in range(master["replicas"])] + [(worker, i) for i in range(worker["replicas"])]
    name = job["metadata"]["name"]
    env = {"MASTER_ADDR": f"{name}-{master['name']}-0.{name}", "MASTER_PORT": flags.get("port", "23456"),
           "WORLD_SIZE": str(len(pods))}
    return [(dict(env, RANK=str(rank)), task["template"]["spec"]["containers"][0])
            for rank, (task, _) in enumerate(pods)]


def pytorchjob_pods(job: dict) -> list[tuple[dict, dict]]:
    """kubeflow/training-operator v1.9.0 pkg/controller.v1/pytorch/envvar.go setPodEnv (L43-127): PYTHONUNBUFFERED
    (L56-60); WORLD_SIZE = replicas x nprocPerNode when it is a number, else x 1 (L62-64, L132-140); MASTER_ADDR,
    PET_MASTER_ADDR = <job>-master-0 and MASTER_PORT, PET_MASTER_PORT = the port named pytorchjob-port (master.go
    L37-58); RANK = PET_NODE_RANK = index, workers + 1 (L77-96); PET_NPROC_PER_NODE = nprocPerNode when set
    (L99-104); PET_NNODES = replicas without elasticPolicy (L117-123). Only the container named pytorch."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    pods = [("Master", i) for i in range(specs["Master"]["replicas"])]
    pods += [("Worker", i) for i in range(specs.get("Worker", {}).get("replicas", 0))]
    nproc = job["spec"].get("nprocPerNode")
    per_pod = int(nproc) if nproc is not None and str(nproc).isdigit() else 1
    container = next(c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch")
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    master = f"{job['metadata']['name']}-master-0"
    out = []
    for rank in range(len(pods)):
        env = {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "MASTER_PORT": str(port),
               "PET_MASTER_PORT": str(port), "WORLD_SIZE": str(len(pods) * per_pod), "RANK": str(rank),
               "PET_NODE_RANK": str(rank), "PET_NNODES": str(len(pods))}
        if nproc is not None:
            env["PET_NPROC_PER_NODE"] = str(nproc)
        out.append((env, container))
    return out


def trainjob_pods(job: dict) -> list[tuple[dict, dict]]:
    """kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy (@8c0f505, L110-166):
    PET_NNODES = numNodes, PET_NPROC_PER_NODE = numProcPerNode (default auto), PET_NODE_RANK = the pod's job
    completion index, PET_MASTER_ADDR = <job>-node-0-0.<job>, PET_MASTER_PORT = 29500
    (pkg/constants/constants.go L72, L190-203)."""
    trainer = job["spec"]["trainer"]
    name = job["metadata"]["name"]
    nodes = trainer.get("numNodes", 1)
    env = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
           "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}
    container = {"command": trainer["command"], "resources": trainer.get("resourcesPerNode", {})}
    return [(dict(env, PET_NODE_RANK=str(index)), container) for index in range(nodes)]


def ascendjob_pods(job: dict) -> list[tuple[dict, dict]]:
    """Ascend/mind-cluster component/ascend-operator/pkg/controllers/v1 (@22bb3d9): env.go setPytorchEnv
    (L248-272): LOCAL_WORLD_SIZE = the NPUs of the container named ascend, WORLD_SIZE = that x the pods that mount
    NPUs, LOCAL_RANK = localRankStr (utils.go L133-143: "0,1,..."), MASTER_ADDR = the job's Service (service.go
    L139-153), MASTER_PORT = its port named ascendjob-port, RANK = the pod index, workers + 1 when the Master
    mounts NPUs (pod.go); ASCEND_VISIBLE_DEVICES from the device plugin's annotation (env.go setCommonEnv)."""
    specs = job["spec"]["replicaSpecs"]
    container = next(c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == "ascend")
    npus = int(container["resources"]["requests"]["huawei.com/Ascend910"])
    pods = specs["Master"]["replicas"] + specs.get("Worker", {}).get("replicas", 0)
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "ascendjob-port")
    env = {"LOCAL_WORLD_SIZE": str(npus), "WORLD_SIZE": str(npus * pods),
           "LOCAL_RANK": ",".join(str(i) for i in range(npus)), "MASTER_ADDR": "10.96.0.10",
           "MASTER_PORT": str(port), "ASCEND_VISIBLE_DEVICES": ",".join(str(i) for i in range(npus))}
    return [(dict(env, RANK=str(rank)), container) for rank in range(pods)]


OPERATORS = {"Job": volcano_pods, "PyTorchJob": pytorchjob_pods, "TrainJob": trainjob_pods,
             "AscendJob": ascendjob_pods}


def with_devices(job: dict, devices: int) -> dict:
    """The manifest with `devices` instead of its 8 per pod (resources and the operator's count)."""
    text = json.dumps(job)
    for key in ("nvidia.com/gpu", "huawei.com/Ascend910"):
        text = re.sub(rf'"{re.escape(key)}": 8\b', f'"{key}": {devices}', text)
    text = text.replace('"nprocPerNode": "8"', f'"nprocPerNode": "{devices}"')
    text = text.replace('"numProcPerNode": 8', f'"numProcPerNode": {devices}')
    return json.loads(text)


def pod_command(container: dict, pod_env: dict, store: Path, out: Path) -> list[str]:
    """The container's command with the test's train arguments (the sample, tiny) after its own `edsr-dist
    train` or `edsr-dist launch [options] --`; a GPU pod's launcher would count its GPUs, which this machine lacks,
    so the test says how many the pod has (--nproc) where the operator does not."""
    command = container["command"]
    assert command[0] == "edsr-dist", command
    train = [*TRAIN_ARGS, "--data", str(store), "--out", str(out), "--resume", "auto"]
    if command[1] == "train":
        return [sys.executable, "-m", "edsr_dist", "train", *train]
    assert command[1] == "launch", command
    options = command[2:command.index("--")]
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    operator_count = "PET_NPROC_PER_NODE" in pod_env or "LOCAL_WORLD_SIZE" in pod_env
    if gpus and not operator_count:
        options += ["--nproc", str(gpus)]
    return [sys.executable, "-m", "edsr_dist", "launch", *options, "--", *train]


def run_pods(pods: list[tuple[dict, dict]], store: Path, tmp_path: Path, timeout: float = 240):
    port = str(free_port())
    procs = []
    for index, (pod_env, container) in enumerate(pods):
        env = {k: v for k, v in clean_env().items() if k not in POD_VARS}
        # Every pod is on this machine: the operator's master address and port become 127.0.0.1 and a free port.
        local = {k: ("127.0.0.1" if k.endswith("MASTER_ADDR") else port if k.endswith("MASTER_PORT") else v)
                 for k, v in pod_env.items()}
        env.update(local, OMP_NUM_THREADS="1")
        console = open(tmp_path / f"pod_{index}.txt", "w")
        procs.append((subprocess.Popen(pod_command(container, pod_env, store, tmp_path / "run"), cwd=tmp_path,
                                       env=env, stdout=console, stderr=subprocess.STDOUT), console))
    try:
        codes = [proc.wait(timeout=timeout) for proc, _ in procs]
    finally:
        for proc, console in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            console.close()
    return codes, [(tmp_path / f"pod_{i}.txt").read_text() for i in range(len(procs))]


def assert_one_job(tmp_path: Path, codes: list[int], consoles: list[str], world: int) -> None:
    assert codes == [0] * len(codes), "\n".join(consoles)
    everything = "".join(consoles)
    assert everything.count("Result: EDSR") == 1, everything  # rank 0 of one job reports
    assert f"{world} worker(s) via " in consoles[0], consoles[0]  # the start line: the job's size
    out = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert steps and steps == sorted(set(steps)), steps  # one run's steps, each once
    assert not list(tmp_path.glob("run.old-*"))  # nobody moved another run aside


# ---- 2 pods x 1 process: `edsr-dist train` is the container's command

@pytest.mark.parametrize("manifest", ["volcano-job.yaml", "pytorchjob.yaml"])
def test_one_process_per_pod(manifest, sample_store, tmp_path):
    job = load(manifest)
    pods = OPERATORS[job["kind"]](job)
    assert len(pods) == 2
    codes, consoles = run_pods(pods, sample_store, tmp_path)
    assert_one_job(tmp_path, codes, consoles, world=2)
    assert "worker(s) via single" not in "".join(consoles)


# ---- 2 pods x 2 workers: `edsr-dist launch` is the container's command

@pytest.mark.parametrize("manifest", ["volcano-job-8gpu.yaml", "pytorchjob-8gpu.yaml", "trainjob.yaml",
                                      "ascendjob.yaml"])
def test_launch_fills_each_pod(manifest, sample_store, tmp_path):
    job = with_devices(load(manifest), DEVICES_IN_TEST)
    pods = OPERATORS[job["kind"]](job)
    assert len(pods) == 2
    codes, consoles = run_pods(pods, sample_store, tmp_path)
    world = len(pods) * DEVICES_IN_TEST
    assert_one_job(tmp_path, codes, consoles, world)
    for index, console in enumerate(consoles):
        first, last = index * DEVICES_IN_TEST, (index + 1) * DEVICES_IN_TEST - 1
        assert f"on pod {index} of 2" in console and f"ranks {first}-{last} of {world}" in console, console
    logs = tmp_path / "run" / "logs"
    assert sorted(p.name for p in logs.glob("rank_*.log")) == [f"rank_{r}.log" for r in range(world)]
    assert f"{world} worker(s) via edsr-dist" in (logs / "rank_0.log").read_text()


# ---- `edsr-dist world --json` under each pod (or each worker the pod's launcher would start) says what the job uses

HAS_WORLD_COMMAND = (REPO / "edsr_dist" / "launcher" / "world_command.py").exists()


def world_json(env: dict, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "world", "--json"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pod_base_env(pod_env: dict) -> dict:
    env = {k: v for k, v in clean_env().items() if k not in POD_VARS}
    env.update(pod_env)
    return env


@pytest.mark.skipif(not HAS_WORLD_COMMAND, reason="`edsr-dist world` comes with issue 20's parallel/world.py")
@pytest.mark.parametrize("manifest", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_world_json_under_each_pod(manifest, sample_store, tmp_path):
    job = with_devices(load(manifest), DEVICES_IN_TEST)
    pods = OPERATORS[job["kind"]](job)
    seen = []
    for pod_env, container in pods:
        command = pod_command(container, pod_env, sample_store, tmp_path / "run")
        if command[3] == "train":
            seen.append(world_json(pod_base_env(pod_env), tmp_path))
            continue
        dry = subprocess.run([*command[:4], "--dry-run", *command[4:]], cwd=tmp_path, env=pod_base_env(pod_env),
                             capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        for line in dry.stdout.splitlines():
            if line.startswith("#"):
                continue
            tokens = shlex.split(line)
            worker_env = dict(t.split("=", 1) for t in tokens[:next(i for i, t in enumerate(tokens) if "=" not in t)])
            seen.append(world_json(pod_base_env(pod_env) | worker_env, tmp_path))
    size = len(seen)
    assert size == len(pods) * (1 if pods[0][1]["command"][1] == "train" else DEVICES_IN_TEST)
    assert sorted(w["rank"] for w in seen) == list(range(size)) and {w["size"] for w in seen} == {size}
    assert {(w["master_addr"], w["master_port"]) for w in seen} == {(seen[0]["master_addr"], seen[0]["master_port"])}


# ---- the manifests themselves

REQUIRED = {  # what each kind needs before its operator accepts it (the API types named in docs/KUBERNETES.md)
    "Job": ("batch.volcano.sh/v1alpha1", lambda s: [t["template"]["spec"]["containers"] for t in s["tasks"]]),
    "PyTorchJob": ("kubeflow.org/v1", lambda s: [r["template"]["spec"]["containers"]
                                                 for r in s["pytorchReplicaSpecs"].values()]),
    "TrainJob": ("trainer.kubeflow.org/v1alpha1", lambda s: [[s["trainer"]]]),
    "AscendJob": ("mindxdl.gitee.com/v1", lambda s: [r["template"]["spec"]["containers"]
                                                     for r in s["replicaSpecs"].values()]),
}


@pytest.mark.parametrize("manifest", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifest_has_what_its_kind_requires(manifest):
    job = load(manifest)
    api, containers_of = REQUIRED[job["kind"]]
    assert job["apiVersion"] == api and job["metadata"]["name"]
    groups = containers_of(job["spec"])
    assert groups and all(groups)
    for containers in groups:
        for container in containers:
            command = container["command"]
            assert command[:2] in (["edsr-dist", "train"], ["edsr-dist", "launch"]), command
            train = command[2:] if command[1] == "train" else command[command.index("--") + 1:]
            assert train[train.index("--resume") + 1] == "auto"  # a restarted pod continues the run
            resources = container.get("resources") or job["spec"]["trainer"]["resourcesPerNode"]
            assert set(resources["limits"]) & {"nvidia.com/gpu", "huawei.com/Ascend910"}
    text = (MANIFESTS / manifest).read_text()
    for volume in ("/dev/shm", "/store", "/runs"):
        assert f"mountPath: {volume}" in text


# ---- a contradictory pod stops in one line before anything starts

@pytest.mark.parametrize("pod_env, says", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}, "RANK=2 is not below"),
    ({"RANK": "0", "WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0,1,2,3,4,5,6,7",
      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}, "LOCAL_WORLD_SIZE=8 does not divide WORLD_SIZE=12"),
])
def test_contradictory_pod_stops_before_any_worker(pod_env, says, tmp_path):
    env = {k: v for k, v in clean_env().items() if k not in POD_VARS}
    env.update(pod_env)
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--", *TRAIN_ARGS, "--out",
                             str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # no log folder, no worker


def test_max_restarts_across_pods_is_refused(tmp_path):
    env = {k: v for k, v in clean_env().items() if k not in POD_VARS}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--max-restarts", "2", "--nproc", "2",
                             "--", *TRAIN_ARGS, "--out", str(tmp_path / "run")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--max-restarts 2 in pod 0 of a 2-pod" in result.stderr and "restart policy" in result.stderr
    assert not (tmp_path / "run").exists()
