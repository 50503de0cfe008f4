"""The Paint-by-Example training objective (PBE_SPEC.md section 1.5).

    z   = s * VAE.encode(image).sample()          s = scaling_factor (0.18215)
    z_m = s * VAE.encode(image * mask).sample()   hole pixels are 0 in [-1, 1] space
    m   = bilinear resize of the mask (1 = keep) to the latent grid, not re-binarised
    c   = proj_out(final_ln(mapper(CLIP(reference).pooler_output)))   [B, 1, 768]
          replaced by the learnable `uncond_vector` with prob. p (per batch or per sample)
    x_t = sqrt(a_t) z + sqrt(1 - a_t) eps        noise only on the 4 latent channels
    L   = mean (eps - UNet([x_t | z_m | m], t, c))^2
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pbe_jax.data.batch import normalize_batch
from pbe_jax.schedulers import add_noise


def resize_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, 1] -> [B, h, w, 1] bilinear without antialias (torchvision 0.12 `Resize` on a
    tensor, as the official code), so edge values stay soft."""
    b, _, _, c = mask.shape
    return jax.image.resize(mask, (b, *size, c), method="linear", antialias=False)


def encode_latents(vae, image: jax.Array, masked_image: jax.Array, rng: jax.Array):
    """Frozen VAE, one call on the stacked [2B] batch. Returns (z, z_masked), [B, h, w, C] each."""
    b = image.shape[0]
    post = vae.encode(jnp.concatenate([image, masked_image], axis=0))  # [2B, H, W, 3]
    z = post.sample(rng) * vae.scaling_factor  # [2B, h, w, C]
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    return z[:b], z[b:]


def condition(image_encoder, reference: jax.Array, rng: jax.Array, *, drop_prob: float,
              drop_mode: str) -> jax.Array:
    """Reference [B, R, R, 3] (CLIP-normalised) -> context [B, 1, D] with CFG dropout."""
    pooled = jax.lax.stop_gradient(image_encoder.clip_pooled(reference))  # frozen tower
    ctx = image_encoder.project(pooled)  # [B, 1, D], trainable
    if drop_prob <= 0:
        return ctx
    b = ctx.shape[0]
    if drop_mode == "batch":  # official: `random.uniform(0,1) < 0.2` once per forward
        drop = jnp.broadcast_to(jax.random.uniform(rng, ()) < drop_prob, (b,))
    elif drop_mode == "sample":
        drop = jax.random.uniform(rng, (b,)) < drop_prob
    else:
        raise ValueError(f"cond_drop_mode must be 'batch' or 'sample', got {drop_mode!r}")
    uncond = jnp.broadcast_to(image_encoder.uncond_vector.get_value().astype(ctx.dtype), ctx.shape)
    return jnp.where(drop[:, None, None], uncond, ctx)


def pbe_loss(model, batch: dict, rng: jax.Array, alphas_cumprod: jax.Array, *,
             cond_drop_prob: float, cond_drop_mode: str = "batch") -> jax.Array:
    """Scalar fp32 loss of a `PaintByExample` model on a host-contract (uint8) batch."""
    b = normalize_batch(batch)
    r_vae, r_drop, r_t, r_noise = jax.random.split(rng, 4)
    z, z_masked = encode_latents(model.vae, b["image"], b["masked_image"], r_vae)
    mask = resize_mask(b["mask"], z.shape[1:3])  # [B, h, w, 1]
    ctx = condition(model.image_encoder, b["reference"], r_drop, drop_prob=cond_drop_prob,
                    drop_mode=cond_drop_mode)
    n = z.shape[0]
    t = jax.random.randint(r_t, (n,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(r_noise, z.shape, jnp.float32)
    x_t = add_noise(alphas_cumprod, z, noise, t)
    unet_in = jnp.concatenate([x_t, z_masked, mask.astype(jnp.float32)], axis=-1)  # [B, h, w, 9]
    eps = model.unet(unet_in, t, ctx)
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))
