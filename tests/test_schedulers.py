"""Schedulers vs diffusers 0.42, step by step, on a fixed sequence of fake model outputs.

Ours runs the whole sequence under one `lax.scan` (traced step index), diffusers runs its usual
Python loop; every intermediate sample must agree to 1e-5 of its scale.
"""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pbe_jax import schedulers as S
from tests.helpers import assert_close

SHAPE = (2, 8, 8, 4)  # NHWC; the schedulers are elementwise, diffusers gets the same arrays
TOL = 1e-5

# The hub repo's scheduler/scheduler_config.json style (PBE_SPEC 5.2: the converter's PNDM config).
PBE_HUB_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# Every registered scheduler, by its first short name: each is checked against the diffusers
# class of its `class_name`, so a newly registered one is tested (and fails without a reference).
REGISTERED = [S.own_scheduler_name({"_class_name": c}) for c in sorted(set(S.NAMES.values()))]
STOCHASTIC = "ddim"  # the one with eta > 0: checked with noise as well


def _each(eta):
    """(name, eta) cases: every registered scheduler deterministic, and DDIM with `eta`."""
    return [(name, 0.0) for name in REGISTERED] + [(STOCHASTIC, eta)]


def _pair(name, n, eta=0.0, **extra):
    """(diffusers scheduler after set_timesteps, ours) for one config dict."""
    config = {**PBE_HUB_CONFIG, "_class_name": S.NAMES[name], **extra}
    ref_cls = getattr(diffusers, config["_class_name"], None)
    assert ref_cls is not None, (f"scheduler {name!r} ({config['_class_name']}) has no parity reference: "
                                 "diffusers has no class of that name")
    ref = ref_cls.from_config(config)
    ref.set_timesteps(n)
    return ref, S.make_scheduler(config, n, eta=eta)


def _run_ours(sched, x, outs, noises):
    """All intermediate samples `[num_steps, *SHAPE]` and scaled inputs, in one scan."""

    def body(carry, xs):
        x, state = carry
        i, out, noise = xs
        x_in = sched.scale_model_input(x, i)
        x, state = sched.step(state, out, i, x, noise=noise)
        return (x, state), (x, x_in)

    @jax.jit
    def run(x, outs, noises):
        idx = jnp.arange(outs.shape[0])
        return jax.lax.scan(body, (x, sched.init_state(x)), (idx, outs, noises))[1]

    return jax.tree.map(np.asarray, run(x, outs, noises))


def _run_ref(ref, x, outs, noises, eta):
    xs, x_ins = [], []
    x = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        x_ins.append(ref.scale_model_input(x, t).numpy())
        kw = {}
        if isinstance(ref, diffusers.DDIMScheduler) and eta > 0:
            kw = dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
        x = ref.step(torch.from_numpy(outs[i]), t, x, **kw).prev_sample
        xs.append(x.numpy())
    return np.stack(xs), np.stack(x_ins)


def _assert_steps_close(ours, ref, what):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{what}: step {i}", rel=TOL)


def _check_against_diffusers(name, n, eta=0.0, **extra):
    ref, ours = _pair(name, n, eta=eta, **extra)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype.kind == ref.timesteps.numpy().dtype.kind
    assert ours.num_steps == len(ref.timesteps)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    rs = np.random.RandomState(n)
    x = (rs.randn(*SHAPE) * ours.init_noise_sigma).astype(np.float32)
    outs = rs.randn(ours.num_steps, *SHAPE).astype(np.float32)
    noises = rs.randn(ours.num_steps, *SHAPE).astype(np.float32)
    xs, x_ins = _run_ours(ours, jnp.asarray(x), jnp.asarray(outs), jnp.asarray(noises))
    ref_xs, ref_x_ins = _run_ref(ref, x, outs, noises, eta)
    what = f"{name} n={n} eta={eta} {extra}"
    _assert_steps_close(x_ins, ref_x_ins, what + " scale_model_input")
    _assert_steps_close(xs, ref_xs, what)
    # The fake outputs must actually move the sample (a scheduler that returned x would fail).
    assert np.abs(ref_xs[-1] - x).max() > 0.1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name,eta", _each(0.7))
def test_ten_steps_each_spacing(name, eta, spacing):
    _check_against_diffusers(name, 10, eta=eta, timestep_spacing=spacing)


@pytest.mark.parametrize("name,eta", _each(1.0))
def test_fifty_steps_pbe_default(name, eta):
    # 50 leading steps with steps_offset 1: the PbE / SD-1.x inference setting.
    _check_against_diffusers(name, 50, eta=eta)


@pytest.mark.parametrize("name,n,extra", [
    ("ddim", 20, dict(prediction_type="v_prediction", clip_sample=True, set_alpha_to_one=True)),
    ("ddim", 20, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=True)),
    ("plms", 20, dict(prediction_type="v_prediction")),
    ("plms", 25, dict(timestep_spacing="trailing", set_alpha_to_one=True)),
    ("dpm++2m", 20, dict(prediction_type="v_prediction")),
    ("dpm++2m", 20, dict(solver_order=3)),
    ("dpm++2m", 20, dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpm++2m", 8, dict(solver_order=3)),  # lower_order_second kicks in below 15 steps
    ("euler", 20, dict(prediction_type="v_prediction")),
    ("euler", 25, dict(timestep_spacing="linspace", final_sigmas_type="sigma_min")),
])
def test_variants(name, n, extra):
    _check_against_diffusers(name, n, **extra)


def test_ddim_rng_noise_is_normal_of_key():
    # The sampler relies on this to reproduce a stochastic run: noise = normal(key, shape, dtype).
    sched = S.make_scheduler("ddim", 10, eta=0.5)
    x = jax.random.normal(jax.random.key(1), SHAPE)
    e = jax.random.normal(jax.random.key(2), SHAPE)
    key = jax.random.key(3)
    a, _ = sched.step((), e, 3, x, rng=key)
    b, _ = sched.step((), e, 3, x, noise=jax.random.normal(key, SHAPE))
    c, _ = S.make_scheduler("ddim", 10).step((), e, 3, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3  # eta > 0 really adds noise
    with pytest.raises(ValueError, match="rng"):
        sched.step((), e, 3, x)


def test_hub_config_builds_plms():
    ours = S.make_scheduler(PBE_HUB_CONFIG, 50)
    assert isinstance(ours, S.PLMS)
    assert ours == S.make_scheduler("plms", 50) == S.make_scheduler("pndm", 50)
    assert hash(ours) == hash(S.make_scheduler("plms", 50))
    ref = diffusers.PNDMScheduler.from_config(PBE_HUB_CONFIG)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.num_steps == 51 and ours.timesteps[0] == 981 and ours.timesteps[-1] == 1
    # Switching class keeps the hub's betas, like diffusers' `DDIMScheduler.from_config(...)`.
    ddim = S.make_scheduler(PBE_HUB_CONFIG, 50, _class_name="DDIMScheduler")
    assert isinstance(ddim, S.DDIM) and ddim.config.beta_schedule == "scaled_linear"
    assert not ddim.config.clip_sample and not ddim.config.set_alpha_to_one


@pytest.mark.parametrize("name", REGISTERED)
def test_to_dict_round_trips_through_diffusers(name):
    ours = S.make_scheduler(name, 30)
    raw = ours.config.to_dict()
    ref = getattr(diffusers, raw["_class_name"]).from_config(raw)
    for key, value in raw.items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key
    assert S.SchedulerConfig.from_dict(dict(ref.config)) == ours.config


@pytest.mark.parametrize("raw,overrides,key", [
    ({"_class_name": "DDIMScheduler", "thresholding": True}, {}, "thresholding"),
    ({"_class_name": "PNDMScheduler"}, {}, "skip_prk_steps"),  # diffusers' default is PRK warm-up
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, {},
     "algorithm_type"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, {}, "use_karras_sigmas"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "uniform"}, {}, "timestep_spacing"),
    ({"_class_name": "LMSDiscreteScheduler"}, {}, "_class_name"),
    (PBE_HUB_CONFIG, {"steps_ofset": 1}, "steps_ofset"),
])
def test_unsupported_settings_name_the_key(raw, overrides, key):
    with pytest.raises(ValueError, match=key):
        S.make_scheduler(raw, 10, **overrides)


def test_eta_only_for_ddim():
    with pytest.raises(ValueError, match="eta"):
        S.make_scheduler("plms", 10, eta=0.5)


@pytest.mark.parametrize("config", [None, {"beta_schedule": "linear"},
                                    {"beta_schedule": "squaredcos_cap_v2"}])
def test_noise_schedule_and_add_noise_match_ddpm(config):
    raw = {**PBE_HUB_CONFIG, **(config or {})}
    ref = diffusers.DDPMScheduler.from_config(raw)
    betas = S.betas_for(raw)
    ac = S.alphas_cumprod(betas)
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=1e-5)
    if config is None:
        np.testing.assert_array_equal(S.noise_schedule(), ac)  # default = SD / PbE scaled_linear
    rs = np.random.RandomState(0)
    x0, noise = rs.randn(2, 4, *SHAPE[1:]).astype(np.float32)
    t = np.array([0, 999, 500, 17])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = np.asarray(S.add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    got_v = np.asarray(S.velocity(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(got_v, want_v.numpy(), rtol=1e-5, atol=1e-5)


def test_add_noise_jits_with_traced_timesteps():
    ac = S.noise_schedule()
    x0 = jnp.ones((3, 2, 2, 4), jnp.bfloat16)
    t = jnp.array([0, 10, 999])
    out = jax.jit(S.add_noise)(ac, x0, jnp.zeros_like(x0), t)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0], np.float32), np.sqrt(ac[[0, 10, 999]]),
                               rtol=1e-2)


def test_a_registered_scheduler_without_a_reference_fails(monkeypatch):
    """The parity tests take their schedulers from the registry: one registered without a
    diffusers class to compare with fails them instead of going untested."""
    monkeypatch.setattr(S, "_REGISTRY", {**S._REGISTRY})  # registered here, gone after the test
    monkeypatch.setattr(S, "NAMES", {**S.NAMES})

    @S.register
    class Unchecked(S.DDIM):
        class_name = "UncheckedScheduler"
        names = ("unchecked",)

    assert "unchecked" in [S.own_scheduler_name({"_class_name": c}) for c in sorted(set(S.NAMES.values()))]
    with pytest.raises(AssertionError, match="'unchecked' .UncheckedScheduler. has no parity reference"):
        _check_against_diffusers("unchecked", 10)
