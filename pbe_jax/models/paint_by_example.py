"""`PaintByExampleModel`: the three networks of Paint by Example plus their scheduler and
preprocessing configs, as one NNX module: the container every loader builds and training
splits. (`pbe_jax.PaintByExample` adds `from_pretrained` / `save_pretrained` / `__call__`.)

Training splits it into trainable params (UNet, the conditioner's trained part) and frozen ones
(VAE, the conditioner's tower: its `FROZEN_PARTS`, models/exemplar.py) with the `TRAINABLE` /
`FROZEN` filters (the paper's split); `param_filters(train_image_tower=True)` also trains the
tower (the demo's departure: it has no pretrained tower, see configs/pbe.py).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.clip import CLIP_MEAN, CLIP_STD
from pbe_jax.models.exemplar import ReferencePreprocess, frozen_parts
from pbe_jax.models.registry import COMPONENTS, slot_class


def default_feature_extractor_config(size: int = 224) -> dict[str, Any]:
    """transformers `CLIPImageProcessor` config of the released model, for a `size` px tower
    (other conditioners: `type(encoder).default_preprocess(config)`)."""
    return ReferencePreprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD,
                               shortest_edge=size).to_feature_extractor_config()


def is_frozen(path: tuple, train_image_tower: bool = False) -> bool:
    """VAE and the conditioner's tower (its `FROZEN_PARTS`, PBE_SPEC 1.2-1.3) are frozen;
    everything else trains. `train_image_tower`: the tower trains too."""
    head = tuple(str(p) for p in path[:2])
    tower = len(head) == 2 and head[0] == "image_encoder" and head[1] in frozen_parts()
    return head[0] == "vae" or (tower and not train_image_tower)


def TRAINABLE(path, x) -> bool:  # noqa: N802 (an nnx filter, used like a constant)
    return isinstance(x, nnx.Param) and not is_frozen(path)


def FROZEN(path, x) -> bool:  # noqa: N802
    return isinstance(x, nnx.Param) and is_frozen(path)


def param_filters(train_image_tower: bool = False):
    """(trainable, frozen) nnx filters: the paper's split (`TRAINABLE`, `FROZEN`), or with the
    CLIP vision tower among the trained params (`config.train.train_image_tower`)."""
    if not train_image_tower:
        return TRAINABLE, FROZEN
    return (lambda path, x: isinstance(x, nnx.Param) and not is_frozen(path, True),
            lambda path, x: isinstance(x, nnx.Param) and is_frozen(path, True))


def component_kwargs(component: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention_impl: str = "xla", remat: bool = False,
                     remat_policy: str | None = None) -> dict:
    """Constructor kwargs of one component from the runtime settings: only the UNet (the big
    trained network) takes remat; the VAE and the image encoder run without it."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    if component == "unet":
        kw.update(remat=remat, remat_policy=remat_policy)
    return kw


def _plain(x):
    """ConfigDicts / nested mappings -> plain dicts (lists -> tuples, as the dataclasses hold)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_plain(v) for v in x)
    return x


def parse_component_configs(model_config: Mapping | None) -> dict[str, Any] | None:
    """`{'unet': {...}, 'vae': {...}, 'image_encoder': {...}}` (a ConfigDict, or config.json
    dicts) -> config objects per component, each of its registered class; None stays None."""
    if model_config is None:
        return None
    raw = _plain(model_config)
    missing = [c for c in COMPONENTS if c not in raw]
    if missing:
        raise ValueError(f"model config lacks components {missing}; it has {sorted(raw)}")
    return {c: slot_class(c, raw[c]).config_class.from_dict(dict(raw[c])) for c in COMPONENTS}


def check_unet_inputs(unet_config, vae_config) -> None:
    """A Paint-by-Example UNet takes noisy latents + masked-image latents + the mask: 4 + 4 + 1 =
    9 channels (2 * the VAE's latent channels + 1). A text-to-image UNet (4) would load, convert
    and then fail at sampling with a broadcasting error; refuse it where the pipeline is built."""
    latent = int(getattr(vae_config, "latent_channels", 4))
    want, got = 2 * latent + 1, int(unet_config.in_channels)
    if got != want:
        raise ValueError(
            f"the UNet takes {got} input channels, not {want} ({latent} noisy latents + {latent} "
            f"masked-image latents + 1 mask): it is not a Paint-by-Example UNet. To train one "
            "from a Stable Diffusion (text-to-image or inpainting) checkpoint, start from "
            "`python -m pbe_jax.convert --from sd-init` (config.init_from.format='sd-init'), "
            "which widens conv_in to 9 channels.")


class PaintByExampleModel(nnx.Module):
    """unet [B,h,w,9]->[B,h,w,4], vae, image_encoder (a conditioner, models/exemplar.py:
    reference [B,R,R,3] -> context [B,N,D]; CLIP: [B,224,224,3] -> [B,1,768]) + configs.

    `scheduler_config` is the model's diffusers `scheduler_config.json`: the one noise schedule
    that training (betas, `num_train_timesteps`, `prediction_type`), sampling and export use.
    """

    def __init__(self, unet, vae, image_encoder, *, scheduler_config: Mapping[str, Any],
                 feature_extractor_config: Mapping[str, Any] | None = None):
        if not scheduler_config or not scheduler_config.get("_class_name"):
            raise ValueError("PaintByExampleModel needs its scheduler config (a diffusers "
                             f"scheduler_config.json with _class_name), got {scheduler_config!r}")
        check_unet_inputs(unet.config, vae.config)
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        # The encoder normalises references with the model's own preprocessing config.
        image_encoder.set_preprocess(feature_extractor_config)
        # Stored as JSON text: static attributes of an NNX module are part of its (hashed)
        # graph definition, which jit uses as a static argument; a dict is unhashable.
        self._scheduler_json = json.dumps(_plain(dict(scheduler_config)), sort_keys=True)
        self._feature_extractor_json = json.dumps(
            dict(feature_extractor_config
                 or image_encoder.preprocess.to_feature_extractor_config()), sort_keys=True)

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
                          remat_policy: str | None = None):
        """Random init from `config.model` of configs/pbe.py: `{'unet': {...}, 'vae': {...},
        'image_encoder': {...}, 'scheduler': {...}[, 'feature_extractor': {...}]}` (diffusers /
        transformers config.json fields; each component's class from the registry)."""
        rngs = nnx.Rngs(seed)
        rt = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                  remat=remat, remat_policy=remat_policy)
        configs = parse_component_configs(model_cfg)
        parts = {c: slot_class(c, _plain(model_cfg[c]))(configs[c], rngs=rngs, **component_kwargs(c, **rt))
                 for c in COMPONENTS}
        if "scheduler" not in model_cfg:
            raise ValueError("model config lacks 'scheduler' (the diffusers scheduler config that "
                             "fixes the noise schedule); see configs/pbe.py")
        fe = model_cfg["feature_extractor"] if "feature_extractor" in model_cfg else None
        return cls(**parts, scheduler_config=_plain(model_cfg["scheduler"]),
                   feature_extractor_config=_plain(fe) if fe else None)

    def configs(self) -> dict[str, Any]:
        """Every config of the model: `config.model`-shaped, plus the feature extractor."""
        return {
            "unet": self.unet.config.to_dict(),
            "vae": self.vae.config.to_dict(),
            "image_encoder": self.image_encoder.config.to_dict(),
            "scheduler": copy.deepcopy(self.scheduler_config),
            "feature_extractor": copy.deepcopy(self.feature_extractor_config),
        }
