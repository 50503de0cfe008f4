"""Training configs, and the one way to load a config file.

`load_config('configs/pbe.py:demo', overrides)` goes through ml_collections' config-file flag
parser, the same one `--config=...` of every command line uses, so a file, its `:ARG` and
`--config.a.b=v` overrides mean the same everywhere (training, sweeps, benchmarks, AOT, tests).
`pbe_jax/configs/pbe.py` ships with the package; `BUILTIN` is its path, so an installed
pbe_jax finds it from any directory (`load_config('pbe:demo')` is a shorthand).
"""
from __future__ import annotations

import os
import sys
import types
from typing import Iterable, Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags

BUILTIN = {"pbe": os.path.join(os.path.dirname(os.path.abspath(__file__)), "pbe.py")}


def split_spec(spec: str) -> tuple[str, str]:
    """'configs/pbe.py:demo,res=32' -> (path, 'demo,res=32'); 'pbe:demo' -> (BUILTIN path, 'demo')."""
    path, _, arg = spec.partition(":")
    path = BUILTIN.get(path, path)
    if not path.endswith(".py"):
        raise ValueError(f"config {spec!r}: expected PATH.py[:ARG] or one of {sorted(BUILTIN)}[:ARG]")
    return path, arg


def load_config(spec: str, overrides: Mapping[str, object] | Iterable[str] = (),
                lock: bool = True) -> ml_collections.ConfigDict:
    """The config `spec` names (`PATH.py[:ARG]` or `pbe[:ARG]`), with `overrides` applied:
    `{'train.lr': 1e-4}` or flag strings `['--config.train.lr=1e-4']`. Locked by default, as
    on the command line, so a misspelt field fails."""
    path, arg = split_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (relative to {os.getcwd()})")
    argv = ["pbe_jax", f"--config={path}:{arg}" if arg else f"--config={path}"]
    argv += [] if isinstance(overrides, Mapping) else list(overrides)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=lock,
                                    sys_argv=argv)
    fv(argv)
    config = fv.config
    if isinstance(overrides, Mapping):
        set_fields(config, overrides)
    return config


def set_fields(config, overrides: Mapping) -> None:
    """Set each dotted field of `overrides` (`{"train.lr": 1e-4}`) on `config`, in place."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def load_module(path: str) -> types.ModuleType:
    """A config file as a module (for `get_sweep`), compiled from source every time, so an edited
    file is always re-read."""
    path = split_spec(path if ":" in path else path + ":")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (relative to {os.getcwd()})")
    name = f"_pbe_cfg_{os.path.splitext(os.path.basename(path))[0]}"
    module = types.ModuleType(name)
    module.__file__ = os.path.abspath(path)
    sys.modules[name] = module  # dataclasses and pickling look modules up there
    with open(path) as f:
        exec(compile(f.read(), module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module
