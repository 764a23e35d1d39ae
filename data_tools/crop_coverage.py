"""How much of an image training crops can reach, and how evenly: the figures in docs/STORE.md ("Coverage").

  python data_tools/crop_coverage.py --size 2040x1356 --tile-size 192 --scale 2 --patch-size 48
  python data_tools/crop_coverage.py --store sample.h5 --scale 2 --patch-size 24   # every image of a store

For each image it prints the share of its HR pixels that some crop can contain, and the spread of the per-pixel
probability of being inside a crop (max/min over the pixels at least one crop away from the image border, where
even a random crop anywhere in the image is flat; and std/mean over all covered pixels), for

- format 1: tiles from the top-left corner, partial edge tiles dropped, crops confined to one tile;
- format 2 (this version): tiles cover the image cropped to a multiple of lcm(scales); crops anywhere in it;
- anywhere: a random crop anywhere in the whole image (the reference).

Crop positions lie on the LR grid (HR multiples of the scale), as in every SR pipeline that crops LR and HR
together. The probabilities are computed exactly (one axis at a time; the two axes are independent).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np


def _anywhere(length: int, patch: int) -> np.ndarray:
    """Per-pixel probability, along one LR axis of `length`, of lying in a uniformly placed crop of `patch`."""
    hits = np.zeros(length)
    positions = length - patch + 1
    if positions < 1:
        return hits
    for offset in range(patch):  # the crop at t covers t .. t + patch - 1
        hits[offset:offset + positions] += 1
    return hits / positions


def _tile_confined(length: int, tile: int, patch: int) -> np.ndarray:
    """Format 1 along one LR axis: whole tiles from 0 (the rest dropped), a uniform tile, a crop inside it."""
    count = length // tile
    hits = np.zeros(length)
    for k in range(count):
        hits[k * tile:(k + 1) * tile] += _anywhere(tile, patch) / count
    return hits


def _hr_profile(lr_profile: np.ndarray, scale: int, hr_length: int) -> np.ndarray:
    hr = np.zeros(hr_length)
    hr[: lr_profile.size * scale] = np.repeat(lr_profile, scale)
    return hr


def measure(height: int, width: int, tile: int, scale: int, patch: int, multiple: int) -> dict[str, dict]:
    """Figures for one HR image of height x width; `multiple` is lcm(scales) of the store."""
    covered = (height - height % multiple, width - width % multiple)
    profiles = {
        "format 1": [_tile_confined(length // scale, tile // scale, patch) for length in (height, width)],
        "format 2": [_anywhere(length // scale, patch) for length in covered],
        "anywhere": [_anywhere(length // scale, patch) for length in (height, width)],
    }
    margin = patch * scale
    result = {}
    for name, (along_y, along_x) in profiles.items():
        prob = np.outer(_hr_profile(along_y, scale, height), _hr_profile(along_x, scale, width))
        inner = prob[margin:covered[0] - margin, margin:covered[1] - margin]
        shown = prob[: covered[0], : covered[1]]
        result[name] = {
            "reachable": float((prob > 0).mean()),
            "inner_max_over_min": float(inner.max() / inner.min()) if inner.size and inner.min() > 0 else math.inf,
            "std_over_mean": float(shown.std() / shown.mean()),
        }
    return result


def _report(label: str, figures: dict[str, dict]) -> None:
    for name, f in figures.items():
        print(f"{label}  {name:9s} reachable {100 * f['reachable']:6.2f} %   inner max/min "
              f"{f['inner_max_over_min']:8.2f}   std/mean {f['std_over_mean']:.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", help="HR WxH of one image, e.g. 2040x1356")
    parser.add_argument("--store", help="a patch store: every training image at its stored size")
    parser.add_argument("--tile-size", type=int, default=192)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=48, help="LR patch side")
    parser.add_argument("--scales", default="2,3,4", help="the store's scales (for lcm) with --size")
    args = parser.parse_args(argv)
    if args.store:
        from edsr_dist.data.store import PatchStore  # after __main__ put the checkout on the path

        store = PatchStore(args.store, args.scale)
        multiple = math.lcm(*store.scales)
        # The store keeps each image cropped to a multiple of lcm(scales): shares are of that size.
        sizes = [(int(h), int(w)) for h, w in store.train_image_size]
        tiles = store.train_grid[:, 0] * store.train_grid[:, 1]
        positions = np.array([(h // args.scale - args.patch_size + 1) * (w // args.scale - args.patch_size + 1)
                              for h, w in sizes], dtype=float)
        for index, (h, w) in enumerate(sizes):
            _report(f"image {index:3d} {w}x{h}", measure(h, w, store.tile_size, args.scale, args.patch_size, multiple))
        # Anchors are uniform over tiles, so an image is drawn in proportion to its tile count; a crop anywhere
        # in the data set would draw it in proportion to its number of crop positions.
        ratio = (tiles / tiles.sum()) / (positions / positions.sum())
        print(f"image weight (share of crops) / (share of crop positions): min {ratio.min():.3f}, "
              f"max {ratio.max():.3f}")
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    multiple = math.lcm(*(int(s) for s in args.scales.split(",")))
    _report(f"{width}x{height}", measure(height, width, args.tile_size, args.scale, args.patch_size, multiple))
    return 0


if __name__ == "__main__":
    # Run from a source checkout without installing: put the repository root first on the path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
