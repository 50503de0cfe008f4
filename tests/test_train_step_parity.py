"""One pbe_jax train step equals one step of the official PyTorch training computation.

The same tiny Paint-by-Example model (pbe_jax random init, perturbed so no bias or norm sits at
its init value, exported with `save_diffusers`) runs pbe_jax's `make_train_step` and the
official step of `tests/torch_pbe_step.py` (diffusers / transformers modules on the export) on
the same uint8 batch with the same random draws (`diffusion.LossDraws`: VAE posterior noise, CFG
drop, timesteps, noise). Checked: the loss and every trainable parameter's gradient within 1e-4
relative (fp32), AdamW's state (moments, per-parameter step counts, the skipped parameters), the
lr (the LambdaLinearScheduler multiplier at step 0) and the updated params within 1e-5; for
epsilon (an SD 1.x-style model) and v-prediction (an SD 2.x-style model: linear projections,
per-block heads, upcast attention, a gelu tower), with and without the condition dropped.

At the official step-0 lr (1e-5 x 1e-6) an update is far below fp32 resolution, so the params
check alone could not fail; the moments carry the gradients, and `test_adamw_follows_torch`
runs the optimizer over three steps at a visible lr on torch's own gradients: the parameters
torch skips (`.grad` None), the per-parameter bias correction, and the weight decay of
`uncond_vector` from its first dropped batch on (a step where it gets a zero gradient and
decays), or not with `decay_uncond_vector=False`.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from pbe_jax import sharding as shd
from pbe_jax.benchmarks.model import random_batch
from pbe_jax.convert.diffusers_io import save_diffusers
from pbe_jax.convert.torch_layout import from_torch_layout, path_to_torch_key, to_torch_layout
from pbe_jax.diffusion import LossDraws
from pbe_jax.training.optim import TorchAdamWState, make_optimizer
from pbe_jax.training.state import Setup
from pbe_jax.training.step import make_train_step
from tests.torch_pbe_step import OfficialStep
from tests.train_utils import tiny_config

B = 4
OFFICIAL = {"train.lr": 1e-5, "train.warmup_steps": 10_000, "train.warmup_init_factor": 1e-6,
            "train.weight_decay": 0.01, "train.b1": 0.9, "train.b2": 0.999, "train.eps": 1e-8,
            "train.grad_clip": 0.0, "train.grad_accum": 1, "train.batch_size": B, "dtype": "fp32",
            "remat": False}
# SD 2.x-style: linear projections, per-block heads, upcast attention, a gelu CLIP tower.
SD2_UNET = dict(in_channels=9, out_channels=4, sample_size=8, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                upcast_attention=True)


# q / k of attention over the one context token (UNet cross-attention, the mapper's
# self-attention) do not change the output (PBE_SPEC 1.3): their true gradient is zero.
ONE_TOKEN_QK = re.compile(r"(attn2\.to_[qk]|transformer_blocks\.\d+\.norm2|mapper\.blocks\.\d+\.attn1\.to_[qk])\.")


def _config(prediction_type: str, **overrides) -> ml_collections.ConfigDict:
    cfg = tiny_config(**{**OFFICIAL, **overrides})
    with cfg.unlocked():
        cfg.model.scheduler.prediction_type = prediction_type
        if prediction_type == "v_prediction":
            cfg.model.unet = ml_collections.ConfigDict(SD2_UNET)
            cfg.model.image_encoder.hidden_act = "gelu"
    return cfg


def _leaf(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _torch_key(path) -> str:
    return path_to_torch_key(tuple(str(getattr(k, "key", k)) for k in path))


def torch_named(tree) -> dict[str, np.ndarray]:
    """A trainable-params-shaped pytree -> {diffusers key: torch-layout array}."""
    return {_torch_key(p): to_torch_layout(_leaf(p), np.asarray(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def from_torch_named(named: dict, like) -> dict:
    """{diffusers key: torch-layout array or None} -> a pytree like `like` (None -> zeros)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = [np.zeros(ref.shape, np.float32) if named[_torch_key(p)] is None else
           from_torch_layout(_leaf(p), np.asarray(named[_torch_key(p)], np.float32), ref.shape)
           for p, ref in flat]
    return jax.tree.unflatten(treedef, out)


def _perturb(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                        jax.device_get(tree))


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def built(request, tmp_path_factory):
    """(prediction type, cfg, setup, params, frozen, export dir, jitted make_train_step)."""
    pt = request.param
    cfg = _config(pt)
    mesh = shd.make_mesh("data:1", devices=jax.devices()[:1])
    setup = Setup(cfg, mesh)
    params, frozen = (_perturb(t, s) for t, s in zip(setup.random_params(), (1, 2)))
    d = str(tmp_path_factory.mktemp(f"pbe_{pt}"))
    save_diffusers(setup.model(params, frozen), d)
    step = jax.jit(make_train_step(setup.graphdef, setup.rest, cfg.train, setup.tx, setup.schedule,
                                   setup.noise))
    return pt, cfg, setup, params, frozen, d, step


def _official(built, **kw) -> OfficialStep:
    pt, cfg, *_, d, _ = built
    t = cfg.train
    args = dict(prediction_type=pt, lr=t.lr, warmup_steps=t.warmup_steps,
                warmup_init_factor=t.warmup_init_factor, weight_decay=t.weight_decay,
                scale_factor=cfg.model.vae.scaling_factor)
    return OfficialStep(d, **{**args, **kw})


def _inputs(cfg, drop: bool, seed: int = 0):
    """(uint8 host batch, LossDraws of numpy arrays) for the tiny config."""
    batch = random_batch(B, cfg.data.resolution, cfg.data.reference_size, seed=seed)
    rng = np.random.default_rng(100 + seed)
    h = cfg.data.resolution // 2 ** (len(cfg.model.vae.block_out_channels) - 1)
    c = cfg.model.vae.latent_channels
    draws = LossDraws(vae_eps=rng.standard_normal((2 * B, h, h, c)).astype(np.float32),
                      drop=np.full((B,), drop), t=np.array([3, 250, 611, 999], np.int32),
                      noise=rng.standard_normal((B, h, h, c)).astype(np.float32))
    return batch, draws


def _rel(a: np.ndarray, b: np.ndarray, floor: float) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor))


@pytest.mark.slow
@pytest.mark.parametrize("drop", [False, True], ids=["cond", "dropped"])
def test_train_step_equals_official(built, drop):
    pt, cfg, setup, params, frozen, _, step = built
    batch, draws = _inputs(cfg, drop)
    official = _official(built)
    t_lr = official.lr()
    t_loss, t_grads = official.step(batch, draws)

    state = setup.new_state(jax.tree.map(jnp.asarray, params))
    new, metrics = step(state, frozen, batch, jax.tree.map(jnp.asarray, draws))
    new = jax.device_get(new)
    # the loss and its target (eps or v) as the official p_losses computes them
    assert abs(float(metrics["loss"]) - t_loss) <= 1e-4 * abs(t_loss), (float(metrics["loss"]), t_loss)
    assert float(metrics["lr"]) == pytest.approx(t_lr, rel=1e-6) and t_lr == pytest.approx(1e-11)
    adam = new["opt_state"][-1]
    assert isinstance(adam, TorchAdamWState)
    # AdamW's first moment is (1 - b1) * grad: the gradients the step computed
    ours = {k: v / (1 - cfg.train.b1) for k, v in torch_named(adam.mu).items()}
    assert set(ours) == set(t_grads)
    top = max(float(np.max(np.abs(g))) for g in t_grads.values() if g is not None)
    bad = {}
    for k, g in t_grads.items():
        if g is None:  # a module the official loss did not run: torch's .grad is None
            assert not np.any(ours[k]), k
            continue
        if ONE_TOKEN_QK.search(k):  # softmax over one key is 1: zero up to rounding, both sides
            size = max(float(np.max(np.abs(ours[k]))), float(np.max(np.abs(g)))) / top
            if size > 1e-5:
                bad[k] = f"{size:.2g} of the largest gradient, expected ~0"
            continue
        err = _rel(ours[k], g, 1e-6 * top)
        if err > 1e-4:
            bad[k] = err
    assert not bad, f"{len(bad)} gradients differ: {sorted(bad.items())[:8]}"
    # which params AdamW stepped, and its moments
    t_mom = official.moments()
    steps = dict(zip(torch_named(adam.mu), np.asarray(adam.param_steps)))
    assert {k for k, n in steps.items() if n} == set(t_mom)
    nu = torch_named(adam.nu)
    for k, (_, v, n) in t_mom.items():
        assert steps[k] == n == 1, k
        if not ONE_TOKEN_QK.search(k):  # (1 - b2) g^2: twice the gradient's relative error
            assert _rel(nu[k], v, (1 - cfg.train.b2) * (1e-6 * top) ** 2) <= 3e-4, k
    head = "image_encoder.proj_out.weight"
    assert (head in t_mom) == (not drop) and ("image_encoder.uncond_vector" in t_mom) == drop
    # the update (at the official step-0 lr)
    t_params, o_params = official.params(), torch_named(new["params"])
    worst = max(float(np.max(np.abs(o_params[k] - t_params[k]))) for k in t_params)
    assert worst <= 1e-5, worst


@pytest.mark.slow
@pytest.mark.parametrize("built", ["epsilon"], indirect=True)
def test_a_non_finite_step_changes_nothing_and_is_counted(built):
    """A NaN loss (here: NaN noise draws): params, AdamW's moments, its step counts and the lr
    schedule's count stay exactly as they were; `nan_skips` counts it; the next finite step is
    the optimizer's first."""
    _, cfg, setup, params, frozen, _, step = built
    batch, draws = _inputs(cfg, drop=False)
    state = setup.new_state(jax.tree.map(jnp.asarray, params))
    before = jax.device_get(state)
    bad = draws._replace(noise=np.full_like(draws.noise, np.nan))
    state, m = step(state, frozen, batch, jax.tree.map(jnp.asarray, bad))
    after = jax.device_get(state)
    assert float(m["update_ok"]) == 0 and int(m["nan_skips"]) == 1 and int(after["step"]) == 1
    for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, b)
    state, m = step(state, frozen, batch, jax.tree.map(jnp.asarray, draws))
    assert float(m["update_ok"]) == 1 and int(m["nan_skips"]) == 1
    # the skip left no trace: the same as the finite step taken from the start
    fresh, _ = step(setup.new_state(jax.tree.map(jnp.asarray, params)), frozen, batch,
                    jax.tree.map(jnp.asarray, draws))
    got, want = jax.device_get(state), jax.device_get(fresh)
    assert int(got["opt_state"][-1].count) == 1
    for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("built", ["v_prediction"], indirect=True)
def test_adamw_follows_torch(built):
    """Three steps (condition kept, dropped, kept) at lr 1e-2 on torch's own gradients: our
    optimizer's params equal torch AdamW's within 1e-6, so the skipped parameters, the
    per-parameter step counts and the weight decay are torch's. `uncond_vector` is skipped at
    step 1 (never reached), stepped at 2, and at 3 gets a zero gradient: it moves on its
    momentum and decays (official), or with `decay_uncond_vector=False` (torch: the vector in
    a parameter group without decay) only moves."""
    pt, cfg, setup, params, *_ = built
    vec = "image_encoder.uncond_vector"
    history = {}
    for decay_vector in (True, False):
        tcfg = _config(pt, **{"train.lr": 1e-2, "train.warmup_steps": 0,
                              "train.decay_uncond_vector": decay_vector}).train
        tx, _ = make_optimizer(tcfg)
        official = _official(built, lr=1e-2, warmup_steps=0, decay_uncond_vector=decay_vector)
        p = jax.tree.map(jnp.asarray, params)
        opt_state = tx.init(p)
        update = tx.update  # eager: compiling it would cost more than running it three times
        history[decay_vector] = [torch_named(p)[vec]]
        for i, drop in enumerate((False, True, False)):
            batch, draws = _inputs(cfg, drop, seed=i)
            _, grads = official.step(batch, draws)
            assert (grads[vec] is None) == (i == 0)  # torch: None until the first dropped batch
            upd, opt_state = update(from_torch_named(grads, p), opt_state, p)
            p = optax.apply_updates(p, upd)
            ours, ref = torch_named(p), official.params()
            worst = {k: float(np.max(np.abs(ours[k] - ref[k]))) for k in ref}
            assert max(worst.values()) <= 1e-6, (i, sorted(worst.items(), key=lambda x: -x[1])[:5])
            history[decay_vector].append(ours[vec])
    for h in history.values():
        np.testing.assert_array_equal(h[1], h[0])  # step 1: skipped, not even decayed
        assert np.max(np.abs(h[2] - h[1])) > 1e-3  # step 2: its first gradient
        assert np.max(np.abs(h[3] - h[2])) > 1e-3  # step 3: zero gradient, momentum moves it
    # the decay (lr * wd = 1e-4 of the vector per step, at steps 2 and 3) is the difference
    np.testing.assert_allclose(history[True][3] - history[False][3],
                               -1e-4 * (history[True][1] + history[True][2]), rtol=2e-2, atol=1e-7)


def test_adamw_bf16_first_moment_is_optax_mu_dtype():
    """`train.mu_dtype=bfloat16` stores AdamW's first moment in bf16 (a quarter less optimizer
    state): every parameter's trajectory equals optax.adamw(mu_dtype=bfloat16) (same formula
    where torch and optax agree: every param gets a gradient every step), and stays within
    bf16 rounding of the fp32 optimizer."""
    from pbe_jax.training.optim import torch_adamw

    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32)}
    kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    runs = {"ours_bf16": torch_adamw(optax.constant_schedule(1e-3), mu_dtype="bfloat16", **kw),
            "ours_fp32": torch_adamw(optax.constant_schedule(1e-3), **kw),
            "optax_bf16": optax.adamw(1e-3, mu_dtype=jnp.bfloat16, **kw)}
    traj = {}
    for name, tx in runs.items():
        p, state = params, tx.init(params)
        for step in range(20):
            g = jax.tree.map(lambda x: jnp.asarray(
                np.random.default_rng(step).normal(size=x.shape), jnp.float32) + 0.5 * x, p)
            upd, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, upd)
        mu = state.mu if hasattr(state, "mu") else state[0].mu  # optax: chain(scale_by_adam, ...)
        traj[name] = (p, {str(x.dtype) for x in jax.tree.leaves(mu)})
    assert traj["ours_bf16"][1] == {"bfloat16"} and traj["ours_fp32"][1] == {"float32"}
    for k in params:
        ours, ref, full = (np.asarray(traj[n][0][k]) for n in ("ours_bf16", "optax_bf16", "ours_fp32"))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
        moved = np.max(np.abs(full - np.asarray(params[k])))  # 20 steps of ~1e-3
        assert np.max(np.abs(ours - full)) <= 2e-2 * moved, (k, np.max(np.abs(ours - full)), moved)
