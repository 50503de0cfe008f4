"""LoRA adapters on a pbe_jax model, built from Flax NNX's own `nnx.LoRALinear` / `nnx.LoRA`.

`add_lora(model, spec, rngs)` replaces every `nnx.Linear` whose dotted path matches the spec's
targets (diffusers/PEFT semantics: a target `to_out.0` matches `....to_out.0`) by a
`ScaledLoRALinear` that shares the Linear's own `kernel` / `bias` Variables, so the base keeps
its paths (`...attn1.to_q.kernel`) and the adapter adds `...attn1.to_q.lora.lora_a` [in, r] and
`.lora_b` [r, out] (`nnx.LoRAParam`), plus `lora_scale`, a scalar `LoRAScale` variable.

    y = base(x) + lora_scale * (x @ lora_a @ lora_b),   lora_scale = scale * alpha / rank

What nnx.LoRALinear gives as is: the [in, r] x [r, out] factors, their `LoRAParam` type (a
training filter), `lora_b` initialised to zero (so an added adapter changes nothing, exactly)
and a state layout that keeps the Linear's. What it lacks and this module adds: the scale (the
effective multiplier lives in a variable, a traced input of every compiled function, so
changing it recompiles nothing), logical axes that follow the base kernel's ([in_axis, None],
[None, out_axis]), and the compute dtype of the base layer. Convolutions are not targets (NNX
has no LoRA convolution); a pattern that matches one is refused, naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Targets of the default spec: the UNet's attention projections (diffusers' LoRA scripts).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")
PROJ_TARGETS = ("proj_in", "proj_out")


class LoRAScale(nnx.Variable):
    """The multiplier of one adapter's output (`scale * alpha / rank`): a model input, never
    trained (not a `Param`)."""


COMPONENTS = ("unet", "image_encoder")  # the parts adapters can sit on


def names(value) -> tuple[str, ...]:
    """A config list of names (`train.lora.targets` / `components` / `also_train`) as a tuple,
    comma-separated entries split: `--config.train.lora.components=unet,image_encoder` gives
    ('unet,image_encoder',) from ml_collections, which means ('unet', 'image_encoder')."""
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(p.strip() for v in items for p in str(v).split(",") if p.strip())


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which Linears get an adapter and its shape. `targets`: module-name patterns matched as
    PEFT's `target_modules` (the full dotted path, or its tail after a '.'); `components`: the
    top-level parts searched (`unet`, `image_encoder`)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    components: tuple[str, ...] = ("unet",)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA targets are empty: name at least one module pattern")

    @classmethod
    def from_config(cls, lcfg) -> "LoRASpec":
        """From `config.train.lora` (rank, alpha (0: = rank), targets, components)."""
        return cls(rank=int(lcfg.rank), alpha=float(lcfg.alpha) or float(lcfg.rank),
                   targets=names(lcfg.targets), components=names(lcfg.components))

    def matches(self, path: str) -> bool:
        if path.split(".", 1)[0] not in self.components:
            return False
        return any(path == t or path.endswith("." + t) for t in self.targets)


class ScaledLoRALinear(nnx.LoRALinear):
    """`nnx.LoRALinear` plus a `lora_scale` variable (see the module docstring). Built from a
    Linear by `from_linear`, which shares that Linear's kernel and bias."""

    @classmethod
    def from_linear(cls, base: nnx.Linear, rank: int, alpha: float, rngs: nnx.Rngs, *,
                    scale: float = 1.0) -> "ScaledLoRALinear":
        kernel_axes = tuple(base.kernel.get_metadata().get("out_sharding") or (None, None))
        in_axis, out_axis = kernel_axes
        layer = cls(base.in_features, base.out_features, lora_rank=rank, use_bias=base.use_bias,
                    dtype=base.dtype, param_dtype=base.param_dtype, precision=base.precision,
                    kernel_init=nnx.initializers.zeros_init(), lora_dtype=base.dtype,
                    lora_param_dtype=jnp.float32, rngs=rngs,
                    a_metadata={"out_sharding": (in_axis, None)},
                    b_metadata={"out_sharding": (None, out_axis)})
        layer.kernel = base.kernel  # the base's own Variables: same paths, same arrays
        if base.use_bias:
            layer.bias = base.bias
        layer.lora_alpha_over_rank = alpha / rank
        layer.lora_scale = LoRAScale(jnp.asarray(scale * alpha / rank, jnp.float32), out_sharding=())
        return layer

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        delta = self.lora(x)
        return y + (self.lora_scale[...].astype(delta.dtype) * delta).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """kernel + lora_scale * lora_a @ lora_b (fp32), the fused Linear's kernel."""
        a, b = self.lora.lora_a[...], self.lora.lora_b[...]
        k = self.kernel[...]
        return (k.astype(jnp.float32) + self.lora_scale[...] * (a @ b)).astype(k.dtype)


def _linears(model: nnx.Module) -> Iterable[tuple[tuple, nnx.Module]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, nnx.Conv)):
            yield path, node


def set_module(model: nnx.Module, path: tuple, node) -> None:
    """Put `node` at `path` (attribute names / list indices) of `model`."""
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = node
    else:
        setattr(parent, path[-1], node)


def add_lora(model: nnx.Module, spec: LoRASpec, rngs: nnx.Rngs, *, scale: float = 1.0
             ) -> list[str]:
    """Put an adapter (zero effect: `lora_b` = 0) on every Linear of `model` that `spec`
    matches, in place. Returns the adapted paths. Raises ValueError when nothing matches or a
    pattern names a convolution."""
    adapted = []
    for path, node in list(_linears(model)):
        name = ".".join(str(p) for p in path)
        if isinstance(node, ScaledLoRALinear) or not spec.matches(name):
            continue
        if isinstance(node, nnx.Conv):
            raise ValueError(f"LoRA target {name} is a convolution: pbe_jax's LoRA adapts Linear "
                             f"layers only (targets {spec.targets})")
        set_module(model, path, ScaledLoRALinear.from_linear(node, spec.rank, spec.alpha, rngs, scale=scale))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"LoRA targets {spec.targets} match no Linear layer in {spec.components}")
    return adapted


def lora_layers(model: nnx.Module) -> dict[str, ScaledLoRALinear]:
    """Dotted path -> adapted layer."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, ScaledLoRALinear)}


def set_lora_scale(model: nnx.Module, scale: float) -> None:
    """Set every adapter's multiplier to `scale * alpha / rank`: a new value of a variable, so
    a compiled function that takes the model's state runs it without recompiling."""
    for layer in lora_layers(model).values():
        put_scale(layer, scale * layer.lora_alpha_over_rank)


def put_scale(layer: ScaledLoRALinear, multiplier: float) -> None:
    """Set a layer's multiplier, on the devices (sharding) its old value had."""
    old = layer.lora_scale[...]
    value = np.float32(multiplier)
    layer.lora_scale[...] = (jax.device_put(value, old.sharding) if hasattr(old, "sharding")
                             else jnp.asarray(value))
