"""The loss weights of uneven shares and micro-batches: averaged over the ranks as DDP and Horovod average, they
add up to one full-batch mean for any split (Engine.gradient_weight over config.batch_shares and split_evenly)."""

from __future__ import annotations

import pytest
import torch

from edsr_dist.config import batch_shares, split_evenly
from edsr_dist.parallel.engine import Engine
from edsr_dist.parallel.world import World


@pytest.mark.parametrize("batch,workers,accumulate", [(16, 1, 1), (16, 4, 1), (16, 3, 1), (16, 1, 4), (16, 2, 2),
                                                      (16, 3, 2), (16, 7, 2), (20, 8, 1), (6, 1, 4)])
def test_weighted_micro_losses_averaged_over_ranks_are_the_full_batch_mean(batch, workers, accumulate):
    per_sample = torch.arange(batch, dtype=torch.float64) * 0.37 + 1.0  # any per-sample losses (or gradients)
    rank_results, start = [], 0
    for rank, share in enumerate(batch_shares(batch, workers)):
        engine = Engine(World(rank=rank, size=workers), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float64)
        for samples in split_evenly(share, accumulate):
            micro_mean = per_sample[start:start + samples].mean()  # what F.l1_loss gives for the micro-batch
            total += micro_mean * engine.gradient_weight(samples, batch)  # summed in .grad over micro-steps
            start += samples
        rank_results.append(total)
    assert start == batch  # the shares and micro-batches cover the batch once
    averaged = torch.stack(rank_results).mean()  # DDP and Horovod: sum over ranks / world size
    assert averaged.item() == pytest.approx(per_sample.mean().item(), rel=1e-12)


def test_an_even_split_without_accumulation_leaves_the_loss_as_it_is():
    for workers in (1, 2, 4, 8, 16):
        engine = Engine(World(rank=0, size=workers), torch.device("cpu"))
        assert engine.gradient_weight(16 // workers, 16) == 1.0
    assert Engine(World(rank=0, size=3), torch.device("cpu")).gradient_weight(6, 16) == 1.125
