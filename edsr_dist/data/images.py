"""Image files as training, evaluation and inference data: which files count as images, how they decode to 8-bit
RGB, the one-line notes about what a folder held besides (files skipped, lossy JPEGs), and network output back to
8-bit pixels (`to_uint8`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edsr_dist.errors import UserError

# Formats Pillow decodes without extra plugins. Order matters where one stem has several files: PNG first.
IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L")
PIXEL_MAX = 255.0


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def load_image_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HWC RGB (grey, palette and alpha images are converted; 16-bit grey keeps its
    top 8 bits rather than being clipped to white)."""
    try:
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT_GREY:
                grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); replace or remove the file") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); replace or remove the file") from None
    return height, width


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files sorted by name, other files that were skipped) of one folder; subfolders are not entered."""
    entries = sorted(p for p in Path(folder).iterdir() if p.is_file())
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]


def find_image(folder: Path, stem: str) -> Path | None:
    """`<folder>/<stem>.<suffix>` for the first image suffix that exists (PNG preferred), else None."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def listing_notes(folder: Path, images: list[Path], skipped: list[Path]) -> list[str]:
    """One line each: the files of `folder` that were not read as images, and whether lossy JPEGs are among the
    images (their compression artefacts become part of the ground truth)."""
    notes = []
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        notes.append(f"note: {folder}: skipped {len(skipped)} file(s) that are not images ({shown}); "
                     f"images are {'/'.join(s[1:] for s in IMAGE_SUFFIXES)}")
    lossy = [p for p in images if p.suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        notes.append(f"note: {folder}: {len(lossy)} of {len(images)} images are JPEG (lossy); their compression "
                     "artefacts become part of the ground truth, so prefer PNG originals where you have them")
    return notes


def no_images_message(flag: str, folder: Path, skipped: list[Path]) -> str:
    found = f" (it holds {len(skipped)} other file(s), e.g. {skipped[0].name})" if skipped else ""
    return (f"{flag} {folder} holds no images{found}; pass a folder of "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")


def collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p))
            if not found:
                raise UserError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)}); pass image files or a "
                                "folder of images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; pass existing image files or folders")
    return files


def open_image(path: Path) -> Image.Image:
    """The decoded image as Pillow reads it (any mode), for `sr` and its exports and benchmarks."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); pass PNG or JPEG files") from None


def read_rgb(path: Path) -> np.ndarray:
    """The image as RGB uint8 (H, W, 3), whatever its mode (alpha dropped: for exports and benchmarks)."""
    return np.array(open_image(path).convert("RGB"))


def to_uint8(sr) -> np.ndarray:
    """Clamp to [0, 255] and round half to even (as torch.round does in the reference code).

    A torch tensor shaped (C, H, W) or (1, C, H, W) is returned as an (H, W, C) image;
    a numpy array keeps its layout.
    """
    if not isinstance(sr, np.ndarray):
        tensor = sr.detach()
        if tensor.dim() == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"to_uint8 takes one image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.dim() != 3:
            raise ValueError(f"to_uint8 expects a (C,H,W) or (1,C,H,W) tensor, got shape {tuple(tensor.shape)}")
        sr = tensor.float().permute(1, 2, 0).cpu().numpy()
    # nan would cast to an arbitrary byte; count it as black, like a diverged network deserves.
    values = np.nan_to_num(np.asarray(sr, dtype=np.float64), nan=0.0)
    return np.clip(np.round(values), 0, PIXEL_MAX).astype(np.uint8)
