r"""Memory benchmark: compiled per-device bytes of the train step under pure data parallel
(`data:8`) vs FSDP (`fsdp:8`) on 8 fake CPU devices, remat off and on. AOT only
(`train.Setup(...).compile()`); nothing runs.

Params / optimizer state / frozen encoders per device are exact (from the shardings,
`train.state_bytes_per_device`); arguments / outputs / temporaries come from XLA's
`compiled.memory_analysis()` (the CPU compiler's estimate of the same program).

Needs 8 devices, i.e. `XLA_FLAGS=--xla_force_host_platform_device_count=8` before jax is
imported, so `run` re-runs this module in a subprocess when the current process has fewer:

  python -m pbe_jax.benchmarks.memory --size=sd15 --out=mem.json
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

from pbe_jax import runtime
from pbe_jax import sharding as shd
from pbe_jax.benchmarks.report import Row
from pbe_jax.benchmarks.sizes import bench_config, get_size
from pbe_jax.training.state import Setup, state_bytes_per_device

NUM_DEVICES = 8
MESHES = {"dp": "data:8,fsdp:1,tensor:1", "fsdp": "data:1,fsdp:8,tensor:1"}


def measure(size_name: str, *, dtype: str = "fp32", compile: bool = True) -> dict:  # noqa: A002
    """{'dp'|'fsdp': {'remat_off'|'remat_on': {bytes...}, 'params': n, 'opt_state': n, ...}}."""

    if jax.device_count() < NUM_DEVICES:
        raise RuntimeError(f"memory benchmark needs {NUM_DEVICES} devices, have {jax.device_count()}: "
                           "set XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax")
    size = get_size(size_name)
    devices = jax.devices()[:NUM_DEVICES]
    out = {}
    for mesh_name, spec in MESHES.items():
        res = {}
        for remat in (False, True):
            cfg = bench_config(size, dtype=dtype, batch=NUM_DEVICES, mesh=spec, remat=remat)
            setup = Setup(cfg, shd.make_mesh(spec, devices=devices))
            if not remat:  # the state does not depend on remat
                state = setup.abstract_state()
                res["params"] = state_bytes_per_device(state["params"])
                res["opt_state"] = state_bytes_per_device(state["opt_state"])
                res["frozen"] = state_bytes_per_device(setup.abstract_frozen())
            if not compile:
                continue
            t0 = time.perf_counter()
            ma = setup.compile().memory_analysis()
            key = "remat_on" if remat else "remat_off"
            res[key] = {"temp": int(ma.temp_size_in_bytes), "argument": int(ma.argument_size_in_bytes),
                        "output": int(ma.output_size_in_bytes), "alias": int(ma.alias_size_in_bytes),
                        "compile_s": time.perf_counter() - t0}
        out[mesh_name] = res
    return out


def measure_in_subprocess(size_name: str, *, dtype: str = "fp32", compile: bool = True) -> dict:  # noqa: A002
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # fake devices are CPU devices
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mem.json")
        cmd = [sys.executable, "-m", "pbe_jax.benchmarks.memory", f"--size={size_name}",
               f"--dtype={dtype}", f"--out={path}"] + ([] if compile else ["--nocompile"])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)


def run(size, *, dtype: str = "fp32", compile: bool = True) -> list[Row]:  # noqa: A002

    if jax.device_count() >= NUM_DEVICES and jax.devices()[0].platform == "cpu":
        m = measure(size.name, dtype=dtype, compile=compile)
    else:
        m = measure_in_subprocess(size.name, dtype=dtype, compile=compile)
    return rows(size.name, m)


def rows(size_name: str, m: dict) -> list[Row]:
    """pbe_jax 'ours' = FSDP, 'reference' = pure data parallel, so the ratio is FSDP / DP."""
    name = f"memory/{size_name}"
    dp, fs = m["dp"], m["fsdp"]
    mib = lambda b: b / 2**20  # noqa: E731
    out = [
        Row(f"{name}/params", mib(fs["params"]), mib(dp["params"]), "MiB/device (fsdp:8 vs data:8)"),
        Row(f"{name}/opt_state", mib(fs["opt_state"]), mib(dp["opt_state"]), "MiB/device (fsdp:8 vs data:8)"),
        Row(f"{name}/params+opt_state", mib(fs["params"] + fs["opt_state"]),
            mib(dp["params"] + dp["opt_state"]), "MiB/device (fsdp:8 vs data:8)"),
        Row(f"{name}/frozen", mib(fs["frozen"]), mib(dp["frozen"]), "MiB/device (fsdp:8 vs data:8)"),
    ]
    for key in ("remat_off", "remat_on"):
        if key in fs and key in dp:
            out.append(Row(f"{name}/temp_{key}", mib(fs[key]["temp"]), mib(dp[key]["temp"]),
                           "MiB/device XLA temp (fsdp:8 vs data:8)"))
            out.append(Row(f"{name}/total_{key}",
                           mib(fs[key]["temp"] + fs[key]["argument"] + fs[key]["output"] - fs[key]["alias"]),
                           mib(dp[key]["temp"] + dp[key]["argument"] + dp[key]["output"] - dp[key]["alias"]),
                           "MiB/device args+out+temp-alias (fsdp:8 vs data:8)"))
    return out


def main(argv) -> None:
    del argv
    F = flags.FLAGS
    runtime.configure()  # the parent's cache setting arrives through the environment
    logging.disable(logging.WARNING)
    result = measure(F.size, dtype=F.dtype, compile=F.compile)
    with open(F.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    flags.DEFINE_string("size", "tiny", "benchmark size")
    flags.DEFINE_string("dtype", "fp32", "compute dtype")
    flags.DEFINE_string("out", None, "JSON result file")
    flags.DEFINE_bool("compile", True, "AOT-compile each mesh x remat (else state bytes only)")
    flags.mark_flag_as_required("out")
    app.run(main)
