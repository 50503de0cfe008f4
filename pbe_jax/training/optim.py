"""The optimizer of the official recipe: torch.optim.AdamW (torch 1.11 semantics, as PyTorch
Lightning 1.4.2 drives it) with the LambdaLinearScheduler warm-up, optional global-norm clipping.

What "torch semantics" adds to optax's adamw (PBE_SPEC 1.2): torch skips a parameter whose
`.grad` is None, and keeps one step count per parameter for Adam's bias correction. In the
official run a parameter's `.grad` is None until the first batch whose loss reaches it, and a
zero tensor ever after (Lightning calls `optimizer.zero_grad()`, which in torch 1.11 zeroes
rather than frees). Paint by Example has two such parameter sets, because the CFG drop is one
draw per batch: the mapper / final LN / proj_out get no gradient from a dropped batch, and
`uncond_vector` none from a kept one. So each starts to be updated (and weight-decayed) from the
first batch that reaches it; from then on it is decayed every step, gradient or not
(`uncond_vector` shrinks x0.82 over 2 M steps at 1e-5 where gradients do not push back).

Here a module that the loss did not run has gradients that are exactly zero: a parameter of
the encoder's trained parts (mapper, final LN, proj_out, uncond_vector) is skipped until its part
has had a non-zero gradient, and its step count starts then; the UNet runs in every loss.
`config.train.decay_uncond_vector=False` exempts `uncond_vector` from decay (pbe_jax's behaviour
before; not the official one).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pbe_jax.training.hparams import lr_at


def make_schedule(tcfg) -> optax.Schedule:
    """LambdaLinearScheduler of the official config: the multiplier rises linearly from
    `warmup_init_factor` to 1 over `warmup_steps`, then stays at 1 (cycle length 1e13)."""
    lr = tcfg.lr
    if tcfg.warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(lr * tcfg.warmup_init_factor, lr, tcfg.warmup_steps)


class TorchAdamWState(NamedTuple):
    """count: int32 [] optimizer steps (the lr schedule's step, as LambdaLR's); param_steps:
    int32 [L] per parameter (flatten order) how often it was updated, torch's `state['step']`
    (0 = its `.grad` has always been None); mu / nu: Adam's moments, shaped like the params."""

    count: jax.Array
    param_steps: jax.Array
    mu: Any
    nu: Any


def torch_adamw(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
                weight_decay: float, decay_mask: Any = None,
                modules: Callable[[Any], list[int]] | None = None,
                mu_dtype: Any = None) -> optax.GradientTransformation:
    """`torch.optim.AdamW` step by step, with the per-parameter skip and step count described
    in the module docstring. `decay_mask`: a bool pytree like the params or a function of them
    (False: no weight decay for that param); None decays all. `modules(params)`: per param
    leaf (flatten order) the index of its module, whose gradients are all exactly zero when the
    loss did not run it (torch: `.grad` is None), or -1 for a module every loss runs. None:
    each param is its own module. `mu_dtype`: the dtype the first moment is stored in (None:
    the param's; e.g. bfloat16 saves a quarter of the AdamW state, optax's `mu_dtype`): the
    update computes in the param's dtype and rounds the new moment to `mu_dtype`."""
    mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None

    def init(params):
        n = len(jax.tree.leaves(params))
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return TorchAdamWState(jnp.zeros((), jnp.int32), jnp.zeros((n,), jnp.int32),
                               mu, jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params, ok=None, hparams=None, **_):
        """`ok` (bool scalar, optional): False leaves the params (updates 0) and the whole
        state unchanged: the train step's skip of a non-finite loss or gradient. `hparams`
        (`training.hparams`, optional): the lr schedule and weight decay as step inputs, in
        place of `learning_rate` and `weight_decay`."""
        if hparams is None:
            lr, wd = learning_rate(state.count), weight_decay
        else:
            lr, wd = lr_at(state.count, hparams), hparams["weight_decay"]
        g_leaves, treedef = jax.tree.flatten(grads)
        mask = decay_mask(params) if callable(decay_mask) else decay_mask
        decays = jax.tree.leaves(mask) if mask is not None else [True] * len(g_leaves)
        module = modules(params) if modules is not None else list(range(len(g_leaves)))
        ran = {m: functools.reduce(jnp.logical_or, [jnp.any(g != 0) for g, mm in zip(g_leaves, module)
                                                     if mm == m])
               for m in set(module) if m >= 0}
        # torch: p.grad is not None <=> its module has run in some step so far
        reached = jnp.stack([ran[m] if m >= 0 else jnp.bool_(True) for m in module])  # [L]
        active = (state.param_steps > 0) | reached
        if ok is not None:
            active = active & ok
        steps = state.param_steps + active.astype(jnp.int32)
        # The leaves of one module share their step count (they are skipped or stepped
        # together from the same start), so torch's per-parameter lr / bias_correction1 and
        # sqrt(bias_correction2) are computed once per module, from its first leaf: one set of
        # scalars instead of one slice of an [L] vector per leaf (fewer kernels to compile).
        scalars = {}
        for i, m in enumerate(module):
            if m not in scalars:
                t = jnp.maximum(steps[i], 1).astype(jnp.float32)
                scalars[m] = (lr / (1 - b1**t), jnp.sqrt(1 - b2**t), active[i])
        out = ([], [], [])
        for i, (g, m, v, p) in enumerate(zip(g_leaves, jax.tree.leaves(state.mu),
                                             jax.tree.leaves(state.nu), jax.tree.leaves(params))):
            step_size, bc2_sqrt, on = scalars[module[i]]
            gated = module[i] >= 0 or ok is not None  # else always stepped
            m_new = b1 * m + (1 - b1) * g  # a bf16 mu: b1 * m rounds to bf16, as optax
            v_new = b2 * v + (1 - b2) * g * g
            if gated:  # skipped (its module never ran, or not ok): the moments stay
                m_new, v_new = jnp.where(on, m_new, m), jnp.where(on, v_new, v)
            m_out = m_new.astype(m.dtype)
            if m_out.dtype == m_new.dtype:
                # The update reads the stored moments rather than recomputing them: each is
                # written in place once and no copy of the old moments is needed (on XLA:CPU
                # ~2 fewer kernels per parameter). A bf16 mu updates with the unrounded moment.
                m_out, v_new = jax.lax.optimization_barrier((m_out, v_new))
                m_new = m_out
            u = -step_size * m_new / (jnp.sqrt(v_new) / bc2_sqrt + eps)
            if decays[i] and (weight_decay or hparams is not None):
                u = u - lr * wd * p  # torch: p *= 1 - lr * weight_decay, first
            if gated:
                u = jnp.where(on, u, 0)
            for lst, x in zip(out, (u.astype(p.dtype), m_out, v_new)):
                lst.append(x)
        upd, mu, nu = (jax.tree.unflatten(treedef, lst) for lst in out)
        count = state.count + (1 if ok is None else ok.astype(jnp.int32))
        return upd, TorchAdamWState(count, steps, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


def _paths(params) -> list[tuple[str, ...]]:
    return [tuple(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def pbe_modules(params) -> list[int]:
    """Module index per trained param: -1 for the UNet (every loss runs it), and one index per
    trained part of the image encoder (`mapper`, `final_layer_norm`, `proj_out`,
    `uncond_vector`): the CFG drop decides which of those the loss runs."""
    names = ["/".join(p[:2]) if p[0] == "image_encoder" else "" for p in _paths(params)]
    index = {n: i for i, n in enumerate(dict.fromkeys(n for n in names if n))}
    return [index[n] if n else -1 for n in names]


def _decay_mask(params):
    """False for `uncond_vector` (the `decay_uncond_vector=False` exemption), True elsewhere."""
    return jax.tree.unflatten(jax.tree.structure(params),
                              ["uncond_vector" not in p for p in _paths(params)])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (same formula and empty state), whose norm can come from the
    step's `hparams['grad_clip']` instead of the constant."""
    def update(updates, state, params=None, hparams=None, **_):
        limit = max_norm if hparams is None else hparams["grad_clip"]
        g_norm = optax.global_norm(updates)
        keep = g_norm < limit

        def clip(t):
            scale = limit if hparams is None else limit.astype(t.dtype)
            return jax.lax.select(keep, t, (t / g_norm.astype(t.dtype)) * scale)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(tcfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(tcfg)
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(clip_by_global_norm(tcfg.grad_clip))
    # One parameter group, as the official configure_optimizers passes all trained params.
    parts.append(torch_adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                             weight_decay=tcfg.weight_decay,
                             decay_mask=None if tcfg.decay_uncond_vector else _decay_mask,
                             modules=pbe_modules, mu_dtype=tcfg.get("mu_dtype")))
    return optax.chain(*parts), schedule
