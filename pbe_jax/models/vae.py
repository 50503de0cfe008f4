"""The SD VAE: a Flax NNX port of diffusers `AutoencoderKL`, loading and saving its checkpoints.

Paint by Example keeps the SD-1.4 VAE frozen; the train step encodes the image and the masked
image with it, the sampler decodes with it. Images are NHWC in [-1, 1]; latents are NHWC
`[B, H/8, W/8, 4]` for SD-1.x. No latent scaling happens in here: the caller multiplies encoded
latents by `scaling_factor` (0.18215) and divides before decoding, as diffusers' pipelines do.

Param paths equal diffusers' state-dict keys (`encoder.down_blocks.0.resnets.1.conv1.weight`,
`encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, ...), see `vae_blocks`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.layers import activation, conv
from pbe_jax.models.registry import register
from pbe_jax.models.vae_blocks import Decoder, Encoder

Dtype = Any

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` config. Defaults are diffusers' defaults, so a partial
    `config.json` means the same thing here as there."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    # Used by the caller (latent scaling, pipelines' fp32 upcast), not by the network itself.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, types, known in (("down_block_types", self.down_block_types, _DOWN_BLOCK),
                                   ("up_block_types", self.up_block_types, _UP_BLOCK)):
            bad = [t for t in types if t != known]
            if bad:
                raise ValueError(f"VAEConfig.{name}: unsupported block types {bad}; only {known!r}")
            if len(types) != n:
                raise ValueError(f"VAEConfig.{name}: {len(types)} entries, but block_out_channels "
                                 f"{tuple(self.block_out_channels)} has {n}")
        activation(self.act_fn)  # raises ValueError naming the activation if unknown
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig.norm_num_groups: {self.norm_num_groups} does not divide "
                                 f"block_out_channels entry {c}")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig.layers_per_block: must be >= 1, got {self.layers_per_block}")

    @classmethod
    def sd1(cls) -> "VAEConfig":
        """The SD-1.x VAE (the one Paint by Example uses): f=8, 4 latent channels, 83.65 M params."""
        return cls(
            down_block_types=(_DOWN_BLOCK,) * 4,
            up_block_types=(_UP_BLOCK,) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )

    @classmethod
    def from_dict(cls, raw: dict) -> "VAEConfig":
        """From a diffusers `config.json` dict. Metadata keys (`_class_name`, `_diffusers_version`,
        `_name_or_path`, ...) are ignored; an unknown key raises ValueError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"VAEConfig: unsupported config keys {unknown} (known: {sorted(fields)})")
        for k, v in cfg.items():
            if isinstance(v, list):
                cfg[k] = tuple(v)
        return cls(**cfg)

    def to_dict(self) -> dict:
        """A full diffusers `config.json` dict (tuples as lists), loadable by `AutoencoderKL`."""
        out = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD-1.x)."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian(NamedTuple):
    """The VAE posterior N(mean, exp(logvar)), a pytree. Fields are `[B, h, w, latent_channels]`
    fp32 (whatever the compute dtype), `logvar` clipped to [-30, 20] as in diffusers."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments [B, h, w, 2C] (mean channels first, then logvar, as diffusers' chunk on dim 1)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, I) from `rng`. [B, h, w, C] fp32."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(self || N(0, I)) summed over h, w, C. [B]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# Attention names of checkpoints converted before diffusers 0.14 (and of the original SD release).
_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@register("diffusers")
class AutoencoderKL(PretrainedMixin, nnx.Module):
    """diffusers `AutoencoderKL` in NNX. Images [B, H, W, in_channels] in [-1, 1] <-> latents
    [B, H/f, W/f, latent_channels], f = `config.downsample_factor`.

    Params fp32 (`param_dtype`), compute in `dtype`; the posterior and the decoded images are
    returned in fp32. `attention_impl` picks the mid-block attention kernel
    (`pbe_jax.models.attention`); `remat` checkpoints each down/mid/up block.
    """

    config_class = VAEConfig
    WEIGHTS_NAMES = ("diffusion_pytorch_model",)

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, attention_impl: str = "xla", remat: bool = False):
        self.config = config
        self.dtype = dtype
        shared = dict(block_out_channels=tuple(config.block_out_channels),
                      layers_per_block=config.layers_per_block, groups=config.norm_num_groups,
                      act_fn=config.act_fn, mid_block_add_attention=config.mid_block_add_attention,
                      rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                      attention_impl=attention_impl, remat=remat)
        lat = config.latent_channels
        self.encoder = Encoder(in_channels=config.in_channels, latent_channels=lat, **shared)
        self.decoder = Decoder(latent_channels=lat, out_channels=config.out_channels, **shared)
        kw = dict(kernel_size=1, padding=0, dtype=dtype, param_dtype=param_dtype)
        self.quant_conv = conv(2 * lat, 2 * lat, rngs, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, rngs, **kw) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @classmethod
    def rename_legacy_keys(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`...attentions.0.{query,key,value,proj_attn}` -> `...attentions.0.{to_q,to_k,to_v,to_out.0}`
        (what diffusers' `_convert_deprecated_attention_blocks` does). Their 1x1-conv weight shape
        [C, C, 1, 1] is handled by `torch_layout`."""
        out = {}
        for key, value in state_dict.items():
            m = _LEGACY_ATTN.match(key)
            new = f"{m[1]}.{_LEGACY_ATTN_NAMES[m[2]]}.{m[3]}" if m else key
            if new in out:
                raise ValueError(f"checkpoint has both {key!r} and its new name {new!r}")
            out[new] = value
        return out

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels].

        H and W should be multiples of f: diffusers' (0, 1) downsampling pad gives ceil sizes
        otherwise, and the decoder would not return the input size.
        """
        moments = self.encoder(x.astype(self.dtype))  # [B, h, w, 2 * latent_channels]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, latent_channels] (unscaled) -> images [B, h*f, w*f, out_channels], fp32."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 sample_posterior: bool = False) -> jax.Array:
        """Reconstruction: decode(mean) or, with `sample_posterior`, decode(sample(rng))."""
        if sample_posterior and rng is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs an rng")
        posterior = self.encode(x)
        return self.decode(posterior.sample(rng) if sample_posterior else posterior.mode())
