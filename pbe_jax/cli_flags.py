"""The flags that the generating command lines share (`pbe_jax.sample`, `pbe_jax.evaluate`,
`pbe_jax.demo`, `pbe_jax.bench`), declared once, with the defaults of `pbe_jax.defaults`.

Every multi-word flag takes '_' or '-': `--use_ema` and `--use-ema` both work (`run` rewrites
the dashed spelling of any defined flag before absl parses the command line; `use-ema` is
also an absl alias, for callers that parse argv themselves).
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags

from pbe_jax.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from pbe_jax.schedulers import scheduler_names

MODEL_FLAGS = ("model", "steps", "guidance", "scheduler", "seed", "dtype", "use_ema", "variant", "revision")


def _define(name: str, fv: flags.FlagValues) -> None:
    if name == "model":
        flags.DEFINE_string("model", None, "diffusers PbE repo (dir or hub id) or a pbe_jax training "
                            "workdir/checkpoint", flag_values=fv)
    elif name == "steps":
        flags.DEFINE_integer("steps", NUM_INFERENCE_STEPS, "denoising steps", lower_bound=1, flag_values=fv)
    elif name == "guidance":
        flags.DEFINE_float("guidance", GUIDANCE_SCALE, "classifier-free guidance scale (1 = off; the "
                           "paper's benchmark: 5)", flag_values=fv)
    elif name == "scheduler":
        flags.DEFINE_enum("scheduler", None, scheduler_names(), "sampler (default: the model's own, its "
                          "scheduler_config.json; PLMS for the released PbE)", flag_values=fv)
    elif name == "seed":
        flags.DEFINE_integer("seed", 0, "base seed (rows without a seed use seed + 1000 * row)", flag_values=fv)
    elif name == "dtype":
        flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "compute dtype", flag_values=fv)
    elif name == "use_ema":
        flags.DEFINE_bool("use_ema", None, "--model is a training run: load its EMA params (default: "
                          "the EMA params when the run has them; --nouse_ema: the raw ones)", flag_values=fv)
        flags.DEFINE_alias("use-ema", "use_ema", flag_values=fv)
    elif name == "variant":
        flags.DEFINE_string("variant", None, "diffusers weight variant of --model (e.g. fp16)", flag_values=fv)
    elif name == "revision":
        flags.DEFINE_string("revision", None, "Hub revision (branch, tag or commit) of --model", flag_values=fv)
    else:
        raise ValueError(f"no shared flag {name!r}; the shared flags are {MODEL_FLAGS}")


def define_model_flags(names: Sequence[str] = MODEL_FLAGS, *, flag_values: flags.FlagValues | None = None) -> None:
    """Declare the shared flags `names` (default: all of `MODEL_FLAGS`)."""
    fv = flags.FLAGS if flag_values is None else flag_values
    for name in names:
        _define(name, fv)


def dashes_to_underscores(argv: Sequence[str], fv: flags.FlagValues | None = None) -> list[str]:
    """`--use-ema=x` -> `--use_ema=x` (and `--nouse-ema` -> `--nouse_ema`) for every flag defined in
    `fv` with underscores; everything else (values, positional arguments, after `--`) unchanged."""
    fv = flags.FLAGS if fv is None else fv
    known = set(fv)
    out, rest = [], False
    for a in argv:
        if rest or not a.startswith("--") or a == "--":
            rest = rest or a == "--"
            out.append(a)
            continue
        name, eq, value = a[2:].partition("=")
        fixed = name.replace("-", "_")
        base = fixed[2:] if fixed.startswith("no") and fixed not in known else fixed
        out.append(f"--{fixed}{eq}{value}" if name not in known and base in known else a)
    return out


def run(main: Callable, argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)` with the dashed spellings accepted (`dashes_to_underscores`)."""
    app.run(main, argv=dashes_to_underscores(sys.argv if argv is None else argv))
