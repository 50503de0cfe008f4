"""guided_sample vs a plain PyTorch loop written like diffusers' PaintByExamplePipeline.__call__.

The UNet is replaced by a toy eps model written twice (JAX NHWC, torch NCHW): a fixed linear map
of the 9 input channels, a function of t and a function of the context, so a wrong channel order,
CFG half, timestep or scheduler step changes the result.
"""
import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from pbe_jax.sampler import guided_sample
from pbe_jax.schedulers import NAMES, make_scheduler, own_scheduler_name
from tests.helpers import assert_close

B, H, W, S_TOK, D = 2, 8, 8, 1, 8
TOL = 1e-4

_rs = np.random.RandomState(0)
W_IN = (_rs.randn(9, 4) * 0.3).astype(np.float32)  # input channels -> eps channels
W_CTX = (_rs.randn(D, 4) * 0.5).astype(np.float32)  # context -> per-channel bias


@functools.partial(jax.jit, static_argnames=("scheduler", "cfg", "batch_sharding"))
def _sample_jit(eps_fn, scheduler, latents, masked_latents, mask, cond, uncond, guidance_scale, rng, *,
                cfg, batch_sharding):
    return guided_sample(eps_fn, scheduler, latents, masked_latents, mask, cond, uncond,
                         guidance_scale if cfg else 1.0, rng, batch_sharding=batch_sharding)


def guided_sample_jit(eps_fn, scheduler, latents, masked_latents, mask, cond, uncond, guidance_scale,
                      rng=None, *, batch_sharding=None):
    """`guided_sample` under `jax.jit` with a traced guidance scale (CFG on/off decided outside,
    as the edit function does): one compile per (eps_fn, shapes, scheduler, CFG on/off)."""
    cfg = float(guidance_scale) != 1.0
    return _sample_jit(Partial(eps_fn), scheduler, latents, masked_latents, mask, cond, uncond,
                       jnp.asarray(guidance_scale if cfg else 1.0, jnp.float32), rng, cfg=cfg,
                       batch_sharding=batch_sharding)


def eps_jax(unet_in, t, context):
    """[N,h,w,9], [N], [N,S,D] -> [N,h,w,4]."""
    lin = jnp.einsum("nhwc,ck->nhwk", unet_in, W_IN)
    ctx = jnp.tanh(context.mean(1) @ W_CTX)  # [N, 4]
    return lin + ctx[:, None, None, :] + jnp.sin(t / 150.0)[:, None, None, None]


def eps_torch(unet_in, t, context):
    """NCHW twin of eps_jax: [N,9,h,w], scalar t, [N,S,D] -> [N,4,h,w]."""
    lin = torch.einsum("nchw,ck->nkhw", unet_in, torch.from_numpy(W_IN))
    ctx = torch.tanh(context.mean(1) @ torch.from_numpy(W_CTX))
    t = torch.as_tensor(t, dtype=torch.float32).expand(unet_in.shape[0])
    return lin + ctx[:, :, None, None] + torch.sin(t / 150.0)[:, None, None, None]


def _inputs(b=B, seed=1):
    rs = np.random.RandomState(seed)
    return dict(
        latents=rs.randn(b, H, W, 4).astype(np.float32),
        masked_latents=rs.randn(b, H, W, 4).astype(np.float32),
        mask=(rs.rand(b, H, W, 1) > 0.5).astype(np.float32),
        cond=rs.randn(b, S_TOK, D).astype(np.float32),
        uncond=rs.randn(1, S_TOK, D).astype(np.float32),
    )


def _reference(sched, inputs, guidance_scale, eta=0.0, noises=None):
    """The diffusers pipeline's denoising loop (PBE_SPEC 5.3), in torch, NCHW."""
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    cfg = guidance_scale != 1.0
    ref = getattr(diffusers, sched.config.class_name).from_config(sched.config.to_dict())
    ref.set_timesteps(sched.num_inference_steps)
    latents = to_t(inputs["latents"]) * ref.init_noise_sigma
    masked, mask = to_t(inputs["masked_latents"]), to_t(inputs["mask"])
    cond = torch.from_numpy(inputs["cond"])
    context = cond
    if cfg:
        uncond = torch.from_numpy(inputs["uncond"]).repeat(cond.shape[0], 1, 1)
        context = torch.cat([uncond, cond])
        masked, mask = torch.cat([masked] * 2), torch.cat([mask] * 2)
    for i, t in enumerate(ref.timesteps):
        x = torch.cat([latents] * 2) if cfg else latents
        x = ref.scale_model_input(x, t)
        x = torch.cat([x, masked, mask], dim=1)
        noise_pred = eps_torch(x, t, context)
        if cfg:
            e_u, e_c = noise_pred.chunk(2)
            noise_pred = e_u + guidance_scale * (e_c - e_u)
        kw = {}
        if eta > 0:
            kw = dict(eta=eta, variance_noise=to_t(noises[i]))
        latents = ref.step(noise_pred, t, latents, **kw).prev_sample
    return latents.numpy().transpose(0, 2, 3, 1)


def _run(sched, inputs, guidance_scale, rng=None, **kw):
    args = {k: jnp.asarray(v) for k, v in inputs.items()}
    return guided_sample_jit(eps_jax, sched, guidance_scale=guidance_scale, rng=rng, **args, **kw)


@pytest.mark.parametrize("name", [own_scheduler_name({"_class_name": c}) for c in sorted(set(NAMES.values()))])
def test_matches_torch_pipeline_loop(name):
    n = {"plms": 10, "dpm++2m": 8}.get(name, 6)  # every registered scheduler (a new one too)
    sched = make_scheduler(name, n)
    inputs = _inputs()
    ours = _run(sched, inputs, 5.0)
    ref = _reference(sched, inputs, 5.0)
    assert_close(ours, ref)
    # Guidance matters: the unguided result is far from the guided one.
    assert np.abs(np.asarray(_run(sched, inputs, 1.0)) - ref).max() > 1e-2


def test_stochastic_ddim_uses_one_key_per_step():
    sched = make_scheduler("ddim", 6, eta=0.8)
    inputs = _inputs()
    rng = jax.random.key(7)
    ours = _run(sched, inputs, 3.0, rng=rng)
    # guided_sample splits rng into one key per step; DDIM draws normal(key, shape) per step.
    keys = jax.random.split(rng, sched.num_steps)
    noises = [np.asarray(jax.random.normal(k, (B, H, W, 4))) for k in keys]
    assert_close(ours, _reference(sched, inputs, 3.0, eta=0.8, noises=noises))
    other = _run(sched, inputs, 3.0, rng=jax.random.key(8))
    assert np.abs(np.asarray(other) - np.asarray(ours)).max() > 1e-2
    with pytest.raises(ValueError, match="rng"):
        _run(sched, inputs, 3.0)


def test_guidance_one_is_conditional_only_on_b_batch():
    sched = make_scheduler("plms", 5)
    inputs = _inputs()
    batches = []

    def spy(unet_in, t, context):
        batches.append((unet_in.shape[0], t.shape[0], context.shape[0]))
        return eps_jax(unet_in, t, context)

    ours = guided_sample_jit(spy, sched, guidance_scale=1.0,
                             **{k: jnp.asarray(v) for k, v in inputs.items()})
    assert batches == [(B, B, B)]  # traced once, on B samples, not 2B
    assert_close(ours, _reference(sched, inputs, 1.0))
    guided_sample_jit(spy, sched, guidance_scale=2.0, **{k: jnp.asarray(v) for k, v in inputs.items()})
    assert batches[-1] == (2 * B, 2 * B, 2 * B)


def test_compiles_once_for_repeated_calls():
    sched = make_scheduler("dpm++2m", 5)
    traces = []

    def counting(unet_in, t, context):
        traces.append(unet_in.shape)
        return eps_jax(unet_in, t, context)

    outs = [_run_with(counting, sched, _inputs(seed=s), g) for s, g in [(1, 5.0), (2, 7.5), (3, 2.0)]]
    assert len(traces) == 1, f"eps_fn traced {len(traces)} times for one shape"
    assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3  # really different calls
    assert_close(outs[1], _reference(sched, _inputs(seed=2), 7.5))  # traced scale used correctly
    _run_with(counting, sched, _inputs(b=4), 5.0)  # a new batch size compiles again
    assert len(traces) == 2


def _run_with(fn, sched, inputs, guidance_scale):
    return guided_sample_jit(fn, sched, guidance_scale=guidance_scale,
                             **{k: jnp.asarray(v) for k, v in inputs.items()})


def test_guided_sample_traces_inside_user_jit():
    # The plain function also works under the caller's own jit (scale static there).
    sched = make_scheduler("euler", 4)
    inputs = {k: jnp.asarray(v) for k, v in _inputs().items()}
    f = jax.jit(lambda kw: guided_sample(eps_jax, sched, guidance_scale=4.0, **kw))
    assert_close(f(inputs), _reference(sched, _inputs(), 4.0))


def test_batch_sharded_over_eight_devices_equals_unsharded():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest fakes 8 CPU devices"
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, P("data"))
    sched = make_scheduler("plms", 6)
    inputs = _inputs(b=8, seed=4)
    unsharded = _run(sched, inputs, 5.0)
    args = {k: jax.device_put(jnp.asarray(v), sharding if k != "uncond" else NamedSharding(mesh, P()))
            for k, v in inputs.items()}
    sharded = guided_sample_jit(eps_jax, sched, guidance_scale=5.0, batch_sharding=sharding, **args)
    assert sharded.sharding.is_equivalent_to(sharding, sharded.ndim)
    assert len(sharded.addressable_shards) == 8 and sharded.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-5)
    assert_close(sharded, _reference(sched, inputs, 5.0))


def test_shape_errors_name_the_arrays():
    sched = make_scheduler("ddim", 3)
    inputs = {k: jnp.asarray(v) for k, v in _inputs().items()}
    inputs["mask"] = inputs["mask"][..., :1, :]
    with pytest.raises(ValueError, match="mask"):
        guided_sample(eps_jax, sched, guidance_scale=2.0, **inputs)


def test_on_step_runs_once_per_step_and_is_absent_by_default():
    sched = make_scheduler("ddim", 6)
    inputs = {k: jnp.asarray(v) for k, v in _inputs().items()}
    seen = []
    with_cb = jax.jit(lambda kw: guided_sample(
        eps_jax, sched, guidance_scale=4.0, on_step=lambda i: jax.debug.callback(seen.append, i), **kw))
    assert_close(with_cb(inputs), _reference(sched, _inputs(), 4.0))  # the same result
    jax.effects_barrier()
    assert sorted(int(i) for i in seen) == list(range(6))
    plain = jax.jit(lambda kw: guided_sample(eps_jax, sched, guidance_scale=4.0, **kw))
    assert "callback" not in plain.lower(inputs).as_text()
    assert "callback" in with_cb.lower(inputs).as_text()
