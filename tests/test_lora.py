"""LoRA fine-tuning: adapters start at zero effect, only they (and the named parts) train, the
base is bitwise unchanged, checkpoints hold only what trains, and a SIGKILLed run resumes exactly."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbe_jax import checkpoint
from pbe_jax import sharding as shd
from pbe_jax.benchmarks.model import build
from pbe_jax.benchmarks.sizes import get_size
from pbe_jax.convert import lora_io
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.models import lora
from pbe_jax.pipeline import PaintByExample
from pbe_jax.training.state import Setup
from tests.test_train import _final_params, host_batches
from tests.train_utils import read_metrics, subprocess_env, tiny_config, train_cmd

LORA = {"train.lora.rank": 4, "train.lr": 1e-2}


@jax.jit
def _unet_jit(graphdef, state):
    u = nnx.merge(graphdef, state)
    c = u.config
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (2, 8, 8, c.in_channels))
    ctx = jax.random.normal(k2, (2, 3, c.cross_attention_dim))  # 3 tokens: q/k projections run
    return u(x, jnp.array([10, 500]), ctx)


def _unet_out(model):
    return np.asarray(_unet_jit(*nnx.split(model.unet)))


def _model(cfg):
    setup = Setup(cfg, shd.make_mesh("data:1", devices=jax.devices()[:1]))
    return setup.model(*setup.random_params())  # host init from (seed, path): same base values


@pytest.mark.slow
def test_adapters_start_at_zero_effect_and_follow_the_scale():
    model = _model(tiny_config(**{"train.lora.rank": 4, "train.lora.alpha": 8.0}))
    base = _unet_out(_model(tiny_config()))
    names = list(lora.lora_layers(model))
    assert names and all(n.startswith("unet.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    np.testing.assert_array_equal(_unet_out(model), base)  # step 0: exactly the base model
    layer = lora.lora_layers(model)[names[0]]
    # adapters follow the base kernel's logical axes
    k_in, k_out = layer.kernel.get_metadata()["out_sharding"]
    assert layer.lora.lora_a.get_metadata()["out_sharding"] == (k_in, None)
    assert layer.lora.lora_b.get_metadata()["out_sharding"] == (None, k_out)
    assert float(layer.lora_scale[...]) == 2.0  # alpha / rank
    # a non-zero adapter changes the output; its scale multiplies the change
    for ly in lora.lora_layers(model).values():
        ly.lora.lora_b[...] = 0.05 * jnp.ones_like(ly.lora.lora_b[...])
    one = _unet_out(model)
    assert np.abs(one - base).max() > 1e-4
    lora.set_lora_scale(model, 0.0)
    np.testing.assert_array_equal(_unet_out(model), base)


def test_lora_refuses_convolutions_and_empty_matches():
    model = _model(tiny_config())
    with pytest.raises(ValueError, match=r"conv_in is a convolution"):
        lora.add_lora(model, lora.LoRASpec(targets=("conv_in",)), nnx.Rngs(0))
    with pytest.raises(ValueError, match="match no Linear"):
        lora.add_lora(model, lora.LoRASpec(targets=("no_such_layer",)), nnx.Rngs(0))


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_lora_steps_on_8_devices_fsdp_change_only_adapters_and_named_parts_bf16_base():
    cfg = tiny_config(**LORA, **{"train.cond_drop_prob": 0.5})
    mesh = shd.make_mesh("fsdp:8")
    setup = Setup(cfg, mesh)
    params, frozen = setup.random_params()
    p0, f0 = _leaves(jax.device_get(params)), _leaves(jax.device_get(frozen))
    # what trains: the adapters and the named parts; nothing of the UNet's own weights
    assert all("lora_" in k or "'image_encoder'" in k for k in p0), sorted(p0)
    assert any("uncond_vector" in k for k in p0) and any("proj_out" in k for k in p0)
    assert not any("mapper" in k for k in p0)
    assert any("'unet'" in k and "'kernel'" in k for k in f0)
    n_train = sum(v.size for v in p0.values())
    assert n_train < 0.2 * (n_train + sum(v.size for v in f0.values()))
    state = setup.new_state(params)
    opt = _leaves(state["opt_state"])
    assert not any("'kernel'" in k and "'unet'" in k for k in opt)  # no optimizer state for the base
    step = setup.jit_step()
    batches = [{k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in b.items()}
               for b in host_batches(cfg, 2)]
    losses = []
    for gb in batches:
        state, m = step(state, frozen, gb)
        losses.append(float(m["loss"]))
        assert np.isfinite(losses[-1])
    p1, f1 = _leaves(jax.device_get(state["params"])), _leaves(jax.device_get(frozen))
    assert f1.keys() == f0.keys()
    for k in f0:
        np.testing.assert_array_equal(f1[k], f0[k], err_msg=k)  # the base is bitwise unchanged
    changed = [k for k in p0 if not np.array_equal(p0[k], p1[k])]
    assert any("lora_b" in k for k in changed) and any("lora_a" in k for k in changed), changed
    assert all(np.abs(v).max() == 0 for k, v in p0.items() if "lora_b" in k)
    # train.lora.base_dtype=bfloat16: the frozen UNet base (only it) in bf16 takes half the
    # bytes, and its first step's loss is the fp32 base's within 2%
    unet = jax.tree.leaves(frozen["unet"])
    assert {str(x.dtype) for x in unet} == {"float32"}
    setup16 = Setup(tiny_config(**LORA, **{"train.cond_drop_prob": 0.5, "train.lora.base_dtype": "bfloat16"}), mesh)
    params16, frozen16 = setup16.random_params()
    unet16 = jax.tree.leaves(frozen16["unet"])
    assert {str(x.dtype) for x in unet16} == {"bfloat16", "float32"}
    assert jax.tree.leaves(frozen16["vae"])[0].dtype == np.float32  # only the adapted base
    frozen_bytes = [sum(x.nbytes for x in unet), sum(x.nbytes for x in unet16)]
    _, m16 = setup16.jit_step()(setup16.new_state(params16), frozen16, batches[0])
    loss16 = float(m16["loss"])
    assert frozen_bytes[1] < 0.51 * frozen_bytes[0] + 64, frozen_bytes
    assert np.isfinite(loss16) and abs(loss16 - losses[0]) < 2e-2 * abs(losses[0]), (loss16, losses)


def _kill_after_checkpoint(cmd, env, ck, step):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (os.path.isdir(ck) and str(step) in os.listdir(ck)):
        assert p.poll() is None, f"training exited (rc {p.returncode}) before the planned kill"
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
def test_lora_run_sigkilled_resumes_exactly_from_a_checkpoint_of_megabytes(tmp_path):
    """A LoRA run killed after its step-2 checkpoint resumes (the base reloaded from its source,
    here the seed's random init) to the same losses and adapters as an uninterrupted run; its
    checkpoints hold the train state only; its adapters read back raw or (by default) EMA."""
    n = 4
    over = {**LORA, "train.num_steps": n, "ckpt_every_steps": 2, "train.ema_decay": 0.5}
    env = subprocess_env(1)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    # the uninterrupted run first: its compiles fill the session's cache, the other two read it
    ref = subprocess.run(train_cmd(full, **over), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _kill_after_checkpoint(train_cmd(killed, **over), env, os.path.join(killed, "checkpoints"), 2)
    done = subprocess.run(train_cmd(killed, **over), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRA resume: base reloaded from random init" in done.stderr
    assert "trainable params:" in done.stderr
    a, b = read_metrics(full), read_metrics(killed)
    assert sorted(b) == list(range(1, n + 1))
    for s in range(1, n + 1):
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
    for x, y in zip(jax.tree.leaves(_final_params(full, n)), jax.tree.leaves(_final_params(killed, n))):
        np.testing.assert_array_equal(x, y)
    step_dir = os.path.join(killed, "checkpoints", str(n))
    assert "frozen" not in os.listdir(step_dir) and "state" in os.listdir(step_dir)
    # the run's adapters read back (pbe_jax layout) and export as diffusers/PEFT
    adapter = lora_io.read_lora(killed, use_ema=False)
    name = next(iter(adapter.layers))
    lora_b = lambda tree: np.asarray(functools.reduce(dict.get, name.split("."), tree)["lora"]["lora_b"])  # noqa: E731
    np.testing.assert_array_equal(adapter.layers[name][1], lora_b(_final_params(killed, n)))
    assert "image_encoder.uncond_vector" in adapter.params
    # by default the run's EMA adapters, as from_pretrained of a full run and its sample grids
    ema = checkpoint.restore_numpy(os.path.join(step_dir, checkpoint.STATE), ["ema"])["ema"]
    default = lora_io.read_lora(killed)
    np.testing.assert_array_equal(default.layers[name][1], lora_b(ema))
    assert np.abs(default.layers[name][1] - adapter.layers[name][1]).max() > 0
    dst = str(tmp_path / "peft")
    assert convert_main(["--from", "orbax", "--src", killed, "--to", "diffusers_lora", "--dst", dst]) == 0
    peft = lora_io.read_peft(os.path.join(dst, lora_io.LORA_WEIGHTS))
    assert peft.layers.keys() == adapter.layers.keys()


# --------------------------------------------------------------------------------------------
# Using a LoRA: load_lora (PEFT file), scale changes without compiling, fuse / unfuse
# --------------------------------------------------------------------------------------------


def _random_adapter(model_dir, rank=2, alpha=4.0, seed=0):
    """An Adapter with non-zero factors for the model's attention projections."""
    shadow = PaintByExample.from_pretrained(model_dir)
    lora.add_lora(shadow, lora.LoRASpec(rank=rank, alpha=alpha), nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    layers = {n: (np.asarray(ly.lora.lora_a[...]),
                  (0.3 * rng.standard_normal(ly.lora.lora_b[...].shape)).astype(np.float32))
              for n, ly in lora.lora_layers(shadow).items()}
    return lora_io.Adapter(layers, alpha / rank)


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lora_base"))
    build(get_size("tiny"), export_dir=d)  # random weights, host init
    return d


@pytest.fixture(scope="module")
def peft_file(tiny_pipe_dir, tmp_path_factory):
    """(the random adapter, its PEFT file): one for the load_lora and the sample CLI tests."""
    adapter = _random_adapter(tiny_pipe_dir)
    return adapter, lora_io.save_peft(adapter, str(tmp_path_factory.mktemp("lora") / "lora"))


def _edit(pipe):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    ref = rng.integers(0, 256, (40, 40, 3), np.uint8)
    return pipe(src, mask, ref, num_inference_steps=2, seed=0, output_type="np")


@pytest.mark.slow
def test_load_lora_from_a_peft_file_scale_compiles_nothing_fuse_unfuse(tiny_pipe_dir, peft_file):
    from tests.test_architecture import compile_events

    base = PaintByExample.from_pretrained(tiny_pipe_dir)
    adapter, f = peft_file
    assert os.path.basename(f) == "pytorch_lora_weights.safetensors"
    back = lora_io.read_lora(os.path.dirname(f))  # the PEFT layout read back
    assert back.layers.keys() == adapter.layers.keys()
    pipe = PaintByExample.from_pretrained(tiny_pipe_dir)
    kernel0 = {n: np.asarray(ly.kernel[...]) for n, ly in lora.lora_layers(pipe).items()} or None
    names = pipe.load_lora(f, scale=1.0)
    assert sorted(names) == sorted(adapter.layers)
    out_base = _edit(base)
    out1 = _edit(pipe)
    assert np.abs(out1 - out_base).max() > 1e-3  # the adapter changes the edit
    with compile_events() as events:
        pipe.set_lora_scale(0.5)
        out_half = _edit(pipe)
        pipe.set_lora_scale(0.0)
        out0 = _edit(pipe)
    assert events == [], f"changing the LoRA scale compiled: {events}"
    assert np.abs(out_half - out1).max() > 1e-4
    np.testing.assert_allclose(out0, out_base, atol=1e-6)
    pipe.set_lora_scale(1.0)
    kernels = {n: np.asarray(ly.kernel[...]) for n, ly in lora.lora_layers(pipe).items()}
    assert kernel0 is None
    pipe.fuse_lora()
    np.testing.assert_allclose(_edit(pipe), out1, atol=2e-5)
    pipe.unfuse_lora()
    for n, ly in lora.lora_layers(pipe).items():
        np.testing.assert_allclose(np.asarray(ly.kernel[...]), kernels[n], atol=1e-6)
    np.testing.assert_allclose(_edit(pipe), out1, atol=2e-5)


@pytest.mark.slow
def test_sample_cli_lora_flags(tiny_pipe_dir, peft_file, tmp_path):
    """`python -m pbe_jax.sample --lora=FILE --lora_scale=S`: the LoRA and its scale change the
    edit. Both runs load the LoRA (scale 0, the base model's edit as the test above shows, and
    1.5): one program, the second run reads it from the compilation cache; an ignored --lora or
    --lora_scale gives two equal edits."""
    from PIL import Image

    _, f = peft_file
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "s.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(tmp_path / "r.png")
    env = subprocess_env(1)
    outs = []
    for extra in ([f"--lora={f}", "--lora_scale=0"], [f"--lora={f}", "--lora_scale=1.5"]):
        out = str(tmp_path / f"out{len(outs)}.png")
        cmd = [sys.executable, "-m", "pbe_jax.sample", f"--model={tiny_pipe_dir}", f"--source={tmp_path / 's.png'}",
               f"--mask={tmp_path / 'm.png'}", f"--reference={tmp_path / 'r.png'}", f"--out={out}",
               "--steps=2", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        outs.append(np.asarray(Image.open(out), np.int16))
    assert np.abs(outs[0] - outs[1]).max() > 0
