"""The Horovod engine: horovod.torch behind the same `Engine` interface as DDP, for jobs started by horovodrun.

Gradients are averaged by Horovod's DistributedOptimizer (one named allreduce per parameter, started from
backward hooks); `finish_gradients` waits for them so the trainer can unscale and check for overflow on the
averaged values, and `step` then applies them without a second synchronisation. With --accumulate N the optimizer
is built with backward_passes_per_step=N: each parameter's hook counts the backward passes down and starts its
allreduce on the N-th only, the earlier ones adding up in .grad (horovod/torch/optimizer.py,
_DistributedOptimizer._make_hook and `_allreduce_delay`; `synchronize` resets the count). It does not divide by
N: the trainer's loss weights (Engine.gradient_weight) make the sum the full-batch mean, as with DDP.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from edsr_dist.errors import UserError
from edsr_dist.parallel.engine import Engine
from edsr_dist.parallel.world import World


def import_horovod():
    try:
        import horovod.torch as hvd
    except (ImportError, OSError) as exc:  # OSError: an extension built against another torch
        raise UserError(f"--engine horovod: horovod.torch cannot be imported ({exc}); install with "
                        "bash scripts/install_horovod.sh (docs/HOROVOD.md), or use --engine ddp") from None
    return hvd


def dense_view(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """A view of `tensor` in its memory order, so that it is contiguous, with the dims that undo it.

    Horovod only takes contiguous tensors, and with channels_last (the trainer's default) 4-D weights,
    their gradients and Adam's moments are not: permuting them to NHWC gives a contiguous view of the
    same memory, so collectives still work in place. None as the second value: already contiguous.
    """
    if tensor.is_contiguous():
        return tensor, None
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))  # stable: ties keep their order
    view = tensor.permute(order)
    if not view.is_contiguous():
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not dense")
    inverse = [order.index(d) for d in range(tensor.dim())]
    return view, inverse


class DenseLayout:
    """A Horovod `compression` that only re-views channels_last gradients as contiguous (no precision change)."""

    @staticmethod
    def compress(tensor: torch.Tensor):
        return dense_view(tensor)

    @staticmethod
    def decompress(tensor: torch.Tensor, inverse):
        return tensor if inverse is None else tensor.permute(inverse)


def _zero_grad(optimizer, optimizer_class, set_to_none: bool = True) -> None:
    """Horovod 0.28.1's zero_grad() accepts no `set_to_none`; keep its guard, accept torch's signature."""
    if optimizer._handles:
        raise RuntimeError("zero_grad() called while gradients were still being averaged; "
                           "call engine.finish_gradients() first")
    optimizer_class.zero_grad(optimizer, set_to_none=set_to_none)


def _to_cpu(value):
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class HorovodEngine(Engine):
    name = "horovod"

    def __init__(self, world: World, device: torch.device):
        super().__init__(world, device)
        if device.type == "npu":
            raise UserError("--engine horovod cannot drive Ascend NPUs (Horovod has no HCCL support); "
                            "use --engine ddp, which uses HCCL")
        hvd = import_horovod()
        hvd.init()
        self.hvd = hvd
        self._ops = 0
        if (hvd.rank(), hvd.size()) != (world.rank, world.size):
            raise UserError(f"--engine horovod: Horovod sees rank {hvd.rank()} of {hvd.size()}, but this worker was "
                            f"started as rank {world.rank} of {world.size} by {world.launcher}; start Horovod jobs "
                            "with horovodrun or `edsr-dist launch --hostfile`, or pass --engine ddp")
        if device.type == "cuda":
            if not (hvd.cuda_built() or hvd.rocm_built()):
                raise UserError("--engine horovod with --device cuda: this horovod was built without GPU support; "
                                "rebuild with HOROVOD_GPU_OPERATIONS=NCCL bash scripts/install_horovod.sh --force")
            if device.index != hvd.local_rank():
                raise UserError(f"rank {world.rank}: device {device} is not Horovod's local rank {hvd.local_rank()}; "
                                "start one worker per GPU with horovodrun")
            torch.cuda.set_device(hvd.local_rank())

    def _name(self, kind: str) -> str:
        # Explicit, rank-independent names: Horovod matches collectives across ranks by name, and its
        # default for broadcast_object is the object's type, which differs between the sender and the receivers.
        self._ops += 1
        return f"edsr.{kind}.{self._ops}"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             accumulate: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
        hvd = self.hvd
        self._broadcast_tensors(model.state_dict(), "param")
        # DistributedOptimizer builds a new optimizer over the same parameter groups with empty state, so
        # the state a resume loaded into the bare optimizer is carried over explicitly.
        loaded = optimizer.state_dict()
        distributed = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average,
                                               compression=DenseLayout, backward_passes_per_step=accumulate)
        if loaded["state"]:
            distributed.load_state_dict(loaded)
        self._share_optimizer_state(distributed)
        distributed.zero_grad = functools.partial(_zero_grad, distributed, type(optimizer))
        return model, distributed

    def _broadcast_tensors(self, named: dict, kind: str) -> None:
        """Rank 0's values into these tensors, in place."""
        handles = [self.hvd.broadcast_async_(dense_view(tensor)[0], root_rank=0, name=self._name(f"{kind}.{name}"))
                   for name, tensor in sorted(named.items())]
        for handle in handles:
            self.hvd.synchronize(handle)

    def _share_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Rank 0's optimizer state on every rank.

        Not hvd.broadcast_optimizer_state: it needs contiguous tensors, and on a fresh start it first creates
        the state with a zero-gradient step, which advances Adam's step count and so its bias correction (the
        run would no longer match the DDP engine step for step). After a resume every rank loaded the same
        file, so the state has the same layout everywhere and is overwritten in place.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        entries = [(f"{i}.{key}", value) for i, p in enumerate(params)
                   for key, value in sorted(optimizer.state.get(p, {}).items())]
        layout = [(name, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (name,) for name, v in entries]
        root_layout = self.broadcast_object(layout if self.world.is_main else None)
        differs = self.all_reduce_max(torch.tensor([float(layout != root_layout)])).item() > 0
        if differs:  # some rank resumed differently (or not at all): take rank 0's state whole
            state = self.broadcast_object(_to_cpu(optimizer.state_dict()) if self.world.is_main else None)
            if not self.world.is_main:
                optimizer.load_state_dict(state)
            return
        if not root_layout:
            return  # a fresh start on every rank: nothing to share yet
        self._broadcast_tensors({name: v for name, v in entries if torch.is_tensor(v)}, "optim")
        others = {name: v for name, v in entries if not torch.is_tensor(v)}
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        others, hyper = self.broadcast_object((others, hyper) if self.world.is_main else None)
        for name, value in others.items():
            index, key = name.split(".", 1)
            optimizer.state[params[int(index)]][key] = value
        for group, values in zip(optimizer.param_groups, hyper):
            group.update(values)

    def finish_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.synchronize()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        with optimizer.skip_synchronize():  # already synchronised in finish_gradients
            optimizer.step()

    def _all_reduce(self, tensor: torch.Tensor, op, kind: str) -> torch.Tensor:
        # A name that repeats for the same kind of call (these are synchronous, so never two in flight) lets
        # Horovod's response cache skip the negotiation for the per-step flags.
        name = f"edsr.{kind}.{str(tensor.dtype).removeprefix('torch.')}.{'x'.join(map(str, tensor.shape))}"
        self.hvd.allreduce_(dense_view(tensor)[0], name=name, op=op)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, self.hvd.Sum, "sum")

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, self.hvd.Max, "max")

    def broadcast_object(self, obj, src: int = 0):
        return self.hvd.broadcast_object(obj, root_rank=src, name=self._name("object"))

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self, clean: bool = True) -> None:
        # After an error a peer may be stuck in a collective: leave without waiting (horovodrun stops the rest).
        if clean and self.hvd.is_initialized():
            self.hvd.barrier()
            self.hvd.shutdown()
