"""The original single-file Paint-by-Example layout (`model.ckpt`: LDM key names,
`pbe_jax.convert.ldm`): read (`load_ldm`, a `.ckpt` or an LDM-keyed `.safetensors`) and write
(`save_ldm`), the form ComfyUI / A1111-style tools load.

A `.safetensors` that `save_ldm` writes carries the model's configs in its `__metadata__`
(`pbe_jax.configs`), so reading it back needs no `model_config` even for a non-released
architecture; the tensors are exactly the original layout's.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Iterable, Mapping

from pbe_jax.convert import ldm
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.components import Place, assemble, each_with_progress, expected_keys, load_component
from pbe_jax.convert.report import PipelineReport, component_patterns, raise_unexpected
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.conditioner import PaintByExampleEncoderConfig
from pbe_jax.models.exemplar import export_refusal
from pbe_jax.models.paint_by_example import PaintByExampleModel, parse_component_configs
from pbe_jax.models.registry import COMPONENTS, slot_class
from pbe_jax.models.unet import UNetConfig
from pbe_jax.models.vae import VAEConfig

# `__metadata__` key of an LDM .safetensors written by `save_ldm`: the model's configs as JSON.
CONFIGS_KEY = "pbe_jax.configs"


def default_configs() -> dict[str, Any]:
    """The released Paint-by-Example architecture (PBE_SPEC 5.2)."""
    return {"unet": UNetConfig.paint_by_example(), "vae": VAEConfig.sd1(),
            "image_encoder": PaintByExampleEncoderConfig.paint_by_example()}


def _check_ldm_missing(comp: str, config, sd: Mapping, allow: list[str], source: str, unet_config,
                       vae_config) -> None:
    """Missing keys named as the LDM checkpoint spells them (the loader would name diffusers keys)."""
    missing = sorted(k for k in expected_keys(slot_class(comp), config) - set(sd)
                     if not any(fnmatch.fnmatchcase(k, p) for p in allow))
    if not missing:
        return
    if comp == "unet":
        names = [ldm.UNET_PREFIX + (ldm.unet_prefix_map(unet_config).forward(k) or "?") + f" ({comp}.{k})"
                 for k in missing]
    elif comp == "vae":
        names = [ldm.VAE_PREFIX + (ldm.vae_prefix_map(vae_config).forward(k) or "?") + f" ({comp}.{k})"
                 for k in missing]
    else:
        names = [f"{comp}.{k}" for k in missing]
    raise CheckpointMismatchError(
        f"{source}: {len(missing)} missing keys for {comp}: " + ", ".join(names[:50])
        + (f" ... (+{len(names) - 50} more)" if len(names) > 50 else "")
        + "\n  (pass allow_missing=[GLOB, ...] / --allow-missing GLOB to accept missing keys)")


def load_ldm(path: str, *, model_config: Mapping | None = None, allow_missing: Iterable[str] = (),
             place: Place | None = None, seed: int = 0, use_ema: bool | None = None,
             progress: bool = False, cls: type = PaintByExampleModel, **runtime):
    """The original `model.ckpt` -> (model, report). The architecture comes from
    `model_config` (default: the released model); the scheduler is the released model's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (an LDM checkpoint is one .ckpt / "
                                ".safetensors file)")
    use_ema = bool(use_ema)  # None: the raw UNet, the weights an LDM file is used with
    report = PipelineReport(source=path, format="ldm", ema=use_ema)
    if model_config is None and path.endswith(".safetensors"):
        saved = stio.read_metadata(path).get(CONFIGS_KEY)
        if saved:
            model_config = json.loads(saved)
            report.notes.append(f"architecture from the file's metadata ({CONFIGS_KEY})")
    configs = parse_component_configs(model_config) or default_configs()
    scheduler = dict(model_config["scheduler"]) if model_config and "scheduler" in model_config else None
    ckpt = stio.read_checkpoint(path)  # .ckpt: torch.load(weights_only=True), never full unpickling
    parts_sd = ldm.split_ldm_checkpoint(ckpt, configs["unet"], configs["vae"], use_ema=use_ema)
    raise_unexpected(parts_sd.unexpected, path)
    for reason, keys in parts_sd.ignored.items():
        report.ignore(reason, keys)
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, f"loading {path}"):
        sd = getattr(parts_sd, comp)
        _check_ldm_missing(comp, configs[comp], slot_class(comp).rename_legacy_keys(sd),
                           component_patterns(allow_missing, comp), path, configs["unet"], configs["vae"])
        parts[comp] = load_component(comp, configs[comp], sd, source=path, report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    fe = model_config.get("feature_extractor") if model_config else None
    return assemble(parts, scheduler, fe, report=report, cls=cls), report


def save_ldm(model, path: str, *, dtype=None) -> str:
    """Write `model` (a `PaintByExampleModel`) as one original-layout checkpoint file: a
    `.safetensors` (with the configs in its metadata) or, only when the name asks for it, a
    PyTorch `.ckpt` (`{'state_dict': ...}`, needs torch). `dtype` (e.g. np.float16) casts."""
    refusal = export_refusal(model.image_encoder, "the LDM layout")
    if refusal:
        raise ValueError(refusal)
    if not path.endswith((".safetensors", ".ckpt")):
        raise ValueError(f"{path}: an LDM checkpoint is one file; name it *.safetensors (or *.ckpt "
                         "for a PyTorch pickle)")
    sd = ldm.to_ldm_checkpoint(model.unet.torch_state_dict(dtype), model.vae.torch_state_dict(dtype),
                               model.image_encoder.torch_state_dict(dtype), model.unet.config,
                               model.vae.config)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".ckpt"):
        stio.write_torch_ckpt(path, sd)
    else:
        stio.write_safetensors(path, sd, metadata={CONFIGS_KEY: json.dumps(model.configs(), sort_keys=True)})
    return path
