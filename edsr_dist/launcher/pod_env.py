"""The pod of a Kubernetes job: what the operator that created it wrote into its environment, read by
`edsr-dist launch` when it is the container's command (one launcher per pod, one worker per device of the pod).

Each operator describes the pod, not a worker (docs/KUBERNETES.md cites the source behind every rule):
  Volcano's pytorch plugin, Kubeflow PyTorchJob   RANK = pod index, WORLD_SIZE = pods (PyTorchJob: pods x
                                                  nprocPerNode), MASTER_ADDR, MASTER_PORT
  Kubeflow TrainJob (and PyTorchJob since 1.7)    PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_*
  ascend-operator AscendJob (PyTorch)             RANK = pod index, WORLD_SIZE = NPUs of the job, LOCAL_WORLD_SIZE
                                                  = NPUs of the pod, LOCAL_RANK = "0,1,..", MASTER_*,
                                                  ASCEND_VISIBLE_DEVICES
Nothing here starts a process: a contradictory environment is a one-line error before any worker exists.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass

from edsr_dist.errors import UserError
from edsr_dist.parallel import ascend_env

VOLCANO = "Volcano/PyTorchJob"
PET = "Kubeflow TrainJob/PyTorchJob"
ASCEND = "AscendJob"
# PET_NPROC_PER_NODE values that leave the count to the pod (torchrun reads them the same way).
COUNT_FROM_POD = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class PodJob:
    operator: str  # VOLCANO | PET | ASCEND
    pods: int
    pod_index: int
    per_pod: int | None  # the operator's number of workers per pod; None: count the pod's devices
    master_addr: str
    master_port: int | None
    variables: str  # the variables this was read from, for the plan's summary and errors
    cards: tuple[int, ...] = ()  # AscendJob: the chips the device plugin gave the pod (physical ids)

    def world(self, per_pod: int) -> int:
        return self.pods * per_pod


def _int(env: dict, name: str, fix: str) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit():
        raise UserError(f"{name}={value!r} is not a whole number; {fix}")
    return int(value)


def _port(env: dict, name: str) -> int | None:
    if not env.get(name):
        return None
    port = _int(env, name, "set it to the rendezvous port (1..65535)")
    if not 1 <= port <= 65535:
        raise UserError(f"{name}={port} is not a port number; set it to 1..65535")
    return port


def _check_index(index_name: str, index: int, pods_text: str, pods: int) -> None:
    if index >= pods:
        raise UserError(f"{index_name}={index} is not below the job's {pods} pod(s) ({pods_text}); the pod's "
                        "environment is contradictory: check the job's replica counts and the variables set by hand")


def _pet(env: dict) -> PodJob:
    """Kubeflow Trainer's torch plugin (and PyTorchJob >= 1.7, which also sets RANK and WORLD_SIZE)."""
    nnodes = env["PET_NNODES"]
    if ":" in nnodes:
        raise UserError(f"PET_NNODES={nnodes!r} is an elastic range (PyTorchJob elasticPolicy): edsr-dist launch "
                        "needs a fixed number of pods; drop elasticPolicy, or run `torchrun ... -m edsr_dist train`")
    fix = "it is set by the Kubeflow operator; do not override it in the manifest"
    pods = _int(env, "PET_NNODES", fix)
    if pods < 1:
        raise UserError(f"PET_NNODES={pods}: a job needs at least one pod")
    if "PET_NODE_RANK" not in env and "RANK" not in env:
        raise UserError("PET_NNODES is set but neither PET_NODE_RANK nor RANK says which pod this is; set "
                        "PET_NODE_RANK to the pod's index (Kubeflow does), or unset PET_NNODES")
    name = "PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK"
    index = _int(env, name, fix)
    _check_index(name, index, f"PET_NNODES={pods}", pods)
    raw = env.get("PET_NPROC_PER_NODE", "auto").strip()
    if raw.isdigit():
        per_pod = int(raw)
        if per_pod < 1:
            raise UserError("PET_NPROC_PER_NODE=0: a pod needs at least one worker; set numProcPerNode to 1 or more")
    elif raw in COUNT_FROM_POD:
        per_pod = None
    else:
        raise UserError(f"PET_NPROC_PER_NODE={raw!r} is neither a number nor one of {', '.join(COUNT_FROM_POD)}; "
                        "fix numProcPerNode (nprocPerNode) in the manifest")
    # PyTorchJob (training-operator envvar.go) also sets RANK = PET_NODE_RANK and WORLD_SIZE = pods x the numeric
    # nprocPerNode (1 when it is not a number): they must tell the same story.
    if "RANK" in env and name != "RANK" and _int(env, "RANK", fix) != index:
        raise UserError(f"RANK={env['RANK']} but PET_NODE_RANK={index}: the pod's environment is contradictory; "
                        "remove the one set by hand from the manifest")
    if "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", fix)
        if world != pods * (per_pod or 1):
            raise UserError(f"WORLD_SIZE={world} but PET_NNODES={pods} x PET_NPROC_PER_NODE={raw} = "
                            f"{pods * (per_pod or 1)}: the pod's environment is contradictory; remove the one set "
                            "by hand from the manifest")
    addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR", "")
    port = _port(env, "PET_MASTER_PORT") if env.get("PET_MASTER_PORT") else _port(env, "MASTER_PORT")
    return PodJob(PET, pods, index, per_pod, addr, port,
                  f"PET_NNODES={pods} {name}={index} PET_NPROC_PER_NODE={raw}")


def _ascend(env: dict) -> PodJob:
    """ascend-operator's setPytorchEnv: WORLD_SIZE counts NPUs, RANK counts pods."""
    fix = "it is set by ascend-operator; do not override it in the manifest"
    local = _int(env, "LOCAL_WORLD_SIZE", fix)
    if local < 1:
        raise UserError("LOCAL_WORLD_SIZE=0: the pod has no NPU; request huawei.com/Ascend910 for the container "
                        "named `ascend`")
    for name in ("WORLD_SIZE", "RANK"):
        if name not in env:
            raise UserError(f"LOCAL_WORLD_SIZE is set but {name} is not; ascend-operator sets both (AscendJob with "
                            "label framework: pytorch); set it, or unset LOCAL_WORLD_SIZE")
    world = _int(env, "WORLD_SIZE", fix)
    if world < local or world % local:
        raise UserError(f"LOCAL_WORLD_SIZE={local} does not divide WORLD_SIZE={world}: the pod's environment is "
                        "contradictory (ascend-operator sets WORLD_SIZE = NPUs per pod x pods); give every pod the "
                        "same huawei.com/Ascend910 count")
    pods = world // local
    index = _int(env, "RANK", fix)
    _check_index("RANK", index, f"WORLD_SIZE={world} / LOCAL_WORLD_SIZE={local}", pods)
    listed = env.get("LOCAL_RANK")
    expected = ",".join(str(i) for i in range(local))
    if listed is not None and listed.replace(" ", "") != expected:
        raise UserError(f"LOCAL_RANK={listed!r} with LOCAL_WORLD_SIZE={local}: ascend-operator gives a pod the list "
                        f"{expected!r}; a single local rank is one worker's variable (another launcher, such as "
                        "torchrun, started this process): run `edsr-dist train` there instead of `edsr-dist launch`")
    cards: tuple[int, ...] = ()
    visible = env.get("ASCEND_VISIBLE_DEVICES", "").strip()
    if visible:
        parts = [p.strip() for p in visible.split(",")]
        if not all(p.isdigit() for p in parts):
            raise UserError(f"ASCEND_VISIBLE_DEVICES={visible!r} is not a comma-separated list of chip numbers; "
                            "it comes from the pod's huawei.com/Ascend910 annotation: do not set it by hand")
        cards = tuple(int(p) for p in parts)
        if len(cards) != local:
            raise UserError(f"ASCEND_VISIBLE_DEVICES={visible} lists {len(cards)} chip(s) but LOCAL_WORLD_SIZE="
                            f"{local}: the pod's environment is contradictory; request the same huawei.com/Ascend910 "
                            "count as the job expects")
    return PodJob(ASCEND, pods, index, local, env.get("MASTER_ADDR", ""), _port(env, "MASTER_PORT"),
                  f"RANK={index} WORLD_SIZE={world} LOCAL_WORLD_SIZE={local}", cards)


def _volcano(env: dict) -> PodJob:
    """Volcano's pytorch plugin and Kubeflow PyTorchJob before 1.7: one RANK per pod."""
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise UserError(f"{other} is set but {name} is not: edsr-dist launch reads a pod's RANK (its index) and "
                            "WORLD_SIZE (the number of pods) together, as Volcano's pytorch plugin and Kubeflow's "
                            f"PyTorchJob set them; set {name}, or unset {other} to launch a job of this machine only")
    if "LOCAL_RANK" in env:
        raise UserError(f"LOCAL_RANK={env['LOCAL_RANK']!r} is one worker's variable (torchrun sets it): this "
                        "process was started by another launcher; run `edsr-dist train` there instead of "
                        "`edsr-dist launch`, or unset LOCAL_RANK")
    fix = "it is set by the job's operator; do not override it in the manifest"
    pods = _int(env, "WORLD_SIZE", fix)
    if pods < 1:
        raise UserError("WORLD_SIZE=0: a job needs at least one pod")
    index = _int(env, "RANK", fix)
    _check_index("RANK", index, f"WORLD_SIZE={pods}", pods)
    return PodJob(VOLCANO, pods, index, None, env.get("MASTER_ADDR", ""), _port(env, "MASTER_PORT"),
                  f"RANK={index} WORLD_SIZE={pods}")


def read_pod_env(env: dict) -> PodJob | None:
    """The job this pod belongs to, or None when no operator's variables are present (a job of this machine)."""
    if env.get("EDSR_DIST_LAUNCHER") == "1":
        return None  # our own worker's variables: a launcher started inside a worker plans its own job
    if "PET_NNODES" in env:
        job = _pet(env)
    elif "LOCAL_WORLD_SIZE" in env:
        job = _ascend(env)
    elif "RANK" in env or "WORLD_SIZE" in env:
        job = _volcano(env)
    else:
        return None
    if not job.master_addr:
        raise UserError(f"{job.variables} describe pod {job.pod_index} of {job.pods} but MASTER_ADDR is not set; "
                        "the operator sets it (the first pod's address): set it, or pass --master-addr")
    return job


def pod_devices(env: dict, device: str) -> tuple[int, str]:
    """How many devices this pod shows for `device` (the train's --device: auto | cpu | cuda | npu), and where
    that number comes from. NPUs: ASCEND_RT_VISIBLE_DEVICES, else the chips the container was given
    (ASCEND_VISIBLE_DEVICES, else its /dev/davinciN nodes); GPUs: torch.cuda.device_count(); else one (CPU)."""
    if device in ("auto", "npu"):
        if env.get("ASCEND_RT_VISIBLE_DEVICES", "").strip():
            return len(ascend_env.visible_devices(env) or []), "ASCEND_RT_VISIBLE_DEVICES"
        if env.get("ASCEND_VISIBLE_DEVICES", "").strip():
            return len(env["ASCEND_VISIBLE_DEVICES"].split(",")), "ASCEND_VISIBLE_DEVICES"
        nodes = [p for p in glob.glob("/dev/davinci[0-9]*") if re.fullmatch(r"/dev/davinci[0-9]+", p)]
        if nodes:
            return len(nodes), "/dev/davinci*"
    if device in ("auto", "cuda"):
        # Imported here: only counting a pod's GPUs needs torch (CUDA's own rules for CUDA_VISIBLE_DEVICES and the
        # driver); every other launch starts its workers without importing it (about a second of start-up).
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), "torch.cuda.device_count()"
    return 1, "no GPU or NPU in the pod"


def workers_per_pod(job: PodJob, nproc: int | None, env: dict, device: str) -> tuple[int, str]:
    """Workers this pod's launcher starts: --nproc, else the operator's count, else the pod's devices. An explicit
    --nproc that disagrees with the operator's count would make the pods disagree on the world size."""
    if job.per_pod is not None:
        source = ("PET_NPROC_PER_NODE" if job.operator == PET else "LOCAL_WORLD_SIZE")
        if nproc is not None and nproc != job.per_pod:
            raise UserError(f"--nproc {nproc} but {source}={job.per_pod} (the {job.operator} gives every pod "
                            f"{job.per_pod} worker(s) in the job's world size): drop --nproc or fix the manifest")
        return job.per_pod, source
    if nproc is not None:
        return nproc, "--nproc"
    count, source = pod_devices(env, device)
    if count < 1:
        raise UserError(f"{source} shows no device in this pod; give the container its devices (resources) or "
                        "pass --nproc N")
    return count, source
