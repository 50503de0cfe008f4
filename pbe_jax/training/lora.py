"""LoRA fine-tuning (`config.train.lora.rank > 0`): what trains, what is a frozen step input,
and what a LoRA run's checkpoint holds.

The model gets adapters (`pbe_jax.models.lora.add_lora`) on the Linears `config.train.lora.targets`
names; the train state's params are the adapters' `lora_a` / `lora_b` plus the `also_train`
parts (by default `uncond_vector` and the image encoder's projection head: final LayerNorm and
`proj_out`); everything else (the UNet's own weights, VAE, CLIP tower, mapper, the adapters'
scale) is a frozen step input: no gradient, no optimizer state. The train step, EMA, NaN skips,
grad accumulation and shardings are the full fine-tuning ones, on this smaller params tree.

A LoRA run's checkpoint holds the train state only (the frozen item is not written): a resume
reloads the base from `config.init_from` (or the seed's random init when it is empty), as the
run got it; the checkpoint's `config` item names it.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models.lora import LoRAScale, LoRASpec, add_lora, names
from pbe_jax.models.paint_by_example import param_filters

log = logging.getLogger("pbe_jax")


def lora_enabled(config) -> bool:
    lcfg = config.train.get("lora")
    return bool(lcfg is not None and int(lcfg.rank) > 0)


def lora_spec(config) -> LoRASpec:
    return LoRASpec.from_config(config.train.lora)


def with_lora(model, config):
    """`model` with the config's adapters added in place (unchanged when LoRA is off)."""
    if lora_enabled(config):
        add_lora(model, lora_spec(config), nnx.Rngs(int(config.seed) + 2))
    return model


def with_lora_scales(frozen: dict, config) -> dict:
    """`frozen` (a random init's) with every adapter's `lora_scale` set to alpha / rank."""
    if not lora_enabled(config):
        return frozen
    spec = lora_spec(config)

    def fill(path, x):
        if str(getattr(path[-1], "key", path[-1])) != "lora_scale":
            return x
        return jax.device_put(np.float32(spec.alpha / spec.rank), x.sharding)

    return jax.tree_util.tree_map_with_path(fill, frozen)


def base_dtype(config):
    """The dtype the frozen base of a LoRA run is held in (`config.train.lora.base_dtype`), or
    None (as loaded)."""
    if not lora_enabled(config) or not config.train.lora.get("base_dtype"):
        return None
    return jnp.dtype(config.train.lora.base_dtype)


def cast_base(frozen, config):
    """`frozen` (arrays or ShapeDtypeStructs) with the float leaves of the adapted components
    (the UNet by default: the base the adapters sit on) in `base_dtype`; the VAE and the image
    encoder stay as they are. Layers compute in the config's dtype whatever the storage."""
    dtype = base_dtype(config)
    if dtype is None:
        return frozen
    comps = set(names(config.train.lora.components))

    def cast(path, x):
        top = str(getattr(path[0], "key", path[0]))
        if top not in comps or not jnp.issubdtype(x.dtype, jnp.floating) or \
                str(getattr(path[-1], "key", path[-1])) == "lora_scale":
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, frozen)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def training_filters(config):
    """(trainable, frozen) nnx filters of a training config: `param_filters` for full
    fine-tuning; for LoRA the adapters plus `also_train` vs every other variable."""
    if not lora_enabled(config):
        return param_filters(bool(config.train.train_image_tower))
    also = names(config.train.lora.also_train)

    def trainable(path, x) -> bool:
        if isinstance(x, nnx.LoRAParam):
            return True
        name = _dotted(path)
        return isinstance(x, nnx.Param) and any(name == a or name.startswith(a + ".") for a in also)

    def frozen(path, x) -> bool:
        return isinstance(x, (nnx.Param, LoRAScale)) and not trainable(path, x)

    return trainable, frozen


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def log_trainable(params, frozen) -> tuple[int, float]:
    """Log 'trainable params: N of M (f%)' and return (N, fraction)."""
    n, m = count(params), count(params) + count(frozen)
    frac = n / max(m, 1)
    log.info("trainable params: %s of %s (%.3f%%)", f"{n:,}", f"{m:,}", 100 * frac)
    return n, frac
