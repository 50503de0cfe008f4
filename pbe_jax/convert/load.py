"""Load a Paint-by-Example pipeline from any checkpoint users hold: `load_pipeline(fmt, path)`.

- `diffusers`: a Paint-by-Example repository directory or Hub id (`convert.diffusers_io`).
- `ldm`: the original `model.ckpt` (LDM key names, `convert.ldm_io`).
- `sd-init`: the paper's initialisation for training, SD + a CLIP vision tower (`convert.sd_init`).
- `orbax`: pbe_jax orbax checkpoints: params checkpoints and training runs (`convert.orbax_io`).

Every format is strict: a missing, unexpected, mis-shaped or non-float tensor fails with a
message naming it; `allow_missing` globs (over `<component>.<torch key>` names, e.g.
`image_encoder.mapper.*`) are the only way to accept gaps. Params go to devices through
`place((component, *nnx_path), np_array)` (e.g. straight into their training sharding).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping

import jax.numpy as jnp

from pbe_jax.convert import orbax_io
from pbe_jax.convert.components import Place
from pbe_jax.convert.diffusers_io import load_diffusers, read_scheduler_config
from pbe_jax.convert.ldm_io import load_ldm
from pbe_jax.convert.sd_init import load_sd_init
from pbe_jax.models.hub import HUB_KWARGS, num_params, resolve
from pbe_jax.models.paint_by_example import PaintByExampleModel
from pbe_jax.models.registry import COMPONENTS

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "ldm", "sd-init", "orbax")


def load_pipeline(fmt: str, path: str, *, clip: str | None = None, model_config: Mapping | None = None,
                  place: Place | None = None, seed: int = 0, variant: str | None = None,
                  allow_missing: Iterable[str] = (), use_ema: bool | None = None, progress: bool = False,
                  return_report: bool = False, cls: type = PaintByExampleModel,
                  use_safetensors: bool | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                  attention_impl: str = "xla", remat: bool = False, remat_policy: str | None = None,
                  **hub):
    """A pipeline (`cls`, default `PaintByExampleModel`) from a checkpoint of format `fmt`.

    model_config: None (architecture from the checkpoint) or `config.model` of configs/pbe.py
        (`{'unet', 'vae', 'image_encoder'[, 'scheduler']}`); the checkpoint must match it (else
        a ValueError lists the differing fields). For `ldm` it *is* the architecture.
    place: `place((component, *nnx_path), host_array) -> jax.Array` puts every param on devices.
    seed: random init of what the checkpoint does not hold (sd-init's mapper etc.).
    use_ema: load EMA weights (orbax training checkpoints; LDM `model_ema.*`); None: a training
        checkpoint's EMA params when it has them (logged), raw weights otherwise.
    hub: `revision`, `cache_dir`, `local_files_only`, `token`, `force_download` (diffusers'
        names; Hub ids only), `use_safetensors`.
    Returns the model, or (model, PipelineReport) with `return_report`.
    """
    unknown = set(hub) - set(HUB_KWARGS)
    if unknown:
        raise TypeError(f"load_pipeline: unexpected keyword arguments {sorted(unknown)}")
    if use_ema and fmt in ("diffusers", "sd-init"):
        raise ValueError(f"use_ema: a {fmt} checkpoint has no EMA copy (only orbax training "
                         "checkpoints and LDM checkpoints with model_ema.* have one)")
    rt = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
              remat_policy=remat_policy)
    common = dict(model_config=model_config, allow_missing=tuple(allow_missing), place=place,
                  seed=seed, progress=progress, cls=cls, **rt)
    if fmt == "diffusers":
        model, report = load_diffusers(path, variant=variant, use_safetensors=use_safetensors, hub=hub,
                                       **common)
    elif fmt == "ldm":
        model, report = load_ldm(path, use_ema=use_ema, **common)
    elif fmt == "sd-init":
        model, report = load_sd_init(path, clip=clip, hub={**hub, "use_safetensors": use_safetensors},
                                     **common)
    elif fmt == "orbax":
        model, report = orbax_io.load_orbax(path, use_ema=use_ema, **common)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS}")
    log.info("%s", report.summary())
    return (model, report) if return_report else model


def param_counts(model) -> dict[str, int]:
    return {c: num_params(getattr(model, c)) for c in COMPONENTS}


def load_scheduler_config(fmt: str, path: str, *, use_ema: bool = False, **hub) -> dict | None:
    """Only the scheduler config (noise schedule) of a checkpoint, without its weights: the
    repo's `scheduler/scheduler_config.json` (diffusers, and the SD repo of sd-init), the run's
    or params checkpoint's schedule (orbax); None when the checkpoint carries none (LDM files,
    a single-file SD checkpoint)."""
    del use_ema
    if fmt in ("diffusers", "sd-init"):
        if os.path.isfile(path):
            return None
        root = resolve(path, {}, extra_patterns=["scheduler/*.json"], **hub)
        return read_scheduler_config(root)
    if fmt == "orbax":
        return orbax_io.read_configs(path).get("scheduler")
    if fmt == "ldm":
        return None
    raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS}")
