"""Fine-tuning a trained pbe_jax model on your own folder in one command (issue 32).

`init_from` a pbe_jax training workdir keeps that model's VAE and its scaling factor: the VAE
stage (on by default in the demo) is skipped without a flag, so a 20-image folder needs no
`vae_fit.steps=0`, no `heldout_images` that fits it and no `vae.scaling_factor` copied by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pbe_jax import sharding as shd
from pbe_jax.convert.load import load_pipeline
from pbe_jax.convert.orbax_io import read_configs
from pbe_jax.data.synthetic import synthetic_scene
from pbe_jax.training.loop import train_and_evaluate
from pbe_jax.training.vae_fit import load_vae, run_vae_stage, vae_stage_on
from tests.train_utils import REPO, subprocess_env, tiny_config, train_cmd


def _folder(root: str, n: int = 20) -> str:
    """`n` PNG scenes with a box mask over their first object (the `folder` source's layout)."""
    d = os.path.join(root, "images")
    os.makedirs(d)
    for i in range(n):
        img, boxes = synthetic_scene(i, min_side=48, max_side=64)
        h, w = img.shape[:2]
        x0, y0, x1, y1 = (boxes[0] * [w, h, w, h]).astype(int)
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(img).save(os.path.join(d, f"img{i}.png"))
        Image.fromarray(mask).save(os.path.join(d, f"img{i}_mask.png"))
    return d


def _vae(workdir: str) -> dict:
    model = load_pipeline("orbax", workdir, use_ema=False)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.vae, nnx.Param)))


@pytest.mark.slow
def test_init_from_a_workdir_keeps_its_vae_and_scaling_on_a_folder(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    stage = {"vae_fit.steps": 2, "vae_fit.batch_size": 8, "vae_fit.heldout_images": 8}
    train_and_evaluate(tiny_config(**stage, **{"train.num_steps": 1}), a)
    scaling = read_configs(a)["vae"]["scaling_factor"]
    assert os.path.isdir(os.path.join(a, "vae")) and scaling != 1.0  # A fitted its own VAE
    images = _folder(str(tmp_path))
    # the demo's VAE stage (600 steps, 64 held-out images > 20) stays on in the config: it must
    # be skipped because init_from brings a VAE, and no scaling factor is given
    cmd = train_cmd(b, **{"vae_fit.steps": 600, "train.num_steps": 1, "data.source": "folder",
                          "data.images_dir": images, "data.use_given_masks": True,
                          "init_from.format": "orbax", "init_from.path": a})
    assert not any("scaling_factor" in c for c in cmd)
    # this process's devices, XLA flags and matmul precision: the command line's train step is
    # the program A's run compiled (the compilation cache serves it; on 1 device it compiled cold)
    env = {**subprocess_env(jax.device_count()), "XLA_FLAGS": os.environ["XLA_FLAGS"],
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no VAE stage" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(b, "vae"))
    assert read_configs(b)["vae"]["scaling_factor"] == scaling
    jax.tree.map(np.testing.assert_array_equal, _vae(b), _vae(a))
    # vae_fit.refit: a new VAE is fitted on this run's images and replaces the init's (the VAE
    # stage itself, the part of a run that decides this; the train step is the one above)
    c = str(tmp_path / "c")
    cfg = tiny_config(**stage, **{"train.num_steps": 1, "seed": 1, "vae_fit.refit": True,
                                  "init_from.format": "orbax", "init_from.path": a})
    assert vae_stage_on(cfg)
    got = run_vae_stage(cfg, c, shd.make_mesh(cfg.mesh), SimpleNamespace(steps=lambda: []))
    assert got == os.path.join(c, "vae") and os.path.isdir(got)
    fitted = json.loads(open(os.path.join(got, "config.json")).read())["scaling_factor"]
    assert fitted != scaling and cfg.model.vae.scaling_factor == fitted
    new = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_vae(got), nnx.Param)))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(_vae(a))))
