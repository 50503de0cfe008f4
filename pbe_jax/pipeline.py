"""`PaintByExample`: the three networks of Paint by Example plus their scheduler and
preprocessing configs, as one NNX module.

Training splits it into trainable params (UNet, mapper, final LN, proj_out, uncond_vector) and
frozen ones (VAE, CLIP vision tower) with `TRAINABLE` / `FROZEN`; inference calls it.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models.conditioner import PaintByExampleEncoderConfig, PaintByExampleImageEncoder
from pbe_jax.models.unet import UNet2DConditionModel, UNetConfig
from pbe_jax.models.vae import AutoencoderKL, VAEConfig

# The released repo's scheduler: diffusers' converter default (PNDM = PLMS, PBE_SPEC 5.2).
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def default_feature_extractor_config(size: int = 224) -> dict[str, Any]:
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }


def is_frozen(path: tuple) -> bool:
    """VAE and the CLIP vision tower are frozen (PBE_SPEC 1.2-1.3); everything else trains."""
    head = tuple(str(p) for p in path[:2])
    return head[0] == "vae" or head == ("image_encoder", "model")


def TRAINABLE(path, x) -> bool:  # noqa: N802 (an nnx filter, used like a constant)
    return isinstance(x, nnx.Param) and not is_frozen(path)


def FROZEN(path, x) -> bool:  # noqa: N802
    return isinstance(x, nnx.Param) and is_frozen(path)


class PaintByExample(nnx.Module):
    """unet [B,h,w,9]->[B,h,w,4], vae, image_encoder [B,224,224,3]->[B,1,768] + configs."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 image_encoder: PaintByExampleImageEncoder, *,
                 scheduler_config: Mapping[str, Any] | None = None,
                 feature_extractor_config: Mapping[str, Any] | None = None):
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        size = image_encoder.config.vision.image_size
        # Stored as JSON text: static attributes of an NNX module are part of its (hashed)
        # graph definition, which jit uses as a static argument; a dict is unhashable.
        self._scheduler_json = json.dumps(dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG), sort_keys=True)
        self._feature_extractor_json = json.dumps(
            dict(feature_extractor_config or default_feature_extractor_config(size)), sort_keys=True)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """diffusers `scheduler/scheduler_config.json` (a fresh copy)."""
        return json.loads(self._scheduler_json)

    @property
    def feature_extractor_config(self) -> dict[str, Any]:
        """transformers `feature_extractor/preprocessor_config.json` (a fresh copy)."""
        return json.loads(self._feature_extractor_json)

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any], *, seed: int = 0, dtype=jnp.float32,
                          param_dtype=jnp.float32, attention_impl: str = "xla", remat: bool = False,
                          remat_policy: str | None = None, **kw) -> "PaintByExample":
        """Random init from `{'unet': {...}, 'vae': {...}, 'image_encoder': {...}}` (diffusers /
        transformers config.json fields, e.g. `config.model` of configs/pbe.py)."""
        rngs = nnx.Rngs(seed)
        rt = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        unet = UNet2DConditionModel(UNetConfig.from_dict(dict(model_cfg["unet"])), rngs=rngs, remat=remat,
                                    remat_policy=remat_policy, **rt)
        vae = AutoencoderKL(VAEConfig.from_dict(dict(model_cfg["vae"])), rngs=rngs, **rt)
        enc = PaintByExampleImageEncoder(
            PaintByExampleEncoderConfig.from_dict(dict(model_cfg["image_encoder"])), rngs=rngs, **rt)
        return cls(unet, vae, enc, **kw)

    def __call__(self, source, mask, reference, **kwargs):
        """Paint `reference` into the white region of `mask` on `source`; arguments and return
        values in `pbe_jax.inference.edit` (num_inference_steps=50, guidance_scale=5.0,
        scheduler='plms', seed=0, num_images_per_prompt=1, latents=None, masked_latents='sample',
        paste_back=False, reference_preprocess='squash', output_type='pil')."""
        from pbe_jax.inference import edit  # noqa: PLC0415 (inference imports this module)

        return edit(self, source, mask, reference, **kwargs)

    def configs(self) -> dict[str, Any]:
        return {
            "unet": self.unet.config.to_dict(),
            "vae": self.vae.config.to_dict(),
            "image_encoder": self.image_encoder.config.to_dict(),
            "scheduler": copy.deepcopy(self.scheduler_config),
            "feature_extractor": copy.deepcopy(self.feature_extractor_config),
        }

    # -- weights: load from / save to diffusers repositories and orbax checkpoints -------------
    # (pbe_jax.convert.load / pbe_jax.convert.orbax_io hold the format logic.)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        variant: str | None = None, revision: str | None = None,
                        attention_impl: str = "xla", remat: bool = False,
                        remat_policy: str | None = None, allow_missing=(), place=None,
                        use_ema: bool = False, model_config: Mapping[str, Any] | None = None,
                        seed: int = 0, return_report: bool = False):
        """Load a diffusers Paint-by-Example repository (local dir or Hub id, e.g.
        `Fantasy-Studio/Paint-by-Example`; safetensors or .bin; `variant='fp16'`), or a pbe_jax
        orbax checkpoint (a params checkpoint, a training workdir or one of its steps).

        `dtype` is the compute dtype, `param_dtype` the params' (fp16/bf16 weights are cast to
        it). `place(path, array)` puts each param on devices. `use_ema` picks a training
        checkpoint's EMA params. `allow_missing` globs (`unet.conv_in.*`) accept absent params,
        which keep their initial values (seeded by `seed`). Returns the model, or
        (model, PipelineReport).
        """
        from pbe_jax.convert.load import load_pipeline  # noqa: PLC0415 (convert imports this module)

        fmt = "orbax" if _is_orbax_dir(path_or_hub_id) else "diffusers"
        return load_pipeline(fmt, path_or_hub_id, variant=variant, revision=revision, dtype=dtype,
                             param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
                             remat_policy=remat_policy, allow_missing=allow_missing, place=place,
                             use_ema=use_ema, model_config=model_config, seed=seed,
                             return_report=return_report)

    def save_pretrained(self, path: str, *, dtype=None, variant: str | None = None,
                        format: str = "diffusers", progress: bool = False) -> str:  # noqa: A002
        """Write a diffusers repository (`format='diffusers'`: model_index.json, unet/, vae/,
        image_encoder/, scheduler/, feature_extractor/; every folder loads with its own diffusers /
        transformers class) or an orbax params checkpoint (`format='orbax'`). `dtype` ('fp16',
        'bf16', np.float16, ...) casts the saved tensors; `variant` names diffusers weight files."""
        from pbe_jax.convert import load, orbax_io  # noqa: PLC0415
        from pbe_jax.models.hub import cast_dtype  # noqa: PLC0415

        np_dtype = None if dtype is None else np.dtype(cast_dtype(dtype))
        if format == "diffusers":
            return load.save_diffusers(self, path, dtype=np_dtype, variant=variant, progress=progress)
        if format == "orbax":
            if variant:
                raise ValueError("variant names diffusers weight files; an orbax checkpoint has none")
            return orbax_io.save_orbax(self, path, dtype=np_dtype, progress=progress)
        raise ValueError(f"save_pretrained: unknown format {format!r}; use 'diffusers' or 'orbax'")


def _is_orbax_dir(path: str) -> bool:
    """A local pbe_jax orbax checkpoint: params checkpoint, training step, checkpoints/ or workdir."""
    if not os.path.isdir(path) and "://" not in path:
        return False
    from pbe_jax.convert import orbax_io  # noqa: PLC0415

    try:
        orbax_io.locate(path)
    except FileNotFoundError:
        return False
    return True

