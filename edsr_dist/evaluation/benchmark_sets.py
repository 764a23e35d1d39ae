"""The standard SR benchmark sets (Set5, Set14, B100, Urban100, Manga109, DIV2K val) as they are distributed, and
image-by-image scoring spread over ranks, shared by `edsr-dist eval --benchmarks` and the trainer's validation.

Layouts of one set folder (the set's name is the folder's name):
- EDSR-PyTorch (its benchmark.tar; src/data/benchmark.py and srdata.py `_scan`): `HR/<stem>.png` and
  `LR_bicubic/X<s>/<stem>x<s>.png`. DIV2K's own zips use the same pattern with a prefix: `DIV2K_valid_HR/` and
  `DIV2K_valid_LR_bicubic/X<s>/<stem>x<s>.png` (also what BasicSR's DIV2K100 test reads, filename_tmpl '{}x2').
- BasicSR (options/test/EDSR/test_EDSR_Mx2.yml): `GTmod12/<stem>.png` and `LRbicx<s>/<stem>.png` (same names;
  PairedImageDataset's default filename_tmpl '{}').
- A bare folder of HR PNGs.
Where a set has no LR folder for the scale, LR is made from the HR image with the MATLAB-style bicubic
(`data.resize.matlab_style_bicubic_downscale`), as the published LR files were made with MATLAB's imresize.

Images are read as the reference code reads them: grayscale replicated to 3 channels (EDSR-PyTorch
src/data/common.py set_channel with n_channels=3), alpha dropped. HR is cropped to a multiple of the scale
(modcrop) first; EDSR-PyTorch crops HR to LR size x scale (srdata.py get_patch, test branch), the same pixels when
LR is (H // s, W // s), which is checked for every given LR file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edsr_dist.data.images import find_image, image_size, list_images, load_image_rgb
from edsr_dist.data.resize import matlab_style_bicubic_downscale, matlab_style_bicubic_upscale, modcrop
from edsr_dist.errors import UserError
from edsr_dist.evaluation.metrics import score_sr
from edsr_dist.evaluation.protocols import Protocol, get_protocol

# The order papers print their tables in; other sets follow alphabetically.
CANONICAL_ORDER = ("set5", "set14", "b100", "bsds100", "urban100", "manga109", "div2k")
MATLAB_BICUBIC = "MATLAB-style bicubic of the modcropped HR (edsr_dist.data.resize)"
# Keys summed over ranks by `score_shards`, in this order, after the image count.
SCORE_KEYS = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")


@dataclass(frozen=True)
class BenchmarkSet:
    name: str
    folder: Path
    layout: str  # "edsr-pytorch" | "basicsr" | "hr-folder"
    hr_folder: Path
    hr_files: tuple[Path, ...]

    def lr_folder(self, scale: int) -> Path | None:
        """The folder of given LR images at `scale`, None when LR is to be made from HR."""
        if self.layout == "edsr-pytorch":
            prefix = self.hr_folder.name[:-len("HR")]  # "" or "DIV2K_valid_"
            folder = self.folder / f"{prefix}LR_bicubic" / f"X{scale}"
        elif self.layout == "basicsr":
            folder = self.folder / f"LRbicx{scale}"
        else:
            return None
        return folder if folder.is_dir() else None

    def lr_path(self, hr_path: Path, scale: int) -> Path | None:
        folder = self.lr_folder(scale)
        if folder is None:
            return None
        stem = f"{hr_path.stem}x{scale}" if self.layout == "edsr-pytorch" else hr_path.stem
        return find_image(folder, stem) or folder / f"{stem}.png"  # a missing file: _check_lr_size says so

    def lr_source(self, scale: int) -> str:
        folder = self.lr_folder(scale)
        return f"files in {folder}" if folder is not None else MATLAB_BICUBIC

    def check(self, scale: int) -> None:
        """Every given LR file exists and has the size its HR needs, read from the PNG headers only; run on every
        rank before any image is scored, so a bad file stops all ranks alike instead of one of them mid-set."""
        for hr_path in self.hr_files:
            lr_path = self.lr_path(hr_path, scale)
            if lr_path is not None:
                _check_lr_size(lr_path, hr_path, image_size(hr_path), scale)

    def load(self, index: int, scale: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(name, LR, HR) of image `index`, uint8 HWC RGB, HR modcropped."""
        hr_path = self.hr_files[index]
        return hr_path.stem, *load_pair(hr_path, self.lr_path(hr_path, scale), scale)


def _check_lr_size(lr_path: Path, hr_path: Path, hr_size: tuple[int, int], scale: int) -> None:
    if not lr_path.is_file():
        raise UserError(f"LR image {lr_path} for {hr_path} is missing; add it, or remove the LR folder to make LR "
                        "from HR with MATLAB-style bicubic")
    want = (hr_size[0] // scale, hr_size[1] // scale)
    size = image_size(lr_path)
    if size != want:
        raise UserError(f"LR image {lr_path} is {size[1]}x{size[0]} but its HR {hr_path.name} needs "
                        f"{want[1]}x{want[0]} at x{scale}; replace it with the HR image downscaled by {scale}")


def load_pair(hr_path: Path, lr_path: Path | None, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR): HR modcropped to `scale`; LR read from `lr_path` (size checked) or made by MATLAB-style bicubic."""
    hr = np.ascontiguousarray(modcrop(load_image_rgb(hr_path), scale))
    if min(hr.shape[:2]) // scale < 4:
        raise UserError(f"HR image {hr_path} is {hr.shape[1]}x{hr.shape[0]}, too small to evaluate at x{scale}; "
                        "remove it from the set")
    if lr_path is None:
        return matlab_style_bicubic_downscale(hr, scale), hr
    _check_lr_size(lr_path, hr_path, hr.shape[:2], scale)
    return load_image_rgb(lr_path), hr


def _images(folder: Path) -> tuple[Path, ...]:
    """The images of a folder, any format edsr_dist/data/images.py reads (the published sets are PNG)."""
    return tuple(list_images(folder)[0])


def open_set(folder: Path) -> BenchmarkSet | None:
    """The set in `folder` in whichever layout it uses, None when it holds none."""
    if not folder.is_dir():
        return None
    hr_folders = [p for p in folder.iterdir() if p.is_dir() and (p.name == "HR" or p.name.endswith("_HR"))]
    # A DIV2K folder may hold DIV2K_train_HR too: the validation images are the benchmark.
    for sub in sorted(hr_folders, key=lambda p: ("valid" not in p.name.lower(), p.name)):
        files = _images(sub)
        if files:
            return BenchmarkSet(folder.name, folder, "edsr-pytorch", sub, files)
    gt = folder / "GTmod12"
    if gt.is_dir() and _images(gt):
        return BenchmarkSet(folder.name, folder, "basicsr", gt, _images(gt))
    files = _images(folder)
    if files:
        return BenchmarkSet(folder.name, folder, "hr-folder", folder, files)
    return None


def _order(benchmark: BenchmarkSet) -> tuple[int, str]:
    key = benchmark.name.lower()
    return (CANONICAL_ORDER.index(key) if key in CANONICAL_ORDER else len(CANONICAL_ORDER), key)


def find_sets(root: str | Path, names: list[str] | None = None) -> list[BenchmarkSet]:
    """The sets under `root` (each subfolder holding one), or `root` itself when it is a set; `names` picks some,
    case-insensitively, in the order given."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--benchmarks {root} is not a folder; pass the folder holding Set5/, Set14/ ... "
                        "(EDSR-PyTorch's benchmark/ or BasicSR's datasets/)")
    found = [s for s in (open_set(p) for p in sorted(root.iterdir()) if p.is_dir()) if s is not None]
    if not found:
        itself = open_set(root)
        found = [itself] if itself is not None else []
    if not found:
        raise UserError(f"--benchmarks {root} holds no benchmark set (no HR/, GTmod12/ or *.png in its "
                        "subfolders); pass the folder holding Set5/, Set14/ ...")
    found.sort(key=_order)
    if not names:
        return found
    by_name = {s.name.lower(): s for s in found}
    missing = [n for n in names if n.lower() not in by_name]
    if missing:
        raise UserError(f"--sets {','.join(missing)} not found under {root}; it has {', '.join(s.name for s in found)}")
    return [by_name[n.lower()] for n in names]


# ---- scoring ------------------------------------------------------------------------------------------------

def protocol_scores(protocol: Protocol, sr: np.ndarray, lr: np.ndarray, hr: np.ndarray, scale: int) -> dict:
    """PSNR/SSIM of SR and of the bicubic baseline (MATLAB-style bicubic upscaling of LR) under `protocol`."""
    bicubic = matlab_style_bicubic_upscale(lr, scale)
    return {"psnr": protocol.psnr(sr, hr, scale), "ssim": protocol.ssim(sr, hr, scale),
            "bicubic_psnr": protocol.psnr(bicubic, hr, scale), "bicubic_ssim": protocol.ssim(bicubic, hr, scale)}


def score_shards(count: int, rank: int, world_size: int, score_one: Callable[[int], dict], keys: tuple[str, ...],
                 all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 progress=None) -> dict:
    """Each rank scores every world_size-th image; the sums are all-reduced, so every rank returns the means over
    all `count` images (and "images": count). `progress`, if given, is called once per image scored here."""
    sums = torch.zeros(1 + len(keys), dtype=torch.float64)
    for index in range(rank, count, world_size):
        scores = score_one(index)
        sums += torch.tensor([1.0, *(scores[key] for key in keys)], dtype=torch.float64)
        if progress is not None:
            progress()
    # HCCL has no float64 all-reduce; float32 sums of per-image PSNRs still hold about 1e-4 dB.
    reduce_dtype = torch.float32 if device.type == "npu" else torch.float64
    sums = all_reduce_sum(sums.to(device, reduce_dtype)).double().cpu()
    images = max(sums[0].item(), 1.0)
    return {"images": int(round(sums[0].item())), **{key: sums[1 + i].item() / images for i, key in enumerate(keys)}}


# ---- training-time validation on a benchmark set ------------------------------------------------------------

@dataclass
class ValidationSource:
    """What the trainer validates on: `count` images, `load(index)` -> (name, LR, HR), `score(sr, lr, hr)` -> dict
    with `keys`, and `labels` added to the report as they are."""

    count: int
    load: Callable[[int], tuple[str, np.ndarray, np.ndarray]]
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], dict]
    keys: tuple[str, ...]
    labels: dict


def validation_source(cfg, store) -> ValidationSource:
    """The store's validation images, or with `val_benchmark` a benchmark set folder, scored as always (PSNR-Y,
    SSIM-Y, PSNR-RGB, bicubic PSNR-Y) and, with `val_protocol` (paper when only `val_benchmark` is set), also
    `psnr`/`ssim`/`bicubic_*` under that protocol: the numbers `edsr-dist eval --benchmarks ... --protocol` prints."""
    scale = cfg.scale
    if cfg.val_benchmark:
        benchmark = open_set(Path(cfg.val_benchmark))
        if benchmark is None:
            raise UserError(f"val_benchmark {cfg.val_benchmark} holds no benchmark set (HR/, GTmod12/ or *.png); "
                            "pass one set's folder, such as benchmark/Set5")
        available, set_name = len(benchmark.hr_files), benchmark.name

        def load(index: int) -> tuple[str, np.ndarray, np.ndarray]:
            return benchmark.load(index, scale)
    else:
        available, set_name, load = store.num_valid, "store", store.read_valid
        if not available:
            # A mean over nothing would read 0 dB and make the first checkpoint the "best".
            raise UserError(f"patch store {store.path} has no validation images, so training would have nothing to "
                            "report; rebuild it with --valid-count K or --valid-hr-dir DIR, or pass --val-benchmark "
                            "with a benchmark set folder")
    count = available if not cfg.max_val_images else min(cfg.max_val_images, available)
    store_keys = ("psnr_y", "ssim_y", "psnr_rgb", "bicubic_psnr_y")
    protocol_name = cfg.val_protocol or ("paper" if cfg.val_benchmark else "")
    if not protocol_name:
        return ValidationSource(count, load, lambda sr, lr, hr: score_sr(sr, lr, hr, scale), store_keys, {})
    protocol = get_protocol(protocol_name)

    def score(sr, lr, hr):
        return {**score_sr(sr, lr, hr, scale), **protocol_scores(protocol, sr, lr, hr, scale)}

    labels = {"val_set": set_name, "protocol": protocol.name}
    return ValidationSource(count, load, score, store_keys + SCORE_KEYS, labels)
