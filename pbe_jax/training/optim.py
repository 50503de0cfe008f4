"""The optimizer of the official recipe: AdamW (torch semantics) with the LambdaLinearScheduler
warm-up, optional global-norm clipping."""
from __future__ import annotations

import jax
import optax


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
