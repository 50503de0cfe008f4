"""The exemplar-encoder contract: what every caller (loss, sampling, data, export, sd-init) asks
of a conditioner instead of assuming CLIP, and the registry of conditioners.

A conditioner is the `image_encoder` of a Paint-by-Example model. It splits in two:

    reference [B, R, R, 3] in [0, 1] (un-normalised: the batch and the host never normalise)
      -> normalize (the model's own feature_extractor_config: image_mean / image_std)
      -> tower(pixel_values) -> tokens [B, N, Dt]          frozen (`FROZEN_PARTS`)
      -> project(tokens)     -> context [B, N', D]         trainable (everything else)

plus `uncond(dtype)`, its learned classifier-free-guidance context (`[1, N', D]`, or `[1, 1, D]`
broadcast over the tokens). `condition(reference, drop)` is the training-time composition (rows
where `drop` is True get the unconditional context); `encode(reference)` the sampling one.

Adding a conditioner is one class and one config entry:

    @register("pbe_jax")                 # loadable by its config's class name
    @register_conditioner("my_tokens")   # selectable by configs/pbe.py:...,conditioner=my_tokens
    class MyEncoder(ExemplarEncoder, PretrainedMixin, nnx.Module):
        config_class = MyEncoderConfig   # to_dict() writes architectures=["MyEncoder"]
        def __init__(self, config, *, rngs, **runtime): self.model = ...; self.proj = ...
        def tower(self, pixel_values): ...    # [B, R, R, 3] normalised -> [B, N, Dt]
        def project(self, tokens): ...        # -> [B, N, D]
        def uncond(self, dtype=None): ...     # -> [1, N or 1, D]
        @classmethod
        def config_entry(cls, base, proj_size): ...  # config.model.image_encoder for a variant

The registry is keyed twice: by the config's class name (models/registry.py, how loaders find
the class) and by the conditioner's short name (`CONDITIONERS`, the `conditioner=` argument).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# --------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ReferencePreprocess:
    """What the tower expects of a reference: `size` x `size` pixels, normalised with `mean` /
    `std` (per channel, on [0, 1] values). Read from (and written as) a transformers image
    processor config (`feature_extractor/preprocessor_config.json`); hashable, so an encoder can
    hold it as a static attribute."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: bool = True
    processor_type: str = "CLIPImageProcessor"
    resample: int = 3  # PIL bicubic
    shortest_edge: int | None = None  # the resize before the crop (CLIP: = size; DINOv2: 256)

    @classmethod
    def from_feature_extractor_config(cls, raw: Mapping[str, Any]) -> "ReferencePreprocess":
        """From a transformers image processor config (CLIPImageProcessor, BitImageProcessor...)."""
        raw = dict(raw)
        for key in ("image_mean", "image_std"):
            if key not in raw or len(raw[key]) != 3:
                raise ValueError(f"feature_extractor config: {key} missing or not 3 values: "
                                 f"{raw.get(key)!r}")
        crop = bool(raw.get("do_center_crop", True))
        edge = _side(raw.get("size"), "size")
        size = _side(raw.get("crop_size"), "crop_size") if crop and raw.get("crop_size") else edge
        if size is None:
            raise ValueError(f"feature_extractor config names no size / crop_size: {sorted(raw)}")
        return cls(size=int(size), mean=tuple(float(v) for v in raw["image_mean"]),
                   std=tuple(float(v) for v in raw["image_std"]), center_crop=crop,
                   processor_type=str(raw.get("image_processor_type", "CLIPImageProcessor")),
                   resample=int(raw.get("resample", 3)), shortest_edge=edge)

    def to_feature_extractor_config(self) -> dict[str, Any]:
        edge = self.shortest_edge or self.size
        return {
            "crop_size": {"height": self.size, "width": self.size},
            "do_center_crop": self.center_crop,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.mean),
            "image_processor_type": self.processor_type,
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": edge},
        }


def _side(v, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    v = dict(v)
    if "shortest_edge" in v:
        return int(v["shortest_edge"])
    if "height" in v and "width" in v:
        if v["height"] != v["width"]:
            raise ValueError(f"feature_extractor config: {what} {v} is not square")
        return int(v["height"])
    raise ValueError(f"feature_extractor config: cannot read {what} {v!r}")


def to_unit(reference: jax.Array) -> jax.Array:
    """uint8 [.., 3] in 0..255 -> float32 in [0, 1]; floats are taken to be in [0, 1] already."""
    if reference.dtype == jnp.uint8:
        return reference.astype(jnp.float32) / 255.0
    return reference.astype(jnp.float32)


def normalize(reference: jax.Array, mean, std) -> jax.Array:
    """The one normalisation formula: [0, 1] (or uint8) [B, R, R, 3] -> (x - mean) / std, fp32."""
    return (to_unit(reference) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --------------------------------------------------------------------------- the contract


class ExemplarEncoder:
    """Mixin of every conditioner (see the module docstring). Subclasses define `tower`,
    `project`, `uncond`, `default_preprocess` and `config_entry`; the rest is shared."""

    # Short name (configs/pbe.py `conditioner=`), set by `register_conditioner`.
    CONDITIONER: str = ""
    # Top-level attributes that hold the frozen tower (the rest of the encoder trains).
    FROZEN_PARTS: tuple[str, ...] = ("model",)
    # True when diffusers' PaintByExamplePipeline can hold the encoder (export --to diffusers/ldm).
    DIFFUSERS_COMPATIBLE: bool = False
    # The pretrained tower's class (a PretrainedMixin: load_config / WEIGHTS_NAMES / IGNORE_KEYS),
    # held under `model.`: sd-init loads it from config.init_from.clip (a dir / Hub id).
    TOWER_CLASS: type | None = None

    preprocess: ReferencePreprocess

    @classmethod
    def default_preprocess(cls, config) -> ReferencePreprocess:
        raise NotImplementedError

    def set_preprocess(self, feature_extractor_config: Mapping[str, Any] | None) -> None:
        """Take the model's own feature_extractor_config (None: the class default)."""
        self.preprocess = (type(self).default_preprocess(self.config) if not feature_extractor_config
                           else ReferencePreprocess.from_feature_extractor_config(feature_extractor_config))

    @classmethod
    def config_entry(cls, base: dict, proj_size: int) -> dict:
        """`config.model.image_encoder` (config.json fields) for a config variant: `base` is
        the variant's tower description, `proj_size` the UNet's cross-attention width."""
        raise NotImplementedError

    @classmethod
    def with_tower(cls, tower_config, proj_size: int, expected=None):
        """This conditioner's config around a pretrained tower's config (sd-init); `expected`
        (the model config's, or None) gives the fields that are not the tower's."""
        raise NotImplementedError

    @classmethod
    def config_reference_size(cls, raw: Mapping[str, Any]) -> int:
        """The reference side (`config.data.reference_size`) of config.json fields `raw`."""
        return cls.default_preprocess(cls.config_class.from_dict(dict(raw))).size

    @classmethod
    def is_frozen_part(cls, name: str) -> bool:
        return name in cls.FROZEN_PARTS

    @classmethod
    def trainable_filter(cls):
        """nnx filter of the trainable params: `nnx.state(encoder, cls.trainable_filter())`."""
        return nnx.All(nnx.Param, lambda path, _: bool(path) and str(path[0]) not in cls.FROZEN_PARTS)

    def normalize(self, reference: jax.Array) -> jax.Array:
        """[B, R, R, 3] uint8 or [0, 1] -> the tower's input (its mean / std)."""
        return normalize(reference, self.preprocess.mean, self.preprocess.std)

    def encode(self, reference: jax.Array) -> jax.Array:
        """Un-normalised reference [B, R, R, 3] -> context [B, N, D]."""
        return self.project(self.tower(self.normalize(reference)))

    def condition(self, reference: jax.Array, drop: jax.Array | None) -> jax.Array:
        """Training: context [B, N, D] of un-normalised references; rows where `drop` [B] is
        True get the unconditional context (CFG dropout)."""
        ctx = self.encode(reference)
        if drop is None:
            return ctx
        uncond = jnp.broadcast_to(self.uncond(ctx.dtype), ctx.shape)
        return jnp.where(drop[:, None, None], uncond, ctx)


def export_refusal(encoder, target: str) -> str | None:
    """Why `target` ('diffusers' / 'ldm': diffusers' PaintByExamplePipeline or the original
    code) cannot hold this conditioner, or None when it can."""
    if type(encoder).DIFFUSERS_COMPATIBLE:
        return None
    name = type(encoder).CONDITIONER or type(encoder).__name__
    return (f"cannot export a model with the {name!r} conditioner ({type(encoder).__name__}) to "
            f"{target}: diffusers' PaintByExamplePipeline and the original LDM code hold only the "
            "CLIP class-token encoder (one context token from a CLIP tower). Save it with "
            "PaintByExample.save_pretrained(path) (a diffusers-style folder naming pbe_jax's "
            "classes, loaded back by PaintByExample.from_pretrained) or --to orbax.")


# --------------------------------------------------------------------------- registry

CONDITIONERS: dict[str, type] = {}


def register_conditioner(name: str):
    """Class decorator: make an ExemplarEncoder selectable as `conditioner=<name>`."""
    def deco(cls: type) -> type:
        if not issubclass(cls, ExemplarEncoder):
            raise TypeError(f"{cls.__name__} is not an ExemplarEncoder")
        cls.CONDITIONER = name
        CONDITIONERS[name] = cls
        return cls
    return deco


def conditioner_class(name: str) -> type:
    if name not in CONDITIONERS:
        raise ValueError(f"unknown conditioner={name!r}; known: {sorted(CONDITIONERS)}")
    return CONDITIONERS[name]


def frozen_parts() -> frozenset[str]:
    """Every registered conditioner's frozen attribute names (for path-only filters)."""
    return frozenset(p for cls in CONDITIONERS.values() for p in cls.FROZEN_PARTS)
