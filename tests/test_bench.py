"""CI smoke test of `python -m pbe_jax.bench`: every benchmark at `--size tiny` runs (ours and the
PyTorch reference), prints a parseable markdown table and writes the `--json` rows. Speed is
not checked; the work is cut down (1 rep, 2 sampler steps, state bytes only for memory)."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.train_utils import FAST_COMPILE_FLAGS, REPO

EXPECTED = {
    "train/tiny/images_per_s": "images/s",
    "train/tiny/mfu": "fraction of peak",
    "sample/tiny/images_per_s": None,
    "data/128px/one_process": "samples/s",
    "data/128px/loader_1_workers_per_worker": "samples/s/worker",
    "memory/tiny/params+opt_state": None,
}
TABLE_ROW = re.compile(r"^\| (\S+) \| (\S+) \| (\S+) \| (\S+) \| (.+) \|$")


@pytest.mark.slow
def test_bench_tiny_all(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pbe_jax.bench", "--what=all", "--size=tiny", "--reps=1",
           "--warmup=1", "--sample_steps=2", "--memory_compile=false", "--data_resolution=128",
           "--data_images=4", "--data_samples=4", "--data_workers=1", "--data_batch=2",
           "--data_seconds=1", "--torch_threads=2", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    for name, unit in EXPECTED.items():
        assert name in rows, f"{name} missing from {sorted(rows)}"
        if unit:
            assert rows[name]["unit"] == unit, rows[name]
    for name, r in rows.items():
        assert set(r) == {"ours", "reference", "ratio", "unit"}, (name, r)
        assert math.isfinite(r["ours"]) and r["ours"] >= 0, (name, r)
        if r["reference"] is None:
            assert r["ratio"] is None, (name, r)
        elif r["reference"]:
            assert math.isclose(r["ratio"], r["ours"] / r["reference"], rel_tol=1e-9), (name, r)
    # both sides were timed for the comparisons the issue asks for
    for name in ("train/tiny/images_per_s", "sample/tiny/images_per_s"):
        assert rows[name]["reference"] > 0 and rows[name]["ours"] > 0, rows[name]
    # FSDP over 8 devices cannot hold more state per device than pure data parallel
    assert rows["memory/tiny/params+opt_state"]["ratio"] < 1.0
    # every JSON row is also a row of a printed markdown table, with the same numbers
    printed = {m.group(1): m for line in proc.stdout.splitlines() if (m := TABLE_ROW.match(line))}
    assert set(rows) <= set(printed), sorted(set(rows) - set(printed))
    for name, r in rows.items():
        assert printed[name].group(5) == r["unit"]
        assert math.isclose(float(printed[name].group(2)), r["ours"], rel_tol=2e-2, abs_tol=1e-2)


def test_rows_and_table():
    from pbe_jax.benchmarks.report import Row, markdown_table

    rows = [Row("x/a", 3.0, 2.0, "images/s"), Row("x/b", 5e9, None, "FLOP")]
    assert rows[0].ratio == 1.5 and rows[1].ratio is None
    table = markdown_table(rows).splitlines()
    assert table[2] == "| x/a | 3.000 | 2.000 | 1.50x | images/s |"
    assert table[3] == "| x/b | 5e+09 | - | - | FLOP |"


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    """`pip install .` (not editable) of the working tree into a folder, and a directory outside
    the checkout to run from: (target, elsewhere, env)."""
    tmp = tmp_path_factory.mktemp("plain_install")
    target, elsewhere = tmp / "site", tmp / "elsewhere"
    elsewhere.mkdir()
    build = tmp / "src"  # the working tree, without the venv and build leftovers
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build",
                                                               "*.egg-info", ".pytest_cache"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(build)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}
    return target, elsewhere, env


@pytest.fixture(scope="module")
def gpu_bench(plain_install, tmp_path_factory):
    """`--what=gpu` at the tiny size, run from the plain install outside the checkout:
    (process, JSON rows)."""
    _, elsewhere, env = plain_install
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu.json"
    cmd = [sys.executable, "-m", "pbe_jax.bench", "--what=gpu", "--gpu_sizes=tiny", "--reps=1",
           "--warmup=0", "--sample_steps=2", "--sample_batch=2", "--torch_threads=2",
           "--torch_compile=false", f"--json={out}"]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_bench_runs_from_a_plain_install_outside_the_checkout(plain_install, gpu_bench):
    """`pip install .` (not editable), then the bench from another directory: no package code
    reads configs or anything else relative to the checkout."""
    target, elsewhere, env = plain_install
    where = subprocess.run([sys.executable, "-c", "import pbe_jax; print(pbe_jax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target)), where.stdout
    r, _ = gpu_bench
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "train/tiny/images_per_s" in r.stdout


@pytest.mark.slow
def test_bench_gpu_command_runs_its_cpu_path(gpu_bench):
    """`--what=gpu` (the accelerator benchmark) end to end at the tiny size on the CPU: train and
    sample rows for ours and diffusers, compile times, the compiled step's bytes. (torch.compile
    is left off here: inductor's C++ build of the UNet takes many minutes on 2 cores.) It runs
    from the plain install (`gpu_bench`), which is also what the test above checks."""
    proc, rows = gpu_bench
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("train/tiny/images_per_s", "train/tiny/mfu", "train/tiny/compile_time",
                 "train/tiny/compiled_step_bytes", "sample/tiny/images_per_s",
                 "sample/tiny/first_call_time"):
        assert name in rows and rows[name]["ours"] > 0, (name, sorted(rows))
    assert rows["train/tiny/images_per_s"]["reference"] > 0
    assert rows["sample/tiny/images_per_s"]["reference"] > 0
    assert "bf16" in proc.stdout  # the gpu preset's dtype
    assert not any(k.endswith("_vs_torch_compile") for k in rows)
    assert not any(k.endswith("peak_device_memory") for k in rows)  # no allocator stats on a CPU


def test_op_table_times_and_classifies_each_xla_op():
    """`--what=ops` reads the JAX profiler's per-op times of a compiled program and sorts each
    op into a class by the HLO it runs (a fusion by what is fused inside it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pbe_jax.benchmarks import ops

    def f(x, k, w):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y.reshape(-1, y.shape[-1]) @ w).sum()

    args = (np.ones((2, 16, 16, 8), np.float32), np.ones((3, 3, 8, 16), np.float32),
            np.ones((16, 32), np.float32))
    per_op, kinds, wall = ops.jax_op_seconds(jax.jit(f), args, reps=2)
    assert per_op and wall > 0 and all(s >= 0 for s in per_op.values())
    classes = ops.by_class(per_op, lambda op: ops._classify_hlo(op, kinds))
    assert set(classes) == set(ops.CLASSES)
    assert classes["conv"] > 0 and classes["matmul"] > 0, (per_op, kinds)
    assert ops._classify_torch("aten::convolution_backward") == "conv"
    assert ops._classify_torch("aten::addmm") == "matmul"
    assert ops._classify_torch("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert ops._classify_torch("aten::native_group_norm") == "elementwise / norm"


def test_recovery_bench_names_a_missing_launcher_and_bad_steps(tmp_path):
    """`--what=recovery` needs the checkout's launch/local.sh: a missing one is named with the flag
    that sets it, before anything starts (the measurement itself: docs/results/recovery_demo_cpu.json;
    the supervised restart it times is tests/test_pod.py's)."""
    from pbe_jax.benchmarks import recovery

    missing = str(tmp_path / "local.sh")
    with pytest.raises(FileNotFoundError, match=r"local.sh does not exist.*--recovery_launcher"):
        recovery.run(launcher=missing)
    assert os.path.isfile(recovery.default_launcher())  # this checkout's
    with pytest.raises(ValueError, match=r"--recovery_steps=6 must be at least 2 x --recovery_ckpt_every=4"):
        recovery.run(steps=6, ckpt_every=4)
