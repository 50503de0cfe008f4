r"""Compile the train step for a target topology on this host and print the memory per device,
to learn about an OOM before renting the pod.

  # a TPU pod slice (needs libtpu: pip install 'pbe_jax[tpu]'; runs on any CPU host)
  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd15 --topology=v5p-64
  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd15,mesh=data:-1,fsdp:8 \
      --topology=v5e-32 --config.train.batch_size=64

  # a GPU count or a CPU mesh: N fake CPU devices (the compiled memory is the CPU compiler's
  # estimate; the state bytes per device are exact for any backend)
  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd15 --topology=h100:16
  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:demo --topology=cpu:8

Topologies: `v4-N`, `v5p-N`, `v5e-N` (= `v5litepod-N`), `v6e-N` (N as in the accelerator type:
TensorCores for v4/v5p, chips for v5e/v6e), optionally with `--num_slices`; `cpu:N`, `gpu:N`,
`h100:N`, `h200:N`, `a100:N` (or a bare `N`) for fake devices. The mesh comes from the config
(`config.mesh`, one axis may be -1) laid over the target's devices.

Printed per device: parameters, optimizer state, frozen encoders and batch (exact, from the
shardings), the compiled step's arguments / outputs / temporaries (XLA's memory analysis) and
their sum, and the verdict against the device's memory (known for TPUs and the named GPUs, or
`--device_memory_gib`). Exit status: 0 fits (or unknown capacity), 3 does not fit, 2 a target
this host cannot compile for (no libtpu); with `--plan`, 0 also when a setting it names fits.

`--plan` (a memory plan before the run): when the config does not fit, compile again with the
cheaper settings of PLAN_STEPS, each on top of the previous, until one fits, and print the
overrides that do (e.g. `--config.train.mu_dtype=bfloat16 --config.train.lora.rank=16`):

  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd15,batch=8,mesh=data:1 \
      --topology=v5e-1 --plan
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

import jax
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from pbe_jax import runtime
from pbe_jax import sharding as shd
from pbe_jax.configs import set_fields
from pbe_jax.configs.validate import check_or_exit
from pbe_jax.training.state import Setup, state_bytes_per_device, step_flops

GiB = 2**30

# Per-device memory (GiB): HBM per TPU chip / device as JAX sees it, GPU memory for the named GPUs.
DEVICE_MEMORY_GIB = {"v4": 32.0, "v5p": 95.0, "v5e": 16.0, "v6e": 32.0,
                     "h100": 80.0, "h200": 141.0, "a100": 80.0, "a100-40g": 40.0, "l4": 24.0}

# v4 / v5p: accelerator-type count N is TensorCores = 2 x chips (one megacore device per chip).
# Chip grid per chip count (3D torus); `wrap` from 64 chips (full 4x4x4 cubes) up.
_CUBE = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
         256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
# v5e / v6e: N is chips, 2D grid.
_GRID = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for. kind: 'tpu' (compile-only devices from libtpu) or 'fake' (CPU)."""
    name: str
    kind: str
    num_devices: int
    device_memory_gib: float | None = None
    topology_name: str = ""  # tpu: e.g. 'v5:2x4x4'
    chip_config_name: str = "default"
    chips_per_host_bounds: tuple = (2, 2, 1)
    wrap: tuple = (False, False, False)


def parse_topology(spec: str) -> Target:
    """'v5p-64' / 'v5e-16' / 'cpu:8' / 'h100:16' / '16' -> Target."""
    s = spec.strip().lower().replace("v5litepod", "v5e")
    if s.isdigit():
        s = f"gpu:{s}"
    m = re.fullmatch(r"(cpu|gpu|h100|h200|a100|a100-40g|l4):(\d+)", s)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise ValueError(f"--topology={spec!r}: need at least one device")
        return Target(spec, "fake", n, DEVICE_MEMORY_GIB.get(m.group(1)))
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", s)
    if not m:
        raise ValueError(f"--topology={spec!r}: expected v4-N, v5p-N, v5e-N, v6e-N, cpu:N, gpu:N, "
                         f"h100:N, h200:N, a100:N or N")
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v4", "v5p"):
        chips = n // 2
        if n % 2 or chips not in _CUBE:
            raise ValueError(f"--topology={spec!r}: {gen}-N needs N in {sorted(2 * c for c in _CUBE)}")
        shape = _CUBE[chips]
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
        prefix = "v4" if gen == "v4" else "v5"
        return Target(spec, "tpu", chips, DEVICE_MEMORY_GIB[gen], f"{prefix}:{'x'.join(map(str, shape))}",
                      "megacore", (2, 2, 1), wrap)
    if n not in _GRID:
        raise ValueError(f"--topology={spec!r}: {gen}-N needs N in {sorted(_GRID)}")
    shape = _GRID[n]
    wrap = {128: (False, True, False), 256: (True, True, False)}.get(n, (False, False, False))
    bounds = (1, 1, 1) if n == 1 else (2, 2, 1)
    return Target(spec, "tpu", n, DEVICE_MEMORY_GIB[gen], f"{gen}:{'x'.join(map(str, shape))}",
                  "default", bounds, wrap)


class MissingLibtpu(RuntimeError):
    pass


def target_devices(target: Target, num_slices: int = 1) -> list:
    """The devices to compile for. For fake targets this must run before any JAX backend is
    initialised (it sets the CPU device count), unless the CPU backend already has exactly N."""

    if target.kind == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise MissingLibtpu(
                f"--topology={target.name} needs libtpu to compile for TPUs (it runs on any CPU "
                f"host): pip install 'pbe_jax[tpu]'  (or: pip install 'jax[tpu]'). "
                f"For a GPU count or a CPU mesh use --topology=gpu:N / cpu:N.")

        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology_name, chip_config_name=target.chip_config_name,
            chips_per_host_bounds=target.chips_per_host_bounds, num_slices=num_slices, wrap=target.wrap)
        return list(topo.devices)
    if num_slices != 1:
        raise ValueError("--num_slices applies to TPU topologies only")
    try:
        jax.config.update("jax_num_cpu_devices", target.num_devices)
    except Exception:  # noqa: BLE001 (backend already initialised: use it if it has N devices)
        pass
    cpus = jax.devices("cpu")
    if len(cpus) != target.num_devices:
        raise RuntimeError(f"--topology={target.name}: the CPU backend was initialised with {len(cpus)} "
                           f"devices before the tool could set {target.num_devices}; run the tool in a "
                           f"fresh process")
    return cpus


def min_peak_bytes(compile_error: str | None, resident_bytes: int) -> int | None:
    """A compile the TPU compiler refused for memory names what its temporaries alone need
    ("... memory required for HLO temporaries (17.09G) exceeds available HBM ..."): with the
    resident state, a lower bound on the step's memory per device, i.e. what a larger device
    would have to hold at least. None when the error names no such size."""
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", compile_error or "")
    if need is None:
        return None
    return resident_bytes + int(float(need.group(1)) * 1024 ** ("KMGT".index(need.group(2)) + 1))


def compile_report(config, devices: list, device_memory_gib: float | None = None) -> dict[str, Any]:
    """Compile `config`'s train step over `devices` and measure memory per device (bytes)."""

    mesh = shd.make_mesh(config.mesh, devices=devices)
    setup = Setup(config, mesh)  # checks that the batch splits over the mesh
    t0 = time.perf_counter()
    compiled, oom = None, None
    try:
        compiled = setup.compile()
    except Exception as e:  # noqa: BLE001 (the TPU compiler itself refuses what cannot fit)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = str(e).strip().splitlines()[0]
    compile_s = time.perf_counter() - t0
    state = setup.abstract_state()
    ma = compiled.memory_analysis() if compiled is not None else None
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")} if ma is not None else {}
    r = {
        "devices": len(devices), "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "global_batch": int(config.train.batch_size), "compile_s": compile_s,
        "params_bytes": state_bytes_per_device(state["params"]),
        "opt_state_bytes": state_bytes_per_device(state["opt_state"]),
        "ema_bytes": state_bytes_per_device(state["ema"]) if "ema" in state else 0,
        "frozen_bytes": state_bytes_per_device(setup.abstract_frozen()),
        "batch_bytes": state_bytes_per_device(setup.abstract_batch()),
        "flops_per_device": step_flops(compiled) if compiled is not None else 0.0,
        "compiled": mem,
        "compile_error": oom,
        "device_memory_bytes": int(device_memory_gib * GiB) if device_memory_gib else None,
    }
    r["state_bytes"] = state_bytes_per_device(state)  # params, optimizer, EMA, step, rng
    # Everything that stays on the device across steps. XLA's `argument` size can be smaller:
    # jit drops arguments the step never reads (the frozen VAE decoder), but the training loop
    # still holds them.
    r["resident_bytes"] = r["state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]
    # Donated train state: its buffers are both argument and output (alias), counted once.
    r["peak_bytes"] = (max(mem["argument"], r["resident_bytes"]) + mem["output"] - mem["alias"]
                       + mem["temp"] + mem["generated_code"]) if mem else None
    r["min_peak_bytes"] = min_peak_bytes(oom, r["resident_bytes"])
    cap, peak = r["device_memory_bytes"], r["peak_bytes"]
    r["fits"] = False if oom else (None if cap is None or peak is None else bool(peak <= cap))
    return r


def _gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GiB:8.3f} GiB"


def format_report(r: dict[str, Any], target: Target) -> str:
    mem = r["compiled"]
    lines = [
        f"target {target.name}: {r['devices']} devices ({r['device_kind']}), mesh {r['mesh']}, "
        f"global batch {r['global_batch']}, compiled in {r['compile_s']:.1f}s",
        "per device:",
        f"  params (trained)          {_gib(r['params_bytes'])}",
        f"  optimizer state           {_gib(r['opt_state_bytes'])}",
        *([f"  EMA params                {_gib(r['ema_bytes'])}"] if r["ema_bytes"] else []),
        f"  params + optimizer (+EMA) {_gib(r['state_bytes'])}",
        f"  frozen VAE + CLIP         {_gib(r['frozen_bytes'])}",
        f"  batch (uint8)             {_gib(r['batch_bytes'])}",
        f"  resident between steps    {_gib(r['resident_bytes'])}",
    ]
    if mem:
        lines += [
            "compiled step (XLA memory analysis), per device:",
            f"  arguments                 {_gib(mem['argument'])}",
            f"  outputs                   {_gib(mem['output'])}",
            f"  aliased (donated state)   {_gib(mem['alias'])}",
            f"  temporaries (activations) {_gib(mem['temp'])}",
            f"  generated code            {_gib(mem['generated_code'])}",
            f"  total (+ resident arrays the step does not read) {_gib(r['peak_bytes'])}",
        ]
    if r["flops_per_device"]:
        lines.append(f"FLOPs per step per device: {r['flops_per_device']:.3g}")
    if r["compile_error"]:
        lines.append(f"DOES NOT FIT: the compiler refused the step: {r['compile_error']}")
    elif r["fits"] is None:
        lines.append("device memory unknown: pass --device_memory_gib to get a verdict")
    else:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"{verdict}: {_gib(r['peak_bytes']).strip()} of {_gib(r['device_memory_bytes']).strip()} per device")
    if target.kind == "fake" and not target.name.startswith("cpu"):
        lines.append("note: compiled by the CPU compiler over fake devices: the GPU compiler fuses and "
                     "assigns buffers differently, so treat the compiled total as an estimate; the "
                     "state sizes above are exact")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Memory plan: when the config does not fit, compile cheaper settings until one does
# --------------------------------------------------------------------------------------------


def _next_remat(config, _) -> dict:
    return {} if config.remat and not config.remat_policy else {"remat": True, "remat_policy": ""}


def _next_accum(config, shards: int) -> dict:
    # The same global batch in more micro-batches (the recipe unchanged, slower steps), while a
    # micro-batch still splits over the `shards` devices the batch is sharded over.
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum)
    ok = batch % (accum * 2) == 0 and (batch // (accum * 2)) % shards == 0
    return {"train.grad_accum": accum * 2} if ok else {}


def _next_lora(config, _) -> dict:
    return {} if int(config.train.lora.rank) > 0 else {"train.lora.rank": 16}


def _next_bf16_base(config, _) -> dict:
    if int(config.train.lora.rank) == 0 or config.train.lora.base_dtype == "bfloat16":
        return {}
    return {"train.lora.base_dtype": "bfloat16"}


# Ordered by what each gives up, cheapest first; each applies on top of the ones before it.
# (name, what it costs, (config, batch shards) -> overrides, {} when it does not apply or is
# already set). grad_accum doubles while the micro-batch splits.
PLAN_STEPS = (
    ("mu_dtype=bfloat16", "AdamW's first moment in bf16",
     lambda c, _: {} if c.train.mu_dtype == "bfloat16" else {"train.mu_dtype": "bfloat16"}),
    ("remat everything", "recompute activations (~1/3 more compute)", _next_remat),
    ("grad_accum x2", "the same global batch in twice the micro-batches (slower steps)", _next_accum),
    ("LoRA rank 16", "train adapters instead of the whole UNet", _next_lora),
    ("bf16 frozen base", "hold the frozen UNet base in bf16", _next_bf16_base),
)


def _with(config, overrides: dict):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        set_fields(c, overrides)
    return c


def memory_plan(config, devices: list, device_memory_gib: float, max_compiles: int = 8,
                compile_fn=compile_report) -> dict[str, Any]:
    """Compile `config`, then, while it does not fit in `device_memory_gib`, the next cheaper
    setting of PLAN_STEPS on top of the previous ones. Every row is a real compile
    (`compile_fn(config, devices, device_memory_gib)`, compile_report's signature). Returns
    {'rows': [(name, overrides so far, report)], 'fits': the overrides of the row that fits,
    {} when the config fits as it is, None when no row fits}."""
    shards = shd.batch_axis_size(shd.make_mesh(config.mesh, devices=devices))
    overrides: dict = {}
    rows = [("as configured", {}, compile_fn(config, devices, device_memory_gib))]
    steps = list(PLAN_STEPS)
    while rows[-1][2]["fits"] is False and steps and len(rows) < max_compiles:
        name, _, step = steps[0]
        change = step(_with(config, overrides), shards)
        if not change:
            steps.pop(0)
            continue
        if name != "grad_accum x2":  # the only step that repeats
            steps.pop(0)
        overrides = {**overrides, **change}
        rows.append((name, dict(overrides), compile_fn(_with(config, overrides), devices, device_memory_gib)))
    last = rows[-1]
    return {"rows": rows, "fits": last[1] if last[2]["fits"] else None}


def format_plan(plan: dict[str, Any], device_memory_gib: float) -> str:
    lines = [f"memory plan for {device_memory_gib:g} GiB per device (each row a compile; settings "
             f"accumulate):",
             f"  {'setting':<20} {'params+opt':>11} {'frozen':>9} {'temps':>9} {'total':>9}  verdict"]
    for name, _, r in plan["rows"]:
        temp = (r["compiled"] or {}).get("temp")
        verdict = ("refused by the compiler" if r["compile_error"] else
                   "fits" if r["fits"] else "does not fit")
        cells = [_gib(b).replace(" GiB", "").strip() for b in (r["state_bytes"], r["frozen_bytes"],
                                                                temp, r["peak_bytes"])]
        lines.append(f"  {name:<20} {cells[0]:>11} {cells[1]:>9} {cells[2]:>9} {cells[3]:>9}  {verdict}")
    fits = plan["fits"]
    if fits is None:
        lines.append("no setting tried fits: use more devices (fsdp) or a smaller image size")
    elif fits:
        lines.append("fits with: " + " ".join(f"--config.{k}={v}" for k, v in fits.items()))
    else:
        lines.append("fits as configured")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pbe.py:sd15", lock_config=True)
    flags.DEFINE_string("topology", None, "v5p-64, v4-8, v5e-16, v6e-8, cpu:8, gpu:16, h100:16, ...")
    flags.DEFINE_integer("num_slices", 1, "TPU multislice: number of slices of --topology")
    flags.DEFINE_float("device_memory_gib", None, "override the per-device memory for the verdict")
    flags.DEFINE_string("json_out", None, "also write the report as JSON here")
    flags.DEFINE_bool("plan", False, "when the config does not fit, compile cheaper settings "
                      "(mu_dtype, remat, grad_accum, LoRA, bf16 base) until one does and name it")
    flags.mark_flags_as_required(["config", "topology"])
    runtime.define_flags()
    return flags.FLAGS


def main(argv) -> int:
    del argv
    f = _FLAGS
    check_or_exit(f.config)  # every field, with the command line's overrides
    runtime.configure_from_flags()  # before the platform is pinned: XLA:CPU flags only without libtpu
    # Compile-only: keep JAX off any accelerator of this host (a TPU target is compiled by
    # libtpu's compile-only client, which needs no TPU here). Env vars are read at jax import,
    # hence the config update; flag parsing imported jax but initialised no backend.
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    try:
        target = parse_topology(f.topology)
        devices = target_devices(target, f.num_slices)
    except (ValueError, MissingLibtpu) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cap = f.device_memory_gib if f.device_memory_gib is not None else target.device_memory_gib
    if f.plan and cap is None:
        print(f"error: --plan needs the device memory: --topology={target.name} does not name it; "
              f"pass --device_memory_gib", file=sys.stderr)
        return 2
    report = compile_report(f.config, devices, cap)
    print(format_report(report, target))
    out = {"target": dataclasses.asdict(target), **report}
    if f.plan:
        first = report  # the config as given is compiled once
        plan = memory_plan(f.config, devices, cap, compile_fn=lambda c, d, m: first if c is f.config
                           else compile_report(c, d, m))
        print(format_plan(plan, cap))
        out["plan"] = [{"setting": n, "overrides": o, "peak_bytes": r["peak_bytes"], "fits": r["fits"],
                        "compile_error": r["compile_error"]} for n, o, r in plan["rows"]]
        out["plan_fits"] = plan["fits"]
    if f.json_out:
        with open(f.json_out, "w") as fh:
            json.dump(out, fh, indent=2)
    return 3 if report["fits"] is False and not (f.plan and plan["fits"] is not None) else 0


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
