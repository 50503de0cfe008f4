"""diffusers Paint-by-Example repositories: read (dir or Hub id) and write.

Layout: `model_index.json`, `unet/`, `vae/`, `image_encoder/`, `scheduler/`,
`feature_extractor/`; safetensors or .bin weights, any `variant`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.components import Place, assemble, each_with_progress, load_component
from pbe_jax.convert.report import PipelineReport, check_architecture
from pbe_jax.models.hub import _formats, find_weight_files, resolve
from pbe_jax.models.paint_by_example import PaintByExampleModel, parse_component_configs
from pbe_jax.models.registry import COMPONENTS, library_of, slot_class
from pbe_jax.models.unet import _DIFFUSERS_VERSION
from pbe_jax.outputs import write_json

SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
FEATURE_EXTRACTOR_FILE = os.path.join("feature_extractor", "preprocessor_config.json")


def read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def resolve_pipeline(path: str, variant: str | None = None, use_safetensors: bool | None = None,
                     **hub) -> str:
    """A local pipeline directory: `path` itself, or the Hub repo's configs plus only the
    weight files that will be read (never the repo's `model.ckpt`, never both .bin and
    .safetensors)."""
    components = {c: slot_class(c).WEIGHTS_NAMES for c in COMPONENTS}
    return resolve(path, components, extra_patterns=["model_index.json", "scheduler/*.json",
                                                     "feature_extractor/*.json"],
                   variant=variant, use_safetensors=use_safetensors, **hub)


def read_scheduler_config(root: str) -> dict | None:
    """The repo's `scheduler/scheduler_config.json`, or None."""
    p = os.path.join(root, SCHEDULER_FILE)
    return read_json(p) if os.path.isfile(p) else None


def load_diffusers(path: str, *, model_config: Mapping | None = None, variant: str | None = None,
                   use_safetensors: bool | None = None, allow_missing: Iterable[str] = (),
                   place: Place | None = None, seed: int = 0, progress: bool = False,
                   cls: type = PaintByExampleModel, hub: Mapping[str, Any] | None = None, **runtime):
    """A diffusers Paint-by-Example repository (dir or Hub id) -> (model, report)."""
    root = resolve_pipeline(path, variant, use_safetensors, **dict(hub or {}))
    report = PipelineReport(source=path, format="diffusers")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(root, c))]
    if missing:
        raise FileNotFoundError(f"{root}: not a Paint-by-Example diffusers repository, no {missing} "
                                f"folder(s) (found: {sorted(os.listdir(root))})")
    raw = {c: read_json(os.path.join(root, c, "config.json")) for c in COMPONENTS}
    configs = parse_component_configs(raw)
    check_architecture(configs, parse_component_configs(model_config), root)
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, f"loading {path}"):
        files = find_weight_files(os.path.join(root, comp), slot_class(comp, raw[comp]).WEIGHTS_NAMES,
                                  variant, formats=_formats(use_safetensors))
        sd = stio.read_checkpoint_files(files)
        parts[comp] = load_component(comp, configs[comp], sd, source=", ".join(files), report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    fe = os.path.join(root, FEATURE_EXTRACTOR_FILE)
    if not os.path.isfile(fe):
        report.notes.append(f"no feature_extractor config in {root}: using the Paint-by-Example default")
    model = assemble(parts, read_scheduler_config(root), read_json(fe) if os.path.isfile(fe) else None,
                     report=report, cls=cls)
    return model, report


def model_index(model) -> dict[str, Any]:
    """`model_index.json` of `model`: the Hub layout of Fantasy-Studio/Paint-by-Example, with
    each component's library and class from the registry.

    diffusers >= 0.40 cannot resolve the "paint_by_example" library name (the pipeline moved to
    `deprecated`), so `PaintByExamplePipeline.from_pretrained(dir)` fails on any PbE repo, the
    Hub's included; we still write it as the Hub has it (see `save_diffusers` for loading the
    export into diffusers)."""
    # A conditioner diffusers cannot hold (models/exemplar.py) names pbe_jax's pipeline class:
    # the folder is diffusers-style, loaded back by pbe_jax.PaintByExample.from_pretrained.
    compatible = type(model.image_encoder).DIFFUSERS_COMPATIBLE
    fe_type = model.feature_extractor_config.get("image_processor_type", "CLIPImageProcessor")
    out: dict[str, Any] = {
        "_class_name": "PaintByExamplePipeline" if compatible else "PaintByExample",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": ["transformers", fe_type],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", model.scheduler_config["_class_name"]],
    }
    for comp in COMPONENTS:
        name = type(getattr(model, comp)).__name__
        out[comp] = [library_of(name), name]
    return out


def save_diffusers(model, path: str, *, dtype=None, variant: str | None = None,
                   max_shard_size: int | str | None = None, progress: bool = False) -> str:
    """Write `model` (a PaintByExampleModel) as a diffusers repository that every component's
    own class loads with no missing or unexpected keys. `dtype` (e.g. np.float16) casts the
    saved tensors; `variant` names the weight files (`diffusion_pytorch_model.<variant>.safetensors`);
    `max_shard_size` (bytes or '5GB') splits larger weight files into shards plus an index.

    In diffusers >= 0.40 assemble the pipeline from its components:

        from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
        from transformers import CLIPImageProcessor
        pipe = PaintByExamplePipeline(
            vae=AutoencoderKL.from_pretrained(d, subfolder="vae"),
            image_encoder=PaintByExampleImageEncoder.from_pretrained(d, subfolder="image_encoder"),
            unet=UNet2DConditionModel.from_pretrained(d, subfolder="unet"),
            scheduler=PNDMScheduler.from_pretrained(d, subfolder="scheduler"),
            feature_extractor=CLIPImageProcessor.from_pretrained(d, subfolder="feature_extractor"),
            safety_checker=None, requires_safety_checker=False)
    """
    os.makedirs(path, exist_ok=True)
    for comp in each_with_progress(COMPONENTS, progress, f"writing {path}"):
        getattr(model, comp).save_pretrained(os.path.join(path, comp), dtype=dtype, variant=variant,
                                             max_shard_size=max_shard_size)
    for rel, cfg in ((SCHEDULER_FILE, model.scheduler_config),
                     (FEATURE_EXTRACTOR_FILE, model.feature_extractor_config)):
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        write_json(os.path.join(path, rel), cfg, sort_keys=True)
    write_json(os.path.join(path, "model_index.json"), model_index(model), sort_keys=True)
    return path
