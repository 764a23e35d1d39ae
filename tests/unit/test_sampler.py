"""TrainSampler: rank shares independent of world size, determinism, augmentation, HR/LR correspondence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edsr_dist.data.builder import SourceFolder, SourceImage, write_store
from edsr_dist.data.sampler import TrainSampler
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError

TILE = 48
SCALES = (2, 4)


class BlockImage(SourceImage):
    """HR constant on 4x4 blocks, LR = HR subsampled: LR is then the exact downscale for scales 2 and 4."""

    def load_lr(self, scale: int, hr: np.ndarray, method: str) -> np.ndarray:
        return np.ascontiguousarray(hr[::scale, ::scale])


def block_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    images = []
    for _ in range(4):
        blocks = rng.integers(0, 256, (TILE // 4 * 2, TILE // 4 * 3, 3), dtype=np.uint8)  # 2x3 tiles per image
        images.append(np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1))
    return images


@pytest.fixture(scope="module")
def block_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = [BlockImage(f"img{n}", hr.shape[:2], lambda hr=hr: hr) for n, hr in enumerate(block_images())]
    path = tmp_path_factory.mktemp("sampler") / "blocks.h5"
    write_store(str(path), [SourceFolder("train", "test blocks", images)], SCALES, TILE, "synthetic-subsample",
                "test blocks")
    return path  # 24 tiles


def sampler(path: Path, scale: int = 2, batch: int = 8, patch: int = 8, seed: int = 3, steps: int = 0,
            rank: int = 0, world: int = 1) -> TrainSampler:
    return TrainSampler(PatchStore(str(path), scale), batch, patch, seed, steps, rank=rank, world_size=world)


def test_rank_shares_concatenate_to_the_single_worker_batch(block_store: Path) -> None:
    single = sampler(block_store, steps=7)  # 7 steps of 8 > 24 tiles: crosses into later passes
    for world in (2, 3, 4, 5, 8):  # 8 on 3 ranks: 3/3/2; on 5: 2/2/2/1/1
        ranks = [sampler(block_store, steps=7, rank=r, world=world) for r in range(world)]
        assert all(len(r) == 7 for r in ranks)
        assert [r.local_batch_size for r in ranks] == [8 // world + (r < 8 % world) for r in range(world)]
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


def locate(image: np.ndarray, patch: np.ndarray) -> set[tuple[int, int, int]]:
    """(y, x, orientation) of every place where one of the eight orientations of `patch` occurs in `image`."""
    side = patch.shape[0]
    corners = image[: image.shape[0] - side + 1, : image.shape[1] - side + 1]
    return {
        (int(y), int(x), k)
        for k, variant in enumerate(dihedral(patch))
        for y, x in np.argwhere(np.all(corners == variant[0, 0], axis=-1))  # candidates by their first pixel
        if np.array_equal(image[y:y + side, x:x + side], variant)
    }


@pytest.mark.parametrize("patch,steps", [(TILE // 2, 12), (4, 40)])
def test_crops_lie_anywhere_in_the_image_in_all_eight_orientations(block_store: Path, patch: int,
                                                                   steps: int) -> None:
    # Each output is found in its anchor tile's image (the random 2x2 LR blocks make it unique), in the anchor's
    # stratum of crop positions, in one of the eight orientations, and crops cross tile borders.
    images = [hr[::2, ::2] for hr in block_images()]  # LR x2 of each image: 48 x 72, tiles of 24
    s = sampler(block_store, scale=2, patch=patch, batch=8, steps=steps)
    orientations, positions, crossing = set(), set(), 0
    for step in range(steps):
        lr, hr = s.batch(0, step)
        for j, tile in enumerate(s.tile_indices(0, step)):
            image = int(s.store.train_image_index[tile])
            found = locate(images[image], lr[j])
            assert len(found) == 1, found
            (y, x, orientation), = found
            rows, cols = s.store.train_grid[image]
            row, col = divmod(int(tile) - int(s.store.train_first_tile[image]), int(cols))
            span_y, span_x = 48 - patch + 1, 72 - patch + 1
            assert row * span_y // rows <= y < -(-(row + 1) * span_y // rows)
            assert col * span_x // cols <= x < -(-(col + 1) * span_x // cols)
            expected_hr = block_images()[image][2 * y:2 * (y + patch), 2 * x:2 * (x + patch)]
            np.testing.assert_array_equal(dihedral(hr[j])[orientation], expected_hr)
            orientations.add(orientation)
            positions.add((image, y, x))
            crossing += (y % 24 + patch > 24) or (x % 24 + patch > 24)
    assert orientations == set(range(8)) and crossing > steps and len(positions) > steps * 4


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
    with pytest.raises(UserError, match="batch_size 2 \\(global\\) is smaller than the 3 workers"):
        sampler(block_store, batch=2, world=3)
    with pytest.raises(UserError, match="outside a world"):
        sampler(block_store, rank=2, world=2)
    with pytest.raises(UserError, match="batch_size 0"):
        sampler(block_store, batch=0)


def test_micro_batches_of_uneven_shares_concatenate_to_the_single_worker_batch(block_store: Path) -> None:
    """16 on 3 ranks (6/5/5) x accumulate 2 (3+3, 3+2, 3+2): the micro-batches, in rank order, are the batch."""
    single = sampler(block_store, batch=16, steps=4)
    ranks = [TrainSampler(PatchStore(str(block_store), 2), 16, 8, 3, 4, rank=r, world_size=3, accumulate=2)
             for r in range(3)]
    assert [r.micro_sizes for r in ranks] == [[3, 3], [3, 2], [3, 2]]
    for step in (0, 3):
        lr, hr = single.batch(1, step)
        micro = [m for r in ranks for m in r.micro_batches(*r.batch(1, step))]
        assert [len(m[0]) for m in micro] == [3, 3, 3, 2, 3, 2]
        np.testing.assert_array_equal(np.concatenate([m[0] for m in micro]), lr)
        np.testing.assert_array_equal(np.concatenate([m[1] for m in micro]), hr)
    with pytest.raises(UserError, match=r"x --accumulate 3: every worker needs at least 3 sample\(s\)"):
        TrainSampler(PatchStore(str(block_store), 2), 8, 8, 3, 4, rank=0, world_size=3, accumulate=3)
