"""Load a `PaintByExample` from any checkpoint users hold; write the diffusers layout back.

`load_pipeline(fmt, path, ...)` dispatches on `fmt`:

- `diffusers`: a Paint-by-Example repository directory or Hub id (`model_index.json`, `unet/`,
  `vae/`, `image_encoder/`, `scheduler/`, `feature_extractor/`; safetensors or .bin, any
  `variant`), e.g. `Fantasy-Studio/Paint-by-Example`.
- `ldm`: the original `model.ckpt` (LDM key names, `pbe_jax.convert.ldm`).
- `sd-init`: the paper's initialisation for training (PBE_SPEC 1.4): Stable Diffusion v1.x (a
  diffusers dir / Hub id, or the original `sd-v1-4.ckpt`) + the CLIP ViT-L/14 vision tower
  (`clip`: a transformers `openai/clip-vit-large-patch14` dir / Hub id). UNet `conv_in` grows
  from 4 to 9 input channels, the 5 new ones zero; mapper, final LN, proj_out and uncond_vector
  are freshly initialised; SD's CLIP text tower is ignored (and reported).
- `orbax`: pbe_jax orbax checkpoints (`pbe_jax.convert.orbax_io`).

Every format is strict: a missing, unexpected, mis-shaped or non-float tensor fails with a
message naming it; `allow_missing` globs (over `<component>.<torch key>` names, e.g.
`image_encoder.mapper.*`) are the only way to accept gaps. Params go to devices through
`place((component, *nnx_path), np_array)` (e.g. straight into their training sharding).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.convert import ldm
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import (
    CheckpointMismatchError,
    param_leaves,
    path_to_torch_key,
    to_torch_layout,
)
from pbe_jax.models.clip import CLIPVisionModel
from pbe_jax.models.conditioner import (
    PaintByExampleEncoderConfig,
    PaintByExampleImageEncoder,
    trainable_filter,
)
from pbe_jax.models.hub import find_weight_files, num_params
from pbe_jax.models.unet import UNet2DConditionModel, UNetConfig
from pbe_jax.models.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "ldm", "sd-init", "orbax")
COMPONENTS = ("unet", "vae", "image_encoder")
CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "image_encoder": PaintByExampleImageEncoder}
# Config fields that do not change the network (its params or its computation).
NOT_ARCHITECTURE = ("sample_size",)

Place = Callable[[tuple, np.ndarray], jax.Array]


@dataclass
class PipelineReport:
    """What a load did: tensors per component, keys ignored or initialised (and why)."""

    source: str
    format: str
    loaded: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys / folders
    initialised: dict[str, list[str]] = field(default_factory=dict)  # how -> keys
    missing_allowed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ignore(self, reason: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self.ignored.setdefault(reason, []).extend(keys)

    def summary(self) -> str:
        lines = [f"loaded {self.format} checkpoint {self.source}: "
                 + ", ".join(f"{c} {n} tensors" for c, n in self.loaded.items())]
        for reason, keys in self.ignored.items():
            lines.append(f"  ignored {len(keys)} keys ({reason}): {_short(keys)}")
        for how, keys in self.initialised.items():
            lines.append(f"  {how}: {_short(keys)}")
        if self.missing_allowed:
            lines.append(f"  missing, allowed (kept at init): {_short(self.missing_allowed)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------ runtime + checks


def runtime_kwargs(component: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   attention_impl: str = "xla", remat: bool = False,
                   remat_policy: str | None = None) -> dict:
    """Constructor kwargs per component, as `PaintByExample.from_model_config` passes them: only
    the UNet (the big trained network) takes remat; VAE and encoder run without it."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    if component == "unet":
        kw.update(remat=remat, remat_policy=remat_policy)
    return kw


def _plain(x):
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_plain(v) for v in x)
    return x


def parse_model_config(model_config: Mapping | None) -> dict[str, Any] | None:
    """`{'unet': {...}, 'vae': {...}, 'image_encoder': {...}}` (a ConfigDict, or config.json
    dicts) -> config objects per component; None stays None."""
    if model_config is None:
        return None
    raw = _plain(model_config)
    missing = [c for c in COMPONENTS if c not in raw]
    if missing:
        raise ValueError(f"model config lacks components {missing}; it has {sorted(raw)}")
    return {c: CLASSES[c].config_class.from_dict(dict(raw[c])) for c in COMPONENTS}


def _config_fields(cfg) -> dict:
    d = {k: v for k, v in _plain(cfg.to_dict()).items()
         if not k.startswith("_") and k not in NOT_ARCHITECTURE and k not in ("architectures", "model_type")}
    return d


def check_architecture(found: Mapping[str, Any], expected: Mapping[str, Any] | None, source: str,
                       exempt: Mapping[str, Iterable[str]] = ()) -> None:
    """Fail when the checkpoint's component configs differ from `expected` (parsed configs),
    listing every differing field. `exempt[component]` names fields the loader rewrites."""
    if expected is None:
        return
    exempt = {c: set(v) for c, v in dict(exempt).items()}
    diffs = []
    for comp in COMPONENTS:
        a, b = _config_fields(found[comp]), _config_fields(expected[comp])
        for k in sorted(set(a) | set(b)):
            if k in exempt.get(comp, ()):
                continue
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                diffs.append(f"{comp}.{k}: checkpoint {a.get(k, '<absent>')!r}, "
                             f"config {b.get(k, '<absent>')!r}")
    if diffs:
        raise ValueError(f"{source}: the checkpoint's architecture differs from the model config in "
                         f"{len(diffs)} fields:\n  " + "\n  ".join(diffs))


def _component_patterns(patterns: Iterable[str], comp: str) -> list[str]:
    """Pipeline-level globs (`unet.conv_in.*`, `*.bias`) -> globs over the component's keys."""
    out = []
    for p in patterns:
        head = p.split(".", 1)[0]
        if head == comp:
            out.append(p.split(".", 1)[1] if "." in p else "*")
        elif head not in COMPONENTS:
            out.append(p)
    return out


def _sub_place(place: Place | None, comp: str) -> Place | None:
    return None if place is None else (lambda path, arr: place((comp, *path), arr))


def _expected_keys(cls, config) -> set[str]:
    return {path_to_torch_key(p) for p in param_leaves(cls.from_config(config, abstract=True))}


def initial_values(comp: str, config, keys: Iterable[str], seed: int = 0, **runtime) -> dict[str, np.ndarray]:
    """The module's own initial values of some params (torch-layout keys -> host arrays).

    The init runs under `jit` returning only the asked-for params, so XLA drops the rest of the
    model's random init as dead code (a fresh 63 M-param mapper costs no 1 B-param init)."""
    keys = set(keys)
    if not keys:
        return {}
    cls = CLASSES[comp]

    def init():
        module = cls(config, rngs=nnx.Rngs(seed), **runtime_kwargs(comp, **runtime))
        return {path_to_torch_key(p): to_torch_layout(str(p[-1]), v.get_value())
                for p, v in param_leaves(module).items() if path_to_torch_key(p) in keys}

    values = jax.device_get(jax.jit(init)())
    absent = keys - set(values)
    if absent:
        raise KeyError(f"{comp} has no params {sorted(absent)}")
    return {k: np.ascontiguousarray(v) for k, v in values.items()}


def load_component(comp: str, config, state_dict: Mapping[str, np.ndarray], *, source: str,
                   report: PipelineReport, allow_missing: Iterable[str] = (), place: Place | None = None,
                   seed: int = 0, **runtime):
    """One component from a diffusers-named state dict, strictly; records the load in `report`.

    Params absent from the checkpoint but matched by `allow_missing` get the module's initial
    values (seeded by `seed`) and are placed like every other param."""
    cls = CLASSES[comp]
    allowed = _component_patterns(allow_missing, comp)
    sd = cls.rename_legacy_keys(dict(state_dict))
    if allowed:
        gaps = sorted(k for k in _expected_keys(cls, config) - set(sd)
                      if any(fnmatch.fnmatchcase(k, p) for p in allowed))
        sd.update(initial_values(comp, config, gaps, seed, **runtime))
        report.missing_allowed += [f"{comp}.{k}" for k in gaps]
    model, rep = cls.from_config_and_state_dict(
        config, sd, source=f"{source} [{comp}]", place=_sub_place(place, comp),
        return_report=True, **runtime_kwargs(comp, **runtime))
    report.loaded[comp] = rep.loaded
    report.ignore(f"{comp}: known unused buffers", [f"{comp}.{k}" for k in rep.ignored])
    return model


def _assemble(parts: Mapping[str, nnx.Module], scheduler_config=None, feature_extractor_config=None):
    from pbe_jax.pipeline import PaintByExample  # noqa: PLC0415 (pipeline imports models; avoid a cycle)

    return PaintByExample(parts["unet"], parts["vae"], parts["image_encoder"],
                          scheduler_config=scheduler_config,
                          feature_extractor_config=feature_extractor_config)


def each_with_progress(items: Iterable[str], enabled: bool, desc: str):
    """Iterate `items`, with a tqdm bar naming the current one when `enabled`."""
    items = list(items)
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm  # noqa: PLC0415

    with tqdm(total=len(items), desc=desc, unit="step") as bar:
        for item in items:
            bar.set_postfix_str(item)
            yield item
            bar.update(1)


# --------------------------------------------------------------------------- diffusers layout


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def _pick_weight_names(names: list[str], stems: Iterable[str], variant: str | None) -> list[str]:
    """The globs of the files `hub.find_weight_files` would read, chosen from a repo listing."""
    for ext in ("safetensors", "bin"):
        for stem in stems:
            for s in ([f"{stem}.{variant}"] if variant else []) + [stem]:
                if f"{s}.{ext}.index.json" in names:
                    return [f"{s}.{ext}.index.json", f"{s}-*-of-*.{ext}"]
                if f"{s}.{ext}" in names:
                    return [f"{s}.{ext}"]
    return []


def resolve_pipeline_dir(path: str, variant: str | None = None, revision: str | None = None) -> str:
    """A local pipeline directory, or a Hub repo id downloaded (configs plus only the weight
    files that will be read: never the repo's `model.ckpt`, never both .bin and .safetensors)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: not a directory, and not a Hub repo id of the form 'org/name'")
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 (network only when asked)

    files = HfApi().list_repo_files(path, revision=revision)
    patterns = ["model_index.json", "scheduler/*.json", "feature_extractor/*.json"]
    for comp in COMPONENTS:
        names = [f.split("/", 1)[1] for f in files if f.startswith(comp + "/")]
        patterns.append(f"{comp}/config.json")
        patterns += [f"{comp}/{p}" for p in _pick_weight_names(names, CLASSES[comp].WEIGHTS_NAMES, variant)]
    return snapshot_download(repo_id=path, revision=revision, allow_patterns=patterns)


def load_diffusers(path: str, *, model_config: Mapping | None = None, variant: str | None = None,
                   revision: str | None = None, allow_missing: Iterable[str] = (),
                   place: Place | None = None, seed: int = 0, progress: bool = False, **runtime):
    """A diffusers Paint-by-Example repository (dir or Hub id) -> (PaintByExample, report)."""
    root = resolve_pipeline_dir(path, variant, revision)
    report = PipelineReport(source=path, format="diffusers")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(root, c))]
    if missing:
        raise FileNotFoundError(f"{root}: not a Paint-by-Example diffusers repository, no {missing} "
                                f"folder(s) (found: {sorted(os.listdir(root))})")
    configs = {c: CLASSES[c].load_config(os.path.join(root, c)) for c in COMPONENTS}
    check_architecture(configs, parse_model_config(model_config), root)
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, f"loading {path}"):
        d = os.path.join(root, comp)
        files = find_weight_files(d, CLASSES[comp].WEIGHTS_NAMES, variant)
        sd = stio.read_checkpoint_files(files)
        parts[comp] = load_component(comp, configs[comp], sd, source=", ".join(files), report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    sched = os.path.join(root, "scheduler", "scheduler_config.json")
    fe = os.path.join(root, "feature_extractor", "preprocessor_config.json")
    model = _assemble(parts, _read_json(sched) if os.path.isfile(sched) else None,
                      _read_json(fe) if os.path.isfile(fe) else None)
    for name, p in (("scheduler", sched), ("feature_extractor", fe)):
        if not os.path.isfile(p):
            report.notes.append(f"no {name} config in {root}: using the Paint-by-Example default")
    return model, report


# Hub layout of Fantasy-Studio/Paint-by-Example's model_index.json. diffusers >= 0.40 cannot
# resolve the "paint_by_example" library name (the pipeline moved to `deprecated`), so
# `PaintByExamplePipeline.from_pretrained(dir)` fails on any PbE repo, the Hub's included; we
# still write it as the Hub has it (see `save_diffusers` for loading the export into diffusers).
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "PaintByExamplePipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_diffusers(model, path: str, *, dtype=None, variant: str | None = None,
                   progress: bool = False) -> str:
    """Write `model` (a PaintByExample) as a diffusers repository that every component's own
    class loads with no missing or unexpected keys. `dtype` (e.g. np.float16) casts the saved
    tensors; `variant` names the weight files (`diffusion_pytorch_model.<variant>.safetensors`).

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
    from pbe_jax.models.unet import _DIFFUSERS_VERSION  # noqa: PLC0415

    os.makedirs(path, exist_ok=True)
    for comp in each_with_progress(COMPONENTS, progress, f"writing {path}"):
        getattr(model, comp).save_pretrained(os.path.join(path, comp), dtype=dtype, variant=variant)
    for sub, name, cfg in (("scheduler", "scheduler_config.json", model.scheduler_config),
                           ("feature_extractor", "preprocessor_config.json", model.feature_extractor_config)):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        with open(os.path.join(path, sub, name), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, "_diffusers_version": _DIFFUSERS_VERSION}, f, indent=2, sort_keys=True)
    return path


# ------------------------------------------------------------------------------------ LDM


def default_configs() -> dict[str, Any]:
    """The released Paint-by-Example architecture (PBE_SPEC 5.2)."""
    return {"unet": UNetConfig.paint_by_example(), "vae": VAEConfig.sd1(),
            "image_encoder": PaintByExampleEncoderConfig.paint_by_example()}


def _check_ldm_missing(comp: str, config, sd: Mapping, allow: list[str], source: str, unet_config,
                       vae_config) -> None:
    """Missing keys named as the LDM checkpoint spells them (the loader would name diffusers keys)."""
    missing = sorted(k for k in _expected_keys(CLASSES[comp], config) - set(sd)
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
             progress: bool = False, **runtime):
    """The original Paint-by-Example `model.ckpt` (or an LDM-keyed .safetensors) -> (PaintByExample,
    report). The architecture comes from `model_config` (default: the released model)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (an LDM checkpoint is one .ckpt / "
                                ".safetensors file)")
    configs = parse_model_config(model_config) or default_configs()
    report = PipelineReport(source=path, format="ldm")
    ckpt = stio.read_checkpoint(path)  # .ckpt: torch.load(weights_only=True), never full unpickling
    parts_sd = ldm.split_ldm_checkpoint(ckpt, configs["unet"], configs["vae"], use_ema=use_ema)
    _raise_unexpected(parts_sd.unexpected, path)
    for reason, keys in parts_sd.ignored.items():
        report.ignore(reason, keys)
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, f"loading {path}"):
        sd = getattr(parts_sd, comp)
        _check_ldm_missing(comp, configs[comp], CLASSES[comp].rename_legacy_keys(sd),
                           _component_patterns(allow_missing, comp), path, configs["unet"], configs["vae"])
        parts[comp] = load_component(comp, configs[comp], sd, source=path, report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    return _assemble(parts), report


def _raise_unexpected(keys: list[str], source: str) -> None:
    if keys:
        raise CheckpointMismatchError(
            f"{source}: {len(keys)} unexpected keys (in no component, and not a known buffer): "
            + ", ".join(keys[:50]) + (f" ... (+{len(keys) - 50} more)" if len(keys) > 50 else ""))


# ---------------------------------------------------------------------------------- SD init


def grow_conv_in(sd: dict[str, np.ndarray], in_channels: int) -> dict[str, np.ndarray]:
    """SD's `conv_in.weight` [O, 4, 3, 3] -> [O, in_channels, 3, 3]: channels 0-3 (the noisy
    latent) keep SD's weights, the new ones (masked-image latent 4 | mask 1) start at zero, as
    the official `scripts/modify_checkpoints.py` does. The bias is unchanged."""
    w = np.asarray(sd["conv_in.weight"])
    if w.ndim != 4 or w.shape[1] != 4:
        raise ValueError(f"SD init: conv_in.weight has shape {tuple(w.shape)}, expected [O, 4, kh, kw] "
                         "(a text-to-image SD v1.x UNet)")
    grown = np.zeros((w.shape[0], in_channels, *w.shape[2:]), w.dtype)
    grown[:, :4] = w
    return {**sd, "conv_in.weight": grown}


def fresh_encoder_head(config: PaintByExampleEncoderConfig, seed: int, **runtime) -> dict[str, np.ndarray]:
    """Random initial values of the encoder's trained part (mapper, final LN, proj_out,
    uncond_vector) as a torch-layout state dict. The init runs under `jit` returning only these,
    so the CLIP tower's random init is dead code and never computed.

    Departure from the official code, on purpose: the distributions are the pbe_jax modules' own
    initialisers (`pbe_jax.models.layers`), not PyTorch's defaults (kaiming-uniform Linear); the
    LayerNorm starts at scale 1 / bias 0 and `uncond_vector` is a standard normal draw in both."""
    def init():
        enc = PaintByExampleImageEncoder(config, rngs=nnx.Rngs(seed),
                                         **runtime_kwargs("image_encoder", **runtime))
        return {path_to_torch_key(p): to_torch_layout(str(p[-1]), v.get_value())
                for p, v in nnx.to_flat_state(nnx.state(enc, trainable_filter()))}

    return {k: np.ascontiguousarray(v) for k, v in jax.device_get(jax.jit(init)()).items()}


_TEXT_TOWER = ("Stable Diffusion's CLIP text tower: Paint by Example replaces the text encoder by the "
               "CLIP vision tower (the official code drops it with load_state_dict(strict=False))")
_CLIP_UNUSED = ("parts of the CLIP checkpoint the Paint-by-Example encoder does not use (text tower, "
                "projections, logit scale, position_ids buffer)")


def _clip_tower(clip: str, revision: str | None, report: PipelineReport):
    """(CLIPVisionConfig, state dict under `model.` for the encoder) from a transformers dir / id."""
    d = clip if os.path.isdir(clip) else _resolve_model_repo(clip, CLIPVisionModel, revision)
    cfg = CLIPVisionModel.load_config(d)
    files = find_weight_files(d, CLIPVisionModel.WEIGHTS_NAMES)
    sd = CLIPVisionModel.rename_legacy_keys(stio.read_checkpoint_files(files))
    unused = [k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in CLIPVisionModel.IGNORE_KEYS)]
    report.ignore(_CLIP_UNUSED, [f"{clip}:{k}" for k in sorted(unused)])
    return cfg, {"model." + k: v for k, v in sd.items() if k not in set(unused)}


def _resolve_model_repo(repo: str, cls, revision: str | None) -> str:
    """Download a single-model Hub repo: config + the weight file that will be read."""
    if os.path.exists(repo) or repo.count("/") != 1:
        raise FileNotFoundError(f"{repo}: not a directory, and not a Hub repo id of the form 'org/name'")
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415

    names = HfApi().list_repo_files(repo, revision=revision)
    patterns = ["config.json"] + _pick_weight_names(names, cls.WEIGHTS_NAMES, None)
    return snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)


def _sd_weights(path: str, configs: dict | None, revision: str | None, report: PipelineReport):
    """SD v1.x (diffusers dir / Hub id, or a single LDM file) -> (unet cfg, unet sd, vae cfg, vae sd)."""
    if os.path.isfile(path):  # the original sd-v1-x.ckpt / .safetensors
        base = configs or default_configs()
        unet_cfg = dataclasses.replace(base["unet"], in_channels=4)
        parts = ldm.split_ldm_checkpoint(stio.read_checkpoint(path), unet_cfg, base["vae"],
                                         with_encoder=False)
        _raise_unexpected(parts.unexpected, path)
        for reason, keys in parts.ignored.items():
            report.ignore(_TEXT_TOWER if reason.startswith("CLIP text tower") else reason, keys)
        return unet_cfg, parts.unet, base["vae"], parts.vae
    root = path if os.path.isdir(path) else _resolve_sd_repo(path, revision)
    out = []
    for comp in ("unet", "vae"):
        d = os.path.join(root, comp)
        cfg = CLASSES[comp].load_config(d)
        out += [cfg, stio.read_checkpoint_files(find_weight_files(d, CLASSES[comp].WEIGHTS_NAMES))]
    unused = [f"{path}/{c}/" for c in ("text_encoder", "tokenizer", "safety_checker", "feature_extractor")
              if os.path.isdir(os.path.join(root, c))]
    report.ignore(_TEXT_TOWER + "; also its tokenizer, safety checker and feature extractor", unused)
    return tuple(out)


def _resolve_sd_repo(repo: str, revision: str | None) -> str:
    if repo.count("/") != 1:
        raise FileNotFoundError(f"{repo}: not a file or directory, and not a Hub repo id 'org/name'")
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415

    files = HfApi().list_repo_files(repo, revision=revision)
    patterns = []
    for comp in ("unet", "vae"):
        names = [f.split("/", 1)[1] for f in files if f.startswith(comp + "/")]
        patterns += [f"{comp}/config.json"] + [f"{comp}/{p}" for p in
                                               _pick_weight_names(names, CLASSES[comp].WEIGHTS_NAMES, None)]
    return snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)


def load_sd_init(path: str, *, clip: str | None, model_config: Mapping | None = None,
                 revision: str | None = None, allow_missing: Iterable[str] = (),
                 place: Place | None = None, seed: int = 0, progress: bool = False, **runtime):
    """The paper's initialisation (PBE_SPEC 1.4): SD v1.x UNet (conv_in grown to 9 channels) and
    VAE, CLIP vision tower from `clip`, a fresh mapper / final LN / proj_out / uncond_vector."""
    if not clip:
        raise ValueError("sd-init needs the CLIP vision tower: clip='openai/clip-vit-large-patch14' "
                         "(a transformers directory or Hub id; --clip on the command line)")
    expected = parse_model_config(model_config)
    report = PipelineReport(source=f"{path} + {clip}", format="sd-init")
    unet_cfg, unet_sd, vae_cfg, vae_sd = _sd_weights(path, expected, revision, report)
    in_ch = expected["unet"].in_channels if expected else 9
    unet_cfg = dataclasses.replace(unet_cfg, in_channels=in_ch)
    unet_sd = grow_conv_in(unet_sd, in_ch)
    clip_cfg, enc_sd = _clip_tower(clip, revision, report)
    proj = expected["image_encoder"].proj_size if expected else _cross_dim(unet_cfg)
    enc_cfg = PaintByExampleEncoderConfig(vision=clip_cfg, proj_size=proj)
    found = {"unet": unet_cfg, "vae": vae_cfg, "image_encoder": enc_cfg}
    # The CLIP repo's projection_dim is its visual_projection width, which PbE does not use.
    check_architecture(found, expected, report.source)
    head = fresh_encoder_head(enc_cfg, seed, **runtime)
    report.initialised["random init (trained from scratch in the paper)"] = sorted(
        f"image_encoder.{k}" for k in head)
    report.initialised[f"zero init (conv_in input channels 4..{in_ch - 1}; 0-3 keep SD's weights)"] = [
        "unet.conv_in.weight"]
    sds = {"unet": unet_sd, "vae": vae_sd, "image_encoder": {**enc_sd, **head}}
    parts = {}
    for comp in each_with_progress(COMPONENTS, progress, "SD init"):
        parts[comp] = load_component(comp, found[comp], sds[comp], source=report.source, report=report,
                                     allow_missing=allow_missing, place=place, seed=seed, **runtime)
    return _assemble(parts), report


def _cross_dim(cfg: UNetConfig) -> int:
    c = cfg.cross_attention_dim
    return int(c[0] if isinstance(c, tuple) else c)


# -------------------------------------------------------------------------------- dispatch


def load_pipeline(fmt: str, path: str, *, clip: str | None = None, model_config: Mapping | None = None,
                  place: Place | None = None, seed: int = 0, variant: str | None = None,
                  revision: str | None = None, allow_missing: Iterable[str] = (),
                  use_ema: bool = False, progress: bool = False, return_report: bool = False,
                  dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "xla",
                  remat: bool = False, remat_policy: str | None = None):
    """A `PaintByExample` from a checkpoint of format `fmt` (one of `FORMATS`).

    model_config: None (architecture from the checkpoint) or `{'unet', 'vae', 'image_encoder'}`
        config dicts (`config.model` of configs/pbe.py); the checkpoint must match it (else a
        ValueError lists the differing fields). For `ldm` it *is* the architecture.
    place: `place((component, *nnx_path), host_array) -> jax.Array` puts every param on devices.
    seed: random init of what the checkpoint does not hold (sd-init's mapper etc.).
    use_ema: load EMA weights (orbax training checkpoints; LDM `model_ema.*`).
    Returns the model, or (model, PipelineReport) with `return_report`.
    """
    if use_ema and fmt in ("diffusers", "sd-init"):
        raise ValueError(f"use_ema: a {fmt} checkpoint has no EMA copy (only orbax training "
                         "checkpoints and LDM checkpoints with model_ema.* have one)")
    rt = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
              remat_policy=remat_policy)
    common = dict(model_config=model_config, allow_missing=tuple(allow_missing), place=place,
                  seed=seed, progress=progress, **rt)
    if fmt == "diffusers":
        model, report = load_diffusers(path, variant=variant, revision=revision, **common)
    elif fmt == "ldm":
        model, report = load_ldm(path, use_ema=use_ema, **common)
    elif fmt == "sd-init":
        model, report = load_sd_init(path, clip=clip, revision=revision, **common)
    elif fmt == "orbax":
        from pbe_jax.convert import orbax_io  # noqa: PLC0415

        model, report = orbax_io.load_orbax(path, use_ema=use_ema, **common)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS}")
    log.info("%s", report.summary())
    return (model, report) if return_report else model


def param_counts(model) -> dict[str, int]:
    return {c: num_params(getattr(model, c)) for c in COMPONENTS}
