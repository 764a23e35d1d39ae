"""The parallelism, in one place: how gradients and statistics cross ranks.

The training loop talks to an `Engine` and never branches on which one it has:
- `Engine` itself: one process, nothing to synchronise (the base class is the local engine).
- `DDPEngine`: torch.distributed + DistributedDataParallel over hccl (Ascend), nccl (CUDA) or gloo (CPU).
- `HorovodEngine` (edsr_dist/parallel/horovod_engine.py): horovod.torch, for jobs started by horovodrun.
Which one a run gets is decided in edsr_dist/parallel/factory.py.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from edsr_dist.errors import UserError
from edsr_dist.parallel.ascend_env import watchdog_timeout
from edsr_dist.parallel.world import World

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
GRAD_COMM_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def half_precision_allreduce(dtype: torch.dtype):
    """A DDP comm hook: gradients cast to `dtype` for the all-reduce (half the bytes), averaged, copied back into
    the fp32 bucket; torch's own `_compress_hook` (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py:57-93:
    divide by the world size before the cast, so fp16 sums do not overflow). Not torch's `bf16_compress_hook` by
    name: DDP refuses that name unless NCCL >= 2.10 (torch/nn/parallel/distributed.py:2485-2504, _check_comm_hook),
    which rules out Gloo and HCCL; the same function under another name is accepted."""
    def grad_comm_hook(process_group, bucket):
        return default_hooks._compress_hook(dtype, process_group, bucket)
    return grad_comm_hook


class Engine:
    name = "local"

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             accumulate: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Return the model to call in training and the optimizer to step; parameters equal on all ranks after it.
        `accumulate`: backward passes per optimizer step (the micro-steps of --accumulate)."""
        return model, optimizer

    def gradient_weight(self, samples: int, global_samples: int) -> float:
        """The factor for the mean loss of `samples` samples (a micro-batch of this rank's share) such that, summed
        over micro-steps and averaged over ranks as the engines do (DDP and Horovod divide the sum by the world
        size), the gradient is the mean over all `global_samples` samples of the step: the full-batch gradient
        whatever the split. Exactly 1 for an even split without accumulation."""
        return samples * self.world.size / global_samples

    def accumulating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around the forward and backward of a micro-step that is not the step's last: gradients add up in .grad
        without communication; the last micro-step's backward averages the sum."""
        return contextlib.nullcontext()

    def finish_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Block until the averaged gradients are in .grad (before unscaling and the overflow check)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self, clean: bool = True) -> None:
        """clean=False after an error: peers may be stuck in a collective, so do not wait for them."""


# How long a rank tries the store address it read before reading it again: an address left by the previous
# attempt's rank 0 (dead by then) refuses the connection at once.
ATTEMPT_STORE_CONNECT_S = 2.0
ATTEMPT_STORE_KEY = "edsr-dist/attempt-store"


def _rendezvous(world: World, timeout: datetime.timedelta) -> dict:
    """init_process_group's rendezvous.

    * torch_npu_run: its agent hosts the store on MASTER_PORT (torch_npu/distributed/rendezvous.py:132-144) and
      torch_npu turns init_method env:// into a client of it, keyed per attempt (distributed_c10d.py:484-498,
      rendezvous.py:36-67); a second server on that port would fail. Its restart counts agree on every node:
      its rendezvous never reports waiting nodes (rendezvous.py:155-156), so every restart is a counted one.
    * torchrun with the agent's shared store (TORCHELASTIC_USE_AGENT_STORE=True; c10d and static rendezvous):
      that store outlives the workers and keeps the previous attempt's keys (Gloo's peer addresses among them:
      new workers then dial dead ones). Prefixing the keys with TORCHELASTIC_RESTART_COUNT splits a multi-node
      job, because torch's agent does not count a restart caused by another node rejoining
      (torch/distributed/elastic/agent/server/api.py, _invoke_run: "membership changes do not count as
      retries"), so nodes can restart with different counts. Instead rank 0 of each attempt hosts a fresh store
      and publishes its address in the agent's store; every other rank connects to the address it reads there,
      reading again while the address refuses (it was the previous attempt's: the agents stop every worker of
      an attempt before the next rendezvous completes). No key of an earlier attempt is ever seen.
    * otherwise (this project's launcher, env:// variables, torchrun without a shared store, where rank 0's
      agent picks a new MASTER_PORT each round): rank 0 hosts the store at MASTER_ADDR:MASTER_PORT.
    """
    if os.environ.get("TORCH_NPU_USE_PARALLEL_TCPSTORE") == "True":
        return {"init_method": "env://"}
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return {"store": _attempt_store(world, timeout)}
    return {"init_method": f"tcp://{world.master_addr}:{world.master_port}"}


def _attempt_store(world: World, timeout: datetime.timedelta) -> dist.Store:
    agent = dist.TCPStore(world.master_addr, world.master_port, world.size, is_master=False, timeout=timeout)
    if world.rank == 0:
        # Global rank 0 runs on the node whose agent hosts the shared store, so MASTER_ADDR reaches it too.
        store = dist.TCPStore(world.master_addr, 0, world.size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        agent.set(ATTEMPT_STORE_KEY, f"{store.port}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port = int(agent.get(ATTEMPT_STORE_KEY).decode())
        try:
            store = dist.TCPStore(world.master_addr, port, world.size, is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=ATTEMPT_STORE_CONNECT_S))
        except (RuntimeError, dist.DistError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        store.set_timeout(timeout)
        return store


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, world: World, device: torch.device, timeout_s: int, grad_comm: str = "none"):
        super().__init__(world, device)
        self.grad_comm = grad_comm
        backend = BACKENDS[device.type]
        if backend == "hccl":
            timeout_s, note = watchdog_timeout(timeout_s)
            if note and world.is_main:
                print(f"edsr-dist train: note: {note}", file=sys.stderr, flush=True)
        # HCCL reads RANK_TABLE_FILE itself when it is set; torch only needs the TCP rendezvous.
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(
                backend=backend,
                rank=world.rank,
                world_size=world.size,
                timeout=timeout,
                **_rendezvous(world, timeout),
                **({"device_id": device} if device.type == "cuda" else {}),
            )
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"rank {world.rank}: could not join the {backend} process group at "
                f"{world.master_addr}:{world.master_port} ({first}); check MASTER_ADDR/MASTER_PORT and that every "
                f"rank was started (raise --dist-timeout for slow starts)"
            ) from None
        self.backend = backend

    def wrap(self, model, optimizer, accumulate: int = 1):
        # DDP broadcasts rank 0's parameters at wrap time, so every rank starts from the same weights.
        # A flat-buffer optimizer (torch_npu's NpuFusedAdam) re-points .grad into its own buffer on its first step;
        # bucket views would re-point them back, leaving it a stale copy, so DDP then copies into .grad instead
        # (as ModelZoo's EDSR runs it: DDP's default, edsr_x2/main_8p.py:224-226).
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type in ("cuda", "npu") else None,
            gradient_as_bucket_view=not getattr(optimizer, "is_fused_optimizer", False),
            bucket_cap_mb=25,
        )
        if self.grad_comm != "none":
            ddp.register_comm_hook(None, half_precision_allreduce(GRAD_COMM_DTYPES[self.grad_comm]))
        return ddp, optimizer

    def accumulating(self, model):
        # DDP's own switch: its reducer neither all-reduces nor marks buckets ready inside no_sync, and the first
        # backward after it reduces the accumulated .grad (torch/nn/parallel/distributed.py, no_sync).
        return model.no_sync()

    def all_reduce_sum(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.device.type in ("cuda", "npu"):
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def shutdown(self, clean: bool = True) -> None:
        if clean and dist.is_initialized():
            # Leave together: a rank tearing down its group while a peer still uses it can abort at exit.
            self.barrier()
            dist.destroy_process_group()


# How backends word "the peer is gone" and "nobody answered in time" (Gloo, NCCL, HCCL, the TCP store).
_TIMEOUT_MARKERS = ("timed out", "timeout", "watchdog caught collective")
_PEER_LOST_MARKERS = ("connection reset", "connection closed", "broken pipe", "socket closed", "connection refused",
                      "communicator was aborted", "end of file")


def describe_collective_failure(exc: BaseException, timeout_s: int) -> str | None:
    """One line for an error a collective raised because another rank died or stopped responding; None when
    `exc` is something else (a real bug keeps its traceback)."""
    if not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    lowered = text.lower()
    from_backend = isinstance(exc, dist.DistError) or any(name in lowered for name in ("gloo", "nccl", "hccl"))
    timed_out = any(marker in lowered for marker in _TIMEOUT_MARKERS)
    peer_lost = any(marker in lowered for marker in _PEER_LOST_MARKERS)
    if not (from_backend and (timed_out or peer_lost)):
        return None
    # "[/path/to/gloo/pair.cc:537] Read error ..." -> "Read error ..."; the source position helps nobody here.
    detail = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    detail = detail if len(detail) <= 160 else detail[:157] + "..."
    if timed_out:
        return (f"a collective timed out after {timeout_s} s ({detail}); a rank stopped responding (hung, stopped "
                "or far slower than the others): check the other ranks' logs; raise --dist-timeout if a step, "
                "validation or checkpoint legitimately takes longer (Ascend: also HCCL_EXEC_TIMEOUT)")
    return (f"lost the connection to another rank during a collective ({detail}); another rank died or was "
            "killed: its log says why")
