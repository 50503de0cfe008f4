"""Training runs where two things meet or a value is nonsense (issue 28): two runs on one
workdir, a resume with a changed config, past or at `num_steps`, with other model shapes, a run
whose every step is non-finite, and the VAE stage cut mid-save or by SIGTERM."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from pbe_jax import sharding as shd
from pbe_jax.checkpoint import CheckpointError
from pbe_jax.models import hub
from pbe_jax.training import loop, vae_fit
from pbe_jax.training.loop import train_and_evaluate
from tests.test_faults_train import logged_steps
from tests.train_utils import read_metrics, subprocess_env, tiny_config, train_cmd


def _wait_for(cond, p: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"exited (rc {p.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


# `python -m pbe_jax.train` whose first logged step waits for the file named last on the command
# line: the run holds its workdir mid-training for as long as the test needs (not a guess of
# how many steps outlast the other processes' start-up).
HOLDING_TRAIN = """
import os, sys, time
from absl import app
from pbe_jax import metrics, train
go = sys.argv.pop()
real = metrics.MetricWriter.scalars
def scalars(self, step, values):
    real(self, step, values)
    while step == 1 and not os.path.exists(go):
        time.sleep(0.05)
metrics.MetricWriter.scalars = scalars
train.define_flags()
app.run(train.main)
"""


@pytest.mark.slow
def test_a_second_train_on_a_busy_workdir_refuses_naming_the_holder(tmp_path):
    """While one run trains, the same command and one with another seed both refuse at once
    (non-zero, naming the holder's pid and host); the first finishes with its own steps,
    checkpoint and config.json, unmixed."""
    wd, n, go = str(tmp_path / "run"), 3, str(tmp_path / "go")
    env = subprocess_env(1)
    first = subprocess.Popen([sys.executable, "-c", HOLDING_TRAIN,
                              *train_cmd(wd, **{"train.num_steps": n})[3:], go], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(read_metrics(wd)) >= 1, first, "the first step")
        t0 = time.time()
        seconds = [subprocess.Popen(train_cmd(wd, **{"train.num_steps": n, "seed": seed}), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for seed in (0, 7)]
        for p in seconds:
            _, err = p.communicate(timeout=300)
            assert p.returncode != 0, err[-3000:]
            assert f"is in use by pid {first.pid} on host {os.uname().nodename}" in err, err[-3000:]
            assert "--reclaim_lock" in err and "Traceback" not in err, err[-3000:]
        assert first.poll() is None, "the first run ended before the second ones were refused"
        assert time.time() - t0 < 120
    finally:
        open(go, "w").close()  # the first run goes on
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert logged_steps(wd) == list(range(1, n + 1))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [str(n)]
    assert json.loads(open(os.path.join(wd, "config.json")).read())["seed"] == 0
    assert not os.path.exists(os.path.join(wd, ".pbe_jax.lock"))  # released at the end


def test_resume_changed_config_past_or_at_num_steps_and_other_shapes(tmp_path, caplog):
    """One compile: the resumes below restore but train no step (or are refused). The demo's
    lr (0.002), as test_faults_train's in-process runs: one train step program in the cache."""
    wd = str(tmp_path)
    cfg = lambda **o: tiny_config(**{"train.num_steps": 2, **o})  # noqa: E731
    train_and_evaluate(cfg(), wd)
    # at num_steps: a finished run, said so; its other lr is logged (old -> new) and
    # config.json follows it
    with caplog.at_level(logging.WARNING, logger="pbe_jax"):
        train_and_evaluate(cfg(**{"train.lr": 4e-3}), wd)
    assert "already done" in caplog.text and "train.lr: 0.002 -> 0.004" in caplog.text
    assert json.loads(open(os.path.join(wd, "config.json")).read())["train"]["lr"] == 4e-3
    assert logged_steps(wd) == [1, 2]
    # num_steps below the checkpoint: refused, naming the field and the step
    with pytest.raises(ValueError, match=r"config.train.num_steps=1 is below .*step 2"):
        train_and_evaluate(cfg(**{"train.num_steps": 1}), wd)
    # other model shapes: the parameter, both shapes and the config field are named
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(cfg(**{"train.num_steps": 4, "model.unet.block_out_channels": (64,)}), wd)
    msg = str(e.value)
    assert "does not fit the config" in msg and "params.unet." in msg, msg
    assert "32)" in msg and "64)" in msg, msg
    assert "model.unet.block_out_channels: [32] -> [64]" in msg, msg
    assert len(msg) < 3000, msg
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]  # nothing moved aside
    assert logged_steps(wd) == [1, 2]


def test_a_run_whose_every_step_is_non_finite_fails(tmp_path, monkeypatch):
    """NaN initial params (a skipped update keeps them): every loss is NaN. The train step is
    the program the test above compiled (same config), so the compilation cache serves it."""
    real = loop._init_params

    def nan_params(*a, **k):
        params, frozen = real(*a, **k)
        return jax.tree.map(lambda x: x * float("nan"), params), frozen

    monkeypatch.setattr(loop, "_init_params", nan_params)
    with pytest.raises(FloatingPointError, match=r"every step of this run \(2: steps 1..2\) was skipped"):
        train_and_evaluate(tiny_config(**{"train.num_steps": 2}), str(tmp_path))
    assert read_metrics(str(tmp_path))[2]["nan_skips"] == 2


class _Ckpt:
    def __init__(self, directory, steps=()):
        self.directory, self._steps = str(directory), list(steps)

    def steps(self):
        return self._steps


def test_vae_stage_half_written_folder_is_redone_and_a_cut_save_leaves_none(tmp_path, monkeypatch):
    cfg = tiny_config(**{"vae_fit.steps": 1})
    mesh = shd.make_mesh("data:-1")
    vae, _ = vae_fit.random_vae(cfg, mesh)
    fits = []

    def fake_fit(config, mesh, stop=None):
        fits.append(1)
        return vae_fit.FittedVAE(vae=vae, psnr=1.0, info={"fake": True})

    monkeypatch.setattr(vae_fit, "fit_vae", fake_fit)
    # what a full disk mid-save left before: vae/ with only config.json
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg.model.vae.to_dict()))
    got = vae_fit.run_vae_stage(cfg, str(tmp_path), mesh, _Ckpt(tmp_path / "checkpoints"))
    assert got == str(tmp_path / "vae") and fits == [1]
    assert vae_fit.vae_folder_problem(got) is None
    assert [n for n in os.listdir(tmp_path) if n.startswith("vae.incomplete-")]
    vae_fit.load_vae(got)  # complete
    # a save cut by a full disk after config.json: no vae/ (nor a temporary) is left behind
    real = hub.write_weights

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(hub, "write_weights", disk_full)
    other = tmp_path / "other"
    with pytest.raises(OSError, match="No space left"):
        vae_fit.run_vae_stage(cfg, str(other), mesh, _Ckpt(other / "checkpoints"))
    assert not other.exists() or os.listdir(other) == []
    monkeypatch.setattr(hub, "write_weights", real)
    assert vae_fit.run_vae_stage(cfg, str(other), mesh, _Ckpt(other / "checkpoints")) \
        == str(other / "vae") and fits == [1, 1, 1]


@pytest.mark.slow
def test_sigterm_during_the_vae_stage_stops_cleanly_with_a_message(tmp_path):
    wd = str(tmp_path / "run")
    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as err:
        p = subprocess.Popen(train_cmd(wd, **{"train.num_steps": 2, "vae_fit.steps": 100000,
                                                 "vae_fit.heldout_images": 8}),
                             env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=err)
        _wait_for(lambda: "vae fit step 1/" in log_file.read_text(), p, "the first VAE step")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=300)
    text = log_file.read_text()
    assert p.returncode == 0, text[-3000:]
    assert "SIGTERM during the VAE stage" in text and "fits the VAE again" in text, text[-3000:]
    assert not [n for n in os.listdir(wd) if n.startswith("vae")], os.listdir(wd)
    assert not os.path.exists(os.path.join(wd, "checkpoints")) or \
        os.listdir(os.path.join(wd, "checkpoints")) == []


_FILE_SIZE_LIMIT_SAVE = """
import resource, signal, sys, tempfile, time
import jax.numpy as jnp
import numpy as np
from pbe_jax.checkpoint import Checkpointer, CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as ENOSPC
ck = Checkpointer(tempfile.mkdtemp(), keep=3)
state = {"params": {f"w{i}": jnp.arange(20000, dtype=jnp.float32) + i for i in range(300)}}
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
ck.save(10, state, {"vae": {"w": np.ones(10, np.float32)}}, {}, {"seed": 0})
deadline = time.time() + 300
try:
    while time.time() < deadline:
        ck.check()
        time.sleep(0.01)
except CheckpointError as e:
    print("RAISED", e)
ck.close()
time.sleep(2)  # the abandoned writes report after the save's error
"""


def test_a_failed_array_write_reports_the_abandoned_writes_once(tmp_path):
    """A disk that fills while the arrays of a save are written: the save's error is raised,
    and the other arrays' abandoned writes ('Event loop is closed', one traceback per array
    before) make one log line."""
    p = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT_SAVE], env=subprocess_env(1),
                       capture_output=True, text=True, timeout=600)
    assert "RAISED checkpoint" in p.stdout and "failed to write" in p.stdout, p.stderr[-3000:]
    assert p.stderr.count("Event loop is closed") <= 1, p.stderr[-3000:]  # timing: 0 or 1
