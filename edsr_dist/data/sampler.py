"""Deterministic, rank-sharded training batches from a PatchStore.

Global sample position g = step * batch_size + j (j < batch_size) of an epoch maps to
  anchor tile = permutation(seed, epoch, pass)[g % num_tiles], pass = g // num_tiles
  crop position, horizontal flip, vertical flip, transpose = f(seed, epoch, g)
so the sample stream depends only on (seed, epoch, step): not on the number of ranks or readers, and any step
can be regenerated exactly on resume. Rank r takes the r-th of world_size consecutive shares of each global
batch, which differ by at most one sample where the batch does not divide (16 on 3 ranks: positions 0-5, 6-10,
11-15), so shares are disjoint, cover the batch, and every rank has the same number of batches. With
--accumulate N a share is cut the same way into N consecutive micro-batches (`micro_batches`).

The crop is not confined to its anchor tile: the anchor (row i of n, column j of m of its image's tile grid)
picks the i-th of n equal strata of the image's crop positions along y (the j-th of m along x), and a uniform
draw picks the position inside it. With anchors uniform over a pass, the crop position is uniform over every
position of the whole image, as a random crop anywhere in the image; the crop is put together from the tiles it
spans (PatchStore.read_train_crop).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

from edsr_dist.config import batch_shares, check_batch_splits, split_evenly
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError

# Domain tags keep the permutation stream and the per-sample stream apart for the same numbers.
_PERMUTATION_STREAM = 0x7065726D  # "perm"
_SAMPLE_STREAM = 0x73616D70  # "samp"
_CACHED_PERMUTATIONS = 4


class TrainSampler:
    def __init__(
        self,
        store: PatchStore,
        batch_size: int,
        patch_size: int,
        seed: int,
        steps_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"rank {rank} is outside a world of {world_size} workers; check the launcher's rank variables"
            )
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size} must be at least 1")
        check_batch_splits(batch_size, world_size, accumulate)
        if patch_size < 1:
            raise UserError(f"patch_size {patch_size} must be at least 1")
        if patch_size * store.scale > store.tile_size:
            raise UserError(
                f"patch larger than tile: patch_size {patch_size} x scale {store.scale} = {patch_size * store.scale} "
                f"exceeds the store's {store.tile_size}px tiles ({store.path}); use patch_size <= "
                f"{store.tile_size // store.scale} or build the store with a larger --tile-size"
            )
        if store.num_train_tiles < 1:
            raise UserError(
                f"patch store {store.path} has no training tiles; build it from images at least one tile large"
            )
        if seed < 0:
            raise UserError(f"seed {seed} must be >= 0")
        if steps_per_epoch < 0:
            raise UserError(f"steps_per_epoch {steps_per_epoch} must be >= 0 (0 = one pass over the tiles)")
        self.store = store
        self.scale = store.scale
        self.batch_size = batch_size
        shares = batch_shares(batch_size, world_size)
        self.local_batch_size = shares[rank]  # this rank's share: the larger ones first
        self.share_start = sum(shares[:rank])
        self.micro_sizes = split_evenly(self.local_batch_size, accumulate)
        self.patch_size = patch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_tiles = store.num_train_tiles
        self.steps_per_epoch = steps_per_epoch or max(1, self.num_tiles // batch_size)
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _permutation(self, epoch: int, pass_: int) -> np.ndarray:
        key = (epoch, pass_)
        perm = self._permutations.get(key)
        if perm is None:
            rng = np.random.default_rng([_PERMUTATION_STREAM, self.seed, epoch, pass_])
            perm = rng.permutation(self.num_tiles)
            self._permutations[key] = perm
            if len(self._permutations) > _CACHED_PERMUTATIONS:
                self._permutations.popitem(last=False)
        return perm

    def positions(self, step: int) -> range:
        """Global sample positions of this rank's share of global batch `step`."""
        start = step * self.batch_size + self.share_start
        return range(start, start + self.local_batch_size)

    def tile_indices(self, epoch: int, step: int) -> np.ndarray:
        """Store tile index of each sample in this rank's share of global batch `step` of `epoch`."""
        self._check_args(epoch, step)
        return np.array(
            [self._permutation(epoch, g // self.num_tiles)[g % self.num_tiles] for g in self.positions(step)],
            dtype=np.int64,
        )

    def _check_args(self, epoch: int, step: int) -> None:
        if epoch < 0 or step < 0:
            raise ValueError(f"epoch {epoch} and step {step} must be >= 0")

    def crop_position(self, tile: int, word_y: int, word_x: int) -> tuple[int, int, int]:
        """(image, LR y, LR x) of the crop anchored at `tile`, from two uniform 32-bit words: the anchor's row
        (column) picks its stratum of the image's crop positions, the word the position inside it."""
        store = self.store
        image = int(store.train_image_index[tile])
        rows, cols = (int(v) for v in store.train_grid[image])
        row, col = divmod(tile - int(store.train_first_tile[image]), cols)
        height, width = (int(v) // self.scale for v in store.train_image_size[image])
        y = ((row << 32) + word_y) * (height - self.patch_size + 1) // (rows << 32)
        x = ((col << 32) + word_x) * (width - self.patch_size + 1) // (cols << 32)
        return image, y, x

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of global batch `step` of `epoch`: lr uint8 (b, p, p, 3), hr uint8 (b, p*s, p*s, 3)."""
        tiles = self.tile_indices(epoch, step)
        p, s = self.patch_size, self.scale
        hp = p * s
        lr_out = np.empty((len(tiles), p, p, 3), dtype=np.uint8)
        hr_out = np.empty((len(tiles), hp, hp, 3), dtype=np.uint8)
        # Pixels as single 3-byte items: flipped/transposed copies then move whole pixels, several times faster
        # than strided copies of single bytes.
        lr_pixels, hr_pixels = _as_pixels(lr_out), _as_pixels(hr_out)
        for j, (g, tile) in enumerate(zip(self.positions(step), tiles)):
            # Three 32-bit words from (seed, epoch, g) alone: y and x within the anchor's strata, flip/transpose bits.
            words = np.random.SeedSequence([_SAMPLE_STREAM, self.seed, epoch, g]).generate_state(3)
            image, y, x = self.crop_position(int(tile), int(words[0]), int(words[1]))
            bits = int(words[2])
            lr_crop, hr_crop = self.store.read_train_crop(image, y, x, p)
            lr, hr = _as_pixels(lr_crop), _as_pixels(hr_crop)
            if bits & 1:  # horizontal flip
                lr, hr = lr[:, ::-1], hr[:, ::-1]
            if bits & 2:  # vertical flip
                lr, hr = lr[::-1], hr[::-1]
            if bits & 4:  # transpose; with the flips this covers all eight 90-degree rotations and mirrorings
                lr, hr = lr.T, hr.T
            lr_pixels[j] = lr
            hr_pixels[j] = hr
        return lr_out, hr_out


    def micro_batches(self, lr: np.ndarray, hr: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """A share from `batch` cut into its consecutive micro-batches (views, no copy)."""
        if len(self.micro_sizes) == 1:  # no accumulation: the batch itself, as the prefetcher handed it out
            return [(lr, hr)]
        bounds = [0, *itertools.accumulate(self.micro_sizes)]
        return [(lr[a:b], hr[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _as_pixels(image: np.ndarray) -> np.ndarray:
    """View a C-contiguous uint8 (..., H, W, 3) array as (..., H, W) items of 3 bytes (shares memory)."""
    return np.ascontiguousarray(image).view(np.dtype("V3"))[..., 0]
