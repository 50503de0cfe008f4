"""The one attention function of pbe_jax, with a selectable implementation.

Every attention layer of every model calls `dot_product_attention`. The implementation is a
runtime option of the model (`attention_impl`), not a code path per model:

- `'xla'` (default on CPU/TPU): einsum + fp32 softmax. For fp32 inputs the softmax is
  normalised after the value product and the backward pass is flash attention's (it recomputes
  the scores from q and k instead of keeping the [B, H, Lq, Lk] probabilities): the same math,
  2-4x faster on XLA:CPU and no probabilities held for the backward pass.
- `'cudnn'`: `jax.nn.dot_product_attention(implementation='cudnn')`, flash attention on NVIDIA
  GPUs (bf16/fp16 only; falls back to 'xla' for fp32 inputs because cuDNN rejects them).
- `'jax'`: `jax.nn.dot_product_attention` letting JAX choose.
- any name registered with `register_attention` (the hook for a TPU flash/splash kernel, e.g.
  `jax.experimental.pallas.ops.tpu.splash_attention`, which needs head-major layout and
  sequence lengths that are multiples of the block size, so it lives outside the core).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Register `fn(q, k, v, *, scale, upcast) -> out` (all [B, L, H, D]) under `name`."""
    _REGISTRY[name] = fn


def attention_impls() -> tuple[str, ...]:
    """The registered kernel names (`config.attention_impl`, `impl=`)."""
    return tuple(sorted(_REGISTRY))


def _scores(q, k, scale):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Lq, Lk]


def _heads_first(x):  # [B, L, H, D] <-> [B, H, L, D]
    return jnp.swapaxes(x, 1, 2)


def _flash_forward(q, k, v, scale):
    # Head-major [B, H, L, D] operands for every product: XLA:CPU picks much faster kernels for
    # "bhqd,bhkd" than for the [B, L, H, D] forms (the value product 3.4x at [8, 256, 8, 8]).
    # The scale goes on q, not on the [B, H, Lq, Lk] scores.
    qs = _heads_first(q * jnp.asarray(scale, q.dtype))
    k, v = _heads_first(k), _heads_first(v)
    s = jnp.einsum("bhqd,bhkd->bhqk", qs, k)
    m = jnp.max(s, axis=-1, keepdims=True)  # [B, H, Lq, 1]
    p = jnp.exp(s - m)  # unnormalised probabilities
    l = jnp.sum(p, axis=-1, keepdims=True)
    # normalise the [B, H, Lq, D] output, not the [B, H, Lq, Lk] probabilities
    out = jnp.einsum("bhqk,bhkd->bhqd", p, v) / l
    return _heads_first(out), (qs, k, v, out, m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_attention(q, k, v, scale):
    """softmax(q k^T * scale) v, q [B, Lq, H, D], k/v [B, Lk, H, D], with flash attention's
    backward pass: dS = P * (dP - rowsum(dO * O)), P recomputed from q, k and the saved row
    max and sum, so only [B, H, Lq] statistics are kept, never the probabilities."""
    return _flash_forward(q, k, v, scale)[0]


def _flash_bwd(scale, res, d_out):
    qs, k, v, out, m, l = res  # head-major
    d_out = _heads_first(d_out)
    p = jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", qs, k) - m) / l  # [B, H, Lq, Lk]
    dv = jnp.einsum("bhqk,bhqd->bhkd", p, d_out)
    dp = jnp.einsum("bhqd,bhkd->bhqk", d_out, v)
    row = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [B, H, Lq, 1]
    ds = p * (dp - row)  # d(scores)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k) * jnp.asarray(scale, qs.dtype)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qs)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)


_flash_attention.defvjp(_flash_forward, _flash_bwd)


def _xla_attention(q, k, v, *, scale: float, upcast: bool) -> jax.Array:
    # q [B, Lq, H, D], k/v [B, Lk, H, D]
    if k.shape[1] == 1:
        # A softmax over one key is exactly 1: every query reads that key's value (Paint by
        # Example's cross-attention: the context is the one CLIP class token). Same values and
        # gradients as the general path (zero for q and k), none of its work.
        return jnp.broadcast_to(v, (v.shape[0], q.shape[1]) + v.shape[2:])
    if q.dtype == jnp.float32:
        return _flash_attention(q, k, v, scale)
    if upcast:  # diffusers `upcast_attention`: scores in fp32 even for bf16 compute
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    probs = jax.nn.softmax(_scores(q, k, scale).astype(jnp.float32), axis=-1).astype(v.dtype)
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
