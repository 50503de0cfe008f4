"""orbax checkpoints and the conversion CLI.

- `python -m pbe_jax.convert --to orbax` (run as a subprocess) then `--from orbax --to diffusers`
  gives back the original tensors bit for bit;
- a training checkpoint (`pbe_jax.checkpoint` layout: trainable `params` / `ema` in `state`, VAE
  and CLIP tower in `frozen`, the architecture in `config`) exports to diffusers in one command;
- a params checkpoint whose config disagrees with its arrays fails naming the keys.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from pbe_jax.checkpoint import Checkpointer, restore_numpy
from pbe_jax.convert import orbax_io
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.convert.load import load_pipeline
from pbe_jax.convert.safetensors_io import read_safetensors
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models import FROZEN, TRAINABLE
from pbe_jax.pipeline import PaintByExample
from tests.test_weights_diffusers import (
    assert_export_equals,
    assert_state_dicts_equal,
    model_configs,
    numpy_sd,
    tiny_pipeline,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = tiny_pipeline(seed=40)
    d = str(tmp_path_factory.mktemp("tiny_orbax_src"))
    pipe.save_pretrained(d)
    return pipe, d


@pytest.fixture(scope="module")
def model(tiny):
    return PaintByExample.from_pretrained(tiny[1])


def test_cli_orbax_roundtrip(tiny, tmp_path):
    pipe, src = tiny
    orbax_dir = str(tmp_path / "orbax")
    proc = subprocess.run(
        [sys.executable, "-m", "pbe_jax.convert", "--from", "diffusers", "--src", src, "--to", "orbax",
         "--dst", orbax_dir, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_unet = sum(v.size for v in numpy_sd(pipe.unet).values())
    lines = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()
             if line.strip().endswith("params") and len(line.split()) == 3}
    assert lines["unet"] == f"{n_unet:,d}", proc.stdout
    assert set(lines) == {"unet", "vae", "image_encoder"}, proc.stdout
    assert "wrote orbax checkpoint" in proc.stdout and "float32 weights" in proc.stdout
    assert orbax_io.locate(orbax_dir)[0] == "params"
    out = str(tmp_path / "diffusers")
    assert convert_main(["--from", "orbax", "--src", orbax_dir, "--to", "diffusers", "--dst", out,
                         "--no-progress"]) == 0
    assert_export_equals(out, pipe)


def _train_checkpoint(model: PaintByExample, workdir: str) -> dict:
    """Write checkpoints at steps 3 and 7 the way `pbe_jax.train` does; return step 7's
    expected torch state dicts per component for raw and EMA params."""
    _, params, frozen, _ = nnx.split(model, TRAINABLE, FROZEN, ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    ckpt = Checkpointer(workdir, async_save=False)
    config = {"model": model_configs(), "seed": 0,
              "train": {"beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear",
                        "num_train_timesteps": 1000}}
    for step, scale in ((3, 3.0), (7, 1.0)):
        state = {"step": np.int32(step), "params": jax.tree.map(lambda x: x * scale, params),
                 "opt_state": ({"mu": jax.tree.map(np.zeros_like, params)},),
                 "rng": np.zeros(2, np.uint32), "nan_skips": np.int32(0),
                 "ema": jax.tree.map(lambda x: x * 0.5 * scale, params)}
        ckpt.save(step, state, frozen, {"position": step}, json.loads(json.dumps(config)), wait=True)
    ckpt.close()


def _expected(model: PaintByExample, ema: bool) -> dict:
    """Component state dicts with the trainable params halved when `ema` (as written above)."""
    out = {}
    for comp in ("unet", "vae", "image_encoder"):
        sd = getattr(model, comp).torch_state_dict()
        trained = (lambda k: True) if comp == "unet" else (
            (lambda k: not k.startswith("model.")) if comp == "image_encoder" else (lambda k: False))
        out[comp] = {k: (v * np.float32(0.5) if ema and trained(k) else v) for k, v in sd.items()}
    return out


@pytest.mark.slow
def test_training_checkpoint_exports(tiny, model, tmp_path):
    _, src = tiny
    workdir = str(tmp_path / "run")
    _train_checkpoint(model, workdir)
    assert orbax_io.locate(workdir) == ("train", orbax_io.locate(os.path.join(workdir, "checkpoints"))[1])
    assert orbax_io.locate(workdir)[1].name == "7"  # the newest step
    # one command: the workdir's newest checkpoint, EMA params, to diffusers
    out = str(tmp_path / "export")
    assert convert_main(["--from", "orbax", "--src", workdir, "--use-ema", "--to", "diffusers",
                         "--dst", out, "--no-progress"]) == 0
    want = _expected(model, ema=True)
    for comp in want:
        stem = "model" if comp == "image_encoder" else "diffusion_pytorch_model"
        got = read_safetensors(os.path.join(out, comp, f"{stem}.safetensors"))
        assert_state_dicts_equal(got, want[comp], comp)
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["beta_schedule"] == "linear"  # from the training config
    # a step dir, raw params; the report says EMA params exist
    step3 = os.path.join(workdir, "checkpoints", "3")
    raw, report = PaintByExample.from_pretrained(step3, use_ema=False, return_report=True)
    assert any("EMA" in n for n in report.notes)
    want3 = {k: v * np.float32(3.0) for k, v in _expected(model, ema=False)["unet"].items()}
    assert_state_dicts_equal(raw.unet.torch_state_dict(), want3, "unet at step 3")
    with pytest.raises(ValueError, match="no EMA copy"):
        load_pipeline("diffusers", src, use_ema=True)


def test_orbax_config_mismatch_names_keys(model, tmp_path):
    d = str(tmp_path / "params")
    model.save_pretrained(d, format="orbax")
    cfg_path = os.path.join(d, orbax_io.CONFIG_FILE)
    with open(cfg_path) as f:
        meta = json.load(f)
    meta["configs"]["unet"]["cross_attention_dim"] = 16
    with open(cfg_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointMismatchError) as e:
        PaintByExample.from_pretrained(d)
    msg = str(e.value)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel"
    assert f"{key}: checkpoint (12, 8), model (16, 8)" in msg


def test_orbax_missing_param_needs_allow_missing(model, tmp_path):
    import orbax.checkpoint as ocp

    d = tmp_path / "full"
    model.save_pretrained(str(d), format="orbax")
    params = restore_numpy(d / orbax_io.PARAMS_ITEM)
    del params["unet"]["conv_in"]["bias"]
    gap = tmp_path / "gap"
    ocp.PyTreeCheckpointer().save(gap / orbax_io.PARAMS_ITEM, args=ocp.args.PyTreeSave(params))
    (gap / orbax_io.CONFIG_FILE).write_text((d / orbax_io.CONFIG_FILE).read_text())
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: unet\.conv_in\.bias"):
        PaintByExample.from_pretrained(str(gap))
    loaded, report = PaintByExample.from_pretrained(
        str(gap), allow_missing=["unet.conv_in.weight", "*.conv_in.bias"], return_report=True)
    assert report.missing_allowed == ["unet.conv_in.bias"]
    assert report.loaded["unet"] == len(model.unet.torch_state_dict()) - 1
    ours, ref = loaded.unet.torch_state_dict(), model.unet.torch_state_dict()
    assert not np.array_equal(ours.pop("conv_in.bias"), ref.pop("conv_in.bias"))  # re-initialised
    assert_state_dicts_equal(ours, ref, "unet without conv_in.bias")
