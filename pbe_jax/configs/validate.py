"""Every value of a training config checked before anything compiles or loads.

`validate(config)` collects every problem of a config (an unknown enum value, a number out of
range, two size facts that disagree) and raises one `ConfigError` listing them all, each naming
the field, its value and what is allowed:

    config.train.nan_policy='halt': expected one of ('skip', 'stop')
    config.keep_checkpoints=0: expected an integer >= 1

The allowed values come from the code that consumes the field (the data source registry, the
attention registry, `jax.checkpoint_policies`, the scheduler table, ...), so a new source or
kernel needs no edit here. The entry points call `check_or_exit(config, sys.argv)` right after
the command line is parsed (ml_collections applies `--config.a.b=v` after `get_config`), and
`train_and_evaluate` calls `validate` first, so an API user gets the same checks.

`check_overrides(argv)` refuses a config field given twice on one command line: ml_collections
would concatenate a tuple field's values (`--config.x='(1,2)' --config.x='(3,4)'` gives
`(1, 2, 3, 4)`) and silently keep the last of any other field. The rule: each field once.
"""
from __future__ import annotations

import inspect
import math
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from pbe_jax import sharding as shd
from pbe_jax.configs import load_config
from pbe_jax.convert.load import FORMATS
from pbe_jax.data.sources import MASK_SOURCES, SOURCES
from pbe_jax.data.synthetic import STYLES
from pbe_jax.diffusion import COND_DROP_MODES, NoiseSchedule
from pbe_jax.evals.scoring import FID_FEATURES
from pbe_jax.models.attention import attention_impls
from pbe_jax.models.hub import cast_dtype
from pbe_jax.models.lora import COMPONENTS as LORA_COMPONENTS
from pbe_jax.models.lora import names
from pbe_jax.models.registry import slot_class
from pbe_jax.schedulers import scheduler_names
from pbe_jax.training.vae_fit import RECON_LOSSES, heldout_data_config

# What `config.train.nan_policy` means: 'skip' the non-finite update (the step keeps the old
# params and counts it in `nan_skips`), or 'stop' the run (training/loop.py; the last good
# checkpoint stays intact).
NAN_POLICIES = ("skip", "stop")

_MISSING = object()


class ConfigError(ValueError):
    """A training config that cannot run; `problems` lists each field that is wrong. (One
    message argument, as ValueError: ml_collections re-raises errors of `get_config` that way.)"""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def of(cls, problems: Sequence[str], where: str = "config") -> "ConfigError":
        n = len(problems)
        head = f"{where}: {n} invalid value{'s' if n > 1 else ''}"
        return cls(head + "\n  " + "\n  ".join(problems), problems)


def remat_policies() -> tuple[str, ...]:
    """The names of `jax.checkpoint_policies` that are policies (not policy factories): what
    `models.layers.maybe_remat` accepts as `config.remat_policy`."""
    names = []
    for name in dir(jax.checkpoint_policies):
        fn = getattr(jax.checkpoint_policies, name)
        if name.startswith("_") or not callable(fn):
            continue
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            names.append(name)
    return tuple(sorted(names))


def vae_factor(model_cfg) -> int:
    """Pixels per latent: 2 ** (number of VAE levels - 1), as `inference` computes it."""
    return 2 ** (len(model_cfg.vae.block_out_channels) - 1)


class _Checks:
    """Collects problems; each check skips a field the config does not have (configs written
    by older versions, or built by hand with fewer fields)."""

    def __init__(self, config):
        self.config, self.problems = config, []

    def get(self, path: str) -> Any:
        node = self.config
        for part in path.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                return _MISSING
        return node

    def add(self, path: str, value: Any, expected: str) -> None:
        self.problems.append(f"config.{path}={value!r}: {expected}")

    def enum(self, path: str, allowed: Iterable[str], empty: str | None = None) -> None:
        """`empty`: what '' means when it is allowed (e.g. "'' = the model's own")."""
        v = self.get(path)
        allowed = tuple(allowed)
        if v is _MISSING or v in allowed or (empty is not None and v == ""):
            return
        self.add(path, v, f"expected one of {allowed}" + (f" (or {empty})" if empty else ""))

    def parse(self, path: str, fn: Callable[[Any], Any], block: bool = False) -> None:
        """The consumer's own parser `fn` accepts the value (its message says what is allowed).
        `block`: the value is a whole block, named but not printed."""
        v = self.get(path)
        if v is _MISSING:
            return
        try:
            fn(v)
        except (ValueError, TypeError, KeyError) as e:
            if block:
                self.problems.append(f"config.{path}: {e}")
            else:
                self.add(path, v, str(e))

    def number(self, path: str, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False, integer: bool = False,
               note: str = "") -> None:
        v = self.get(path)
        if v is _MISSING:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and integer:
            ok = isinstance(v, int)
        if ok:
            ok = not math.isnan(v) and ((lo is None or (v > lo if lo_open else v >= lo))
                                        and (hi is None or (v < hi if hi_open else v <= hi)))
        if ok:
            return
        kind = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        self.add(path, v, f"expected {kind} {rng}" + (f" ({note})" if note else ""))

    def count(self, path: str, minimum: int = 1, note: str = "") -> None:
        self.number(path, lo=minimum, integer=True, note=note)

    def off_or_count(self, path: str) -> None:
        self.number(path, lo=0, integer=True, note="0 = off")

    def prob(self, path: str) -> None:
        self.number(path, lo=0.0, hi=1.0)

    def ordered(self, low: str, high: str) -> None:
        a, b = self.get(low), self.get(high)
        if _MISSING in (a, b) or not all(isinstance(x, (int, float)) for x in (a, b)):
            return
        if a > b:
            self.problems.append(f"config.{low}={a!r} > config.{high}={b!r}: expected {low} <= {high}")


def _check_mesh(spec) -> None:
    sizes = shd.parse_mesh_spec(spec)
    if sum(s == -1 for s in sizes.values()) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh axis sizes must be >= 1 with at most one -1 (the rest of the "
                         f"devices), got {sizes}")


def _check_mu_dtype(name) -> None:
    """What `training.optim` does with it: `jnp.dtype(name)` when non-empty."""
    try:
        dtype = jnp.dtype(name) if name else None
    except TypeError:
        dtype = jnp.dtype(jnp.int8)  # not understood: refused below
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError("expected '' (the param's dtype) or a floating dtype name such as "
                         "'float32' or 'bfloat16'")


def _general(c: _Checks) -> None:
    c.parse("dtype", cast_dtype)
    c.parse("mesh", _check_mesh)
    c.enum("attention_impl", attention_impls())
    c.enum("remat_policy", remat_policies(), empty="'' = recompute everything")
    c.enum("init_from.format", FORMATS, empty="'' = random init")
    if c.get("init_from.format") in FORMATS and c.get("init_from.path") == "":
        c.problems.append(f"config.init_from.path='': config.init_from.format="
                          f"{c.get('init_from.format')!r} needs a path (a folder or Hub id)")
    scheduler = c.get("model.scheduler")
    if scheduler is not _MISSING:
        c.parse("model.scheduler", lambda s: NoiseSchedule.from_config(s.to_dict()), block=True)
    c.count("log_every_steps")
    c.count("ckpt_every_steps")
    c.count("keep_checkpoints", note="the run keeps this many newest steps; 0 would keep none")
    c.off_or_count("sample_every_steps")
    c.count("sample_steps")
    c.number("sample_guidance", lo=0.0)
    c.count("sample_num")
    c.number("peak_flops", lo=0.0, note="0 = look up the device")


def _check_lora_components(value) -> None:
    bad = [n for n in names(value) if n not in LORA_COMPONENTS]
    if bad or not names(value):
        raise ValueError(f"expected a non-empty list of {LORA_COMPONENTS} (e.g. unet,image_encoder), "
                         f"got {list(names(value))}")


def _train(c: _Checks) -> None:
    c.count("train.num_steps")
    c.count("train.batch_size")
    c.number("train.lr", lo=0.0, lo_open=True)
    c.off_or_count("train.warmup_steps")
    c.number("train.warmup_init_factor", lo=0.0, hi=1.0)
    c.number("train.weight_decay", lo=0.0)
    c.number("train.b1", lo=0.0, hi=1.0, hi_open=True)
    c.number("train.b2", lo=0.0, hi=1.0, hi_open=True)
    c.number("train.eps", lo=0.0, lo_open=True)
    c.parse("train.mu_dtype", _check_mu_dtype)
    c.number("train.grad_clip", lo=0.0, note="0 = off")
    c.count("train.grad_accum")
    c.number("train.ema_decay", lo=0.0, hi=1.0, hi_open=True, note="0 = no EMA")
    c.prob("train.cond_drop_prob")
    c.enum("train.cond_drop_mode", COND_DROP_MODES)
    c.enum("train.nan_policy", NAN_POLICIES)
    c.parse("train.lora.components", _check_lora_components)


def _data(c: _Checks) -> None:
    c.enum("data.source", sorted(SOURCES))
    c.enum("data.synthetic_style", STYLES)
    c.count("data.synthetic_num_images")
    c.count("data.synthetic_min_side")
    c.ordered("data.synthetic_min_side", "data.synthetic_max_side")
    c.count("data.resolution")
    c.count("data.reference_size")
    c.prob("data.min_box_area")
    c.prob("data.max_box_area")
    c.ordered("data.min_box_area", "data.max_box_area")
    c.count("data.min_box_side", 0)
    c.count("data.min_image_side")
    c.count("data.max_image_pixels")
    for p in ("arbitrary_mask_prob", "ref_flip_prob", "ref_rotate_prob", "ref_blur_prob",
              "ref_elastic_prob", "crop_shrink_ratio", "ref_backdrop_prob"):
        c.prob(f"data.{p}")
    c.number("data.ref_backdrop_fill_min", lo=0.0, hi=1.0, lo_open=True)
    c.number("data.ref_backdrop_fill_max", lo=0.0, hi=1.0, lo_open=True)
    c.ordered("data.ref_backdrop_fill_min", "data.ref_backdrop_fill_max")
    backdrop, source = c.get("data.ref_backdrop_prob"), c.get("data.source")
    if (isinstance(backdrop, (int, float)) and backdrop > 0 and isinstance(source, str)
            and source in SOURCES and source not in MASK_SOURCES):
        c.add("data.ref_backdrop_prob", backdrop,
              f"0 with config.data.source={source!r}: the backdrop references need object masks, "
              f"which only the {MASK_SOURCES} sources give")
    c.number("data.box_extend_ratio", lo=0.0)
    c.count("data.bezier_samples")
    c.count("data.bezier_jitter", 0)
    c.count("data.ref_pad", 0)
    c.number("data.ref_rotate_limit", lo=0.0, hi=180.0)
    c.count("data.ref_blur_min")
    c.ordered("data.ref_blur_min", "data.ref_blur_max")
    for p in ("elastic_alpha", "elastic_sigma", "elastic_alpha_affine"):
        c.number(f"data.{p}", lo=0.0)
    c.count("data.num_workers", 0, note="0 = in-process")
    c.count("data.read_threads")
    c.count("data.prefetch")
    c.count("data.max_retries", 0)
    c.count("data.cv2_threads", 0)


def _stages(c: _Checks) -> None:
    c.off_or_count("evals.every_steps")
    c.count("evals.limit")
    c.count("evals.steps")
    c.number("evals.guidance", lo=0.0)
    c.enum("evals.scheduler", scheduler_names(), empty="'' = the model's own")
    c.count("evals.batch_size")
    c.enum("evals.fid_features", FID_FEATURES)
    c.off_or_count("vae_fit.steps")
    c.count("vae_fit.batch_size")
    c.number("vae_fit.lr", lo=0.0, lo_open=True)
    c.off_or_count("vae_fit.warmup_steps")
    c.number("vae_fit.kl_weight", lo=0.0)
    c.enum("vae_fit.recon", RECON_LOSSES)
    c.count("vae_fit.heldout_images")
    if c.get("vae_fit.refit") is True and c.get("vae_fit.steps") == 0:
        c.problems.append("config.vae_fit.refit=True: the VAE stage is off (config.vae_fit.steps=0); "
                          "set config.vae_fit.steps > 0 to fit a new VAE")
    if c.get("data") is not _MISSING:
        c.parse("vae_fit.heldout_data", lambda s: heldout_data_config(c.config.data, s))
    c.off_or_count("exemplar_eval.num_triplets")
    c.off_or_count("exemplar_eval.offstyle_triplets")
    identity, style = c.get("exemplar_eval.identity"), c.get("data.synthetic_style")
    if identity is True and style is not _MISSING and style != "identity":
        c.add("exemplar_eval.identity", identity,
              f"scores shapes and patterns, which only the 'identity' scenes have "
              f"(config.data.synthetic_style={style!r}; use configs/pbe.py:demo,scenes=identity)")
    c.number("watchdog.stall_minutes", lo=0.0, note="0 = off")
    c.count("watchdog.heartbeat_seconds")
    c.count("exemplar_eval.grid_rows")
    c.enum("exemplar_eval.scheduler", scheduler_names(), empty="'' = the model's own")


def _encoder_input_size(c: _Checks):
    """The reference side the configured conditioner takes (asked of its class: CLIP's
    image_size, DINOv2's crop size), or _MISSING when the config does not say."""
    raw = c.get("model.image_encoder")
    if raw is _MISSING:
        return _MISSING
    raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    try:
        return slot_class("image_encoder", raw).config_reference_size(raw)
    except Exception:  # noqa: BLE001 (an encoder config that does not parse is reported elsewhere)
        return raw.get("image_size", _MISSING)


def _sizes(c: _Checks) -> None:
    """Size facts that must agree: the data's image sizes and the model's input sizes, and
    the micro-batches of gradient accumulation."""
    ref, image = c.get("data.reference_size"), _encoder_input_size(c)
    if _MISSING not in (ref, image) and ref != image:
        c.problems.append(
            f"config.data.reference_size={ref} != " + (
                f"config.model.image_encoder.image_size={image}"
                if c.get("model.image_encoder.image_size") == image else
                f"{image} (config.model.image_encoder's input size, from its preprocessing)")
            + ": the reference is the image encoder's input; set both to the same size")
    res, sample = c.get("data.resolution"), c.get("model.unet.sample_size")
    vae_levels = c.get("model.vae.block_out_channels")
    if _MISSING not in (res, sample, vae_levels) and isinstance(res, int):
        f = vae_factor(c.config.model)
        unet_f = 2 ** (len(c.get("model.unet.block_out_channels") or (0,)) - 1)
        if res % (f * unet_f):
            c.problems.append(
                f"config.data.resolution={res}: expected a multiple of {f * unet_f} (the VAE "
                f"factor {f} of config.model.vae.block_out_channels x the UNet's {unet_f} of "
                f"config.model.unet.block_out_channels)")
        elif res != sample * f:
            c.problems.append(
                f"config.data.resolution={res} != config.model.unet.sample_size={sample} x VAE "
                f"factor {f}: set config.model.unet.sample_size={res // f} (get_config's res= "
                f"and --config.data.resolution keep them together)")
    latent = c.get("model.vae.latent_channels")
    for field, want, expr in (  # what the UNet's convs and cross-attention must agree with
            ("model.unet.in_channels", None if latent is _MISSING else 2 * latent + 1,
             "2 x config.model.vae.latent_channels + 1 (noisy + masked-image latents + mask)"),
            ("model.unet.out_channels", latent, "config.model.vae.latent_channels"),
            ("model.unet.cross_attention_dim", c.get("model.image_encoder.proj_size"),
             "config.model.image_encoder.proj_size (the context width)")):
        got = c.get(field)
        if _MISSING not in (got, want) and want is not None and got != want:
            c.problems.append(f"config.{field}={got}: expected {expr} = {want}")
    batch, accum = c.get("train.batch_size"), c.get("train.grad_accum")
    if (_MISSING not in (batch, accum) and isinstance(batch, int) and isinstance(accum, int)
            and batch >= 1 and accum >= 1 and batch % accum):
        c.problems.append(
            f"config.train.batch_size={batch} is not divisible by config.train.grad_accum={accum}: "
            f"each step splits the batch into grad_accum equal micro-batches")


def problems(config) -> list[str]:
    """Every problem of `config`, one line each naming the field ([] when it can run)."""
    c = _Checks(config)
    for section in (_general, _train, _data, _stages, _sizes):
        section(c)
    return c.problems


def validate(config, where: str = "config") -> None:
    """Raise one ConfigError listing every problem of `config` (nothing when it can run)."""
    found = problems(config)
    if found:
        raise ConfigError.of(found, where)


_OVERRIDE = re.compile(r"^--(no)?([A-Za-z_]\w*)\.([\w.]+)(=(.*))?$", re.DOTALL)


def check_overrides(argv: Sequence[str], name: str = "config") -> None:
    """Refuse a `--NAME.a.b` field given more than once in `argv` (ml_collections would
    concatenate a tuple field's values and keep the last of any other)."""
    seen: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        m = _OVERRIDE.match(arg)
        if not m or m.group(2) != name:
            continue
        if m.group(4) is not None:
            value = m.group(5)
        elif m.group(1):
            value = "false"
        else:  # `--config.x VALUE` or the boolean `--config.x`
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            value = nxt if nxt and not nxt.startswith("-") else "true"
        seen.setdefault(m.group(3), []).append(value)
    twice = [f"--{name}.{k} is given {len(v)} times ({', '.join(map(repr, v))}): give each field "
             f"once (a tuple as one value, e.g. --{name}.{k}='(a, b)')"
             for k, v in seen.items() if len(v) > 1]
    if twice:
        raise ConfigError.of(twice, "command line")


def check_run(spec: str, overrides: Sequence[str], where: str = "config") -> None:
    """The config file `spec` (`PATH.py:ARG`) with the `--config.a.b=v` flags `overrides`, as a
    run of it on the command line would see it, checked (a sweep checks each run before any)."""
    check_overrides(overrides)
    validate(load_config(spec, overrides), where)


def check_or_exit(config, argv: Sequence[str] | None = None) -> None:
    """For command lines: the overrides of `argv` (default sys.argv) and `config`, checked;
    on a problem print it and exit with status 2 (before anything compiles or loads)."""
    try:
        check_overrides(sys.argv if argv is None else argv)
        validate(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
