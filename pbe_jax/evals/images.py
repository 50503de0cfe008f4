"""Host-side image loading for the metrics, matching the reference scripts pixel for pixel.

Resizes that the reference code does with PIL are done with PIL here (its antialiased bicubic
has no exact JAX equivalent); everything after that runs on device.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's


def list_images(directory: str) -> list[str]:
    """Image files of a directory (pytorch-fid's extensions), sorted by name."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    files = sorted(f for f in os.listdir(directory) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{directory}: no images with extensions {IMAGE_EXTENSIONS}")
    return [os.path.join(directory, f) for f in files]


def load_rgb_uint8(path: str) -> np.ndarray:
    """`[H, W, 3]` uint8, like pytorch-fid's `Image.open(path).convert('RGB')`."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def clip_pil_resize_crop(img: Image.Image, size: int = 224) -> np.ndarray:
    """The PIL part of OpenAI CLIP's `preprocess` (`clip.load(...)[1]`), exactly: torchvision
    `Resize(size, BICUBIC)` on the PIL image (short side to `size`, long side truncated, PIL's
    antialiased bicubic; untouched when the short side already fits), `CenterCrop(size)`, then
    RGB. Returns `[size, size, 3]` uint8; `ToTensor` + `Normalize` happen on device
    (`pbe_jax.models.clip.clip_preprocess`, an identity resize at this size)."""
    w, h = img.size
    if min(w, h) != size:
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        img = img.resize((new_w, new_h), Image.BICUBIC)
    w, h = img.size
    # torchvision center_crop: int(round(...)) with Python's round-half-to-even.
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def clip_file_preprocess(path: str, size: int = 224) -> np.ndarray:
    """`clip_pil_resize_crop(Image.open(path))`: how the official FID and QS scripts load a file
    (they pass the opened image to CLIP's `preprocess` without converting it first)."""
    with Image.open(path) as img:
        return clip_pil_resize_crop(img, size)


def batched(items: Sequence, batch_size: int, load: Callable[[object], np.ndarray]) -> "Batches":
    """Lazily load `items` in batches of `batch_size` (the last may be shorter) as stacked arrays;
    a `load` returning a tuple of arrays gives a tuple of stacked arrays."""
    return Batches(items, batch_size, load)


class Batches:
    """An iterable of stacked batches with a length (for progress bars)."""

    def __init__(self, items: Sequence, batch_size: int, load: Callable[[object], np.ndarray]):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.load = list(items), batch_size, load

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.items), self.batch_size):
            rows = [self.load(it) for it in self.items[start:start + self.batch_size]]
            if isinstance(rows[0], tuple):
                yield tuple(np.stack(column) for column in zip(*rows))
            else:
                yield np.stack(rows)
