"""The batch contract: what the loader yields and what the train step sees.

Host batches (the loader's output; uint8 so that a 512 px batch moves to the device at a
quarter of the float32 bytes, measured in data/bench.py):

  image      [B, H, W, 3]  uint8 0..255   the square crop, H = W = config.data.resolution
  mask       [B, H, W, 1]  uint8 0..255   255 = keep (known), 0 = hole; soft values at the hole
                                          edge from the bilinear resize, as the official code
  reference  [B, R, R, 3]  uint8 0..255   augmented box crop, R = config.data.reference_size,
                                          not normalised

`normalize_batch` (pure jax, jit-able; run on device inside the train step) gives float32:

  image         [B, H, W, 3]  in [-1, 1]
  mask          [B, H, W, 1]  in [0, 1], 1 = keep, 0 = hole (the paper's polarity)
  masked_image  [B, H, W, 3]  image * mask: hole pixels are 0 in [-1, 1] space, exactly the
                              official `inpaint_image = GT * mask`
  reference     [B, R, R, 3]  in [0, 1] (x / 255): the conditioner normalises it with its own
                              mean / std (models/exemplar.py)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HOST_KEYS = ("image", "mask", "reference")
DEVICE_KEYS = ("image", "mask", "masked_image", "reference")


def host_batch_spec(batch_size: int, resolution: int, reference_size: int
                    ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one host batch: what the loader yields and the train step is
    compiled for (`training.state.Setup.abstract_batch`, ahead-of-time compilation)."""
    u8 = np.uint8
    return {
        "image": jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), u8),
        "mask": jax.ShapeDtypeStruct((batch_size, resolution, resolution, 1), u8),
        "reference": jax.ShapeDtypeStruct((batch_size, reference_size, reference_size, 3), u8),
    }


def normalize_batch(batch: dict) -> dict:
    """uint8 host batch -> float32 model inputs (see the module docstring). Extra keys pass
    through unchanged."""
    image = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    mask = batch["mask"].astype(jnp.float32) / 255.0
    reference = batch["reference"].astype(jnp.float32) / 255.0
    out = {k: v for k, v in batch.items() if k not in HOST_KEYS}
    out.update(image=image, mask=mask, masked_image=image * mask, reference=reference)
    return out
