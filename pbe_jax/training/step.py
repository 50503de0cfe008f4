"""The train step: a module-level pure function built by `make_train_step`, jitted by
`training.state.Setup.jit_step` with explicit shardings."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pbe_jax.diffusion import LossDraws, NoiseSchedule, pbe_loss
from pbe_jax.training.hparams import lr_at


def _split_micro(batch: dict, n: int) -> dict:
    # [B, ...] -> [n, B/n, ...] taking every n-th sample, so the sharded leading dim stays the
    # sharded dim of each micro-batch (no resharding).
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch {x.shape[0]} not divisible by grad_accum {n}")
        return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)
    return jax.tree.map(f, batch)


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tcfg, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, noise: NoiseSchedule) -> Callable:
    """A pure `train_step(state, frozen, batch, draws=None, hparams=None) -> (state, metrics)`.

    state: {'step', 'params' (trainable), 'opt_state', 'rng' (raw uint32[2] key), 'nan_skips'
    [, 'ema']}; frozen: VAE + CLIP tower params (inputs, never updated, no gradients);
    batch: the uint8 host contract of `pbe_jax.data.batch`. `noise` is the model's noise
    schedule (betas and prediction type of `config.model.scheduler`). `draws`
    (`diffusion.LossDraws`) replaces the step's random draws (VAE noise, CFG drop, timesteps,
    noise): tests compare the step against the official PyTorch computation with it.
    """
    accum = int(tcfg.grad_accum)

    def loss_fn(params, frozen, batch, rng, drop_prob, draws=None):
        model = nnx.merge(graphdef, params, frozen, rest)
        return pbe_loss(model, batch, rng, noise, cond_drop_prob=drop_prob,
                        cond_drop_mode=tcfg.cond_drop_mode, draws=draws)

    grad_fn = jax.value_and_grad(loss_fn)

    def loss_and_grads(params, frozen, batch, rng, draws, hparams):
        # a zero drop probability stays a constant: no drop is drawn (a structural choice)
        drop_prob = tcfg.cond_drop_prob if hparams is None or not tcfg.cond_drop_prob \
            else hparams["cond_drop_prob"]
        if accum == 1:
            return grad_fn(params, frozen, batch, rng, drop_prob, draws)
        if draws is not None:
            raise ValueError(f"train_step: explicit draws need grad_accum 1, got {accum}")
        micro = _split_micro(batch, accum)

        def body(carry, xs):
            mb, r = xs
            loss, g = grad_fn(params, frozen, mb, r, drop_prob)
            return jax.tree.map(jnp.add, carry, (loss, g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zero, (micro, jax.random.split(rng, accum)))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    def train_step(state, frozen, batch, draws: LossDraws | None = None, hparams: dict | None = None):
        rng, step_rng = jax.random.split(state["rng"])
        params = state["params"]
        loss, grads = loss_and_grads(params, frozen, batch, step_rng, draws, hparams)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step changes nothing: the optimizer leaves its state as it was when not
        # `ok` (`optim.torch_adamw`), and the params keep their values.
        extra = {} if hparams is None else {"hparams": hparams}
        updates, opt_state = tx.update(grads, state["opt_state"], params, ok=ok, **extra)
        new_params = jax.tree.map(lambda p, u: jnp.where(ok, (p + u).astype(p.dtype), p), params, updates)
        new = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "rng": rng,
            "nan_skips": state["nan_skips"] + (~ok).astype(jnp.int32),
        }
        if "ema" in state:
            ema_decay = float(tcfg.ema_decay) if hparams is None else hparams["ema_decay"]
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], new["params"])
            new["ema"] = ema
        lr = schedule(state["step"]) if hparams is None else lr_at(state["step"], hparams)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "update_ok": ok.astype(jnp.float32), "nan_skips": new["nan_skips"]}
        return new, metrics

    return train_step
