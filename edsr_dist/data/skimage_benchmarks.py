"""Benchmark-shaped folders built from scikit-image's bundled photos, for trying `edsr-dist eval --benchmarks`
without downloading Set5 & co. (and for the tests). Not a benchmark: two small sets of centre crops.

- `sk-photos`: four RGB photos (astronaut, chelsea, coffee, rocket).
- `sk-gray-alpha`: two grayscale photos (camera, coins) and the RGBA scikit-image logo, the cases the real sets
  contain (grayscale images exist in Set14, B100 and Urban100 downloads).
Crops are (12 k + 1) pixels on each side: odd, so every scale needs modcrop, and cropped to the same pixels at
x2, x3, x4 and BasicSR's mod 12. LR images are the MATLAB-style bicubic of the modcropped HR, as the published
LR files were made with MATLAB's imresize.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from edsr_dist.data.resize import matlab_style_bicubic_downscale, modcrop
from edsr_dist.errors import CommandParser, UserError, at_least

SETS = {"sk-photos": ("astronaut", "chelsea", "coffee", "rocket"), "sk-gray-alpha": ("camera", "coins", "logo")}
LAYOUTS = ("edsr-pytorch", "basicsr", "hr-folder")


def _centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top = max((image.shape[0] - height) // 2, 0)
    left = max((image.shape[1] - width) // 2, 0)
    return np.ascontiguousarray(image[top:top + height, left:left + width])


def _rgb(image: np.ndarray) -> np.ndarray:
    """As the evaluation reads it: grayscale replicated, alpha dropped."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_benchmarks(root: str | Path, layout: str = "edsr-pytorch", scales=(2, 3, 4), size: int = 16,
                     sets: dict | None = None) -> Path:
    """Write the sets under `root` in `layout`; crops are (12 size + 1) x (12 (size + 4) + 1) pixels."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(root)
    height, width = 12 * size + 1, 12 * (size + 4) + 1
    for set_name, photos in (sets or SETS).items():
        for photo in photos:
            hr = _centre_crop(getattr(skimage.data, photo)(), height, width)
            if layout == "hr-folder":
                _save(hr, root / set_name / f"{photo}.png")
                continue
            if layout == "basicsr":
                _save(modcrop(hr, 12), root / set_name / "GTmod12" / f"{photo}.png")
            else:
                _save(hr, root / set_name / "HR" / f"{photo}.png")
            for scale in scales:
                lr = matlab_style_bicubic_downscale(_rgb(hr), scale)
                lr = lr[:, :, 0] if hr.ndim == 2 else lr  # a grayscale set ships grayscale LR
                if layout == "basicsr":
                    _save(lr, root / set_name / f"LRbicx{scale}" / f"{photo}.png")
                else:
                    _save(lr, root / set_name / "LR_bicubic" / f"X{scale}" / f"{photo}x{scale}.png")
    return root


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m edsr_dist.data.skimage_benchmarks",
                           description="Write benchmark-shaped folders from scikit-image's photos.")
    parser.add_argument("root", help="output folder (the --benchmarks ROOT of `edsr-dist eval`)")
    parser.add_argument("--layout", choices=LAYOUTS, default="edsr-pytorch")
    parser.add_argument("--size", type=int, default=16, help="crops are (12 size + 1) x (12 (size + 4) + 1) pixels")
    args = parser.parse_args(argv)
    at_least("--size", args.size, 2)
    print(write_benchmarks(args.root, args.layout, size=args.size))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
