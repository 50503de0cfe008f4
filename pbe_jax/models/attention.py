"""The one attention function of pbe_jax, with a selectable implementation.

Every attention layer of every model calls `dot_product_attention`. The implementation is a
runtime option of the model (`attention_impl`), not a code path per model:

- `'xla'` (default on CPU/TPU): einsum + fp32 softmax (for fp32 inputs through
  `jax.nn.dot_product_attention(implementation='xla')`, the same math, faster on XLA:CPU).
- `'cudnn'`: `jax.nn.dot_product_attention(implementation='cudnn')`, flash attention on NVIDIA
  GPUs (bf16/fp16 only; falls back to 'xla' for fp32 inputs because cuDNN rejects them).
- `'jax'`: `jax.nn.dot_product_attention` letting JAX choose.
- any name registered with `register_attention` (the hook for a TPU flash/splash kernel, e.g.
  `jax.experimental.pallas.ops.tpu.splash_attention`, which needs head-major layout and
  sequence lengths that are multiples of the block size, so it lives outside the core).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Register `fn(q, k, v, *, scale, upcast) -> out` (all [B, L, H, D]) under `name`."""
    _REGISTRY[name] = fn


def _xla_attention(q, k, v, *, scale: float, upcast: bool) -> jax.Array:
    # q [B, Lq, H, D], k/v [B, Lk, H, D]
    if q.dtype == jnp.float32:
        # Same math as below; JAX's implementation lowers to HLO that XLA:CPU runs ~25% faster
        # for the whole small UNet (measured), so fp32 (the CPU dtype) takes it.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    if upcast:  # diffusers `upcast_attention`: scores in fp32 even for bf16 compute
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Lq, Lk]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _jax_attention(q, k, v, *, scale: float, upcast: bool, implementation=None) -> jax.Array:
    dtype = v.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    return out.astype(dtype)


def _cudnn_attention(q, k, v, *, scale: float, upcast: bool) -> jax.Array:
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return _xla_attention(q, k, v, scale=scale, upcast=upcast)
    # cuDNN accumulates in fp32 internally, which is what upcast asks for.
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


register_attention("xla", _xla_attention)
register_attention("jax", _jax_attention)
register_attention("cudnn", _cudnn_attention)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "xla",
    scale: float | None = None,
    upcast: bool = False,
) -> jax.Array:
    """Multi-head attention core. q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]."""
    if impl not in _REGISTRY:
        raise ValueError(f"unknown attention_impl {impl!r}; registered: {sorted(_REGISTRY)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _REGISTRY[impl](q, k, v, scale=scale, upcast=upcast)
