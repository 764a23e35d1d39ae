"""TrainSampler: rank shares independent of world size, determinism, augmentation, HR/LR correspondence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edsr_dist.data.builder import SourceImage, write_store
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError

TILE = 48
SCALES = (2, 4)


class BlockImage(SourceImage):
    """HR constant on 4x4 blocks, LR = HR subsampled: LR is then the exact downscale for scales 2 and 4."""

    def load_lr(self, scale: int, hr: np.ndarray, method: str) -> np.ndarray:
        return np.ascontiguousarray(hr[::scale, ::scale])


@pytest.fixture(scope="module")
def block_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    images = []
    for number in range(4):
        blocks = rng.integers(0, 256, (TILE // 4 * 2, TILE // 4 * 3, 3), dtype=np.uint8)  # 2x3 tiles per image
        hr = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
        images.append(BlockImage(f"img{number}", hr.shape[:2], lambda hr=hr: hr))
    path = tmp_path_factory.mktemp("sampler") / "blocks.h5"
    write_store(str(path), images, [], SCALES, TILE, "synthetic-subsample", "test blocks")
    return path  # 24 tiles


def sampler(path: Path, scale: int = 2, batch: int = 8, patch: int = 8, seed: int = 3, steps: int = 0,
            rank: int = 0, world: int = 1) -> TrainSampler:
    return TrainSampler(PatchStore(str(path), scale), batch, patch, seed, steps, rank=rank, world_size=world)


def test_rank_shares_concatenate_to_the_single_worker_batch(block_store: Path) -> None:
    single = sampler(block_store, steps=7)  # 7 steps of 8 > 24 tiles: crosses into later passes
    for world in (2, 4):
        ranks = [sampler(block_store, steps=7, rank=r, world=world) for r in range(world)]
        assert all(len(r) == 7 and r.local_batch_size == 8 // world for r in ranks)
        for epoch in (0, 1, 5):
            for step in (0, 1, 3, 6):
                lr, hr = single.batch(epoch, step)
                shares = [r.batch(epoch, step) for r in ranks]
                np.testing.assert_array_equal(np.concatenate([s[0] for s in shares]), lr)
                np.testing.assert_array_equal(np.concatenate([s[1] for s in shares]), hr)
                tiles = np.concatenate([r.tile_indices(epoch, step) for r in ranks])
                np.testing.assert_array_equal(tiles, single.tile_indices(epoch, step))


def test_shares_are_disjoint_and_each_pass_is_a_permutation(block_store: Path) -> None:
    world = 4
    ranks = [sampler(block_store, batch=8, steps=6, rank=r, world=world) for r in range(world)]
    for epoch in (0, 2):
        for first_step in (0, 3):  # steps 0-2 are pass 0, steps 3-5 pass 1 (24 tiles, 8 per step)
            seen = []
            for step in range(first_step, first_step + 3):
                shares = [set(r.tile_indices(epoch, step).tolist()) for r in ranks]
                for a in range(world):
                    for b in range(a + 1, world):
                        assert not shares[a] & shares[b]
                seen += [t for share in shares for t in share]
            assert sorted(seen) == list(range(24))
    assert sampler(block_store, batch=8).steps_per_epoch == 3  # floor(24 / 8)
    assert sampler(block_store, batch=40).steps_per_epoch == 1  # at least one


def test_deterministic_resumable_and_epoch_dependent(block_store: Path) -> None:
    a, b = sampler(block_store, steps=5), sampler(block_store, steps=5)
    later = [b.batch(1, step) for step in (4, 2, 0)]  # another instance, another order (a resumed run)
    for step, (lr, hr) in zip((4, 2, 0), later):
        lr_a, hr_a = a.batch(1, step)
        np.testing.assert_array_equal(lr_a, lr)
        np.testing.assert_array_equal(hr_a, hr)
    assert not np.array_equal(a.batch(0, 0)[0], a.batch(1, 0)[0])
    assert not np.array_equal(a.tile_indices(0, 0), a.tile_indices(1, 0))
    other_seed = sampler(block_store, seed=4, steps=5)
    assert not np.array_equal(a.batch(1, 0)[0], other_seed.batch(1, 0)[0])


@pytest.mark.parametrize("scale,patch", [(2, 8), (4, 12), (2, 24)])
def test_hr_crop_matches_lr_crop_exactly(block_store: Path, scale: int, patch: int) -> None:
    s = sampler(block_store, scale=scale, patch=patch, batch=8, steps=4)
    for step in range(4):
        lr, hr = s.batch(2, step)
        assert lr.shape == (8, patch, patch, 3) and hr.shape == (8, patch * scale, patch * scale, 3)
        assert lr.dtype == hr.dtype == np.uint8
        np.testing.assert_array_equal(np.repeat(np.repeat(lr, scale, axis=1), scale, axis=2), hr)


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(m, k) for m in (image, image[:, ::-1]) for k in range(4)]


def test_crops_and_all_eight_orientations_occur(block_store: Path) -> None:
    # patch * scale == tile: the crop is the whole tile, so each output is one orientation of its tile.
    s = sampler(block_store, scale=2, patch=TILE // 2, batch=8, steps=12)
    used = set()
    for step in range(12):
        lr, hr = s.batch(0, step)
        for j, tile in enumerate(s.tile_indices(0, step)):
            _, hr_tile = s.store.read_train(int(tile))
            matches = [k for k, variant in enumerate(dihedral(hr_tile)) if np.array_equal(variant, hr[j])]
            assert matches, "output is not a rotation/mirror of its tile"
            used.add(matches[0])
    assert used == set(range(8))
    # With room to move, crop offsets cover the whole range: locate each LR patch in its tile (the random
    # 2x2 LR blocks make a 4x4 patch unique) under the orientation that undoes the augmentation.
    small = sampler(block_store, scale=2, patch=4, batch=8, steps=20)
    offsets = set()
    for step in range(20):
        lr, _ = small.batch(0, step)
        for j, tile in enumerate(small.tile_indices(0, step)):
            lr_tile, _ = small.store.read_train(int(tile))
            windows = np.lib.stride_tricks.sliding_window_view(lr_tile, (4, 4), axis=(0, 1))  # (21, 21, 3, 4, 4)
            found = {
                (int(y), int(x))
                for variant in dihedral(lr[j])
                for y, x in np.argwhere(np.all(windows == variant.transpose(2, 0, 1), axis=(2, 3, 4)))
            }
            assert len(found) == 1
            offsets |= found
    ys, xs = {y for y, _ in offsets}, {x for _, x in offsets}
    assert min(ys) == min(xs) == 0 and max(ys) == max(xs) == TILE // 2 - 4 and len(offsets) > 100


def test_sample_store_lr_is_the_downscaled_hr(sample_store: Path) -> None:
    s = TrainSampler(PatchStore(str(sample_store), 3), 8, 40, seed=0, steps_per_epoch=0)
    lr, hr = s.batch(0, 0)
    for j in range(len(lr)):
        down = np.asarray(Image.fromarray(hr[j]).resize((40, 40), Image.BICUBIC)).astype(int)
        inner = np.abs(down - lr[j].astype(int))[4:-4, 4:-4]  # borders differ: the crop cut the kernel support
        assert inner.mean() < 1.5, inner.mean()


def test_bad_settings(block_store: Path) -> None:
    with pytest.raises(UserError, match="patch larger than tile"):
        sampler(block_store, scale=2, patch=TILE // 2 + 1)
    with pytest.raises(UserError, match="patch larger than tile"):
        sampler(block_store, scale=4, patch=13)
    with pytest.raises(UserError, match="does not divide by the 3 workers"):
        sampler(block_store, batch=8, world=3)
    with pytest.raises(UserError, match="outside a world"):
        sampler(block_store, rank=2, world=2)
    with pytest.raises(UserError, match="batch_size 0"):
        sampler(block_store, batch=0)
