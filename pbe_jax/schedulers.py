"""Noise schedules and samplers (DDIM, PLMS, DPM-Solver++, Euler) as pure, jit-able step functions.

Each scheduler reproduces its diffusers 0.42 counterpart for the same `scheduler_config.json`:
`DDIMScheduler`, `PNDMScheduler(skip_prk_steps=True)` (the PLMS sampler that Paint by Example
uses: 50 steps, PBE_SPEC 3.1 / 5.2), `DPMSolverMultistepScheduler` (dpmsolver++) and
`EulerDiscreteScheduler`.

Design: everything that depends only on (config, number of steps) -- timesteps, alphas, sigmas,
multistep weights -- is worked out once on the host in float64 and stored as float32 tables with
one row per step. `step(state, model_output, step_index, sample)` gathers its row with a traced
`step_index`, so a whole sampling loop runs under one `lax.scan`. Multistep history (PLMS's past
eps, DPM-Solver's past x0) lives in an explicit `state` pytree instead of mutable attributes.
A `Scheduler` is a frozen, hashable description and can be a static argument of `jax.jit`.

Nothing here cares about layout: latents may be NHWC or NCHW, the tables are scalars per step.

Training helpers: `betas_for(config)`, `alphas_cumprod(betas)`, `noise_schedule(config)`,
`add_noise(alphas_cumprod, x0, noise, t)` (= diffusers `DDPMScheduler.add_noise`) and
`velocity(...)` (the v-prediction target, = `DDPMScheduler.get_velocity`).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)

# Settings that change the computation and that we do not implement: any other value -> ValueError.
_UNSUPPORTED = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "variance_type": (None,),
    "lambda_min_clipped": (-math.inf,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
}

# The SD-1.x / Paint-by-Example settings (the hub repo's PNDM config and what the diffusers
# converter writes, PBE_SPEC 5.2), applied to each class when a scheduler is picked by name.
SD_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
    timestep_spacing="leading",
)


def pbe_scheduler_config() -> dict[str, Any]:
    """The released Paint-by-Example `scheduler_config.json` (PNDM = PLMS, SD's betas): the
    default noise schedule of `config.model.scheduler` and of repositories that ship none."""
    return {"_class_name": "PNDMScheduler", **SD_DEFAULTS, "prediction_type": "epsilon",
            "trained_betas": None}


# ------------------------------------------------------------------------------------------------
# The registry: one entry per scheduler class (its diffusers name, defaults, short names)
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type["Scheduler"]] = {}  # diffusers class name -> Scheduler subclass
NAMES: dict[str, str] = {}  # short name ('plms', 'ddim', ...) -> diffusers class name


def register(cls: type["Scheduler"]) -> type["Scheduler"]:
    """Class decorator: adding a scheduler is one subclass of `Scheduler` with `class_name`
    (diffusers'), `kind`, `names` (what users type) and `defaults` (diffusers' constructor
    defaults), decorated with `@register`."""
    _REGISTRY[cls.class_name] = cls
    for name in cls.names:
        NAMES[name] = cls.class_name
    return cls


def own_scheduler_name(model_config: Mapping[str, Any]) -> str:
    """The short name of a model's own scheduler (its `scheduler_config.json`'s `_class_name`):
    'plms' for the released PbE (PNDMScheduler), 'ddim' for the demo."""
    return _entry(dict(model_config).get("_class_name")).names[0]


def scheduler_names() -> list[str]:
    """The short names users pick a sampler by (CLI flags, `pipe(..., scheduler=...)`)."""
    return sorted(NAMES)


def _entry(class_name: str | None) -> type["Scheduler"]:
    if class_name not in _REGISTRY:
        raise ValueError(f"scheduler config: _class_name={class_name!r} is not supported "
                         f"(supported: {sorted(_REGISTRY)})")
    return _REGISTRY[class_name]


def _by_kind(kind: str) -> type["Scheduler"]:
    for cls in _REGISTRY.values():
        if cls.kind == kind:
            return cls
    raise ValueError(f"unknown scheduler kind {kind!r}; known: {sorted(c.kind for c in _REGISTRY.values())}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers `scheduler_config.json`, reduced to the fields that change the computation.

    `kind` is one of 'ddim', 'pndm', 'dpmsolver++', 'euler'. Fields a class does not use keep
    their defaults (e.g. `solver_order` for DDIM).
    """

    kind: str
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    skip_prk_steps: bool = True
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    @property
    def class_name(self) -> str:
        return _by_kind(self.kind).class_name

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], **overrides) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json` dict (its `_class_name` picks the scheduler).

        Keys the class does not know (metadata, other schedulers' settings) are ignored, as in
        diffusers' `from_config`; `overrides` must be known keys. Raises ValueError naming the key
        for settings we do not implement.
        """
        name = overrides.get("_class_name", raw.get("_class_name"))
        entry = _entry(name)
        defaults = entry.defaults
        unknown = set(overrides) - set(defaults) - set(_UNSUPPORTED) - {"_class_name"}
        if unknown:
            raise ValueError(f"{name}: unknown override(s) {sorted(unknown)} "
                             f"(known: {sorted(defaults)})")
        merged = {**raw, **overrides}
        for key, allowed in _UNSUPPORTED.items():
            if key in merged and merged[key] not in allowed:
                raise ValueError(f"{name}: {key}={merged[key]!r} is not supported (only {allowed})")
        fields = {k: merged.get(k, v) for k, v in defaults.items()}
        if fields.pop("algorithm_type", "dpmsolver++") != "dpmsolver++":
            raise ValueError(f"{name}: algorithm_type={merged['algorithm_type']!r} is not "
                             "supported (only 'dpmsolver++')")
        if fields["trained_betas"] is not None:
            fields["trained_betas"] = tuple(float(b) for b in fields["trained_betas"])
        config = cls(kind=entry.kind, **fields)
        config.validate()
        return config

    def validate(self) -> None:
        def check(field, allowed):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{self.class_name}: {field}={value!r} is not supported "
                                 f"(supported: {allowed})")

        check("kind", tuple(c.kind for c in _REGISTRY.values()))
        check("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check("timestep_spacing", ("leading", "trailing", "linspace"))
        check("prediction_type", ("epsilon", "v_prediction") if self.kind == "pndm"
              else ("epsilon", "v_prediction", "sample"))
        if self.kind == "pndm":
            # The Runge-Kutta warm-up of PNDM proper is not implemented; PbE uses PLMS.
            check("skip_prk_steps", (True,))
        if self.kind == "dpmsolver++":
            check("solver_order", (1, 2, 3))
            check("solver_type", ("midpoint", "heun"))
        if self.kind in ("dpmsolver++", "euler"):
            check("final_sigmas_type", ("zero", "sigma_min"))

    def to_dict(self) -> dict[str, Any]:
        """A `scheduler_config.json` that `diffusers.<class_name>.from_config` loads."""
        name = self.class_name
        out = {"_class_name": name}
        for key in _entry(name).defaults:
            out[key] = "dpmsolver++" if key == "algorithm_type" else getattr(self, key)
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out


# ------------------------------------------------------------------------------------------------
# Noise schedule (shared by training and sampling)
# ------------------------------------------------------------------------------------------------

def _config_of(config: SchedulerConfig | Mapping | str | None) -> SchedulerConfig:
    if config is None:
        config = "ddim"
    if isinstance(config, str):
        return SchedulerConfig.from_dict({"_class_name": NAMES[config], **SD_DEFAULTS})
    if isinstance(config, Mapping):
        raw = dict(config)
        raw.setdefault("_class_name", "DDIMScheduler")  # only the beta fields matter here
        return SchedulerConfig.from_dict(raw)
    return config


def betas_for(config: SchedulerConfig | Mapping | str | None = None) -> np.ndarray:
    """Betas `[T]` float32 for a scheduler config (None: SD / PbE's scaled_linear 0.00085->0.012
    over 1000 steps, i.e. LDM's "linear" = linspace(sqrt(start), sqrt(end))**2).

    Worked out in float64 and rounded once; diffusers works in float32 throughout, which differs
    from this by ~1e-6 relative in alphas_cumprod.
    """
    c = _config_of(config)
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, np.float64)
    elif c.beta_schedule == "linear":
        betas = np.linspace(c.beta_start, c.beta_end, n)
    elif c.beta_schedule == "scaled_linear":
        betas = np.linspace(c.beta_start**0.5, c.beta_end**0.5, n) ** 2
    else:  # squaredcos_cap_v2 (diffusers `betas_for_alpha_bar`, cosine)
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    return betas.astype(np.float32)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """prod_{s<=t} (1 - beta_s), `[T]` float32 (accumulated in float64)."""
    return np.cumprod(1.0 - np.asarray(betas, np.float64)).astype(np.float32)


def noise_schedule(config: SchedulerConfig | Mapping | str | None = None) -> np.ndarray:
    """alphas_cumprod `[T]` float32 for a config (None: SD / PbE scaled_linear)."""
    return alphas_cumprod(betas_for(config))


def _per_sample(ac: jax.Array, timesteps: jax.Array, ndim: int) -> jax.Array:
    a = jnp.asarray(ac, jnp.float32)[jnp.asarray(timesteps).reshape(-1)]
    return a.reshape(a.shape + (1,) * (ndim - 1))  # [B] -> [B, 1, ..., 1]


def add_noise(alphas_cumprod: np.ndarray | jax.Array, x0: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
    """q_sample: sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0/noise `[B, ...]`, timesteps int `[B]`.

    Equal to diffusers `DDPMScheduler.add_noise`; computed in float32, returned in x0.dtype.
    """
    a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
    out = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1 - a) * noise.astype(jnp.float32)
    return out.astype(x0.dtype)


def velocity(alphas_cumprod: np.ndarray | jax.Array, x0: jax.Array, noise: jax.Array,
             timesteps: jax.Array) -> jax.Array:
    """v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (= `DDPMScheduler.get_velocity`)."""
    a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
    out = jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1 - a) * x0.astype(jnp.float32)
    return out.astype(x0.dtype)


# ------------------------------------------------------------------------------------------------
# Timesteps (each class spaces them slightly differently; these follow diffusers line by line)
# ------------------------------------------------------------------------------------------------

def _spaced(c: SchedulerConfig, n: int) -> np.ndarray:
    """Descending timesteps as DDIM / PNDM / Euler space them (float64, integral except Euler's
    'linspace')."""
    T = c.num_train_timesteps
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return ts[::-1] if c.kind == "euler" else ts.round()[::-1]
    if c.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + c.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _dpm_timesteps(c: SchedulerConfig, n: int) -> np.ndarray:
    T = c.num_train_timesteps  # = last_timestep, since lambda_min_clipped is -inf
    if c.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    if c.timestep_spacing == "leading":
        return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + c.steps_offset
    return np.arange(T, 0, -T / n).round() - 1


def _sigmas(c: SchedulerConfig, ac: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Karras-style sigmas at `timesteps` (linear interpolation) plus the final sigma `[n+1]`."""
    full = np.sqrt((1 - ac.astype(np.float64)) / ac.astype(np.float64))
    sig = np.interp(timesteps, np.arange(len(full)), full)
    last = full[0] if c.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sig, [last]])


# ------------------------------------------------------------------------------------------------
# Schedulers
# ------------------------------------------------------------------------------------------------

def _row(tables: Mapping[str, np.ndarray], i) -> dict[str, jax.Array]:
    """Row `i` (a traced int is fine) of every per-step table."""
    return {k: jnp.asarray(v)[i] for k, v in tables.items()}


def _x0_eps(prediction_type: str, out, sample, sqrt_a, sqrt_b):
    """(x0, eps) from a model output, where x_t = sqrt_a x0 + sqrt_b eps (DDIM's conversions)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_b * out) / sqrt_a, out
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * out, sqrt_a * out + sqrt_b * sample
    return out, (sample - sqrt_a * out) / sqrt_b  # "sample"


@dataclasses.dataclass(frozen=True)
class Scheduler(abc.ABC):
    """A sampler for one (config, num_inference_steps): host tables + pure jit-able step.

    Use: `x = noise * s.init_noise_sigma; state = s.init_state(x)`, then for i in
    range(s.num_steps): `x_in = s.scale_model_input(x, i)`, eps = model(x_in, s.timesteps[i]),
    `x, state = s.step(state, eps, i, x, rng)`. `i` may be traced (lax.scan / fori_loop).
    Hashable (eq by fields), so it can be a static jit argument.
    """

    config: SchedulerConfig
    num_inference_steps: int
    eta: float = 0.0  # DDIM only: 0 = deterministic DDIM, 1 = DDPM-like

    stochastic = False  # whether `step` needs an rng (or explicit noise)
    # Registry entry (`register`): diffusers class name, our kind, short names, diffusers'
    # constructor defaults (a config dict lacking a key gets the class default, exactly as
    # `SchedulerClass.from_config(dict)` does).
    class_name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        if not 0 < self.num_inference_steps <= self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be in "
                             f"[1, num_train_timesteps={self.config.num_train_timesteps}]")

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return noise_schedule(self.config)

    @functools.cached_property
    def _built(self) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        return self._build()

    @abc.abstractmethod
    def _build(self) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        """(timesteps, per-step float32 tables, init_noise_sigma)."""

    @property
    def timesteps(self) -> np.ndarray:
        """The model's timestep at each step `[num_steps]` (int64; float32 for Euler, whose
        'linspace' timesteps are fractional)."""
        return self._built[0]

    @property
    def num_steps(self) -> int:
        """Model evaluations per sample (PLMS: num_inference_steps + 1, as in diffusers)."""
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return self._built[2]

    @property
    def tables(self) -> dict[str, np.ndarray]:
        return self._built[1]

    def scale_model_input(self, x: jax.Array, step_index) -> jax.Array:
        return x

    def init_state(self, latents: jax.Array) -> Any:
        """Multistep history for a sample shaped like `latents` (a pytree; () when none)."""
        return ()

    @abc.abstractmethod
    def step(self, state, model_output: jax.Array, step_index, sample: jax.Array,
             rng: jax.Array | None = None, noise: jax.Array | None = None):
        """x_t -> x_{t-1}: returns (prev_sample [same shape/dtype as sample], new_state)."""


@register
class DDIM(Scheduler):
    """diffusers `DDIMScheduler` (+ `eta`, the `step` argument). With eta > 0 pass `rng` (noise is
    `jax.random.normal(rng, sample.shape, sample.dtype)`) or the `noise` itself."""

    class_name, kind, names = "DDIMScheduler", "ddim", ("ddim",)
    defaults = dict(_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _build(self):
        c, n, ac = self.config, self.num_inference_steps, self.alphas_cumprod.astype(np.float64)
        ts = _spaced(c, n).astype(np.int64)
        # diffusers steps back by T // n whatever the spacing.
        prev = ts - c.num_train_timesteps // n
        final = 1.0 if c.set_alpha_to_one else ac[0]
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * np.sqrt(var)
        tables = dict(sqrt_a=np.sqrt(a_t), sqrt_b=np.sqrt(1 - a_t), sqrt_a_prev=np.sqrt(a_prev),
                      dir_coef=np.sqrt(1 - a_prev - std**2), std=std)
        return ts, {k: v.astype(np.float32) for k, v in tables.items()}, 1.0

    def step(self, state, model_output, step_index, sample, rng=None, noise=None):
        r = _row(self.tables, step_index)
        x0, eps = _x0_eps(self.config.prediction_type, model_output, sample, r["sqrt_a"], r["sqrt_b"])
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        prev = r["sqrt_a_prev"] * x0 + r["dir_coef"] * eps
        if self.eta > 0:
            if noise is None:
                if rng is None:
                    raise ValueError(f"DDIM with eta={self.eta} needs `rng` or `noise`")
                noise = jax.random.normal(rng, sample.shape, sample.dtype)
            prev = prev + r["std"] * noise
        return prev.astype(sample.dtype), state


@register
class PLMS(Scheduler):
    """diffusers `PNDMScheduler(skip_prk_steps=True)`: pseudo linear multistep (Liu et al. 2022).

    diffusers runs n + 1 model calls for n steps: step 0 is an Euler step from t0; step 1 evaluates
    at the new point and redoes step 0 from x_t0 with the average of both eps (a Heun-like
    correction, its eps is not kept); steps 2, 3 use 2nd / 3rd order Adams-Bashforth weights,
    then 4th order. The state keeps the last three kept eps and x_t0.
    """

    class_name, kind, names = "PNDMScheduler", "pndm", ("plms", "pndm")
    defaults = dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False)

    def _build(self):
        c, n, ac = self.config, self.num_inference_steps, self.alphas_cumprod.astype(np.float64)
        base = _spaced(c, n)[::-1]  # ascending, as diffusers' `_timesteps`
        ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
        ratio = c.num_train_timesteps // n
        final = 1.0 if c.set_alpha_to_one else ac[0]
        # Weights on (new eps, kept eps [newest first]) per step: diffusers' `ets` logic.
        ab = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [1.5, -0.5, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0]]
        ab4 = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
        rows = []
        for i, t in enumerate(ts):
            t_from, t_to = (t + ratio, t) if i == 1 else (t, t - ratio)
            a_t = ac[t_from]
            a_prev = ac[t_to] if t_to >= 0 else final
            b_t, b_prev = 1 - a_t, 1 - a_prev
            denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
            rows.append(dict(
                w=ab[i] if i < 4 else ab4,
                sample_coef=(a_prev / a_t) ** 0.5, eps_coef=(a_prev - a_t) / denom,
                sqrt_a=a_t**0.5, sqrt_b=b_t**0.5,
                keep=float(i != 1), from_first=float(i == 1), set_first=float(i == 0)))
        tables = {k: np.array([r[k] for r in rows], np.float32) for k in rows[0]}
        return ts, tables, 1.0

    def init_state(self, latents):
        return dict(ets=jnp.zeros((3,) + latents.shape, latents.dtype),
                    first_sample=jnp.zeros_like(latents))

    def step(self, state, model_output, step_index, sample, rng=None, noise=None):
        r = _row(self.tables, step_index)
        ets, w = state["ets"], r["w"]
        x = jnp.where(r["from_first"] > 0, state["first_sample"], sample)
        eps = w[0] * model_output + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]
        if self.config.prediction_type == "v_prediction":
            eps = r["sqrt_a"] * eps + r["sqrt_b"] * x  # diffusers converts the combined output
        prev = r["sample_coef"] * x - r["eps_coef"] * eps
        kept = jnp.concatenate([model_output[None].astype(ets.dtype), ets[:2]], axis=0)
        new_state = dict(
            ets=jnp.where(r["keep"] > 0, kept, ets),
            first_sample=jnp.where(r["set_first"] > 0, sample, state["first_sample"]))
        return prev.astype(sample.dtype), new_state


@register
class DPMSolverPP(Scheduler):
    """diffusers `DPMSolverMultistepScheduler(algorithm_type='dpmsolver++')`, orders 1-3.

    The update is linear in (x_t, x0_0, x0_1, x0_2) (current and two past x0 predictions); its
    four coefficients per step are found on the host by running diffusers' formulas on unit
    vectors, in float64 (diffusers runs them in float32).
    """

    class_name, kind, names = "DPMSolverMultistepScheduler", "dpmsolver++", ("dpm++2m",)
    defaults = dict(_COMMON, timestep_spacing="linspace", algorithm_type="dpmsolver++", solver_order=2,
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                    final_sigmas_type="zero")

    def _build(self):
        c, n = self.config, self.num_inference_steps
        ts = _dpm_timesteps(c, n).astype(np.int64)
        sig = _sigmas(c, self.alphas_cumprod, ts).astype(np.float32).astype(np.float64)
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, exp(-h) = 0
            lam = np.log(alpha) - np.log(sigma)
        coefs = np.zeros((n, 4))
        for i in range(n):
            last = i == n - 1
            lof = last and (c.euler_at_final or (c.lower_order_final and n < 15)
                            or c.final_sigmas_type == "zero")
            los = i == n - 2 and c.lower_order_final and n < 15
            nums = min(i, c.solver_order)  # diffusers' lower_order_nums
            if c.solver_order == 1 or nums < 1 or lof:
                order = 1
            elif c.solver_order == 2 or nums < 2 or los:
                order = 2
            else:
                order = 3
            coefs[i] = self._coefs(order, i, alpha, sigma, lam)
        tables = dict(alpha=alpha[:n], sigma=sigma[:n], c_x=coefs[:, 0], c_m0=coefs[:, 1],
                      c_m1=coefs[:, 2], c_m2=coefs[:, 3])
        return ts, {k: v.astype(np.float32) for k, v in tables.items()}, 1.0

    def _coefs(self, order, i, alpha, sigma, lam) -> np.ndarray:
        """Coefficients of (x, m0, m1, m2) in diffusers' dpmsolver++ update at step i."""
        x, m0, m1, m2 = np.eye(4)
        a_t, s_t, s_s0 = alpha[i + 1], sigma[i + 1], sigma[i]
        h = lam[i + 1] - lam[i]
        em1 = np.exp(-h) - 1.0
        if order == 1:
            return (s_t / s_s0) * x - (a_t * em1) * m0
        r0 = (lam[i] - lam[i - 1]) / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if order == 2:
            if self.config.solver_type == "midpoint":
                return (s_t / s_s0) * x - (a_t * em1) * D0 - 0.5 * (a_t * em1) * D1
            return (s_t / s_s0) * x - (a_t * em1) * D0 + (a_t * (em1 / h + 1.0)) * D1
        r1 = (lam[i - 1] - lam[i - 2]) / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        return ((s_t / s_s0) * x - (a_t * em1) * D0 + (a_t * (em1 / h + 1.0)) * D1
                - (a_t * ((em1 + h) / h**2 - 0.5)) * D2)

    def init_state(self, latents):
        return dict(x0=jnp.zeros((2,) + latents.shape, latents.dtype))  # past x0, newest first

    def step(self, state, model_output, step_index, sample, rng=None, noise=None):
        r = _row(self.tables, step_index)
        x0, _ = _x0_eps(self.config.prediction_type, model_output, sample, r["alpha"], r["sigma"])
        past = state["x0"]
        prev = r["c_x"] * sample + r["c_m0"] * x0 + r["c_m1"] * past[0] + r["c_m2"] * past[1]
        new_past = jnp.concatenate([x0[None].astype(past.dtype), past[:1]], axis=0)
        return prev.astype(sample.dtype), dict(x0=new_past)


@register
class Euler(Scheduler):
    """diffusers `EulerDiscreteScheduler` (no churn: s_churn = 0, its default)."""

    class_name, kind, names = "EulerDiscreteScheduler", "euler", ("euler",)
    defaults = dict(_COMMON, timestep_spacing="linspace", final_sigmas_type="zero")

    def _build(self):
        c, n = self.config, self.num_inference_steps
        ts = _spaced(c, n).astype(np.float32)
        sig = _sigmas(c, self.alphas_cumprod, ts.astype(np.float64)).astype(np.float32)
        # diffusers: max sigma for linspace/trailing, sqrt(max^2 + 1) for leading.
        smax = float(sig.max())
        init = smax if c.timestep_spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
        tables = dict(sigma=sig[:-1], dt=sig[1:] - sig[:-1],
                      in_scale=np.sqrt(sig[:-1].astype(np.float64) ** 2 + 1).astype(np.float32))
        return ts, tables, init

    def scale_model_input(self, x, step_index):
        return x / jnp.asarray(self.tables["in_scale"])[step_index]

    def step(self, state, model_output, step_index, sample, rng=None, noise=None):
        r = _row(self.tables, step_index)
        sigma, pt = r["sigma"], self.config.prediction_type
        if pt == "epsilon":
            x0 = sample - sigma * model_output
        elif pt == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            x0 = model_output
        derivative = (sample - x0) / sigma
        return (sample + derivative * r["dt"]).astype(sample.dtype), state


def make_scheduler(name_or_config: str | Mapping[str, Any] | SchedulerConfig,
                   num_inference_steps: int, *, eta: float = 0.0, **overrides) -> Scheduler:
    """A scheduler from a name or a diffusers `scheduler_config.json` dict.

    Names ('ddim', 'plms' = 'pndm', 'dpm++2m', 'euler') use the SD-1.x / PbE settings
    (`SD_DEFAULTS`: scaled_linear 0.00085->0.012, 1000 train steps, steps_offset 1, 'leading'
    spacing, set_alpha_to_one False, clip_sample False). A dict takes its `_class_name` (override
    it to switch scheduler, like diffusers' `OtherScheduler.from_config(config)`) and the
    class's diffusers defaults for missing keys. `overrides` are config keys; `eta` is DDIM's.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in NAMES:
            raise ValueError(f"scheduler name {name_or_config!r} is not one of {sorted(NAMES)}")
        raw = {"_class_name": NAMES[name_or_config], **SD_DEFAULTS}
        config = SchedulerConfig.from_dict(raw, **overrides)
    elif isinstance(name_or_config, SchedulerConfig):
        config = dataclasses.replace(name_or_config, **overrides)
        config.validate()
    else:
        config = SchedulerConfig.from_dict(name_or_config, **overrides)
    if eta and config.kind != "ddim":
        raise ValueError(f"eta={eta} is a DDIM setting; {config.class_name} is deterministic")
    return _by_kind(config.kind)(config, int(num_inference_steps), float(eta))


def scheduler_for(model_config: Mapping[str, Any], name: str | None, num_inference_steps: int,
                  eta: float = 0.0) -> Scheduler:
    """The sampler for a model: `name` (None = the model's own class) picks the class; betas,
    `num_train_timesteps`, `prediction_type` and spacing come from the model's scheduler config,
    and keys that config lacks take the SD / PbE values (`SD_DEFAULTS`), not the new class's
    diffusers defaults: e.g. DDIM built from the hub's PNDM config would get diffusers'
    `clip_sample=True`, which the official (LDM) DDIM sampler does not do."""
    if name is None:
        return make_scheduler(dict(model_config), num_inference_steps, eta=eta)
    if name not in NAMES:
        raise ValueError(f"scheduler {name!r} is not one of {scheduler_names()}")
    cfg = {**SD_DEFAULTS, **dict(model_config), "_class_name": NAMES[name]}
    return make_scheduler(cfg, num_inference_steps, eta=eta)
