"""A training config is checked as a whole before anything compiles or loads: every enum
against the code that consumes it, every range, the size facts that must agree (reference size
vs the image encoder, resolution vs the UNet's sample size x the VAE factor, grad_accum vs the
batch), and a command-line field given twice. Every shipped variant and sweep passes."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

import pytest

from pbe_jax.configs import load_config
from pbe_jax.configs.pbe import SWEEPS, TOWERS, VARIANTS, get_config
from pbe_jax.configs.validate import (ConfigError, check_or_exit, check_overrides, problems,
                                      validate)
from pbe_jax.data.sources import SOURCES
from pbe_jax.training import sweeps
from pbe_jax.training.loop import train_and_evaluate
from tests.train_utils import CONFIG_FILE, REPO, tiny_config

# Issue 28's nonsense values: (field, value, what the message must say besides the value).
NONSENSE = [
    ("train.nan_policy", "halt", "expected one of ('skip', 'stop')"),
    ("train.lr", -1e-4, "expected a number > 0"),
    ("train.cond_drop_prob", 1.5, "expected a number in [0, 1]"),
    ("train.ema_decay", 1.5, "expected a number in [0, 1)"),
    ("keep_checkpoints", 0, "expected an integer >= 1"),
    ("keep_checkpoints", -1, "expected an integer >= 1"),
    ("ckpt_every_steps", 0, "expected an integer >= 1"),
    ("log_every_steps", 0, "expected an integer >= 1"),
    ("train.batch_size", 0, "expected an integer >= 1"),
    ("train.num_steps", 0, "expected an integer >= 1"),
    ("train.mu_dtype", "float8", "floating dtype"),
    ("remat_policy", "foo", "nothing_saveable"),
    ("train.cond_drop_mode", "per_sample", "expected one of ('batch', 'sample')"),
    ("data.source", "laion", f"expected one of {tuple(sorted(SOURCES))}"),
    ("data.arbitrary_mask_prob", -0.1, "expected a number in [0, 1]"),
    ("sample_every_steps", -5, "expected an integer >= 0 (0 = off)"),
    ("attention_impl", "flash", "'cudnn'"),
    ("dtype", "fp8", "unknown dtype"),
    ("vae_fit.recon", "l3", "expected one of ('l1', 'l2')"),
    ("evals.scheduler", "dpm", "expected one of ('ddim',"),
    ("init_from.format", "hf", "expected one of ('diffusers', 'ldm', 'sd-init', 'orbax')"),
    ("mesh", "data:-1,fsdp:-1", "at most one -1"),
]


@pytest.mark.parametrize("field,value,expected", NONSENSE, ids=[f"{f}={v}" for f, v, _ in NONSENSE])
def test_nonsense_value_is_refused_naming_the_field(field, value, expected):
    cfg = load_config("pbe:demo", {field: value})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    line = [p for p in e.value.problems if p.startswith(f"config.{field}={value!r}")]
    assert len(line) == 1, e.value.problems
    assert expected in line[0]
    assert f"config.{field}={value!r}" in str(e.value)


def test_the_noise_schedule_is_checked_as_the_loss_reads_it():
    cfg = load_config("pbe:demo", {"model.scheduler.prediction_type": "eps"})
    with pytest.raises(ConfigError, match=re.escape(
            "config.model.scheduler: scheduler config: prediction_type='eps' cannot be trained")):
        validate(cfg)


def test_reference_size_mismatch_names_both_fields():
    cfg = load_config("pbe:demo", {"data.reference_size": 64})
    with pytest.raises(ConfigError, match=re.escape(
            "config.data.reference_size=64 != config.model.image_encoder.image_size=32")):
        validate(cfg)


def test_all_problems_are_reported_together():
    cfg = load_config("pbe:demo", {"train.nan_policy": "halt", "train.lr": -1.0,
                                   "keep_checkpoints": 0, "data.reference_size": 64})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.problems) == 4
    assert str(e.value).startswith("config: 4 invalid values")


def test_train_and_evaluate_refuses_before_touching_the_workdir(tmp_path):
    """The API entry point checks first: nothing is created, loaded or compiled."""
    workdir = tmp_path / "run"
    cfg = tiny_config(**{"keep_checkpoints": 0, "train.ema_decay": 1.5})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config\.keep_checkpoints=0.*\n.*config\.train\.ema_decay=1\.5"):
        train_and_evaluate(cfg, str(workdir))
    assert time.perf_counter() - t0 < 5
    assert not workdir.exists()


def _train(tmp_path, *overrides: str, module: str = "pbe_jax.train",
           where: str = "--workdir") -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", module, f"--config={CONFIG_FILE}:demo",
           f"{where}={tmp_path / 'run'}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    return proc, time.perf_counter() - t0


def test_command_line_refuses_nonsense_before_compiling(tmp_path):
    """The real command line: both problems named, exit 2, no workdir made. (The demo takes
    minutes before its first step: a refusal after compiling would take far longer.)"""
    proc, took = _train(tmp_path, "--config.train.nan_policy=halt", "--config.ckpt_every_steps=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.train.nan_policy='halt': expected one of ('skip', 'stop')" in proc.stderr
    assert "config.ckpt_every_steps=0: expected an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    assert took < 60


def test_command_line_refuses_a_tuple_given_twice(tmp_path):
    """ml_collections concatenates a repeated tuple override ((32, 64) twice -> 4 levels);
    the rule here: each field once."""
    assert load_config("pbe:demo", ["--config.model.unet.block_out_channels=(32,64)"] * 2
                       ).model.unet.block_out_channels == (32, 64, 32, 64)  # what it did
    proc, took = _train(tmp_path, "--config.model.unet.block_out_channels=(32,64)",
                        "--config.model.unet.block_out_channels=(32,64)")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.model.unet.block_out_channels is given 2 times" in proc.stderr
    assert not (tmp_path / "run").exists()
    assert took < 60


@pytest.mark.slow
def test_vae_stage_and_aot_command_lines_refuse_nonsense(tmp_path):
    proc, _ = _train(tmp_path, "--config.vae_fit.lr=-0.001", module="pbe_jax.fit_vae")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.vae_fit.lr=-0.001: expected a number > 0" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc, _ = _train(tmp_path, "--topology=cpu:8", "--config.train.batch_size=12",
                     "--config.train.grad_accum=5", module="pbe_jax.tools.aot_compile",
                     where="--json_out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.train.batch_size=12 is not divisible by config.train.grad_accum=5" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_field_given_twice_is_refused():
    for argv in (["--config.train.lr=1e-4", "--config.train.lr=2e-4"],
                 ["--config.train.lr", "1e-4", "--config.train.lr=2e-4"],
                 ["--config.remat", "--noconfig.remat"],
                 ["--config.sharding_rules=(('a','b'),)", "--config.sharding_rules=(('c','d'),)"]):
        field = argv[0].split("=")[0].removeprefix("--")
        with pytest.raises(ConfigError, match=re.escape(f"--{field} is given 2 times")):
            check_overrides(["pbe_jax.train", "--config=configs/pbe.py:demo", *argv])
    # distinct fields, other flags and what follows `--` are fine
    check_overrides(["x", "--config=a.py:demo", "--config.train.lr=1", "--config.train.b1=0.8",
                     "--workdir=/tmp/a", "--", "--config.train.lr=2"])


def test_check_or_exit_prints_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        check_or_exit(load_config("pbe:demo", {"log_every_steps": 0}), argv=["x"])
    assert e.value.code == 2
    assert "config.log_every_steps=0" in capsys.readouterr().err


# ---- size facts ----------------------------------------------------------------------------


def test_resolution_and_unet_sample_size_have_one_source():
    assert get_config("sd15,res=256").model.unet.sample_size == 32  # 256 / VAE factor 8
    assert get_config("demo,res=64").model.unet.sample_size == 32  # 64 / VAE factor 2
    assert get_config("sd21_768").model.unet.sample_size == 96
    cfg = load_config("pbe:sd15", ["--config.data.resolution=256"])
    assert cfg.model.unet.sample_size == 32
    assert load_config("pbe:demo", {"data.resolution": 64}).model.unet.sample_size == 32
    # the `resolution` sweep's runs: the model side follows (an export states the right size)
    for run in sweeps.expand(f"{CONFIG_FILE}:demo,sweep=resolution", "/tmp/unused"):
        cfg = load_config(f"{CONFIG_FILE}:demo", list(run.train_args[2:]))
        assert cfg.model.unet.sample_size * 2 == cfg.data.resolution == run.overrides["data.resolution"]


def test_resolution_mismatch_names_both_fields():
    cfg = load_config("pbe:demo", {"model.unet.sample_size": 8})
    with pytest.raises(ConfigError, match=re.escape(
            "config.data.resolution=32 != config.model.unet.sample_size=8 x VAE factor 2: "
            "set config.model.unet.sample_size=16")):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"config\.data\.resolution=100: expected a multiple of 64"):
        get_config("sd15,res=100")


def test_grad_accum_must_divide_the_batch():
    cfg = load_config("pbe:demo", {"train.batch_size": 8, "train.grad_accum": 3})
    with pytest.raises(ConfigError, match=re.escape(
            "config.train.batch_size=8 is not divisible by config.train.grad_accum=3")):
        validate(cfg)
    validate(load_config("pbe:demo", {"train.batch_size": 8, "train.grad_accum": 4}))


# ---- what ships is valid -------------------------------------------------------------------


def _shipped_args():
    for variant in VARIANTS:
        yield variant
        yield f"{variant},dtype=fp32,batch=64,steps=10,mesh=data:-1,fsdp:1,tensor:1"
    for tower in TOWERS:
        for variant in ("sd15", "sd21", "sd21_768"):
            yield f"{variant},tower={tower}"
    for res in (256, 512, 768):
        yield f"sd15,res={res}"
    yield "demo,res=64"
    yield "demo,scenes=identity"
    yield "demo,scenes=identity,conditioner=dinov2"


def test_every_shipped_config_and_sweep_validates():
    files = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
    assert files
    for path in files:
        for arg in _shipped_args():
            assert problems(load_config(f"{path}:{arg}")) == [], (path, arg)
        for variant in VARIANTS:
            for name in SWEEPS:  # expand checks every run with its overrides
                assert sweeps.expand(f"{path}:{variant},sweep={name}", "/tmp/unused")
    assert problems(tiny_config()) == [] and problems(tiny_config(small_model=False)) == []


def test_sweep_refuses_a_point_that_cannot_run():
    with pytest.raises(ConfigError, match=r"sweep run .*: 1 invalid value\n  config\.train\.ema_decay=1\.0"):
        sweeps.expand(f"{CONFIG_FILE}:demo,sweep=lr_batch", "/tmp/unused", ["--config.train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match=r"--config\.train\.num_steps is given 2 times"):
        sweeps.expand(f"{CONFIG_FILE}:demo,sweep=cond_drop", "/tmp/unused",
                      ["--config.train.num_steps=5", "--config.train.num_steps=6"])


def test_unet_channels_follow_the_vae_and_the_image_encoder():
    cfg = load_config("pbe:demo", {"model.unet.cross_attention_dim": 64, "model.unet.in_channels": 4,
                                   "model.unet.out_channels": 8})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.problems == [
        "config.model.unet.in_channels=4: expected 2 x config.model.vae.latent_channels + 1 "
        "(noisy + masked-image latents + mask) = 9",
        "config.model.unet.out_channels=8: expected config.model.vae.latent_channels = 4",
        "config.model.unet.cross_attention_dim=64: expected config.model.image_encoder.proj_size "
        "(the context width) = 32"]
