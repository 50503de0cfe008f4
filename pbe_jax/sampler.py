"""The guided Paint-by-Example sampling loop: one `lax.scan` over the scheduler's steps.

Each step does what diffusers' `PaintByExamplePipeline.__call__` (PBE_SPEC 5.3) and the official
`plms.py` do: UNet input `[x_t | masked-image latents | mask]` (4 + 4 + 1 channels, in that
order), classifier-free guidance `e = e_u + s (e_c - e_u)` with both halves in one 2B-batch call,
and no CFG at all when s == 1. The whole loop is traced once per (shapes, scheduler, CFG on/off),
with no host round trip per step. It is traced inside the one jitted edit function
(`pbe_jax.inference.edit_function`), which gives it the UNet with its params as arguments.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pbe_jax.schedulers import Scheduler

# eps_fn(unet_in [N, h, w, 9], t float32 [N], context [N, S, D]) -> eps [N, h, w, 4]
EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _cfg_enabled(guidance_scale) -> bool:
    """CFG is skipped only for a concrete scale of exactly 1 (as `do_classifier_free_guidance`);
    a traced scale cannot be tested, so it keeps both halves."""
    if isinstance(guidance_scale, jax.core.Tracer):
        return True
    return float(guidance_scale) != 1.0


def guided_sample(eps_fn: EpsFn, scheduler: Scheduler, latents: jax.Array,
                  masked_latents: jax.Array, mask: jax.Array, cond: jax.Array,
                  uncond: jax.Array, guidance_scale: float | jax.Array,
                  rng: jax.Array | None = None, *,
                  batch_sharding: NamedSharding | None = None) -> jax.Array:
    """Denoise `latents` to x0 latents with classifier-free guidance; traceable under `jax.jit`.

    Args:
      eps_fn: the UNet, `eps_fn(unet_in [N,h,w,9], t [N] float32, context [N,S,D]) -> [N,h,w,4]`.
      scheduler: from `make_scheduler`; static (hashable).
      latents: initial noise x_T ~ N(0, I) `[B, h, w, 4]`; scaled here by
        `scheduler.init_noise_sigma`, as diffusers' `prepare_latents` does.
      masked_latents: VAE latents of the masked image `[B, h, w, 4]`.
      mask: `[B, h, w, 1]`, 1 = keep, 0 = region to paint (PbE polarity).
      cond: reference embedding `[B, S, D]` (PbE: S = 1, D = 768).
      uncond: the learned unconditional vector, `[1, S, D]` or `[B, S, D]`.
      guidance_scale: s; a Python float equal to 1.0 drops the unconditional half (B-batch calls).
      rng: PRNG key; split into one key per step for stochastic schedulers (DDIM eta > 0).
      batch_sharding: if given, re-asserted on the latents every step (data-parallel sampling).

    Returns:
      x0 latents `[B, h, w, 4]` in latents.dtype (divide by the VAE scaling factor to decode).
    """
    b = latents.shape[0]
    if masked_latents.shape[:-1] != latents.shape[:-1] or mask.shape != latents.shape[:-1] + (1,):
        raise ValueError(f"latents {latents.shape}, masked_latents {masked_latents.shape} and mask "
                         f"{mask.shape} must be [B,h,w,4], [B,h,w,4], [B,h,w,1]")
    if scheduler.stochastic and rng is None:
        raise ValueError(f"{type(scheduler).__name__}(eta={scheduler.eta}) is stochastic: pass rng")
    cfg = _cfg_enabled(guidance_scale)
    dtype = latents.dtype
    # The masked image and mask are the same in both CFG halves (only the context differs).
    spatial = jnp.concatenate([masked_latents.astype(dtype), mask.astype(dtype)], axis=-1)
    if cfg:
        # [1, 1, D] (broadcast over the tokens) or [1, S, D], as the conditioner defines it
        uncond = jnp.broadcast_to(uncond, (b,) + cond.shape[1:]).astype(cond.dtype)
        context = jnp.concatenate([uncond, cond], axis=0)  # [2B, S, D], uncond first as diffusers
        spatial = jnp.concatenate([spatial, spatial], axis=0)  # [2B, h, w, 5]
        guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    else:
        context = cond
    timesteps = jnp.asarray(scheduler.timesteps, jnp.float32)
    n = scheduler.num_steps

    def constrain(x):
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    def body(carry, xs):
        x, state = carry
        i, key = xs
        x = constrain(x)
        x_in = scheduler.scale_model_input(x, i)
        if cfg:
            x_in = jnp.concatenate([x_in, x_in], axis=0)
        unet_in = jnp.concatenate([x_in, spatial], axis=-1)  # [N, h, w, 4 + 4 + 1]
        t = jnp.broadcast_to(timesteps[i], (unet_in.shape[0],))
        eps = eps_fn(unet_in, t, context).astype(jnp.float32)
        if cfg:
            e_u, e_c = eps[:b], eps[b:]
            eps = e_u + guidance_scale * (e_c - e_u)
        x, state = scheduler.step(state, eps.astype(dtype), i, x, rng=key)
        return (constrain(x), state), None

    x = constrain(latents * jnp.asarray(scheduler.init_noise_sigma, dtype))
    keys = jax.random.split(rng, n) if rng is not None else None
    (x, _), _ = jax.lax.scan(body, (x, scheduler.init_state(x)), (jnp.arange(n), keys))
    return x
