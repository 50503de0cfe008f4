"""Training: the step (in process, 8 fake devices) and the real CLI loop (subprocesses)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from pbe_jax import sharding as shd
from pbe_jax.data.pipeline import make_loader
from pbe_jax.training.state import Setup, state_bytes_per_device
from tests.train_utils import read_metrics, subprocess_env, tiny_config, train_cmd
from tests.helpers import free_port


def host_batches(cfg, n):
    it = iter(make_loader(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed, mesh=None))
    return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def run_steps(cfg, mesh, batches):
    setup = Setup(cfg, mesh)
    params, frozen = setup.random_params()
    state = setup.new_state(params)
    step = setup.jit_step()
    losses = []
    for b in batches:
        gb = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in b.items()}
        state, m = step(state, frozen, gb)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state), jax.device_get(frozen)


@pytest.fixture(scope="module")
def batches():
    return host_batches(tiny_config(), 3)


@pytest.mark.slow
def test_sharded_equals_unsharded(batches):
    cfg = tiny_config(**{"train.lr": 1e-4})
    l1, s1, _ = run_steps(cfg, shd.make_mesh("data:1", devices=jax.devices()[:1]), batches)
    l8, s8, _ = run_steps(cfg, shd.make_mesh("data:4,fsdp:2"), batches)
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    flat1, flat8 = jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])
    assert len(flat1) == len(flat8)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat1, flat8))
    assert worst <= 1e-5, worst
    assert l1[0] != l1[1]  # the loop really advanced (different batches, updated params)


def _uncond(state):
    return np.asarray(state["params"]["image_encoder"]["uncond_vector"])


@pytest.mark.slow
def test_frozen_never_change_uncond_trains_only_when_dropped(batches):
    mesh = shd.make_mesh("data:-1")
    cfg = tiny_config(**{"train.cond_drop_prob": 1.0})
    setup = Setup(cfg, mesh)
    params0, frozen0 = jax.device_get(setup.random_params())
    _, state, frozen = run_steps(cfg, mesh, batches)
    # Frozen encoders are step inputs only: not in the optimizer state, not changed.
    assert "vae" not in state["params"] and "model" not in state["params"]["image_encoder"]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert not [p for p in opt_paths if "'vae'" in p or "'model'" in p]
    n_par = len(jax.tree.leaves(state["params"]))
    assert 2 * n_par <= len(opt_paths) <= 2 * n_par + 4  # adam mu, nu per trainable param + counts
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)
    # always dropped -> the unconditional vector learns
    assert np.max(np.abs(_uncond(state) - np.asarray(params0["image_encoder"]["uncond_vector"]))) > 0
    # never dropped -> it stays exactly where it started, while the mapper does train
    _, state0, _ = run_steps(tiny_config(**{"train.cond_drop_prob": 0.0}), mesh, batches)
    np.testing.assert_array_equal(_uncond(state0), np.asarray(params0["image_encoder"]["uncond_vector"]))
    p_before = np.asarray(params0["image_encoder"]["proj_out"]["kernel"])
    assert np.max(np.abs(np.asarray(state0["params"]["image_encoder"]["proj_out"]["kernel"]) - p_before)) > 0


@pytest.mark.slow
def test_fsdp_divides_param_and_optimizer_bytes(monkeypatch):
    monkeypatch.setattr(shd, "MIN_SHARD_SIZE", 0)  # tiny model: shard every divisible array
    cfg = tiny_config()
    dp = Setup(cfg, shd.make_mesh("data:8"))
    fs = Setup(cfg, shd.make_mesh("fsdp:8"))

    def po_bytes(s):
        st = s.abstract_state()
        return state_bytes_per_device({"p": st["params"], "o": st["opt_state"]})

    b_dp, b_fs = po_bytes(dp), po_bytes(fs)
    assert b_dp / b_fs >= 0.7 * 8, (b_dp, b_fs)
    # the compiled step agrees: its per-device argument bytes shrink by at least that much
    m_dp, m_fs = dp.compile().memory_analysis(), fs.compile().memory_analysis()
    saved = m_dp.argument_size_in_bytes - m_fs.argument_size_in_bytes
    assert saved >= 0.9 * (b_dp - b_fs), (m_dp.argument_size_in_bytes, m_fs.argument_size_in_bytes)


@pytest.mark.slow
def test_demo_config_trains_loss_falls(tmp_path):
    """The real loop (train_and_evaluate) on a fixed small synthetic dataset: loss falls."""
    from pbe_jax.training.loop import train_and_evaluate

    n = 120  # the mean loss of the last 20 steps is 0.68x the first 20's here (seeds 1, 2: 0.77x, 0.71x)
    cfg = tiny_config(**{"train.num_steps": n, "train.lr": 3e-3, "ckpt_every_steps": n,
                         "data.synthetic_num_images": 8})
    train_and_evaluate(cfg, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    losses = [rows[s]["loss"] for s in sorted(rows)]
    assert len(losses) == n
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)
    assert os.path.isdir(tmp_path / "checkpoints" / str(n))
    assert (tmp_path / "images").is_dir() and any((tmp_path / "images").iterdir())


def _final_params(workdir, step):
    import orbax.checkpoint as ocp

    r = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return r["params"]


@pytest.mark.slow
def test_sigterm_checkpoints_current_step_and_exits_0(tmp_path):
    wd = str(tmp_path)
    p = subprocess.Popen(train_cmd(wd, **{"train.num_steps": 100000}), env=subprocess_env(1),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while len(read_metrics(wd)) < 3:
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    last_step = max(read_metrics(wd))
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    assert ckpts and ckpts[-1] == last_step, (ckpts, last_step)


@pytest.mark.slow
def test_two_processes_sigterm_to_one_agree_without_a_collective_per_step(tmp_path):
    """Two processes (two devices each, mesh data:2,fsdp:2) train like one process with two
    devices (data:1,fsdp:2): the same loss at every logged step. SIGTERM reaches process 1 only;
    both stop at the same step, a multiple of log_every_steps (the only steps where they agree),
    and checkpoint it. Process 0's log counts the agreements: one per log_every_steps steps, not
    one per step. (The meshes and the model are test_pod.py's, whose runs compile the same
    programs: the compilation cache serves them here.)"""
    every = 4
    wd = str(tmp_path / "multi")
    port = free_port()
    procs = [subprocess.Popen(
        train_cmd(wd, extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"],
                  **{"train.num_steps": 100000, "mesh": "data:2,fsdp:2", "log_every_steps": every}),
        env=subprocess_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    deadline = time.time() + 600
    while len(read_metrics(wd)) < 2:
        for pr in procs:
            assert pr.poll() is None, pr.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    errs = []
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-3000:]
        errs.append(err)
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    last = ckpts[-1]
    assert last % every == 0 and last == max(read_metrics(wd)), (ckpts, sorted(read_metrics(wd)))
    lines = [ln for ln in errs[0].splitlines() if "preemption agreement:" in ln]
    assert lines, errs[0][-3000:]
    collectives, steps = map(int, lines[-1].split("agreement:")[1].split()[0:4:3])
    assert steps == last and collectives == last // every, lines[-1]
    single = str(tmp_path / "single")
    subprocess.run(train_cmd(single, **{"train.num_steps": last, "mesh": "data:1,fsdp:2",
                                        "log_every_steps": every}),
                   env=subprocess_env(2), check=True, capture_output=True, timeout=600)
    a, b = read_metrics(single), read_metrics(wd)
    assert sorted(a) == sorted(b) == list(range(every, last + 1, every)), (sorted(a), sorted(b))
    for s in a:
        np.testing.assert_allclose(a[s]["loss"], b[s]["loss"], rtol=1e-5)
