"""In-training sample grids: edits of the current batch's first images by the model being
trained, through the one jitted edit function (`pbe_jax.inference`), so the grid compiles once
per run, not at every `sample_every_steps`."""
from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.inference import prepare, run_edit
from pbe_jax.metrics import image_grid


@functools.lru_cache(maxsize=8)
def _head(n: int, mesh):
    """The first n rows of a (sharded) global batch, replicated so every process can read them."""
    return jax.jit(lambda b: {k: v[:n] for k, v in b.items()}, out_shardings=shd.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _reconstruct(graphdef, mesh):
    def f(state, image):  # [N, H, W, 3] in [-1, 1] -> [0, 1]
        vae = nnx.merge(graphdef, state)
        return jnp.clip(vae.decode(vae.encode(image).mode()) / 2 + 0.5, 0.0, 1.0)
    return jax.jit(f) if mesh is None else jax.jit(f, out_shardings=shd.replicated(mesh))


def host_rows(batch: dict, n: int) -> dict[str, np.ndarray]:
    """The first `n` samples of a host or global device batch as host uint8 arrays."""
    leaf = batch["image"]
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        batch = _head(n, sh.mesh)(batch)
        return {k: np.asarray(v.addressable_data(0)) for k, v in batch.items()}
    return {k: np.asarray(v)[:n] for k, v in batch.items()}


def training_samples(model, batch: dict, config) -> np.ndarray | None:
    """A grid (rows: masked source, reference, sample, VAE reconstruction of the source) of
    `config.sample_num` edits of the training `batch` with `model` (its params as training
    placed them); run by every process, returned on each."""
    n = min(int(config.sample_num), batch["image"].shape[0])
    if n <= 0:
        return None
    rows = host_rows(batch, n)
    edits = [m[..., 0] < 127.5 for m in rows["mask"]]  # 255 = keep
    # max_pixels=None: the grid runs at the training resolution, the run's own choice
    inputs = prepare(model, list(rows["image"]), edits, list(rows["reference"]), list(range(n)),
                     max_pixels=None)
    out = run_edit(model, inputs, num_inference_steps=int(config.sample_steps),
                   guidance_scale=float(config.sample_guidance), scheduler=None, masked_latents="mode")
    image = inputs.image
    masked = (image * inputs.keep + 1) / 2
    h = image.shape[1]
    ref = rows["reference"].astype(np.float32) / 255.0
    ref = np.stack([cv2.resize(r, (h, h), interpolation=cv2.INTER_LINEAR) for r in ref])
    # What the frozen VAE makes of the source: the best a sample can look.
    graphdef, state = nnx.split(model.vae)
    mesh = getattr(jax.tree.leaves(state)[0].sharding, "mesh", None)
    recon = _reconstruct(graphdef, mesh)(state, image)
    recon = np.asarray(recon.addressable_data(0) if mesh is not None else recon)
    return image_grid([masked, ref, out, recon])
