"""The Paint-by-Example training objective (PBE_SPEC.md section 1.5).

    z   = s * VAE.encode(image).sample()          s = scaling_factor (0.18215)
    z_m = s * VAE.encode(image * mask).sample()   hole pixels are 0 in [-1, 1] space
    m   = bilinear resize of the mask (1 = keep) to the latent grid, not re-binarised
    c   = conditioner(reference)  (models/exemplar.py; the paper's `clip`:
          proj_out(final_ln(mapper(CLIP(reference).pooler_output))) [B, 1, 768])
          replaced by the learned unconditional context with prob. p (per batch or per sample)
    x_t = sqrt(a_t) z + sqrt(1 - a_t) eps        noise only on the 4 latent channels
    L   = mean (target - UNet([x_t | z_m | m], t, c))^2
          target = eps (`prediction_type` 'epsilon') or
                   v = sqrt(a_t) eps - sqrt(1 - a_t) z ('v_prediction', diffusers' get_velocity)

The noise schedule (betas, `num_train_timesteps`, `prediction_type`) is the model's diffusers
scheduler config, `config.model.scheduler`: `NoiseSchedule.from_config` reads it, the same dict
that sampling and export use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pbe_jax.data.batch import normalize_batch
from pbe_jax.schedulers import add_noise, noise_schedule, velocity

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """What the loss needs of a scheduler config: alphas_cumprod `[T]` and the target."""

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any]) -> "NoiseSchedule":
        """From a diffusers `scheduler_config.json` dict (any supported `_class_name`)."""
        raw = dict(scheduler_config)
        pt = raw.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config: prediction_type={pt!r} cannot be trained "
                             f"(supported: {PREDICTION_TYPES})")
        return cls(noise_schedule(raw), pt)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def target(self, z0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the UNet learns to output at x_t = add_noise(z0, noise, t)."""
        if self.prediction_type == "v_prediction":
            return velocity(self.alphas_cumprod, z0, noise, t)
        if self.prediction_type == "sample":
            return z0
        return noise


class LossDraws(NamedTuple):
    """The random draws of one loss evaluation, normally made from the step's rng. Passing them
    explicitly (tests comparing against the official PyTorch computation) replaces the draws.

    vae_eps [2B, h, w, C] (posterior samples of image then masked image: mean + std * vae_eps),
    drop bool [B] (condition replaced by uncond_vector), t int32 [B], noise [B, h, w, C].
    """

    vae_eps: jax.Array
    drop: jax.Array
    t: jax.Array
    noise: jax.Array


def resize_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, 1] -> [B, h, w, 1] bilinear without antialias (torchvision 0.12 `Resize` on a
    tensor, as the official code), so edge values stay soft."""
    b, _, _, c = mask.shape
    return jax.image.resize(mask, (b, *size, c), method="linear", antialias=False)


def encode_latents(vae, image: jax.Array, masked_image: jax.Array, rng: jax.Array,
                   eps: jax.Array | None = None):
    """Frozen VAE, one call on the stacked [2B] batch. Returns (z, z_masked), [B, h, w, C] each.
    `eps` ([2B, h, w, C]) replaces the posterior's standard-normal draw."""
    b = image.shape[0]
    post = vae.encode(jnp.concatenate([image, masked_image], axis=0))  # [2B, H, W, 3]
    z = post.sample(rng) if eps is None else post.mean + post.std * eps
    z = jax.lax.stop_gradient((z * vae.scaling_factor).astype(jnp.float32))  # [2B, h, w, C]
    return z[:b], z[b:]


COND_DROP_MODES = ("batch", "sample")  # config.train.cond_drop_mode, as draw_drop reads it


def draw_drop(rng: jax.Array, b: int, drop_prob: float, drop_mode: str) -> jax.Array:
    """bool [B]: which samples get the unconditional vector (CFG dropout)."""
    if drop_mode == "batch":  # official: `random.uniform(0,1) < 0.2` once per forward
        return jnp.broadcast_to(jax.random.uniform(rng, ()) < drop_prob, (b,))
    if drop_mode == "sample":
        return jax.random.uniform(rng, (b,)) < drop_prob
    raise ValueError(f"cond_drop_mode must be one of {COND_DROP_MODES}, got {drop_mode!r}")


def condition(image_encoder, reference: jax.Array, drop: jax.Array | None) -> jax.Array:
    """Reference [B, R, R, 3] (un-normalised, [0, 1]) -> context [B, N, D]; rows where `drop`
    is True get the conditioner's learned unconditional context."""
    # The tower is frozen by the train step's param split (its params are step inputs, never
    # differentiated), unless config.train.train_image_tower puts it among the trained params.
    return image_encoder.condition(reference, drop)


def pbe_loss(model, batch: dict, rng: jax.Array, schedule: NoiseSchedule, *,
             cond_drop_prob: float, cond_drop_mode: str = "batch",
             draws: LossDraws | None = None) -> jax.Array:
    """Scalar fp32 loss of a `PaintByExampleModel` on a host-contract (uint8) batch."""
    b = normalize_batch(batch)
    n = b["image"].shape[0]
    r_vae, r_drop, r_t, r_noise = jax.random.split(rng, 4)
    z, z_masked = encode_latents(model.vae, b["image"], b["masked_image"], r_vae,
                                 None if draws is None else draws.vae_eps)
    mask = resize_mask(b["mask"], z.shape[1:3])  # [B, h, w, 1]
    if draws is not None:
        drop = draws.drop
    else:
        # a traced probability (the step's hparams input) is drawn with, whatever its value
        on = isinstance(cond_drop_prob, jax.Array) or cond_drop_prob > 0
        drop = draw_drop(r_drop, n, cond_drop_prob, cond_drop_mode) if on else None
    ctx = condition(model.image_encoder, b["reference"], drop)
    if draws is not None:
        t, noise = draws.t, draws.noise.astype(jnp.float32)
    else:
        t = jax.random.randint(r_t, (n,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(r_noise, z.shape, jnp.float32)
    x_t = add_noise(schedule.alphas_cumprod, z, noise, t)
    unet_in = jnp.concatenate([x_t, z_masked, mask.astype(jnp.float32)], axis=-1)  # [B, h, w, 9]
    out = model.unet(unet_in, t, ctx)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - schedule.target(z, noise, t)))
