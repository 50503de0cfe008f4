"""pbe_jax.runtime: where the compilation cache lives, the default XLA flags, the start-up clock,
and (through the training command line) that a second run compiles nothing new."""
import os
import re
import subprocess

import pytest

from pbe_jax import runtime
from tests.train_utils import subprocess_env, train_cmd


def test_cache_dir_precedence(monkeypatch, tmp_path):
    tag = runtime.host_cpu_tag()
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.resolve_cache_dir() == f"{tmp_path}/xdg/pbe_jax/xla/{tag}"  # the default: on
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert runtime.resolve_cache_dir() == str(tmp_path / "jax")  # JAX's own variable, as given
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env"))
    assert runtime.resolve_cache_dir() == f"{tmp_path}/env/{tag}"
    assert runtime.resolve_cache_dir(str(tmp_path / "flag")) == f"{tmp_path}/flag/{tag}"  # flag wins
    assert runtime.resolve_cache_dir("gs://b/xla") == f"gs://b/xla/{tag}"
    for off in ("off", "OFF", "none", "0", "false"):
        assert runtime.resolve_cache_dir(off) is None
    monkeypatch.setenv(runtime.CACHE_ENV, "off")
    assert runtime.resolve_cache_dir() is None


def test_default_xla_flags_never_override_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --xla_foo=1")
    assert runtime.apply_default_xla_flags({"xla_backend_optimization_level": "2", "xla_bar": "x"}) \
        == ["--xla_bar=x"]
    assert os.environ["XLA_FLAGS"] == "--xla_bar=x --xla_backend_optimization_level=3 --xla_foo=1"


def test_python_gc_thresholds_raised_unless_the_process_chose_its_own(monkeypatch):
    import gc
    saved = gc.get_threshold()
    try:
        monkeypatch.delenv(runtime.PYTHON_GC_ENV, raising=False)
        gc.set_threshold(700, 10, 10)  # CPython 3.11's default
        assert runtime.tune_python_gc() and gc.get_threshold() == runtime.PYTHON_GC_THRESHOLD
        assert runtime.tune_python_gc()  # idempotent
        gc.set_threshold(1000, 5, 5)  # the process's own choice stays
        assert not runtime.tune_python_gc() and gc.get_threshold() == (1000, 5, 5)
        monkeypatch.setenv(runtime.PYTHON_GC_ENV, "default")
        gc.set_threshold(700, 10, 10)
        assert not runtime.tune_python_gc() and gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*saved)


def test_startup_clock_sections_and_cache_notes(tmp_path, own_cache_settings):
    import jax
    import jax.numpy as jnp

    runtime.configure(str(tmp_path))
    clock = runtime.StartupClock(first=None)
    clock.mark("nothing")
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    clock.mark("compile")
    names = [s[0] for s in clock.sections]
    assert names == ["nothing", "compile"]
    assert clock.sections[0][3] == ""
    assert re.fullmatch(r"cache \d+ miss(es)?", clock.sections[1][3]), clock.sections[1]
    line = clock.line()
    assert line.startswith("start-up ") and "compile " in line and str(tmp_path) in line
    d = clock.as_dict()
    assert set(d) == {"startup/nothing", "startup/compile", "startup/total", "startup/total_cpu"}
    # off: nothing read or written
    n_files, counts = _cache_files(tmp_path), runtime.compile_counts()
    assert n_files > 0
    runtime.configure("off")
    clock = runtime.StartupClock(first=None)
    jax.jit(lambda x: x * 5 - 2)(jnp.arange(7.0)).block_until_ready()
    clock.mark("compile")
    assert clock.line().endswith("compilation cache off") and clock.sections[0][3] == ""
    after = runtime.compile_counts()
    assert (after["cache_hits"], after["cache_misses"]) == (counts["cache_hits"], counts["cache_misses"])
    assert after["compiles"] > counts["compiles"]
    assert _cache_files(tmp_path) == n_files


def test_entries_written_without_a_size_limit_do_not_stop_the_cache(tmp_path, monkeypatch,
                                                                    own_cache_settings):
    """JAX with a size limit writes nothing more to a folder holding one entry that has no
    last-use stamp (what a JAX process without a limit writes): pbe_jax stamps such entries in
    its own folders, and keeps JAX's setting for JAX_COMPILATION_CACHE_DIR (the test suite's
    worker processes and its command lines share one; the command lines wrote nothing)."""
    import jax
    import jax.numpy as jnp

    folder = tmp_path / "own" / runtime.host_cpu_tag()
    folder.mkdir(parents=True)
    (folder / "jit_foreign-0123-cache").write_bytes(b"written by a JAX without a size limit")
    runtime.configure(str(tmp_path / "own"))
    assert jax.config.jax_compilation_cache_max_size == runtime.CACHE_MAX_BYTES
    assert (folder / "jit_foreign-0123-atime").is_file()
    jax.jit(lambda x: x * 7 - 3)(jnp.arange(3.0)).block_until_ready()
    assert list(folder.glob("jit__lambda-*-cache")), sorted(os.listdir(folder))
    # JAX's own variable: JAX's size setting (unlimited here) stays, and entries are left alone
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert runtime.configure()["compilation_cache"] == str(tmp_path / "jax")
    assert jax.config.jax_compilation_cache_max_size == -1
    jax.jit(lambda x: x * 11 + 5)(jnp.arange(4.0)).block_until_ready()
    names = [p.name for p in (tmp_path / "jax").iterdir()]
    assert any(n.startswith("jit__lambda-") for n in names) and all(n.endswith("-cache") for n in names)


def _startup_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if " start-up " in ln]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _cache_files(d) -> int:
    return sum(len(files) for _, _, files in os.walk(d))


@pytest.mark.slow
def test_second_process_compiles_nothing_new(tmp_path):
    """The training command line, twice with the same config and cache folder: the second run
    finds every program in the cache (0 misses). (Switching the cache off:
    test_startup_clock_sections_and_cache_notes.)"""
    cache = tmp_path / "cache"
    env = subprocess_env(1)
    env[runtime.CACHE_ENV] = str(cache)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # every program, as by default
    over = {"train.num_steps": 2}

    def run(name):
        p = subprocess.run(train_cmd(str(tmp_path / name), **over), env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return _startup_line(p.stderr)

    first = run("a")
    m = re.search(r"(\d+) hits, (\d+) misses", first)
    assert m and int(m.group(2)) > 0, first
    assert re.search(r"compile [\d.]+s \(cache 1 miss\)", first), first
    n_files = _cache_files(cache)
    second = run("b")
    m = re.search(r"(\d+) hits, (\d+) misses", second)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, second
    assert re.search(r"compile [\d.]+s \(cache 1 hit\)", second), second
    assert _cache_files(cache) == n_files  # nothing new written
