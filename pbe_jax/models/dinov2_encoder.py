"""The `dinov2` conditioner (configs/pbe.py `conditioner=dinov2`): AnyDoor's ID tokens.

    reference [B, 224, 224, 3] (DINOv2-normalised: ImageNet mean / std)
      -> DINOv2 tower (`model`, models/dinov2.py)  -> class + patch tokens [B, 1 + N, Dt]  (frozen)
      -> proj_out (Linear Dt -> the UNet's cross-attention width) -> context [B, 1 + N, D]  (trained)

plus `uncond_vector` [1, 1, D] (learned, broadcast over the tokens), as the CLIP conditioner's.
Register tokens of a with-registers tower are dropped (AnyDoor feeds `x_norm_clstoken` and
`x_norm_patchtokens`). The reference is preprocessed as DINOv2's image processor
(BitImageProcessor: shortest edge 256, centre crop 224, ImageNet mean / std); `reference_size`
is that crop (the tower resamples its position table to the input's grid).

config.json: the tower's transformers fields plus `proj_size` and `reference_size`, with
`architectures: ["Dinov2ImageEncoder"]`; parameter paths `model.*` (the transformers checkpoint
keys of the tower), `proj_out.{weight,bias}`, `uncond_vector`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.dinov2 import (
    DINOV2_CROP,
    DINOV2_MEAN,
    DINOV2_RESIZE,
    DINOV2_STD,
    Dinov2Config,
    Dinov2Model,
    checkpoint_state_dict,
    dinov2_class,
)
from pbe_jax.models.exemplar import ExemplarEncoder, ReferencePreprocess, register_conditioner
from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.registry import register

# The towers `sd-init` takes with `conditioner=dinov2` (`tower=` argument): transformers config
# fields and the Hub repo. AnyDoor uses ViT-g/14.
DINOV2_TOWERS = {
    f"dinov2_{size}": (getattr(Dinov2Config, f"vit_{abbr}14")().to_dict(), f"facebook/dinov2-{name}")
    for size, abbr, name in (("s14", "s", "small"), ("b14", "b", "base"), ("l14", "l", "large"),
                             ("g14", "g", "giant"))
}


@dataclasses.dataclass(frozen=True)
class Dinov2EncoderConfig:
    """The tower's `Dinov2Config`, the context width `proj_size` and the reference side."""

    tower: Dinov2Config = dataclasses.field(default_factory=Dinov2Config.vit_g14)
    proj_size: int = 1024
    reference_size: int = DINOV2_CROP

    ARCHITECTURE = "Dinov2ImageEncoder"

    @property
    def hidden_size(self) -> int:
        return self.tower.hidden_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Dinov2EncoderConfig":
        raw = dict(raw)
        proj = raw.pop("proj_size", None)
        if proj is None:
            raise ValueError("Dinov2ImageEncoder config: proj_size (the context width, the UNet's "
                             "cross_attention_dim) is missing")
        size = raw.pop("reference_size", DINOV2_CROP)
        raw.pop("architectures", None)  # ours; the tower's class follows its model_type
        return cls(tower=Dinov2Config.from_dict(raw), proj_size=int(proj), reference_size=int(size))

    def to_dict(self) -> dict[str, Any]:
        d = self.tower.to_dict()
        d.update(proj_size=self.proj_size, reference_size=self.reference_size,
                 architectures=[self.ARCHITECTURE])
        return d


@register("pbe_jax")
@register_conditioner("dinov2")
class Dinov2ImageEncoder(ExemplarEncoder, PretrainedMixin, nnx.Module):
    """DINOv2 class + patch tokens -> Linear -> context [B, 1 + N, proj_size]."""

    config_class = Dinov2EncoderConfig
    WEIGHTS_NAMES = ("model", "diffusion_pytorch_model")
    FROZEN_PARTS = ("model",)
    TOWER_CLASS = Dinov2Model  # load_config reads either DINOv2 model_type
    TOWERS = DINOV2_TOWERS
    DEFAULT_TOWER = "dinov2_g14"

    def __init__(self, config: Dinov2EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", remat: bool = False):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.model = dinov2_class(config.tower)(config.tower, rngs=rngs, attention_impl=attention_impl,
                                                remat=remat, **kw)
        self.proj_out = layers.linear(config.hidden_size, config.proj_size, rngs,
                                      axes=(ax.EMBED, ax.MLP), **kw)
        self.uncond_vector = nnx.Param(
            jax.random.normal(rngs.params(), (1, 1, config.proj_size), param_dtype),
            out_sharding=(None, None, ax.EMBED))
        self.set_preprocess(None)

    @classmethod
    def rename_legacy_keys(cls, state_dict):
        """transformers 5's in-memory tower names -> the checkpoint's (models/dinov2.py)."""
        return checkpoint_state_dict(state_dict)

    @classmethod
    def default_preprocess(cls, config: Dinov2EncoderConfig) -> ReferencePreprocess:
        """DINOv2's image processor (shortest edge 256 -> crop 224 for the released towers)."""
        size = config.reference_size
        edge = DINOV2_RESIZE if size == DINOV2_CROP else size
        return ReferencePreprocess(size=size, mean=DINOV2_MEAN, std=DINOV2_STD,
                                   processor_type="BitImageProcessor", shortest_edge=edge)

    @classmethod
    def with_tower(cls, tower_config: Dinov2Config, proj_size: int, expected=None) -> Dinov2EncoderConfig:
        size = expected.reference_size if expected is not None else DINOV2_CROP
        return Dinov2EncoderConfig(tower=tower_config, proj_size=proj_size, reference_size=size)

    @classmethod
    def config_entry(cls, base: dict, proj_size: int) -> dict:
        """`base`: a DINOv2 tower's transformers config fields (DINOV2_TOWERS, or the demo's)."""
        return {**base, "proj_size": proj_size, "architectures": (Dinov2EncoderConfig.ARCHITECTURE,)}

    def tower(self, pixel_values: jax.Array) -> jax.Array:
        """Normalised pixels -> class + patch tokens [B, 1 + N, Dt]. No stop_gradient: the param
        split freezes the tower (its params are step inputs), and `train_image_tower` (the demo)
        really trains it."""
        return self.model.class_and_patch_tokens(pixel_values)

    def project(self, tokens: jax.Array) -> jax.Array:
        return self.proj_out(tokens.astype(self.dtype))

    def uncond(self, dtype=None) -> jax.Array:
        return self.uncond_vector[...].astype(dtype or self.dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.project(self.tower(pixel_values))
