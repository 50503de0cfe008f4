"""Sweeps share one compiled program: hyperparameters that do not change shapes are inputs of
the train step (`pbe_jax.training.hparams`), so runs that differ only in them hit one
persistent-cache entry."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from pbe_jax import runtime
from pbe_jax import sharding as shd
from pbe_jax.training.hparams import hparams_of
from pbe_jax.training.state import Setup
from tests.train_utils import tiny_config


@pytest.mark.slow
def test_lr_sweep_compiles_the_step_once(tmp_path, own_cache_settings):
    """Two sweep points, the second with another lr, warm-up, weight decay, drop probability, EMA
    decay and clip norm (every one of them a step input, so an lr-only sweep is covered too): the
    step compiles once, the second point loads it from the cache, and each point trains with its
    own values (the lr metric and the losses differ)."""
    runtime.configure(str(tmp_path / "xla"))
    mesh = shd.make_mesh("data:1", devices=jax.devices()[:1])
    base = {"train.warmup_steps": 3, "train.ema_decay": 0.9, "train.grad_clip": 1.0}
    points = [{"train.lr": 1e-3},
              {"train.lr": 5e-3, "train.warmup_steps": 5, "train.weight_decay": 0.1,
               "train.cond_drop_prob": 0.5, "train.ema_decay": 0.5, "train.grad_clip": 0.5}]
    misses, lrs, losses = [], [], []
    for point in points:
        cfg = tiny_config(**{**base, **point})
        setup = Setup(cfg, mesh)
        params, frozen = setup.random_params()
        state = setup.new_state(params)
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim))
                 for k, v in _batch(cfg).items()}
        before = runtime.compile_counts()["cache_misses"]
        step = setup.jit_step().lower(state, frozen, batch).compile()
        misses.append(runtime.compile_counts()["cache_misses"] - before)
        for _ in range(2):
            state, m = step(state, frozen, batch)
        lrs.append(float(m["lr"]))
        losses.append(float(m["loss"]))
    assert misses[0] >= 1 and misses[1:] == [0], misses
    # lr after one step of warm-up: lr * (f + (1 - f) / W)
    for point, lr in zip(points, lrs):
        h = hparams_of(tiny_config(**{**base, **point}).train)
        want = h["lr"] * (h["warmup_init_factor"] + (1 - h["warmup_init_factor"]) / h["warmup_steps"])
        np.testing.assert_allclose(lr, want, rtol=1e-6)
    assert len(set(losses)) == len(losses), losses


def _batch(cfg):
    from pbe_jax.data.pipeline import make_loader
    it = iter(make_loader(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed, mesh=None))
    return {k: np.asarray(v) for k, v in next(it).items()}


def test_goodput_line_and_values(tmp_path):
    """Goodput: start-up sections sorted into start-up / compile / restore / steps, the loop's
    checkpoint and eval time taken out of the steps, restarts.jsonl's downtime counted."""
    import json
    import time

    from pbe_jax.training.goodput import Goodput

    (tmp_path / "restarts.jsonl").write_text(
        json.dumps({"failed_at": 100, "restart_at": 103.5, "exit_code": 75, "step": 4}) + "\n" + '{"fail')
    g = Goodput()
    g.add_startup({"startup/imports": 2.0, "startup/trace_lower": 1.0, "startup/compile": 3.0,
                   "startup/params_restore": 0.5, "startup/first_step": 0.25, "startup/total": 6.75})
    g.loop_started(data_wait_s=0.75)
    with g.timed("checkpoint"):
        time.sleep(0.05)
    values, line = g.report(str(tmp_path), data_wait_s=0.75)
    s = {k.split("/")[1][:-2]: v for k, v in values.items() if k.endswith("_s")}
    assert s["startup"] == 2.0 and s["compile"] == 4.0 and s["restore"] == 0.5 and s["data"] == 0.0
    assert s["checkpoint"] >= 0.05 and s["restart_downtime"] == 3.5 and values["goodput/restarts"] == 1
    assert 0.25 <= s["steps"] < 0.3
    np.testing.assert_allclose(values["goodput/total_s"], sum(v for k, v in s.items() if k != "total"))
    np.testing.assert_allclose(values["goodput/share"], s["steps"] / values["goodput/total_s"])
    assert line.startswith("goodput ") and "compile 4.0s" in line and "restarts 1 (lost 3.5s" in line, line
