"""Shared helpers for the training tests: a tiny config, config loading, reading run outputs."""
from __future__ import annotations

import json
import os
import sys

from pbe_jax.configs import load_config
from tests.helpers import FAST_COMPILE_FLAGS  # noqa: F401 (also the pod and bench tests' flag)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "pbe.py")


# The test model: the demo's with one UNet level and one VAE level (the demo has two of each)
# on 16 px images. The same code runs (cross-attention down / up blocks, the mid block, the VAE
# encoder, the image encoder and its mapper); the train step has ~40% less to compile (8 s
# instead of 14 s on 2 cores), which every training test pays at least once. Tests of what the
# demo model learns use `small_model=False`.
SMALL_MODEL = {
    "data.resolution": 16,
    "model.unet.block_out_channels": (32,),
    "model.unet.down_block_types": ("CrossAttnDownBlock2D",),
    "model.unet.up_block_types": ("CrossAttnUpBlock2D",),
    "model.vae.block_out_channels": (16,),
    "model.vae.down_block_types": ("DownEncoderBlock2D",),
    "model.vae.up_block_types": ("UpDecoderBlock2D",),
    "model.vae.sample_size": 16,
    "model.unet.sample_size": 16,  # 16 px / VAE factor 1 (the demo's link assumes factor 2)
}

# The overrides that make the demo config tiny enough for tests (as CLI flags and as a dict).
TINY = {
    "data.resolution": 32,
    "data.num_workers": 0,
    "data.synthetic_num_images": 16,
    "train.batch_size": 8,
    "train.warmup_steps": 0,
    "log_every_steps": 1,
    "ckpt_every_steps": 1000,
    "sample_every_steps": 0,
    # The demo's VAE stage and held-out exemplar eval (tests/test_demo.py runs them).
    "vae_fit.steps": 0,
    "exemplar_eval.num_triplets": 0,
    "train.train_image_tower": False,
    "train.ema_decay": 0.0,  # the demo's EMA (tests that want one set it)
}


def _tiny(small_model: bool, overrides: dict) -> dict:
    return {**TINY, **(SMALL_MODEL if small_model else {}), **overrides}


def tiny_config(arg: str = "demo", small_model: bool = True, **overrides):
    return load_config(f"{CONFIG_FILE}:{arg}", _tiny(small_model, overrides))


def cli_overrides(small_model: bool = True, **overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in _tiny(small_model, overrides).items()]


def train_cmd(workdir: str, arg: str = "demo", extra: list[str] = (), small_model: bool = True,
              **overrides) -> list[str]:
    return [sys.executable, "-m", "pbe_jax.train", f"--config={CONFIG_FILE}:{arg}",
            f"--workdir={workdir}", *cli_overrides(small_model, **overrides), *extra]


def read_metrics(workdir: str) -> dict[int, dict]:
    """metrics.jsonl as {step: row}; a later row for the same step (after a resume) wins."""
    rows = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                rows[row["step"]] = row
    return rows


def subprocess_env(devices: int = 1, optimized: bool = False) -> dict:
    """The environment of a command line a test starts: `devices` fake CPU devices, compiled
    at -O0 (FAST_COMPILE_FLAGS) unless `optimized` (XLA's default: a run of hundreds of steps)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if not optimized:
        env["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env
