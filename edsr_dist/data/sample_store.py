"""The embedded sample store: built offline, in seconds, from the photos scikit-image ships in its wheel.

It exists so that training, evaluation and the tests run anywhere without downloading DIV2K. It is far too small
to train a useful model; it only exercises the whole pipeline with real photographs.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import skimage.data

from edsr_dist.data.builder import SourceFolder, SourceImage, write_store
from edsr_dist.data.store import FORMAT_VERSION, store_info
from edsr_dist.errors import UserError
from edsr_dist.locations import cache_root

SAMPLE_TILE_SIZE = 144  # divisible by 2, 3 and 4
SAMPLE_SCALES = (2, 3, 4)
SAMPLE_DEGRADATION = "bicubic-pil"

# The train/valid split, by scene: (scene, split, images as scikit-image data names). All images of a scene go
# to the same side, so no validation scene is ever seen in training. Change the split here and nowhere else.
# skimage.data.cat() returns the very same photo as chelsea(), so it is not listed a second time.
SAMPLE_SCENES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("chelsea", "valid", ("chelsea",)),
    ("coffee", "valid", ("coffee",)),
    ("astronaut", "valid", ("astronaut",)),
    ("rocket", "train", ("rocket",)),
    ("hubble_deep_field", "train", ("hubble_deep_field",)),
    ("immunohistochemistry", "train", ("immunohistochemistry",)),
    ("retina", "train", ("retina",)),
    ("colorwheel", "train", ("colorwheel",)),
    ("motorcycle", "train", ("motorcycle_left", "motorcycle_right")),
    # Grey photos and textures, replicated to RGB: extra training material only.
    ("camera", "train", ("camera",)),
    ("brick", "train", ("brick",)),
    ("grass", "train", ("grass",)),
    ("gravel", "train", ("gravel",)),
    ("coins", "train", ("coins",)),
    ("moon", "train", ("moon",)),
)


def sample_split() -> tuple[list[str], list[str]]:
    """(training image names, validation image names) in the order they are stored."""
    train = [name for _, split, names in SAMPLE_SCENES if split == "train" for name in names]
    valid = [name for _, split, names in SAMPLE_SCENES if split == "valid" for name in names]
    return train, valid


def load_sample_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as uint8 HWC RGB."""
    try:
        if name in ("motorcycle_left", "motorcycle_right"):
            left, right, _ = skimage.data.stereo_motorcycle()
            image = left if name == "motorcycle_left" else right
        else:
            image = getattr(skimage.data, name)()
    except (AttributeError, OSError, ValueError, ImportError) as exc:
        raise UserError(
            f"scikit-image sample image {name!r} cannot be loaded offline ({exc}); edit SAMPLE_SCENES in "
            f"edsr_dist/data/sample_store.py or reinstall scikit-image"
        ) from None
    image = np.asarray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise UserError(f"scikit-image sample image {name!r} is {image.dtype}, not uint8; remove it from SAMPLE_SCENES")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def build_sample_store(
    out: str,
    scales: Sequence[int] = SAMPLE_SCALES,
    tile_size: int = SAMPLE_TILE_SIZE,
    progress: bool = False,
) -> dict[str, object]:
    """Build the sample store at `out` (atomically). Returns the builder's summary."""
    def source(name: str) -> SourceImage:
        image = load_sample_image(name)
        return SourceImage(name, (image.shape[0], image.shape[1]), lambda: image)

    train_names, valid_names = sample_split()
    where = f"scikit-image {skimage.__version__} bundled photos"
    return write_store(
        out,
        [SourceFolder("train", where, [source(n) for n in train_names]),
         SourceFolder("valid", where, [source(n) for n in valid_names])],
        scales,
        tile_size,
        degradation=SAMPLE_DEGRADATION,
        source=f"scikit-image {skimage.__version__} bundled sample photos (edsr_dist.data.sample_store.SAMPLE_SCENES)",
        resize_method=SAMPLE_DEGRADATION,
        progress=progress,
    )


def default_sample_store_path(cache_dir: str = "") -> str:
    """Where the sample store is cached: in `cache_dir` or the cache folder (locations.cache_root)."""
    root = cache_root(cache_dir)
    scales = "".join(map(str, SAMPLE_SCALES))
    return os.path.join(root, f"sample_v{FORMAT_VERSION}_t{SAMPLE_TILE_SIZE}_x{scales}.h5")


def ensure_sample_store(path: str | None = None) -> str:
    """Return the path of a usable sample store, building it first when missing or unreadable.

    Safe when several processes call it at once: each writes its own temporary file and renames it into place.
    """
    path = path or default_sample_store_path()
    if os.path.exists(path):
        try:
            store_info(path)
            return path
        except UserError:
            pass  # damaged or from an older format: rebuild below
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    build_sample_store(path)
    return path
