"""Validation during training: when (`should_validate`), the scores over the held-out images shared out across
ranks, and the sample images of the last validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from edsr_dist.config import Config
from edsr_dist.data.store import PatchStore
from edsr_dist.evaluation.benchmark_sets import ValidationSource, score_shards, validation_source
from edsr_dist.evaluation.metrics import bicubic_upscale
from edsr_dist.inference.torch_runtime import super_resolve
from edsr_dist.model.ema import WeightEMA
from edsr_dist.parallel.engine import Engine
from edsr_dist.parallel.world import World
from edsr_dist.state.inputs import FOLDER, local_input
from edsr_dist.train.reporting import write_sample_image


def open_validation(cfg: Config, store: PatchStore) -> ValidationSource:
    """The store's validation images or cfg.val_benchmark's; refuses a run with nothing to validate on."""
    benchmark = local_input(cfg.val_benchmark, FOLDER, cfg.cache_dir, cfg.endpoint_url)
    return validation_source(dataclasses.replace(cfg, val_benchmark=benchmark), store)


class Validator:
    def __init__(self, cfg: Config, source: ValidationSource, model: torch.nn.Module, ema: WeightEMA | None,
                 device: torch.device, precision: str, world: World, engine: Engine, out: Path):
        self.cfg, self.source, self.model, self.ema = cfg, source, model, ema
        self.device, self.precision, self.world, self.engine, self.out = device, precision, world, engine, out

    def should_validate(self, epoch_number: int, last: bool) -> bool:
        return epoch_number % self.cfg.validate_every == 0 or last

    @torch.no_grad()
    def validate(self, write_samples: bool = False) -> dict:
        """Each rank takes every world-size-th image; sums are reduced so rank 0 reports the whole set."""
        source = self.source
        network = self.ema.model if self.ema is not None else self.model  # what eval, sr and export will use

        def score_one(index: int) -> dict:
            name, lr, hr = source.load(index)
            sr = super_resolve(network, lr, self.device, tile=self.cfg.val_tile or None, precision=self.precision)
            if write_samples:
                self.write_sample(name, bicubic_upscale(lr, hr.shape), sr, hr)
            return source.score(sr, lr, hr)

        self.model.eval()
        # Training shapes never change, so cuDNN's autotuner pays off there; here every image differs.
        autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        report = score_shards(source.count, self.world.rank, self.world.size, score_one, source.keys,
                              self.engine.all_reduce_sum, self.device)
        self.model.train()
        torch.backends.cudnn.benchmark = autotune
        return {**report, **source.labels}

    def write_sample(self, name: str, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> None:
        write_sample_image(self.out / "samples" / f"{name}_bicubic_edsr_gt.png", bicubic, sr, hr, self.cfg.scale)
