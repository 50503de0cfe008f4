r"""Write a PNG grid of training samples, to check the data pipeline by eye.

  python -m pbe_jax.data.preview --config=configs/pbe.py:demo --out grid.png --num 16
  python -m pbe_jax.data.preview --config=configs/pbe.py:sd15 --config.data.source=coco \
      --config.data.annotations=instances_val2017.json --config.data.images_dir=val2017

Each sample is three tiles: the source crop with the hole outlined in red, the masked image
as the model sees it (`image * mask` in [-1, 1], so the hole is mid-grey), and the augmented
reference. Samples are those of the first training steps (`config.seed`).
"""
from __future__ import annotations

import cv2
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pbe_jax.data.decode import BAD_REASONS
from pbe_jax.data.pipeline import make_dataset


def outline_hole(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0)) -> np.ndarray:
    """`[H, W, 3]` uint8 with the border of the hole (mask < 128) drawn in `colour`."""

    hole = (mask[..., 0] < 128).astype(np.uint8)
    contours, _ = cv2.findContours(hole, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image.copy())
    cv2.drawContours(out, contours, -1, colour, max(1, image.shape[0] // 256))
    return out


def masked_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The model's `masked_image` mapped back to uint8: hole pixels are 0 in [-1, 1], i.e.
    mid-grey."""
    x = (image.astype(np.float32) / 127.5 - 1.0) * (mask.astype(np.float32) / 255.0)
    return np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def sample_tiles(sample: dict, tile: int) -> np.ndarray:
    """[tile, 3 * tile, 3] uint8: outlined source | masked image | reference."""

    image, mask = sample["image"], sample["mask"]
    tiles = [outline_hole(image, mask), masked_view(image, mask), sample["reference"]]
    tiles = [cv2.resize(t, (tile, tile), interpolation=cv2.INTER_LINEAR) for t in tiles]
    return np.concatenate(tiles, axis=1)


def preview_grid(samples: list[dict], *, tile: int = 128, per_row: int = 4, gap: int = 4
                 ) -> np.ndarray:
    """`samples` -> one `[rows * (tile + gap), per_row * (3 * tile + gap), 3]` uint8 grid."""
    rows = -(-len(samples) // per_row)
    cell_h, cell_w = tile + gap, 3 * tile + gap
    grid = np.full((rows * cell_h, per_row * cell_w, 3), 255, np.uint8)
    for i, s in enumerate(samples):
        r, c = divmod(i, per_row)
        grid[r * cell_h:r * cell_h + tile, c * cell_w:c * cell_w + 3 * tile] = sample_tiles(s, tile)
    return grid


def write_preview(data_cfg, out: str, *, num: int = 16, seed: int = 0, tile: int | None = None
                  ) -> dict[str, int]:
    """Render the first `num` samples of `data_cfg` into the PNG `out`; returns the bad-data
    counts met on the way."""

    ds = make_dataset(data_cfg, seed=seed)
    samples = [ds[i] for i in range(num)]
    counts = np.sum([s["bad_counts"] for s in samples], axis=0)
    tile = tile or min(int(data_cfg.resolution), 256)
    grid = preview_grid(samples, tile=max(tile, 96))
    if not cv2.imwrite(out, grid[..., ::-1]):
        raise OSError(f"could not write {out!r}")
    return {r: int(c) for r, c in zip(BAD_REASONS, counts) if c}


def main(argv):
    del argv

    cfg = flags.FLAGS.config
    counts = write_preview(cfg.data, flags.FLAGS.out, num=flags.FLAGS.num,
                           seed=int(cfg.get("seed", 0)), tile=flags.FLAGS.tile)
    print(f"wrote {flags.FLAGS.out} ({flags.FLAGS.num} samples); bad data: {counts or 'none'}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pbe.py:demo",
                                    lock_config=True)
    flags.DEFINE_string("out", "grid.png", "PNG to write")
    flags.DEFINE_integer("num", 16, "number of samples")
    flags.DEFINE_integer("tile", None, "tile side in px (default min(resolution, 256))")
    flags.mark_flags_as_required(["config"])
    app.run(main)
