"""The training data: the patch store (the sample, a file, or a bucket object fetched once per server), this
rank's sampler over it, and each epoch's batches read ahead in a thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edsr_dist.config import Config
from edsr_dist.data.sample_store import default_sample_store_path, ensure_sample_store
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.data.store import PatchStore, verify_store
from edsr_dist.errors import UserError
from edsr_dist.locations import is_url
from edsr_dist.parallel.engine import Engine
from edsr_dist.parallel.world import World
from edsr_dist.state.inputs import STORE, local_input
from edsr_dist.train.prefetch import Prefetcher
from edsr_dist.train.step_timer import StepTimer


def open_store(cfg: Config, is_main: bool, engine: Engine) -> PatchStore:
    path = cfg.data
    if not path:
        # Rank 0 builds (or repairs) the cached sample store while the others wait.
        cached = default_sample_store_path(cfg.cache_dir)
        path = ensure_sample_store(cached) if is_main else None
        if is_main:
            print(f"sample store: {path} (cached; EDSR_DIST_CACHE sets the folder)", flush=True)
        engine.barrier()
        path = path or ensure_sample_store(cached)
    elif is_url(path):
        # Every rank asks; one process per server (cache folder) downloads while the others wait on its lock.
        path = local_input(path, STORE, cfg.cache_dir, cfg.endpoint_url, verify_store=verify_store)
    elif not Path(path).exists():
        raise UserError(f"store {path} does not exist; build one with `edsr-dist build-store` or omit --data for the sample")
    return PatchStore(path, cfg.scale)


class TrainingData:
    """This rank's share of every step's global batch, epoch by epoch; owns the open store."""

    def __init__(self, store: PatchStore, cfg: Config, world: World, device: torch.device,
                 memory_format: torch.memory_format):
        self.store, self.device, self.memory_format = store, device, memory_format
        self.pin = device.type in ("cuda", "npu")  # page-locked batches, so the copy to the device is asynchronous
        self.sampler = TrainSampler(store, cfg.batch_size, cfg.patch_size, cfg.seed, cfg.steps_per_epoch,
                                    rank=world.rank, world_size=world.size, accumulate=cfg.accumulate)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def batches(self, epoch: int, first_step: int, timer: StepTimer) -> Prefetcher:
        """(step in epoch, (lr, hr)) from first_step to the epoch's end, read ahead; close() it when done."""
        return Prefetcher(lambda s: self.sampler.batch(epoch, s), range(first_step, self.steps_per_epoch), timer,
                          pin=self.pin)

    def to_device(self, batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 NHWC batch (an array, or a page-locked tensor from the prefetcher) as float on the device."""
        x = batch_uint8 if torch.is_tensor(batch_uint8) else torch.from_numpy(batch_uint8)
        x = x.to(self.device, non_blocking=True)
        # NHWC uint8 -> logical NCHW float; permute keeps the NHWC storage, i.e. channels_last, for free.
        x = x.permute(0, 3, 1, 2).float()
        return x.contiguous(memory_format=self.memory_format)

    def close(self) -> None:
        self.store.close()
