r"""Paint-by-Example training: `python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=DIR`.

`train_and_evaluate(config, workdir)` runs in named sections, always in this order: mesh, data,
model (abstract), shardings, params (restore > init_from > random), step, loop. The train step
is a module-level pure function built by `make_train_step` and compiled with `jax.jit` and
explicit in/out shardings, the train state donated.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.checkpoint import Checkpointer
from pbe_jax.diffusion import pbe_loss
from pbe_jax.metrics import MetricWriter, image_grid, peak_flops_per_device
from pbe_jax.models.hub import cast_dtype
from pbe_jax.pipeline import FROZEN, TRAINABLE, PaintByExample
from pbe_jax.schedulers import noise_schedule

log = logging.getLogger("pbe_jax")

# --------------------------------------------------------------------------------------------
# Optimizer and step
# --------------------------------------------------------------------------------------------


def make_schedule(tcfg) -> optax.Schedule:
    """LambdaLinearScheduler of the official config: the multiplier rises linearly from
    `warmup_init_factor` to 1 over `warmup_steps`, then stays at 1 (cycle length 1e13)."""
    lr = tcfg.lr
    if tcfg.warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(lr * tcfg.warmup_init_factor, lr, tcfg.warmup_steps)


def _decay_mask(params):
    flat = jax.tree_util.tree_flatten_with_path(params)
    keep = [not any(getattr(k, "key", None) == "uncond_vector" for k in path) for path, _ in flat[0]]
    return jax.tree.unflatten(flat[1], keep)


def make_optimizer(tcfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(tcfg)
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    # torch.optim.AdamW semantics (decoupled decay on every trained param, as the official
    # code passes all params in one group), except `uncond_vector`: torch skips a param whose
    # .grad is None (the vector is only in the graph when the condition is dropped), while
    # here its gradient is an explicit zero and decay alone would shrink it.
    parts.append(optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                             weight_decay=tcfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), schedule


def _split_micro(batch: dict, n: int) -> dict:
    # [B, ...] -> [n, B/n, ...] taking every n-th sample, so the sharded leading dim stays the
    # sharded dim of each micro-batch (no resharding).
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch {x.shape[0]} not divisible by grad_accum {n}")
        return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)
    return jax.tree.map(f, batch)


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tcfg, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    """A pure `train_step(state, frozen, batch) -> (state, metrics)`.

    state: {'step', 'params' (trainable), 'opt_state', 'rng' (raw uint32[2] key), 'nan_skips'
    [, 'ema']}; frozen: VAE + CLIP tower params (inputs, never updated, no gradients);
    batch: the uint8 host contract of `pbe_jax.data.batch`.
    """
    alphas_cumprod = jnp.asarray(noise_schedule({
        "beta_schedule": tcfg.beta_schedule, "beta_start": tcfg.beta_start,
        "beta_end": tcfg.beta_end, "num_train_timesteps": tcfg.num_train_timesteps}))
    accum = int(tcfg.grad_accum)
    ema_decay = float(tcfg.ema_decay)

    def loss_fn(params, frozen, batch, rng):
        model = nnx.merge(graphdef, params, frozen, rest)
        return pbe_loss(model, batch, rng, alphas_cumprod, cond_drop_prob=tcfg.cond_drop_prob,
                        cond_drop_mode=tcfg.cond_drop_mode)

    grad_fn = jax.value_and_grad(loss_fn)

    def loss_and_grads(params, frozen, batch, rng):
        if accum == 1:
            return grad_fn(params, frozen, batch, rng)
        micro = _split_micro(batch, accum)

        def body(carry, xs):
            mb, r = xs
            loss, g = grad_fn(params, frozen, mb, r)
            return jax.tree.map(jnp.add, carry, (loss, g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zero, (micro, jax.random.split(rng, accum)))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    def train_step(state, frozen, batch):
        rng, step_rng = jax.random.split(state["rng"])
        params = state["params"]
        loss, grads = loss_and_grads(params, frozen, batch, step_rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": rng,
            "nan_skips": state["nan_skips"] + (~ok).astype(jnp.int32),
        }
        if "ema" in state:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], new["params"])
            new["ema"] = ema
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "update_ok": ok.astype(jnp.float32), "nan_skips": new["nan_skips"]}
        return new, metrics

    return train_step


# --------------------------------------------------------------------------------------------
# Model, shardings and state
# --------------------------------------------------------------------------------------------


def runtime_kwargs(config) -> dict:
    return dict(dtype=cast_dtype(config.dtype), attention_impl=config.attention_impl,
                remat=bool(config.remat), remat_policy=config.remat_policy or None)


def abstract_model(config) -> PaintByExample:
    return nnx.eval_shape(lambda: PaintByExample.from_model_config(
        config.model, seed=config.seed, **runtime_kwargs(config)))


class Setup:
    """Everything derived from (config, mesh) before any array exists."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        rules = tuple(tuple(r) for r in config.sharding_rules)
        self.abstract = abstract_model(config)
        self.graphdef, p_abs, f_abs, rest = nnx.split(self.abstract, TRAINABLE, FROZEN, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"model has state that is neither trainable nor frozen: {rest}")
        self.rest = nnx.to_pure_dict(rest)
        self.params_sharding = shd.state_shardings(p_abs, mesh, rules)
        self.frozen_sharding = shd.state_shardings(f_abs, mesh, rules)
        self.tx, self.schedule = make_optimizer(config.train)
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

        return make(self.abstract_params()), make(self.abstract_frozen())

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
        if "ema" in self.state_sharding:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    def jit_step(self) -> Callable:
        step = make_train_step(self.graphdef, self.rest, self.config.train, self.tx, self.schedule)
        batch_sh = {k: shd.batch_sharding(self.mesh, 4) for k in ("image", "mask", "reference")}
        return jax.jit(step, in_shardings=(self.state_sharding, self.frozen_sharding, batch_sh),
                       out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                       donate_argnums=(0,))

    def abstract_batch(self) -> dict:
        c = self.config
        b, r, ref = c.train.batch_size, c.data.resolution, c.data.reference_size
        s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=shd.batch_sharding(self.mesh, 4))  # noqa: E731
        return {"image": s(b, r, r, 3), "mask": s(b, r, r, 1), "reference": s(b, ref, ref, 3)}

    def _with_sharding(self, shapes, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

    def abstract_params(self) -> dict:
        shapes = nnx.to_pure_dict(nnx.split(self.abstract, TRAINABLE, ...)[1])
        return self._with_sharding(shapes, self.params_sharding)

    def abstract_frozen(self) -> dict:
        shapes = nnx.to_pure_dict(nnx.split(self.abstract, FROZEN, ...)[1])
        return self._with_sharding(shapes, self.frozen_sharding)

    def abstract_state(self) -> dict:
        """The train state's shapes with shardings: restore targets and AOT-compile inputs."""
        return self._with_sharding(jax.eval_shape(self.new_state, self.abstract_params()), self.state_sharding)

    def compile(self):
        """The compiled step for abstract inputs (cost and memory analysis, AOT checks)."""
        return self.jit_step().lower(self.abstract_state(), self.abstract_frozen(), self.abstract_batch()).compile()


def host_init(path: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray:
    """PyTorch-default-style init of one param from (seed, its path): deterministic, the same
    for any mesh or process count, and built on the host. (NNX's own initialisers run one
    threefry draw per param inside a jitted init, whose XLA compile takes minutes on CPU for a
    model of hundreds of arrays; random init only seeds demos and from-scratch runs.)
    kernels: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch Linear/Conv); norms: scale 1, bias 0;
    biases 0; embeddings N(0, 0.02); other vectors (`uncond_vector`, `class_embedding`) N(0, 1).
    """
    name = path[-1]
    digest = np.frombuffer(("/".join(path)).encode(), np.uint8)
    rng = np.random.default_rng([seed, *np.resize(digest, 64).tolist()])
    if name == "scale":
        return np.ones(shape, np.float32)
    if name == "bias":
        return np.zeros(shape, np.float32)
    if name == "kernel":
        bound = 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1))
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name == "embedding":
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the current step and exits 0."""

    def __init__(self):
        self.requested = False
        self._prev = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: checkpointing at the current step, then exiting")
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils  # noqa: PLC0415

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def restore(self):
        signal.signal(signal.SIGTERM, self._prev)


def _init_params(setup: Setup, config):
    """Precedence when the workdir has no checkpoint: config.init_from > random init."""
    fmt = config.init_from.format
    if not fmt:
        log.info("init: random (config.init_from.format is empty)")
        return setup.random_params()
    from pbe_jax.convert.load import load_pipeline  # noqa: PLC0415

    log.info("init: %s from %s", fmt, config.init_from.path)
    model = load_pipeline(fmt, config.init_from.path, clip=config.init_from.clip or None,
                          model_config=config.model, place=setup.place_fn(), seed=config.seed,
                          **runtime_kwargs(config))
    _, p, f, _ = nnx.split(model, TRAINABLE, FROZEN, ...)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(f)


def _input_grid(batch) -> np.ndarray:
    """Training inputs at step 0: image, masked image, reference (first 4 local samples)."""
    loc = {k: np.asarray(v.addressable_shards[0].data if hasattr(v, "addressable_shards") else v)[:4]
           for k, v in batch.items()}
    img = loc["image"].astype(np.float32) / 255
    mask = loc["mask"].astype(np.float32) / 255
    ref = loc["reference"].astype(np.float32) / 255
    h = img.shape[1]
    ref = np.stack([np.asarray(jax.image.resize(r, (h, h, 3), "linear")) for r in ref])
    return image_grid([img, img * mask + 0.5 * (1 - mask), ref])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics."""
    from pbe_jax.data.pipeline import make_loader  # noqa: PLC0415

    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
    # ---- mesh
    mesh = shd.make_mesh(config.mesh)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    if config.train.batch_size % shd.batch_axis_size(mesh):
        raise ValueError(f"config.train.batch_size={config.train.batch_size} not divisible by the "
                         f"batch mesh axes (data x fsdp = {shd.batch_axis_size(mesh)})")
    # ---- data
    loader = make_loader(config.data, global_batch_size=config.train.batch_size, seed=config.seed,
                         mesh=mesh)
    # ---- model (abstract) and shardings
    setup = Setup(config, mesh)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    writer = MetricWriter(workdir)
    # ---- params. Precedence: workdir checkpoint > config.init_from > random init.
    restored = ckpt.restore_latest(setup.abstract_state(), setup.abstract_frozen()) \
        if ckpt.steps() else None
    if restored is not None:
        step0, r = restored
        state, frozen = r.state, r.frozen
        if r.data:
            loader.set_state(r.data)
        log.info("resumed from %s/%d", ckpt.directory, step0)
    else:
        params, frozen = _init_params(setup, config)
        state = setup.new_state(params)
        step0 = 0
        if jax.process_index() == 0:
            (epath.Path(workdir) / "config.json").write_text(config.to_json(indent=2))
    # ---- step
    t0 = time.perf_counter()
    it = iter(loader)
    batch = next(it) if step0 < config.train.num_steps else None
    compiled = setup.jit_step().lower(state, frozen, batch).compile() if batch is not None else None
    flops = step_flops(compiled) if compiled is not None else 0.0
    peak = peak_flops_per_device(config.peak_flops)
    log.info("compiled the train step in %.1fs; %.3g FLOPs/step/device; peak %.3g FLOP/s/device",
             time.perf_counter() - t0, flops, peak)
    if step0 == 0 and batch is not None:
        writer.image(0, "train_inputs", _input_grid(batch))
    # ---- loop
    pre = _Preemption()
    last = {}
    step = step0
    t_last, n_last = time.perf_counter(), step0
    try:
        while step < config.train.num_steps:
            state, m = compiled(state, frozen, batch)
            step += 1
            stop_nan = config.train.nan_policy == "stop" and not bool(m["update_ok"])
            if stop_nan:
                raise FloatingPointError(f"non-finite loss/grad at step {step}: stopping "
                                         f"(nan_policy='stop'); the last good checkpoint is intact")
            is_last = step == config.train.num_steps
            if step % config.log_every_steps == 0 or is_last:
                m = jax.device_get(m)
                dt = (time.perf_counter() - t_last) / max(step - n_last, 1)
                t_last, n_last = time.perf_counter(), step
                ips = config.train.batch_size / dt
                mfu = flops / dt / peak if flops and peak else 0.0
                last = {**{k: float(v) for k, v in m.items()}, "step_time": dt, "images_per_s": ips,
                        "mfu": mfu}
                last.update({f"data/{k}": v for k, v in loader.bad_data_counts().items()})
                writer.scalars(step, last)
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.2f img/s %.3fs/step MFU %.2f%% skips %d",
                         step, config.train.num_steps, last["loss"], last["lr"], last["grad_norm"], ips,
                         dt, 100 * mfu, int(last["nan_skips"]))
            preempted = pre.agreed()
            if step % config.ckpt_every_steps == 0 or is_last or preempted:
                ckpt.save(step, state, frozen, loader.get_state(), json.loads(config.to_json()),
                          wait=preempted or is_last)
            if preempted:
                log.warning("checkpoint at step %d written; exiting on SIGTERM", step)
                break
            if config.sample_every_steps and step % config.sample_every_steps == 0:
                _log_samples(setup, state, frozen, batch, writer, step)
            if config.evals.every_steps and step % config.evals.every_steps == 0:
                _run_evals(setup, state, frozen, writer, step)
            if not is_last:
                batch = next(it)
    finally:
        pre.restore()
        ckpt.close()
        writer.close()
        loader.close()  # stops grain worker processes / threads
    return last


def _log_samples(setup: Setup, state, frozen, batch, writer: MetricWriter, step: int) -> None:
    """A grid of sampler outputs on the current batch's first images (process 0 writes)."""
    from pbe_jax.sample import training_samples  # noqa: PLC0415

    model = nnx.merge(setup.graphdef, state["params"], frozen, setup.rest)
    grid = training_samples(model, batch, setup.config)
    if grid is not None:
        writer.image(step, "samples", grid)


def _run_evals(setup: Setup, state, frozen, writer: MetricWriter, step: int) -> None:
    """COCOEE metrics of the current params (`config.evals`), on every process."""
    from pbe_jax.evaluate import training_eval  # noqa: PLC0415

    model = nnx.merge(setup.graphdef, state["params"], frozen, setup.rest)
    values = training_eval(model, setup.config, step)
    if values:
        writer.scalars(step, values)
        log.info("step %d evals: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def main(argv) -> None:
    del argv
    setup_logging()
    train_and_evaluate(_FLAGS.config, _FLAGS.workdir)


def setup_logging() -> None:
    """pbe_jax INFO lines on the console; orbax/absl chatter only from WARNING up."""
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False


def _define_flags():
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from pbe_jax import distributed  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pbe.py:demo", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); gs:// works")
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()
    return flags.FLAGS


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()

    def _main(argv):
        from pbe_jax import distributed  # noqa: PLC0415

        distributed.initialize_from_flags()
        main(argv)

    app.run(_main)
