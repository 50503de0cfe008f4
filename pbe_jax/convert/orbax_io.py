"""Orbax checkpoints of `PaintByExample` params: training checkpoints in, params checkpoints in/out.

Two layouts are read:

- a **params checkpoint** (what `--to orbax` / `save_orbax` writes): `DIR/params` (orbax PyTree
  of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, NNX layout) + `DIR/pbe_config.json` (the
  component configs, scheduler and preprocessing configs);
- a **training checkpoint** (layout owned by `pbe_jax.checkpoint`), where `state['params']` (or
  `state['ema']`) holds the trainable params and `frozen` the VAE and CLIP tower; the
  architecture and the noise schedule come from the run's `config['model']`. A workdir (newest
  step that reads: `pbe_jax.checkpoint.restore_newest`, the fallback training applies too), its
  `checkpoints/` dir or one `checkpoints/<step>` dir are accepted.

Arrays are restored to host numpy (only the items needed: never the optimizer state) and put on
devices with `place(path, array)`, so a sharded training layout can be restored on any host.
Paths may be local or any path orbax reads (e.g. `gs://`).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from pbe_jax import checkpoint as ckpt
from pbe_jax.convert.components import each_with_progress
from pbe_jax.convert.report import PipelineReport, check_architecture
from pbe_jax.convert.torch_layout import CheckpointMismatchError, param_leaves, path_to_torch_key
from pbe_jax.models.abstract import eval_shape
from pbe_jax.models.paint_by_example import PaintByExampleModel, parse_component_configs
from pbe_jax.models.registry import COMPONENTS
from pbe_jax.outputs import write_json
from pbe_jax.schedulers import pbe_scheduler_config

log = logging.getLogger(__name__)

PARAMS_ITEM = "params"
CONFIG_FILE = "pbe_config.json"
FORMAT_TAG = "pbe_jax.params/1"


# --------------------------------------------------------------------------------- writing


def save_orbax(model, path: str, *, dtype=None, progress: bool = False) -> str:
    """Write `model`'s params (optionally cast to `dtype`) and configs as a params checkpoint."""
    root = epath.Path(path) if "://" in str(path) else epath.Path(path).absolute()
    for step in each_with_progress(("params", "configs"), progress, f"writing {path}"):
        if step == "params":
            root.mkdir(parents=True, exist_ok=True)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            if dtype is not None:
                params = jax.tree.map(lambda x: x.astype(dtype), params)
            ocp.PyTreeCheckpointer().save(root / PARAMS_ITEM, args=ocp.args.PyTreeSave(params), force=True)
        else:
            write_json(root / CONFIG_FILE, {"format": FORMAT_TAG, "configs": model.configs()},
                       sort_keys=True)
    return str(root)


# --------------------------------------------------------------------------------- reading


def locate(path: str) -> tuple[str, epath.Path]:
    """('params' | 'train', directory) for a params checkpoint, a training step dir, a
    `checkpoints/` dir or a workdir (newest step)."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such orbax checkpoint directory")
    if (p / CONFIG_FILE).exists():
        return "params", p
    steps = ckpt.training_steps(p)
    if steps:
        return "train", steps[-1]
    raise FileNotFoundError(
        f"{path}: not a pbe_jax orbax checkpoint: looked for {CONFIG_FILE} (params checkpoint), "
        "state/ + config/ (a training step), or checkpoints/<step>/ (a workdir)")


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a pbe_jax orbax checkpoint (params checkpoint, training run or step)."""
    if not (os.path.isdir(path) or "://" in path):
        return False
    try:
        locate(path)
    except FileNotFoundError:
        return False
    return True


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = (*prefix, str(k))
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def scheduler_of_run(config: Mapping) -> dict:
    """The noise schedule a run trained with: `config['model']['scheduler']`. Runs saved before
    the schedule moved there kept the beta fields in `config['train']`."""
    model = config.get("model", {})
    if "scheduler" in model:
        return dict(model["scheduler"])
    sched = pbe_scheduler_config()
    train = config.get("train") or {}
    for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        if k in train:
            sched[k] = train[k]
    return sched


def _read_train(step_dir: epath.Path, use_ema: bool | None, report: PipelineReport):
    """(flat params, configs) of a training checkpoint step; `report` gets notes only once
    the step has been read. `use_ema=None`: the EMA params when the run kept them (what its
    sample grids and scores used), else the raw ones."""
    config = ckpt.read_config(step_dir)
    if "model" not in config:
        raise ValueError(f"{step_dir}/config: no 'model' field (not a pbe_jax training config)")
    item, has_ema = ckpt.params_key(step_dir, use_ema)
    use_ema = item == "ema"
    notes = []
    if has_ema and not use_ema:
        notes.append("the checkpoint also holds EMA params (what its sample grids and scores used); "
                     "they load by default (use_ema=None / no --nouse_ema)")
    trained = ckpt.restore_numpy(step_dir / ckpt.STATE, [item])[item]
    frozen = ckpt.restore_numpy(step_dir / ckpt.FROZEN)
    flat = _flatten(trained)
    for k, v in _flatten(frozen).items():
        if k in flat:
            raise CheckpointMismatchError(f"{step_dir}: param {'.'.join(k)} is in both state and frozen")
        flat[k] = v
    configs = {c: config["model"][c] for c in COMPONENTS}
    configs["scheduler"] = scheduler_of_run(config)
    notes.append(f"training checkpoint at step {step_dir.name}, {'EMA' if use_ema else 'raw'} params")
    report.notes += notes
    report.ema = bool(use_ema)
    log.warning("loaded the %s params of %s (step %s)%s", "EMA" if use_ema else "raw", step_dir.parent,
                step_dir.name, "; use_ema=False / --nouse_ema loads the raw ones" if use_ema else
                "; use_ema=True / --use_ema loads the EMA ones" if has_ema else ", the run kept no EMA copy")
    return flat, configs


def _matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _check_params(leaves: Mapping[tuple, Any], flat: Mapping[tuple, np.ndarray], allow_missing: list[str],
                  source: str) -> list[str]:
    """Strict comparison of checkpoint arrays with the model's params; returns the allowed gaps
    (dotted NNX names) or raises naming every missing, unexpected, mis-shaped or non-float one."""
    missing, allowed, bad = [], [], []
    for p, var in leaves.items():
        name = ".".join(map(str, p))
        key = tuple(map(str, p))
        if key not in flat:
            # globs match the NNX name (`unet.conv_in.kernel`) or the torch one (`unet.conv_in.weight`)
            (allowed if _matches((name, path_to_torch_key(p)), allow_missing) else missing).append(name)
            continue
        arr, shape = flat[key], tuple(var.get_value().shape)
        if tuple(arr.shape) != shape:
            bad.append(f"{name}: checkpoint {tuple(arr.shape)}, model {shape}")
        elif not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
            bad.append(f"{name}: dtype {arr.dtype}, expected a float tensor")
    known = {tuple(map(str, p)) for p in leaves}
    unexpected = [".".join(k) for k in flat if k not in known]
    if missing or unexpected or bad:
        parts = [f"{source} does not match PaintByExample:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape/dtype mismatches", bad)):
            if items:
                parts.append(f"  {len(items)} {title}: " + ", ".join(sorted(items)[:50])
                             + (f" ... (+{len(items) - 50} more)" if len(items) > 50 else ""))
        parts.append("  (pass allow_missing=[GLOB, ...] / --allow-missing GLOB to accept missing keys)")
        raise CheckpointMismatchError("\n".join(parts))
    return allowed


def _newest(path: str, d: epath.Path, read):
    """(step dir, read(step dir)) of a training run: the step `path` names, or the newest
    step of a workdir / `checkpoints/` dir that reads (newer ones that do not are moved
    aside and reported, as when training resumes)."""
    if ckpt.is_step_dir(path):
        return d, read(d)
    return ckpt.restore_newest(ckpt.training_steps(path), read)


def read_configs(path: str) -> dict:
    """The configs of a params checkpoint or a training run (`config.model`-shaped: unet, vae,
    image_encoder, scheduler[, feature_extractor]), without reading any array."""
    kind, d = locate(path)
    if kind == "train":
        _, config = _newest(path, d, ckpt.read_config)
        return {**{c: config["model"][c] for c in COMPONENTS}, "scheduler": scheduler_of_run(config)}
    return json.loads((d / CONFIG_FILE).read_text())["configs"]


def _read(kind: str, path: str, d: epath.Path, use_ema: bool | None, report: PipelineReport):
    """(directory read, flat params, configs) of a params or training checkpoint."""
    if kind == "train":
        d, (flat, configs) = _newest(path, d, lambda step: _read_train(step, use_ema, report))
        return d, flat, configs
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT_TAG:
        raise ValueError(f"{d / CONFIG_FILE}: format {meta.get('format')!r}, expected {FORMAT_TAG!r}")
    if use_ema:
        raise ValueError(f"{d}: a params checkpoint has no EMA copy (it holds one set of params)")
    return d, _flatten(ckpt.restore_numpy(d / PARAMS_ITEM)), meta["configs"]


def load_orbax(path: str, *, model_config: Mapping | None = None, allow_missing: Iterable[str] = (),
               place=None, seed: int = 0, use_ema: bool | None = None, progress: bool = False,
               cls: type = PaintByExampleModel, **runtime):
    """A params or training checkpoint -> (model, report). Strict: every param of the
    model must be in the checkpoint with its shape and a float dtype, and nothing else."""
    kind, d = locate(path)
    report = PipelineReport(source=str(d), format=f"orbax ({kind})")
    steps = iter(each_with_progress(("read", "check", "place"), progress, f"loading {d}"))
    next(steps)
    d, flat, configs = _read(kind, path, d, use_ema, report)
    report.source = str(d)
    next(steps)
    found = parse_component_configs({c: configs[c] for c in COMPONENTS})
    check_architecture(found, parse_component_configs(model_config), str(d))
    cfg_dicts = {c: found[c].to_dict() for c in COMPONENTS}
    cfg_dicts["scheduler"] = configs.get("scheduler") or pbe_scheduler_config()
    if configs.get("feature_extractor"):
        cfg_dicts["feature_extractor"] = configs["feature_extractor"]
    build = lambda: cls.from_model_config(cfg_dicts, seed=seed, **runtime)  # noqa: E731
    model = eval_shape(build)
    leaves = param_leaves(model)
    gaps = set(_check_params(leaves, flat, list(allow_missing), str(d)))
    report.missing_allowed = sorted(gaps)
    next(steps)
    init = {}
    if gaps:  # initial values of the allowed gaps only: under jit the rest of the init is dead code
        def init_gaps():
            named = ((".".join(map(str, q)), v) for q, v in param_leaves(build()).items())
            return {n: v.get_value() for n, v in named if n in gaps}

        init = jax.device_get(jax.jit(init_gaps)())
    place = place or (lambda path, a: jax.numpy.asarray(a))
    report.loaded = dict.fromkeys(COMPONENTS, 0)
    for p, var in leaves.items():
        key = tuple(map(str, p))
        src = flat[key] if key in flat else init[".".join(key)]
        var.set_value(place(p, np.asarray(src, dtype=var.get_value().dtype)))
        report.loaded[str(p[0])] += key in flat
    nnx.update(model, nnx.from_flat_state(leaves))
    next(steps, None)
    return model, report
