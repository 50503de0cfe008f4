"""Sweeps: expansion and run names, early validation, launcher commands, a real local sweep of
two tiny training runs, and the summary table."""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex

import numpy as np
import pytest

from pbe_jax import sweep as sweep_cli
from pbe_jax.configs import load_config, load_module
from pbe_jax.training import sweeps as sweep
from tests.train_utils import CONFIG_FILE, REPO, cli_overrides, subprocess_env

SAFE = re.compile(r"^[A-Za-z0-9._+=,-]+$")


def _write_cfg(tmp_path, body: str) -> str:
    """A config file whose get_config is configs/pbe.py's and whose get_sweep is `body`."""
    path = tmp_path / "swcfg.py"
    path.write_text(
        "import importlib.util\n"
        f"_s = importlib.util.spec_from_file_location('_pbe_cfg', {CONFIG_FILE!r})\n"
        "_m = importlib.util.module_from_spec(_s)\n_s.loader.exec_module(_m)\n"
        "get_config = _m.get_config\n\n" + body)
    return str(path)


def test_run_names_stable_safe_and_unique():
    a = {"train.lr": 1e-4, "train.batch_size": 64}
    b = {"train.batch_size": 64, "train.lr": 1e-4}
    assert sweep.run_name(a) == sweep.run_name(b) == "batch_size=64,lr=0.0001"
    # values keep full precision (repr), so close values stay distinct
    assert sweep.run_name({"train.lr": 1e-5}) != sweep.run_name({"train.lr": 1.00001e-5})
    # keys that share their last component keep the full dotted key
    shared = sweep.run_name({"train.seed": 1, "data.seed": 2})
    assert shared == "data.seed=2,train.seed=1"
    odd = sweep.run_name({"mesh": "data:-1,fsdp:8", "data.source": "my data/x", "remat": True,
                          "model.unet.block_out_channels": (32, 64)})
    assert SAFE.match(odd), odd
    assert "block_out_channels=32x64" in odd and "remat=true" in odd and "/" not in odd
    long1 = sweep.run_name({f"k{i}": "v" * 20 for i in range(10)})
    long2 = sweep.run_name({**{f"k{i}": "v" * 20 for i in range(9)}, "k9": "w" * 20})
    assert len(long1) <= sweep.MAX_NAME and len(long2) <= sweep.MAX_NAME and long1 != long2
    assert sweep.run_name({}) == "base"


def test_expand_pbe_sweeps(tmp_path):
    root = str(tmp_path / "root")
    runs = sweep.expand(f"{CONFIG_FILE}:demo,sweep=lr_batch", root, ["--config.train.num_steps=3"])
    points = load_module(CONFIG_FILE).get_sweep("demo,sweep=lr_batch")
    lrs = sorted({p["train.lr"] for p in points})
    bss = sorted({p["train.batch_size"] for p in points})
    assert len(runs) == len(lrs) * len(bss) >= 4
    expected = {f"batch_size={b},lr={lr!r}" for lr, b in itertools.product(lrs, bss)}
    assert {r.name for r in runs} == expected
    for r in runs:
        assert r.workdir == os.path.join(root, r.name)
        args = list(r.train_args)
        # the sweep token is for get_sweep only; get_config would reject it
        assert args[0] == f"--config={CONFIG_FILE}:demo"
        assert f"--workdir={r.workdir}" in args
        assert f"--config.train.lr={r.overrides['train.lr']!r}" in args
        assert f"--config.train.batch_size={r.overrides['train.batch_size']}" in args
        assert args[-1] == "--config.train.num_steps=3"  # extra flags go to every run, last
    # every sweep of the config file expands and validates against get_config
    for arg in ("sd15,sweep=cond_drop", "sd15,mesh=data:-1,fsdp:8,sweep=mask_mix", "demo,sweep=resolution"):
        runs = sweep.expand(f"{CONFIG_FILE}:{arg}", root)
        assert len({r.name for r in runs}) == len(runs) >= 2
        assert all(r.train_args[0] == f"--config={CONFIG_FILE}:{sweep.strip_sweep_token(arg)}" for r in runs)
    assert sweep.strip_sweep_token("sd15,mesh=data:-1,fsdp:8,sweep=mask_mix") == "sd15,mesh=data:-1,fsdp:8"


def test_bad_points_fail_before_anything_runs(tmp_path):
    cfg = _write_cfg(tmp_path, "def get_sweep(arg):\n    return [{'train.lr': 1e-3}, {'train.lrr': 1e-4}]\n")
    with pytest.raises(ValueError, match="point 1.*lrr"):
        sweep.expand(f"{cfg}:demo", str(tmp_path))
    cfg = _write_cfg(tmp_path, "def get_sweep(arg):\n    return [{'train.batch_size': 'big'}]\n")
    with pytest.raises(ValueError, match="batch_size"):
        sweep.expand(f"{cfg}:demo", str(tmp_path))
    cfg = _write_cfg(tmp_path, "def get_sweep(arg):\n    return [{'data.source': 'a b'}, {'data.source': 'a/b'}]\n")
    with pytest.raises(ValueError, match="same run name"):
        sweep.expand(f"{cfg}:demo", str(tmp_path))
    cfg = _write_cfg(tmp_path, "")
    with pytest.raises(ValueError, match="get_sweep"):
        sweep.expand(f"{cfg}:demo", str(tmp_path))


def test_print_and_launcher_commands(tmp_path, capsys):
    root = str(tmp_path / "r")
    assert sweep_cli.main([f"--config={CONFIG_FILE}:demo,sweep=cond_drop", f"--workdir={root}",
                       "--run=print", "--config.train.num_steps=5"]) == 0
    lines = [shlex.split(x) for x in capsys.readouterr().out.strip().splitlines()]
    points = load_module(CONFIG_FILE).get_sweep("demo,sweep=cond_drop")
    assert len(lines) == len(points)
    for argv, p in zip(lines, points):
        assert argv[:3] == ["python", "-m", "pbe_jax.train"]
        assert f"--config.train.cond_drop_prob={p['train.cond_drop_prob']!r}" in argv
        assert "--config.train.num_steps=5" in argv
    assert not os.path.exists(root)  # printing starts nothing

    assert sweep_cli.main([f"--config={CONFIG_FILE}:sd15,sweep=mask_mix", "--workdir=gs://bucket/sw",
                       "--run=slurm", "--dry_run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all(x.startswith("+ sbatch --job-name=pbe-arbitrary_mask_prob=") for x in out)
    assert all(os.path.join(REPO, "launch", "gpu", "slurm.sbatch") in x for x in out)
    assert all("--output=gs://" not in x for x in out)  # SLURM cannot write its log to GCS

    assert sweep_cli.main([f"--config={CONFIG_FILE}:sd15,sweep=cond_drop", "--workdir=gs://bucket/sw",
                       "--run=tpu", "--dry_run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3
    for x in out:
        argv = shlex.split(x[2:])
        assert argv[0].endswith("launch/tpu/pod.sh") and argv[1:4] == ["run", "--wait", "--"]
        assert argv[4:7] == ["python", "-m", "pbe_jax.train"]
        assert any(a.startswith("--workdir=gs://bucket/sw/cond_drop_prob=") for a in argv)


def test_summarize_reads_metrics(tmp_path):
    rng = np.random.default_rng(0)
    losses = {}
    for name, steps, target in (("lr=0.1", 7, 7), ("lr=0.2", 4, 10), ("lr=0.3", 6, 6)):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "loss": float(rng.uniform(0.1, 1)), "lr": 0.1, "grad_norm": 1.0,
                 "images_per_s": 5.0, "data/retries": 0.0} for s in range(1, steps + 1)]
        losses[name] = [r["loss"] for r in rows]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
        (d / "config.json").write_text(json.dumps({"train": {"num_steps": target}}))
        (d / "sweep_point.json").write_text(json.dumps({"name": name, "overrides": {"train.lr": float(name[3:])}}))
    (tmp_path / "not_a_run").mkdir()
    md, csv_text = sweep.summarize(str(tmp_path))
    assert (tmp_path / "summary.md").read_text() == md
    table = list(csv.DictReader(io.StringIO(csv_text)))
    assert [r["run"] for r in table] == sorted(losses, key=lambda n: losses[n][-1])  # by final loss
    for r in table:
        ls = losses[r["run"]]
        assert float(r["loss"]) == ls[-1]
        assert math.isclose(float(r["loss_last5"]), float(np.mean(ls[-5:])), rel_tol=1e-12)
        assert float(r["train.lr"]) == float(r["run"][3:])
        assert "data/retries" in r
    status = {r["run"]: r["status"] for r in table}
    assert status == {"lr=0.1": "done", "lr=0.2": "at 4/10", "lr=0.3": "done"}
    assert md.count("\n") == 2 + 3 and "| run | train.lr | status | step | loss |" in md


@pytest.mark.slow
def test_local_sweep_two_tiny_runs(tmp_path, monkeypatch, capsys):
    """Two real training runs, one after the other, then the summary. The points differ only in
    the host-side mask mix, so the second run's programs come from the first one's persistent
    compilation cache (the session's, see conftest; a real sweep over data settings gains the
    same way with JAX_COMPILATION_CACHE_DIR set)."""
    cfg = _write_cfg(tmp_path, "def get_sweep(arg):\n"
                     "    return [{'data.arbitrary_mask_prob': p} for p in (0.0, 1.0)]\n")
    root = tmp_path / "sweep"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", subprocess_env(1)["XLA_FLAGS"])
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.chdir(REPO)
    flags = cli_overrides(**{"train.num_steps": 3})
    rc = sweep_cli.main([f"--config={cfg}:demo", f"--workdir={root}", "--run=local", "--parallel=1", *flags])
    logs = {d: (root / d / "train.log").read_text()[-3000:] for d in os.listdir(root) if (root / d / "train.log").exists()}
    assert rc == 0, logs
    names = {"arbitrary_mask_prob=0.0", "arbitrary_mask_prob=1.0"}
    assert set(os.listdir(root)) == names
    capsys.readouterr()
    assert sweep_cli.main(["--summarize", str(root)]) == 0
    table = list(csv.DictReader(io.StringIO((root / "summary.csv").read_text())))
    assert {r["run"] for r in table} == names
    losses = {}
    for r in table:
        run_dir = root / r["run"]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == [1, 2, 3]  # process 0 logged each step once
        assert r["status"] == "done" and int(r["step"]) == 3
        assert float(r["loss"]) == rows[-1]["loss"] and math.isfinite(float(r["loss"]))
        losses[r["run"]] = [x["loss"] for x in rows]
        # the override reached the run's config, and the summary shows it
        prob = json.loads((run_dir / "config.json").read_text())["data"]["arbitrary_mask_prob"]
        assert prob == float(r["data.arbitrary_mask_prob"]) == float(r["run"].split("=")[1])
    assert losses["arbitrary_mask_prob=0.0"] != losses["arbitrary_mask_prob=1.0"]  # different masks
    md = (root / "summary.md").read_text()
    assert all(n in md for n in names)


def test_dry_run_prints_the_cost_and_the_demo_sweep_has_the_demo_lr(tmp_path, capsys):
    points = load_module(CONFIG_FILE).get_sweep("demo,sweep=lr_batch")
    demo = load_config(f"{CONFIG_FILE}:demo")
    assert demo.train.lr in {p["train.lr"] for p in points}
    assert demo.train.batch_size in {p["train.batch_size"] for p in points}
    root = str(tmp_path / "r")
    assert sweep_cli.main([f"--config={CONFIG_FILE}:demo,sweep=lr_batch", f"--workdir={root}",
                           "--run=local", "--dry_run", "--config.train.num_steps=7"]) == 0
    out, err = capsys.readouterr()
    n = len(points)
    images = sum(7 * p["train.batch_size"] for p in points)
    vae = n * demo.vae_fit.steps
    assert f"{n} runs x 7 steps = {7 * n:,} training steps ({images:,} images) + {vae:,} VAE-stage steps" in err
    assert len(out.strip().splitlines()) == n and not os.path.exists(root)  # nothing started
