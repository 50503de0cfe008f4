"""How well an autoencoder gives images back: VAE reconstructions and PSNR.

`reconstruct(vae, images)` runs `decode(encode(x).mode())` through one jitted function per
(VAE graph, mesh), cached, so the in-training grids and evals compile it once per run.
`psnr` is the usual 8-bit figure, 10 log10(1 / MSE) on images in [0, 1], per image.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import sharding as shd


@functools.lru_cache(maxsize=8)
def reconstruct_fn(graphdef, mesh):
    """jitted `(vae state, images [N, H, W, 3] in [-1, 1]) -> [N, H, W, 3] in [0, 1]`, the
    output replicated over `mesh` (None: the params' device) so every process can read it."""
    def f(state, image):
        vae = nnx.merge(graphdef, state)
        return jnp.clip(vae.decode(vae.encode(image).mode()) / 2 + 0.5, 0.0, 1.0)
    return jax.jit(f) if mesh is None else jax.jit(f, out_shardings=shd.replicated(mesh))


def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """`images` `[N, H, W, 3]` (uint8, or float in [-1, 1]) -> host float32 `[N, H, W, 3]` in
    [0, 1]: the VAE's reconstruction from the posterior mean, with `vae`'s params where they
    are (placed on a mesh by training, or on one device)."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    graphdef, state = nnx.split(vae)
    mesh = getattr(jax.tree.leaves(state)[0].sharding, "mesh", None)
    out = reconstruct_fn(graphdef, mesh)(state, x)
    return np.asarray(out.addressable_data(0) if mesh is not None else out)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Per-image PSNR in dB of `a` against `b`, both `[N, H, W, 3]` in [0, 1] (uint8 is scaled),
    over the pixels where `where` `[N, H, W]` is True (all when None); an image with no such
    pixel gives NaN, a perfect one 100 dB."""
    a = np.asarray(a, np.float64) / (255.0 if np.asarray(a).dtype == np.uint8 else 1.0)
    b = np.asarray(b, np.float64) / (255.0 if np.asarray(b).dtype == np.uint8 else 1.0)
    sq = np.square(a - b).mean(axis=-1)  # [N, H, W]
    w = np.ones(sq.shape, bool) if where is None else np.asarray(where, bool)
    n = w.sum(axis=(1, 2))
    mse = (sq * w).sum(axis=(1, 2)) / np.maximum(n, 1)
    out = 10 * np.log10(1.0 / np.maximum(mse, 1e-10))  # capped at 100 dB
    return np.where(n > 0, out, np.nan)


def vae_psnr(vae, images: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of `vae`'s reconstructions of uint8 `images` `[N, H, W, 3]`."""
    return float(np.mean(psnr(reconstruct(vae, images), images)))
