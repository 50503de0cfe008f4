"""The paper's initialisation for training (PBE_SPEC 1.4): Stable Diffusion (a diffusers dir /
Hub id, or the original single-file `sd-v1-4.ckpt`) + a CLIP vision tower (`clip`: a
transformers dir / Hub id, e.g. `openai/clip-vit-large-patch14` as the paper, or an OpenCLIP
ViT-H/14 in transformers format such as `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`). UNet `conv_in`
grows from 4 to 9 input channels, the 5 new ones zero; mapper ((layers + 1) // 5 blocks of the
tower's width), final LN, proj_out (tower width -> the UNet's cross_attention_dim) and
uncond_vector are freshly initialised with PyTorch's defaults; SD's CLIP text tower is ignored
(and reported); the SD repo's scheduler config (its betas and `prediction_type`, e.g. SD 2.x
768's v_prediction) is kept. SD 1.x and 2.x diffusers repos load alike (linear projections,
per-block head counts and upcast attention come with the UNet's config.json).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from pbe_jax.convert import ldm
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.components import Place, assemble, each_with_progress, load_component
from pbe_jax.convert.diffusers_io import read_json, read_scheduler_config
from pbe_jax.convert.ldm_io import default_configs
from pbe_jax.convert.report import PipelineReport, check_architecture, raise_unexpected
from pbe_jax.convert.torch_layout import path_to_torch_key, to_torch_layout
from pbe_jax.models.hub import find_weight_files, resolve
from pbe_jax.models.init import torch_default_init
from pbe_jax.models.paint_by_example import PaintByExampleModel, component_kwargs, parse_component_configs
from pbe_jax.models.registry import COMPONENTS, slot_class
from pbe_jax.models.unet import UNetConfig

_TEXT_TOWER = ("Stable Diffusion's CLIP text tower: Paint by Example replaces the text encoder by the "
               "CLIP vision tower (the official code drops it with load_state_dict(strict=False))")
_CLIP_UNUSED = ("parts of the CLIP checkpoint the Paint-by-Example encoder does not use (text tower, "
                "projections, logit scale, position_ids buffer)")


def grow_conv_in(sd: dict[str, np.ndarray], in_channels: int) -> dict[str, np.ndarray]:
    """SD's `conv_in.weight` [O, 4, 3, 3] -> [O, in_channels, 3, 3]: channels 0-3 (the noisy
    latent) keep SD's weights, the new ones (masked-image latent 4 | mask 1) start at zero, as
    the official `scripts/modify_checkpoints.py` does. The bias is unchanged."""
    w = np.asarray(sd["conv_in.weight"])
    if w.ndim != 4 or w.shape[1] != 4:
        raise ValueError(f"SD init: conv_in.weight has shape {tuple(w.shape)}, expected [O, 4, kh, kw] "
                         "(a text-to-image SD UNet)")
    grown = np.zeros((w.shape[0], in_channels, *w.shape[2:]), w.dtype)
    grown[:, :4] = w
    return {**sd, "conv_in.weight": grown}


def fresh_encoder_head(config, seed: int, **runtime) -> dict[str, np.ndarray]:
    """Initial values of the encoder's trained part (the conditioner's: for `clip`, mapper,
    final LN, proj_out, uncond_vector)
    as a torch-layout state dict, as the official code initialises them: PyTorch's defaults
    (`nn.Linear`: weight and bias U(+-1/sqrt(fan_in)); `nn.LayerNorm`: 1 / 0) and
    `uncond_vector = torch.randn(1, 1, D)` (PBE_SPEC 1.3). Built on the host from (seed, path)
    (`models.init.torch_default_init`); only the shapes of the encoder are traced."""
    enc_cls = slot_class("image_encoder", config)
    enc = nnx.eval_shape(lambda: enc_cls(
        config, rngs=nnx.Rngs(seed), **component_kwargs("image_encoder", **runtime)))
    shapes = {tuple(str(k) for k in p): tuple(v.get_value().shape)
              for p, v in nnx.to_flat_state(nnx.state(enc, enc_cls.trainable_filter()))}
    return {path_to_torch_key(p): np.ascontiguousarray(to_torch_layout(p[-1], v))
            for p, v in torch_default_init(shapes, seed).items()}


def _pretrained_tower(tower_cls: type, clip: str, hub: Mapping[str, Any], report: PipelineReport):
    """(tower config, state dict under `model.` for the encoder) from a transformers dir / id;
    `tower_cls` is the conditioner's TOWER_CLASS (CLIPVisionModel for `clip`)."""
    d = resolve(clip, {"": tower_cls.WEIGHTS_NAMES}, **hub)
    cfg = tower_cls.load_config(d)
    files = find_weight_files(d, tower_cls.WEIGHTS_NAMES)
    sd = tower_cls.rename_legacy_keys(stio.read_checkpoint_files(files))
    unused = [k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in tower_cls.IGNORE_KEYS)]
    report.ignore(_CLIP_UNUSED, [f"{clip}:{k}" for k in sorted(unused)])
    return cfg, {"model." + k: v for k, v in sd.items() if k not in set(unused)}


def _sd_weights(path: str, configs: dict | None, hub: Mapping[str, Any], report: PipelineReport):
    """SD (diffusers dir / Hub id, or a single LDM file) -> (unet cfg, unet sd, vae cfg, vae sd,
    scheduler config or None)."""
    if os.path.isfile(path):  # the original sd-v1-x.ckpt / .safetensors
        base = configs or default_configs()
        unet_cfg = dataclasses.replace(base["unet"], in_channels=4)
        parts = ldm.split_ldm_checkpoint(stio.read_checkpoint(path), unet_cfg, base["vae"],
                                         with_encoder=False)
        raise_unexpected(parts.unexpected, path)
        for reason, keys in parts.ignored.items():
            report.ignore(_TEXT_TOWER if reason.startswith("CLIP text tower") else reason, keys)
        return unet_cfg, parts.unet, base["vae"], parts.vae, None
    root = resolve(path, {c: slot_class(c).WEIGHTS_NAMES for c in ("unet", "vae")},
                   extra_patterns=["scheduler/*.json"], **hub)
    out = []
    for comp in ("unet", "vae"):
        d = os.path.join(root, comp)
        raw = read_json(os.path.join(d, "config.json"))
        cls = slot_class(comp, raw)
        out += [cls.config_class.from_dict(raw),
                stio.read_checkpoint_files(find_weight_files(d, cls.WEIGHTS_NAMES))]
    unused = [f"{path}/{c}/" for c in ("text_encoder", "tokenizer", "safety_checker", "feature_extractor")
              if os.path.isdir(os.path.join(root, c))]
    report.ignore(_TEXT_TOWER + "; also its tokenizer, safety checker and feature extractor", unused)
    return (*out, read_scheduler_config(root))


def load_sd_init(path: str, *, clip: str | None, model_config: Mapping | None = None,
                 allow_missing: Iterable[str] = (), place: Place | None = None, seed: int = 0,
                 progress: bool = False, cls: type = PaintByExampleModel,
                 hub: Mapping[str, Any] | None = None, **runtime):
    """The paper's initialisation (PBE_SPEC 1.4): SD UNet (conv_in grown to 9 channels), VAE and
    scheduler, CLIP vision tower from `clip`, a fresh mapper / final LN / proj_out / uncond_vector."""
    if not clip:
        raise ValueError("sd-init needs the CLIP vision tower: clip='openai/clip-vit-large-patch14' "
                         "(a transformers directory or Hub id; --clip on the command line)")
    hub = dict(hub or {})
    expected = parse_component_configs(model_config)
    report = PipelineReport(source=f"{path} + {clip}", format="sd-init")
    unet_cfg, unet_sd, vae_cfg, vae_sd, scheduler = _sd_weights(path, expected, hub, report)
    in_ch = expected["unet"].in_channels if expected else 9
    unet_cfg = dataclasses.replace(unet_cfg, in_channels=in_ch)
    unet_sd = grow_conv_in(unet_sd, in_ch)
    # The conditioner (config.model.image_encoder's class; the paper's CLIP one by default)
    # names its pretrained tower's class and builds its config around the tower's.
    enc_cls = slot_class("image_encoder", expected["image_encoder"] if expected else None)
    tower_cfg, enc_sd = _pretrained_tower(enc_cls.TOWER_CLASS, clip, hub, report)
    proj = expected["image_encoder"].proj_size if expected else _cross_dim(unet_cfg)
    enc_cfg = enc_cls.with_tower(tower_cfg, proj, expected["image_encoder"] if expected else None)
    found = {"unet": unet_cfg, "vae": vae_cfg, "image_encoder": enc_cfg}
    # The CLIP repo's projection_dim is its visual_projection width, which PbE does not use.
    check_architecture(found, expected, report.source)
    head = fresh_encoder_head(enc_cfg, seed, **runtime)
    report.initialised["random init (trained from scratch in the paper)"] = sorted(
        f"image_encoder.{k}" for k in head)
    report.initialised[f"zero init (conv_in input channels 4..{in_ch - 1}; 0-3 keep SD's weights)"] = [
        "unet.conv_in.weight"]
    if scheduler is None and model_config is not None and "scheduler" in model_config:
        scheduler = dict(model_config["scheduler"])
    sds = {"unet": unet_sd, "vae": vae_sd, "image_encoder": {**enc_sd, **head}}
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, "SD init"):
        parts[comp] = load_component(comp, found[comp], sds[comp], source=report.source, report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    return assemble(parts, scheduler, report=report, cls=cls), report


def _cross_dim(cfg: UNetConfig) -> int:
    c = cfg.cross_attention_dim
    return int(c[0] if isinstance(c, tuple) else c)
