"""Test setup: 8 fake CPU devices (set before jax is imported anywhere), fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# LLVM -O0 (`tests.helpers.FAST_COMPILE_FLAGS`) for the programs the tests compile in process
# and, through `train_utils.subprocess_env`, in the command lines they start (a run of hundreds
# of steps keeps XLA's default). XLA's HLO passes (fusion, layout, sharding) are unchanged; only
# LLVM's machine-code optimisation is skipped. A test that compares two programs at the last
# float bit compiles them at the default level (`tests.helpers.OPTIMIZED`). Whole suite, one
# quiet run each: 1588 -> 1408 CPU-s.
from tests.helpers import FAST_COMPILE_FLAGS  # noqa: E402 (numpy and socket only: no jax yet)

if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session, inherited by subprocess tests: the CLI tests compile
# the same tiny train step several times. `pbe_jax.runtime` (the cache every command line turns
# on, by default in ~/.cache/pbe_jax/xla) uses this folder too (JAX_COMPILATION_CACHE_DIR ranks
# below only PBE_JAX_COMPILATION_CACHE / --compilation_cache), so the suite neither reads nor
# fills a user's cache and starts cold each session. Programs under 0.5 s of compile are not
# written (the command lines write every program): writing them all cost more CPU than their
# hits saved (three CLI-heavy test files: 146 vs 132 CPU-s, 2026-12-06).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pbe_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402

from pbe_jax import runtime  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
runtime.tune_python_gc()  # what every command line does (runtime.configure): tests trace a lot

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: 15 s or more on 2 cores: a large model, a "
                            "training run or several processes (still runs in CI)")


def pytest_collection_modifyitems(session, config, items):
    """The files that hold a `slow` test first, each file whole and in its own order. pytest.ini
    runs pytest-xdist with `--dist=loadfile --no-loadscope-reorder`: a worker takes one file at a
    time, in this order, so the long files start first and the short ones fill the gaps at the
    end (longest-first scheduling), and a file's module fixtures are built once. (The default
    `load` scheduler deals each worker a quarter of the collection up front in contiguous chunks:
    one worker got the long tests and ran them alone for ~8 minutes at the end while the other
    idled; dealing single tests instead builds every module fixture on both workers.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def own_cache_settings(monkeypatch):
    """Let a test call runtime.configure (its own cache folder, or off); afterwards this worker
    has the suite's cache settings back (a worker left with the cache off compiles every later
    test's programs again)."""
    from jax.experimental.compilation_cache import compilation_cache

    from pbe_jax import runtime

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    saved = {n: getattr(jax.config, n) for n in names}
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setattr(runtime, "_configured", None)
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(monkeypatch):
    """A process a test started and left running (a test that failed while a 100000-step training
    run waited for its SIGTERM) is killed when the test ends, not left to take a core for the rest
    of the session. (Module fixtures start theirs before this records.)"""
    import subprocess

    started, real_init = [], subprocess.Popen.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()
