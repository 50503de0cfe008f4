"""The original Paint-by-Example `model.ckpt` (LDM key names, `pbe_jax.convert.ldm`), or an
LDM-keyed .safetensors, -> a pipeline."""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Iterable, Mapping

from pbe_jax.convert import ldm
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.components import Place, assemble, each_with_progress, expected_keys, load_component
from pbe_jax.convert.report import PipelineReport, component_patterns, raise_unexpected
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.conditioner import PaintByExampleEncoderConfig
from pbe_jax.models.paint_by_example import PaintByExampleModel, parse_component_configs
from pbe_jax.models.registry import COMPONENTS, slot_class
from pbe_jax.models.unet import UNetConfig
from pbe_jax.models.vae import VAEConfig


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
             place: Place | None = None, seed: int = 0, use_ema: bool = False,
             progress: bool = False, cls: type = PaintByExampleModel, **runtime):
    """The original `model.ckpt` -> (model, report). The architecture comes from
    `model_config` (default: the released model); the scheduler is the released model's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (an LDM checkpoint is one .ckpt / "
                                ".safetensors file)")
    configs = parse_component_configs(model_config) or default_configs()
    scheduler = dict(model_config["scheduler"]) if model_config and "scheduler" in model_config else None
    report = PipelineReport(source=path, format="ldm")
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
    return assemble(parts, scheduler, report=report, cls=cls), report
