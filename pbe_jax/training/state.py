"""Everything derived from (config, mesh) before any array exists: the abstract model, the
shardings of params / optimizer state / frozen encoders / batch, the jitted step, random init.
Shared by training, AOT compilation, benchmarks and tests."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.data.batch import HOST_KEYS, host_batch_spec
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.models.abstract import eval_shape
from pbe_jax.models.hub import cast_dtype
from pbe_jax.models.init import host_init
from pbe_jax.models.paint_by_example import PaintByExampleModel
from pbe_jax.training.hparams import BoundStep, hparams_of
from pbe_jax.training.lora import cast_base, training_filters, with_lora, with_lora_scales
from pbe_jax.training.optim import make_optimizer
from pbe_jax.training.step import make_train_step


def config_runtime(config) -> dict:
    """The runtime settings of a training config (compute dtype, attention kernel, remat)."""
    return dict(dtype=cast_dtype(config.dtype), attention_impl=config.attention_impl,
                remat=bool(config.remat), remat_policy=config.remat_policy or None)


def abstract_model(config) -> PaintByExampleModel:
    return eval_shape(lambda: with_lora(PaintByExampleModel.from_model_config(
        config.model, seed=config.seed, **config_runtime(config)), config))


class Setup:
    """Everything derived from (config, mesh) before any array exists."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        shd.check_batch_size(config.train.batch_size, mesh, what="config.train.batch_size")
        rules = tuple(tuple(r) for r in config.sharding_rules)
        self.abstract = abstract_model(config)
        # What trains and what is a frozen step input (the paper: VAE and CLIP tower frozen).
        # LoRA (`config.train.lora.rank`): adapters + named parts train, the rest is frozen.
        self.trainable, self.frozen = training_filters(config)
        self.graphdef, p_abs, f_abs, rest = nnx.split(self.abstract, self.trainable, self.frozen, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"model has state that is neither trainable nor frozen: {rest}")
        self.rest = nnx.to_pure_dict(rest)
        self.params_sharding = shd.state_shardings(p_abs, mesh, rules)
        self.frozen_sharding = shd.state_shardings(f_abs, mesh, rules)
        self.tx, self.schedule = make_optimizer(config.train)
        # The one noise schedule: the model's scheduler config (`config.model.scheduler`).
        self.noise = NoiseSchedule.from_config(self.abstract.scheduler_config)
        p_shapes = nnx.to_pure_dict(p_abs)
        opt_shapes = jax.eval_shape(self.tx.init, p_shapes)
        rep = shd.replicated(mesh)
        self.state_sharding = {
            "step": rep, "params": self.params_sharding,
            "opt_state": shd.opt_state_shardings(opt_shapes, self.params_sharding, mesh),
            "rng": rep, "nan_skips": rep,
        }
        if config.train.ema_decay > 0:
            self.state_sharding["ema"] = self.params_sharding

    def model(self, params, frozen):
        """The model with these params (e.g. a train state's, sharded as training placed them)."""
        return nnx.merge(self.graphdef, params, frozen, self.rest)

    def random_params(self):
        """Random init (training from scratch, the demo), each array built on the host and put
        straight into its sharding; see `host_init`."""
        place = self.place_fn()
        seed = int(self.config.seed)

        def make(tree):
            flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
            leaves = []
            for path, x in flat:
                key = tuple(str(getattr(k, "key", k)) for k in path)
                leaves.append(place(key, host_init(key, x.shape, seed)))
            return jax.tree.unflatten(treedef, leaves)

        return make(self.abstract_params()), cast_base(with_lora_scales(make(self.abstract_frozen()), self.config),
                                                       self.config)

    def place_fn(self) -> Callable[[tuple, np.ndarray], jax.Array]:
        """For checkpoint loaders: put a host array straight into its sharding. Each process
        copies only the shards its devices hold (works multi-host)."""
        flat = {}
        for tree in (self.params_sharding, self.frozen_sharding):
            for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
                flat[tuple(str(getattr(k, "key", k)) for k in path)] = s

        def place(path, arr):
            s = flat[tuple(str(p) for p in path)]
            return jax.make_array_from_callback(arr.shape, s, lambda idx: arr[idx])

        return place

    def new_state(self, params) -> dict:
        config = self.config
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
        rep = shd.replicated(self.mesh)
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
            "params": params,
            "opt_state": opt_state,
            "rng": jax.device_put(jax.random.PRNGKey(config.seed + 1), rep),
            "nan_skips": jax.device_put(jnp.zeros((), jnp.int32), rep),
        }
        if "ema" in self.state_sharding:  # one program for the whole tree (not one per shape)
            state["ema"] = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                   out_shardings=self.state_sharding["ema"])(params)
        return state

    def jit_step(self, hparams: dict | None = None) -> BoundStep:
        """The jitted step over (state, frozen, batch) with the hyperparameters of
        `training.hparams` as a bound input (this config's, or `hparams`): runs that differ
        only in them share one compiled program."""
        pure = make_train_step(self.graphdef, self.rest, self.config.train, self.tx, self.schedule,
                               self.noise)

        def train_step(state, frozen, batch, hparams):
            return pure(state, frozen, batch, hparams=hparams)

        batch_sh = {k: shd.batch_sharding(self.mesh, 4) for k in HOST_KEYS}
        rep = shd.replicated(self.mesh)
        hp = hparams_of(self.config.train) if hparams is None else hparams
        in_sh = (self.state_sharding, self.frozen_sharding, batch_sh, {k: rep for k in hp})
        jitted = jax.jit(train_step, in_shardings=in_sh, out_shardings=(self.state_sharding, rep),
                         donate_argnums=(0,))
        return BoundStep(jitted, hp, self.mesh)

    def abstract_batch(self) -> dict:
        c = self.config
        spec = host_batch_spec(c.train.batch_size, c.data.resolution, c.data.reference_size)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(self.mesh, v.ndim))
                for k, v in spec.items()}

    def _with_sharding(self, shapes, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

    def abstract_params(self) -> dict:
        shapes = nnx.to_pure_dict(nnx.split(self.abstract, self.trainable, ...)[1])
        return self._with_sharding(shapes, self.params_sharding)

    def abstract_frozen(self) -> dict:
        shapes = nnx.to_pure_dict(nnx.split(self.abstract, self.frozen, ...)[1])
        return cast_base(self._with_sharding(shapes, self.frozen_sharding), self.config)

    def abstract_state(self) -> dict:
        """The train state's shapes with shardings: restore targets and AOT-compile inputs."""
        return self._with_sharding(jax.eval_shape(self.new_state, self.abstract_params()), self.state_sharding)

    def compile(self):
        """The compiled step for abstract inputs (cost and memory analysis, AOT checks)."""
        return self.jit_step().lower(self.abstract_state(), self.abstract_frozen(), self.abstract_batch()).compile()


def step_flops(compiled) -> float:
    """FLOPs of one step per device, from XLA's cost analysis (0 when unavailable)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return 0.0
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def state_bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of (abstract or concrete) sharded arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total
