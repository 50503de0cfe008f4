"""AOT compile tool: topology parsing, per-device state sizes against the model's own parameter
count, and the CLI compiling the demo step for 2 fake devices (memory analysis consistent with
the state it is given). TPU targets compile only where libtpu is installed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.models import TRAINABLE
from pbe_jax.tools.aot_compile import (GiB, PLAN_STEPS, _with, compile_report, format_plan, format_report,
                                      memory_plan, parse_topology)
from pbe_jax.training.state import Setup, abstract_model, state_bytes_per_device
from tests.train_utils import CONFIG_FILE, REPO, SMALL_MODEL, cli_overrides, tiny_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_parse_topology():
    t = parse_topology("v5p-64")
    assert (t.kind, t.num_devices, t.topology_name, t.chip_config_name) == ("tpu", 32, "v5:2x4x4", "megacore")
    t = parse_topology("v5p-1024")
    assert t.num_devices == 512 and t.topology_name == "v5:8x8x8" and t.wrap == (True, True, True)
    t = parse_topology("v5litepod-16")
    assert (t.num_devices, t.topology_name, t.chip_config_name) == (16, "v5e:4x4", "default")
    assert parse_topology("v4-8").topology_name == "v4:2x2x1"
    assert parse_topology("v6e-256").wrap == (True, True, False)
    for spec, n in (("cpu:8", 8), ("gpu:16", 16), ("64", 64), ("h100:16", 16)):
        t = parse_topology(spec)
        assert t.kind == "fake" and t.num_devices == n
    assert parse_topology("h100:16").device_memory_gib == 80 and parse_topology("cpu:8").device_memory_gib is None
    for bad in ("v5p-63", "v5p-6", "v5e-12", "tpu-8", "cpu:0", "cpu:x"):
        with pytest.raises(ValueError, match="topology"):
            parse_topology(bad)


def _param_bytes(cfg) -> int:
    """fp32 bytes of the trainable parameters, counted from the abstract model itself."""
    p = nnx.split(abstract_model(cfg), TRAINABLE, ...)[1]
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(p))


def test_state_bytes_per_device_follow_the_mesh():
    cfg = tiny_config(small_model=False)
    full = _param_bytes(cfg)
    dp = Setup(cfg, shd.make_mesh("data:8")).abstract_state()
    fsdp = Setup(cfg, shd.make_mesh("data:1,fsdp:8")).abstract_state()
    # data parallel: every device holds all params and Adam's mu and nu
    assert state_bytes_per_device(dp["params"]) == full
    # + the step count and torch AdamW's per-parameter step counts (int32 [L], training/optim.py)
    counts = 64 + 4 * len(jax.tree.leaves(dp["params"]))
    assert 2 * full <= state_bytes_per_device(dp["opt_state"]) <= 2 * full + counts
    # fsdp: the big kernels are split 8 ways, small arrays stay whole
    p8 = state_bytes_per_device(fsdp["params"])
    assert full / 8 <= p8 < full / 2
    assert 2 * p8 <= state_bytes_per_device(fsdp["opt_state"]) <= 2 * p8 + counts


def test_compiler_out_of_memory_is_a_verdict(monkeypatch):
    """The TPU compiler refuses a step that cannot fit (RESOURCE_EXHAUSTED): the tool reports it
    as 'does not fit' with the compiler's numbers and still prints the state sizes; any other
    compile error propagates."""
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (19.58G) exceeds available HBM (15.75G).\ndetails")

    def refuse(self):
        raise RuntimeError(msg)

    monkeypatch.setattr(Setup, "compile", refuse)
    cfg = tiny_config(small_model=False)
    cfg.mesh = "data:1,fsdp:2"
    devices = jax.devices()[:2]
    r = compile_report(cfg, devices, device_memory_gib=16)
    assert r["fits"] is False and r["compile_error"] == msg.splitlines()[0] and r["compiled"] == {}
    setup = Setup(cfg, shd.make_mesh(cfg.mesh, devices=devices))
    assert r["params_bytes"] == state_bytes_per_device(setup.abstract_state()["params"])
    text = format_report(r, parse_topology("v5e-16"))
    assert "DOES NOT FIT: the compiler refused the step: RESOURCE_EXHAUSTED" in text and "(19.58G)" in text

    def broken(self):
        raise RuntimeError("INTERNAL: something else")

    monkeypatch.setattr(Setup, "compile", broken)
    with pytest.raises(RuntimeError, match="INTERNAL"):
        compile_report(cfg, devices)


@pytest.mark.slow
def test_memory_plan_compiles_until_a_setting_fits():
    """Real compiles over 2 fake devices: with one byte less than the config needs, the plan
    compiles the config (does not fit), then mu_dtype=bfloat16 (fits: a smaller AdamW state)
    and stops there, naming that override."""
    cfg = tiny_config(**{"train.batch_size": 4})
    cfg.mesh = "data:2"
    devices = jax.devices()[:2]
    compiles = {}

    def once(c, d, gib):  # each distinct config compiled once; the verdict for this capacity
        key = c.to_json()
        if key not in compiles:
            compiles[key] = compile_report(c, d, None)
        r = dict(compiles[key])
        r["fits"] = r["peak_bytes"] <= gib * GiB
        return r

    need = once(cfg, devices, 0)["peak_bytes"]
    plan = memory_plan(cfg, devices, (need - 1) / GiB, compile_fn=once)
    (first, _, base), (name, overrides, r) = plan["rows"]
    assert first == "as configured" and base["fits"] is False
    assert name == "mu_dtype=bfloat16" and r["fits"] is True and r["peak_bytes"] < need
    assert r["opt_state_bytes"] < base["opt_state_bytes"] and r["params_bytes"] == base["params_bytes"]
    assert plan["fits"] == overrides == {"train.mu_dtype": "bfloat16"} and len(compiles) == 2
    assert "fits with: --config.train.mu_dtype=bfloat16" in format_plan(plan, 1.0)
    assert cfg.train.mu_dtype == "float32"  # the caller's config is left as it was
    # a config that fits is compiled once
    roomy = memory_plan(cfg, devices, 64.0, compile_fn=once)
    assert len(roomy["rows"]) == 1 and roomy["fits"] == {} and "fits as configured" in format_plan(roomy, 64.0)


def test_memory_plan_tries_the_steps_in_order_and_accumulates_them():
    """Nothing fits until the frozen base is bf16: every step is tried once, in PLAN_STEPS'
    order, each on top of the ones before; grad_accum doubles while a micro-batch still splits
    over the 2 batch shards (batch 8: accum 2 and 4, not 8)."""
    cfg = tiny_config(small_model=False, **{"train.batch_size": 8})
    cfg.mesh = "data:2"
    seen = []

    def fake_compile(c, devices, gib):
        seen.append(c)
        fits = c.train.lora.base_dtype == "bfloat16"
        return {"fits": fits, "state_bytes": 1, "frozen_bytes": 1, "compiled": {"temp": 1},
                "peak_bytes": 3, "compile_error": None}

    plan = memory_plan(cfg, jax.devices()[:2], 1.0, compile_fn=fake_compile)
    names = [n for n, _, _ in plan["rows"]]
    assert not cfg.remat  # the demo config: remat off, so the plan turns it on
    assert names == ["as configured", *[s[0] for s in PLAN_STEPS[:3]], "grad_accum x2", *[s[0] for s in PLAN_STEPS[3:]]]
    assert names[1:4] == ["mu_dtype=bfloat16", "remat everything", "grad_accum x2"]
    last = seen[-1]
    assert (last.train.mu_dtype, last.train.grad_accum, last.train.lora.rank, last.train.lora.base_dtype) \
        == ("bfloat16", 4, 16, "bfloat16")
    assert plan["fits"] == {"train.mu_dtype": "bfloat16", "remat": True, "remat_policy": "",
                            "train.grad_accum": 4, "train.lora.rank": 16, "train.lora.base_dtype": "bfloat16"}
    # nothing fits: the plan says so after at most max_compiles compiles
    never = memory_plan(cfg, jax.devices()[:2], 1.0, max_compiles=3,
                        compile_fn=lambda c, d, g: {**fake_compile(c, d, g), "fits": False})
    assert len(never["rows"]) == 3 and never["fits"] is None
    assert "no setting tried fits" in format_plan(never, 1.0)


# The CLI test's model: the tests' small one (one UNet and one VAE level: less to compile than the
# demo's two) on the demo's 32 px images, batch 4.
CLI_MODEL = {**SMALL_MODEL, "data.resolution": 32, "model.unet.sample_size": 32, "model.vae.sample_size": 32,
             "train.batch_size": 4}


@pytest.mark.slow
def test_cli_compiles_for_fake_devices(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pbe_jax.tools.aot_compile", f"--config={CONFIG_FILE}:demo,mesh=data:1,fsdp:2",
           "--topology=cpu:2", "--device_memory_gib=0.001", f"--json_out={out}",
           *cli_overrides(**CLI_MODEL)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    # 1 MiB per device cannot hold the state: the verdict and the exit status say so
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    assert "DOES NOT FIT" in r.stdout and "params + optimizer" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["devices"] == 2 and rep["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}

    # the same sizes, computed here over 2 of the test's fake devices
    cfg = tiny_config(**CLI_MODEL)
    cfg.mesh = "data:1,fsdp:2"
    setup = Setup(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:2]))
    state = setup.abstract_state()
    assert rep["params_bytes"] == state_bytes_per_device(state["params"])
    assert rep["opt_state_bytes"] == state_bytes_per_device(state["opt_state"])
    assert rep["frozen_bytes"] == state_bytes_per_device(setup.abstract_frozen())
    assert rep["batch_bytes"] == 4 // 2 * (32 * 32 * 3 + 32 * 32 + cfg.data.reference_size ** 2 * 3)
    # XLA's arguments: the whole train state and batch shards this device holds, plus the frozen
    # params the step reads (jit drops unread ones, e.g. the VAE decoder)
    assert rep["state_bytes"] == state_bytes_per_device(state)
    assert rep["resident_bytes"] == rep["state_bytes"] + rep["frozen_bytes"] + rep["batch_bytes"]
    assert rep["state_bytes"] + rep["batch_bytes"] < rep["compiled"]["argument"] <= rep["resident_bytes"]
    # the donated state comes back in place; activations need room
    assert rep["compiled"]["alias"] >= rep["params_bytes"] + rep["opt_state_bytes"]
    assert rep["compiled"]["temp"] > 0
    assert rep["peak_bytes"] >= rep["resident_bytes"] + rep["compiled"]["temp"] and rep["fits"] is False


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the TPU path is tested instead")
def test_tpu_topology_without_libtpu_says_what_to_install():
    r = subprocess.run([sys.executable, "-m", "pbe_jax.tools.aot_compile", f"--config={CONFIG_FILE}:demo",
                        "--topology=v5p-64"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2
    assert "pip install 'pbe_jax[tpu]'" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'pbe_jax[tpu]')")
def test_tpu_topology_compiles_on_this_host(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pbe_jax.tools.aot_compile", f"--config={CONFIG_FILE}:demo,mesh=data:-1",
                        "--topology=v5p-8", f"--json_out={out}", *cli_overrides(small_model=False, **{"train.batch_size": 4})],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["devices"] == 4 and "TPU" in rep["device_kind"] and rep["fits"] is True
    assert rep["compiled"]["argument"] >= rep["state_bytes"] + rep["frozen_bytes"]


def test_a_refused_compile_gives_a_lower_bound_on_its_memory():
    """The TPU compiler's out-of-memory refusal names its temporaries: with the resident state, the
    least a larger device must hold (docs/lora.md's table shows it for sd15 full at batch 8)."""
    from pbe_jax.tools.aot_compile import min_peak_bytes
    err = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (17.09G) exceeds available HBM (15.75G).")
    assert min_peak_bytes(err, 2**30) == 2**30 + int(17.09 * 2**30)
    assert min_peak_bytes("RESOURCE_EXHAUSTED: something else", 2**30) is None
    assert min_peak_bytes(None, 0) is None
