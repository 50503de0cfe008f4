"""Bilinear resizes that reproduce, tap for tap, the ones the reference metric code uses.

Metric numbers move with the resize (see clean-fid's findings), so each reference is
reproduced exactly rather than approximated with `jax.image.resize` (which antialiases when it
downsamples, unlike both references here):

- `half_pixel`: PyTorch `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`,
  as used by pytorch-fid (input to 299) and by torchvision `T.Resize` on tensors in the
  torchvision of the paper's environment (0.12: no antialias on tensors). Source coordinate
  `(dst + 0.5) * in / out - 0.5`, clamped at 0, computed in float32 like PyTorch's CPU kernel.
- `tf1`: TensorFlow 1.x `tf.image.resize_bilinear(align_corners=False)` as re-implemented by
  torch-fidelity (`interpolate_bilinear_2d_like_tensorflow1x`, method 'slow'): source
  coordinate `dst * in / out`, no half-pixel offset.

Each output pixel mixes two input pixels per axis, so the resize is two gathers and a weighted
sum per axis (cheaper than a dense [out, in] matrix product and the same arithmetic as the
references). Works on numpy arrays (host) and jax arrays (traced) alike.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

MODES = ("half_pixel", "tf1")


class Taps(NamedTuple):
    """For each output index along one axis: input indices `lo`, `hi` and weights `w_lo`, `w_hi`
    (all `[out]`); output = w_lo * in[lo] + w_hi * in[hi]."""

    lo: np.ndarray
    hi: np.ndarray
    w_lo: np.ndarray
    w_hi: np.ndarray


def bilinear_taps(in_size: int, out_size: int, mode: str = "half_pixel") -> Taps:
    """The two-tap bilinear filter along one axis (see the module docstring for `mode`)."""
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {MODES}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize {in_size} -> {out_size}: sizes must be positive")
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "half_pixel":
        if in_size == out_size:  # PyTorch copies exactly when the size is unchanged
            idx = np.arange(out_size)
            return Taps(idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32))
        scale = np.float32(in_size) / np.float32(out_size)
        # PyTorch's CPU kernel evaluates scale * (dst + 0.5) - 0.5 as one float32 fused
        # multiply-add (a single rounding); the float32 product is exact in float64, so this is
        # the same number. Plain float32 arithmetic would move the weights by up to ~1e-5.
        src = (np.float64(scale) * (dst + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0.0))
    else:
        # torch-fidelity: grid * float32(in / out), with the ratio taken in float64 first.
        src = dst * np.float32(in_size / out_size)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w_hi = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    hi = np.minimum(lo + 1, in_size - 1)
    return Taps(lo, hi, (np.float32(1.0) - w_hi).astype(np.float32), w_hi)


def _resize_axis(x, taps: Taps, axis: int, xp):
    shape = [1] * x.ndim
    shape[axis] = -1
    w_lo = xp.asarray(taps.w_lo).reshape(shape)
    w_hi = xp.asarray(taps.w_hi).reshape(shape)
    return xp.take(x, taps.lo, axis=axis) * w_lo + xp.take(x, taps.hi, axis=axis) * w_hi


def resize_bilinear(images, size: tuple[int, int], mode: str = "half_pixel"):
    """Resize float images `[..., H, W, C]` to `[..., size[0], size[1], C]`.

    Rows first, then columns. (Bilinear is separable, so the order only changes rounding; the
    references interpolate both axes in one pass, which agrees to float32 rounding.) A numpy
    input gives a numpy output computed on the host; a jax input stays on device.
    """
    xp = np if isinstance(images, np.ndarray) else jnp
    if images.ndim < 3:
        raise ValueError(f"resize_bilinear expects [..., H, W, C], got shape {tuple(images.shape)}")
    if not xp.issubdtype(images.dtype, xp.floating):
        raise ValueError(f"resize_bilinear expects float images, got dtype {images.dtype}")
    h, w = images.shape[-3], images.shape[-2]
    out = _resize_axis(images, bilinear_taps(h, size[0], mode), images.ndim - 3, xp)
    return _resize_axis(out, bilinear_taps(w, size[1], mode), images.ndim - 2, xp)
