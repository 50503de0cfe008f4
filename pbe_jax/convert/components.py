"""One component from a diffusers-named state dict, strictly, and the assembled pipeline:
what every loader (diffusers, LDM, SD init) ends with."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from pbe_jax.convert.report import PipelineReport, component_patterns
from pbe_jax.convert.torch_layout import param_leaves, path_to_torch_key, to_torch_layout
from pbe_jax.models.paint_by_example import PaintByExampleModel, component_kwargs
from pbe_jax.models.registry import slot_class
from pbe_jax.schedulers import pbe_scheduler_config

Place = Callable[[tuple, np.ndarray], jax.Array]


def sub_place(place: Place | None, comp: str) -> Place | None:
    return None if place is None else (lambda path, arr: place((comp, *path), arr))


def expected_keys(cls, config) -> set[str]:
    return {path_to_torch_key(p) for p in param_leaves(cls.from_config(config, abstract=True))}


def initial_values(comp: str, config, keys: Iterable[str], seed: int = 0, **runtime) -> dict[str, np.ndarray]:
    """The module's own initial values of some params (torch-layout keys -> host arrays).

    The init runs under `jit` returning only the asked-for params, so XLA drops the rest of the
    model's random init as dead code (a fresh 63 M-param mapper costs no 1 B-param init)."""
    keys = set(keys)
    if not keys:
        return {}
    cls = slot_class(comp, config)

    def init():
        module = cls(config, rngs=nnx.Rngs(seed), **component_kwargs(comp, **runtime))
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
    cls = slot_class(comp, config)
    allowed = component_patterns(allow_missing, comp)
    sd = cls.rename_legacy_keys(dict(state_dict))
    if allowed:
        gaps = sorted(k for k in expected_keys(cls, config) - set(sd)
                      if any(fnmatch.fnmatchcase(k, p) for p in allowed))
        sd.update(initial_values(comp, config, gaps, seed, **runtime))
        report.missing_allowed += [f"{comp}.{k}" for k in gaps]
    model, rep = cls.from_config_and_state_dict(
        config, sd, source=f"{source} [{comp}]", place=sub_place(place, comp),
        return_report=True, **component_kwargs(comp, **runtime))
    report.loaded[comp] = rep.loaded
    report.ignore(f"{comp}: known unused buffers", [f"{comp}.{k}" for k in rep.ignored])
    return model


def assemble(parts: Mapping[str, nnx.Module], scheduler_config: Mapping[str, Any] | None,
             feature_extractor_config=None, *, report: PipelineReport | None = None,
             cls: type = PaintByExampleModel):
    """The pipeline (`cls`: `PaintByExampleModel` or a subclass such as `pbe_jax.PaintByExample`)
    from its networks; a checkpoint without a scheduler config gets the released model's."""
    if scheduler_config is None:
        scheduler_config = pbe_scheduler_config()
        if report is not None:
            report.notes.append("no scheduler config: using the Paint-by-Example default (PNDM, SD betas)")
    return cls(parts["unet"], parts["vae"], parts["image_encoder"], scheduler_config=scheduler_config,
               feature_extractor_config=feature_extractor_config)


def each_with_progress(items: Iterable[str], enabled: bool, desc: str):
    """Iterate `items`, with a tqdm bar naming the current one when `enabled`."""
    items = list(items)
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm  # noqa: PLC0415 (only for progress bars)

    with tqdm(total=len(items), desc=desc, unit="step") as bar:
        for item in items:
            bar.set_postfix_str(item)
            yield item
            bar.update(1)
