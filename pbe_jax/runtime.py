r"""Process set-up every entry point runs first: the persistent XLA compilation cache, default
XLA:CPU flags (`CPU_XLA_FLAGS`), Python's garbage collector set for tracing (`tune_python_gc`), and
counters / a clock for the start-up report.

`configure()` (or `configure_from_flags()` in a command line; `distributed.initialize_from_flags`
calls it) must run before the first computation: XLA reads `XLA_FLAGS` when the backend starts.

The compilation cache is on by default, in `$XDG_CACHE_HOME/pbe_jax/xla` (`~/.cache/pbe_jax/xla`).
Where it lives, in order of precedence:
  --compilation_cache=DIR|off        the flag of every command line
  PBE_JAX_COMPILATION_CACHE=DIR|off  environment
  JAX_COMPILATION_CACHE_DIR=DIR      JAX's own variable (kept as the user set it)
  the user cache dir above
A path may be `gs://...` (a pod's hosts then share what process 0 compiled). Entries go to a
subfolder named after the host CPU (architecture + instruction-set features), so hosts of
different CPU generations sharing one folder never load each other's machine code. JAX writes
an entry from process 0 only and, with a size limit (here 8 GiB, least recently used entries
evicted), under a file lock, so concurrent processes and hosts can share the folder. Every
program is cached however fast it compiled (the many small start-up programs add up);
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` / `JAX_COMPILATION_CACHE_MAX_SIZE` override.
A folder given only as `JAX_COMPILATION_CACHE_DIR` keeps JAX's own size setting (unlimited
unless `JAX_COMPILATION_CACHE_MAX_SIZE`): JAX with a size limit stops writing to a folder as soon
as it holds one entry written without (other JAX programs sharing it), so pbe_jax imposes none
there; in its own folders it stamps such entries at start-up (`stamp_unstamped_entries`).
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
import os
import platform
import threading
import time

import jax
from absl import flags
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent
from jax.experimental.compilation_cache import compilation_cache as jax_cache

log = logging.getLogger("pbe_jax")

CACHE_ENV = "PBE_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "no")
CACHE_MAX_BYTES = 8 * 2**30

# XLA:CPU flags set unless XLA_FLAGS already names them, only on a host whose JAX backend is the
# CPU (XLA_FLAGS also reaches the GPU compiler). None at present: LLVM -O2 instead of XLA's -O3
# for the generated kernels was tried and did not compile the `small` step measurably faster
# (107.3 vs 107.6 s, one contended run each; README "Start-up"); a flag goes here once measured
# faster with parity kept.
CPU_XLA_FLAGS: dict[str, str] = {}

# CPython's cyclic garbage collector while pbe_jax traces models (`tune_python_gc`): the youngest
# generation collected every 50,000 net allocations instead of every 700 (2,000 from 3.13).
PYTHON_GC_THRESHOLD = (50_000, 20, 20)
PYTHON_GC_ENV = "PBE_JAX_PYTHON_GC"  # "default": keep the interpreter's thresholds
_PYTHON_GC_DEFAULTS = {(700, 10, 10), (2000, 10, 10), (2000, 10, 0)}  # CPython 3.11-3.12, 3.13, 3.14

_EVENTS = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_counts = {"cache_hits": 0, "cache_misses": 0, "compiles": 0, "compile_s": 0.0}
_counts_lock = threading.Lock()
_listening = False
_configured: dict | None = None


def define_flags() -> None:
    """The runtime flags every command line accepts."""
    if "compilation_cache" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "compilation_cache", None,
        f"persistent XLA compilation cache: a directory (local or gs://) or 'off'; default "
        f"${CACHE_ENV}, else $JAX_COMPILATION_CACHE_DIR, else {default_cache_root()}")


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pbe_jax", "xla")


def host_cpu_tag() -> str:
    """`<arch>-<hash of the CPU's instruction-set features>`: machine code compiled on one host
    runs on another with the same tag."""
    features = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    features = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        features = platform.processor()
    return f"{platform.machine() or 'unknown'}-{hashlib.sha1(features.encode()).hexdigest()[:10]}"


def resolve_cache_dir(setting: str | None = None) -> str | None:
    """The cache folder this process uses, or None when the cache is off (see the module
    docstring for the precedence). JAX's own `JAX_COMPILATION_CACHE_DIR` is used as given."""
    if setting is None:
        setting = os.environ.get(CACHE_ENV)
    if setting is None:
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return os.environ["JAX_COMPILATION_CACHE_DIR"]
        setting = default_cache_root()
    if setting.strip().lower() in OFF or not setting.strip():
        return None
    root = setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
    return f"{root.rstrip('/')}/{host_cpu_tag()}"


def _jax_owns(setting: str | None) -> bool:
    """True when the folder is JAX's own `JAX_COMPILATION_CACHE_DIR` (no flag, no
    PBE_JAX_COMPILATION_CACHE): other JAX programs may write there without a size limit, so
    pbe_jax keeps JAX's settings for it (`JAX_COMPILATION_CACHE_MAX_SIZE`, unlimited by default)."""
    return (setting is None and os.environ.get(CACHE_ENV) is None
            and bool(os.environ.get("JAX_COMPILATION_CACHE_DIR")))


def stamp_unstamped_entries(cache_dir: str) -> int:
    """Give each entry of a local cache folder that has no last-use stamp (written by a JAX
    process without a size limit) one, dated by its file. With a size limit, JAX reads every
    entry's stamp before each write and, when one is missing, writes nothing more (a warning per
    program): one such entry would silently turn the cache read-only. Returns how many were
    stamped (0 for gs:// folders, which are left as they are)."""
    if "://" in cache_dir or not os.path.isdir(cache_dir):
        return 0
    from jax._src import lru_cache  # the entry / stamp suffixes JAX uses: no public name

    names = set(os.listdir(cache_dir))
    n = 0
    for name in names:
        if not name.endswith(lru_cache._CACHE_SUFFIX):
            continue
        stamp = name[: -len(lru_cache._CACHE_SUFFIX)] + lru_cache._ATIME_SUFFIX
        if stamp in names:
            continue
        try:
            mtime_ns = os.stat(os.path.join(cache_dir, name)).st_mtime_ns
            with open(os.path.join(cache_dir, stamp), "xb") as f:
                f.write(mtime_ns.to_bytes(8, "little"))
            n += 1
        except OSError:  # removed meanwhile, or stamped by another process first
            pass
    return n


def _cpu_only_host() -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is
    installed."""
    platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return not any(importlib.util.find_spec(p) for p in plugins)


def tune_python_gc() -> bool:
    """Let Python's garbage collector run less often while JAX traces; True if applied.

    Tracing and lowering a model allocates millions of short-lived Python objects (tracers, jaxpr
    equations, MLIR operations). With CPython's default thresholds the collector runs every 700
    net allocations and, every tenth time, walks everything that imports and earlier traces left
    alive: 5-8% of a command line's CPU time and of the test suite's in-process tests
    (docs/performance.md "Python's garbage collector"). Objects are still freed by reference
    counting at once; only cycles wait for the (rarer) collection.

    `configure()` applies it, unless `PBE_JAX_PYTHON_GC=default` or the process already set
    thresholds of its own (anything but the interpreter's defaults).
    """
    if os.environ.get(PYTHON_GC_ENV, "").lower() == "default":
        return False
    if gc.get_threshold() not in _PYTHON_GC_DEFAULTS:
        return gc.get_threshold() == PYTHON_GC_THRESHOLD
    gc.set_threshold(*PYTHON_GC_THRESHOLD)
    return True


def apply_default_xla_flags(defaults: dict[str, str]) -> list[str]:
    """Prepend `--name=value` to XLA_FLAGS for each default the user's XLA_FLAGS does not name.
    Returns the flags added. Effective only before the backend starts."""
    current = os.environ.get("XLA_FLAGS", "")
    named = {tok.lstrip("-").split("=", 1)[0] for tok in current.split()}
    added = [f"--{k}={v}" for k, v in defaults.items() if k not in named]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([*added, current]).strip()
    return added


def _listen() -> None:
    """Count compilation-cache hits / misses and backend compiles of this process."""
    global _listening
    if _listening:
        return
    _listening = True

    def on_event(event: str, **kw) -> None:
        if event in _EVENTS:
            with _counts_lock:
                _counts[_EVENTS[event]] += 1

    def on_duration(event: str, duration: float, **kw) -> None:
        if event == _COMPILE_EVENT:
            with _counts_lock:
                _counts["compiles"] += 1
                _counts["compile_s"] += float(duration)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)


def compile_counts() -> dict:
    """{'cache_hits', 'cache_misses', 'compiles' (backend compile requests, cache hits
    included), 'compile_s'} since `configure()`."""
    with _counts_lock:
        return dict(_counts)


def configure(compilation_cache: str | None = None) -> dict:
    """Set up this process (idempotent; a later call with another cache setting switches the
    cache). Returns {'compilation_cache': dir or None, 'xla_flags_added': [...]}."""
    global _configured
    _listen()
    tune_python_gc()
    cache_dir = resolve_cache_dir(compilation_cache)
    if _configured is not None and _configured["compilation_cache"] == cache_dir:
        return dict(_configured)
    added = []
    if CPU_XLA_FLAGS and _configured is None and _cpu_only_host():
        if xla_bridge.backends_are_initialized():
            log.warning("runtime.configure ran after the JAX backend started: default XLA flags "
                        "%s not applied", CPU_XLA_FLAGS)
        else:
            added = apply_default_xla_flags(CPU_XLA_FLAGS)
    if cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and not _jax_owns(compilation_cache)
                and importlib.util.find_spec("filelock") is not None):
            # A size limit makes JAX evict old entries and lock the folder for each read / write.
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
            stamp_unstamped_entries(cache_dir)
    jax_cache.reset_cache()  # pick the new setting up even after an earlier compile
    _configured = {"compilation_cache": cache_dir, "xla_flags_added": added}
    return dict(_configured)


def configure_from_flags() -> dict:
    f = flags.FLAGS
    return configure(f.compilation_cache if "compilation_cache" in f else None)


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class StartupClock:
    """Wall and CPU seconds of the named sections of a start-up. `mark(name)` closes the section
    that ran since the previous mark (or since the clock started). The first section, `first`,
    is everything before the clock existed (interpreter, imports, flags, when the clock starts
    at the top of a command line). A section that asked the compilation cache says how many
    programs it found there ('cache 1 hit') or had to compile ('cache 1 miss')."""

    def __init__(self, first: str | None = "imports"):
        """`first=None`: no section for the time before (the clock starts inside a longer-lived
        process, e.g. a test or a notebook)."""
        self.sections: list[tuple[str, float, float, str]] = []
        if first:
            self.sections.append((first, _process_age(), time.process_time(), ""))
        self._counts0 = compile_counts()
        self._last = (time.perf_counter(), time.process_time(), self._counts0)

    def mark(self, name: str) -> None:
        """Close the section `name`: the time since the previous mark."""
        t, c, n0 = self._last
        n1 = compile_counts()
        self._last = (time.perf_counter(), time.process_time(), n1)
        hits, misses = (n1[k] - n0[k] for k in ("cache_hits", "cache_misses"))
        note = ", ".join(f"{v} {w}" + ("es" if w == "miss" and v > 1 else "s" if v > 1 else "")
                         for v, w in ((hits, "hit"), (misses, "miss")) if v)
        self.sections.append((name, self._last[0] - t, self._last[1] - c,
                              f"cache {note}" if note else ""))

    def total(self) -> tuple[float, float]:
        return sum(s[1] for s in self.sections), sum(s[2] for s in self.sections)

    def as_dict(self) -> dict[str, float]:
        """{'startup/<section>': wall seconds, ..., 'startup/total', 'startup/total_cpu'}."""
        out = {f"startup/{n.replace(' ', '_').replace('+', '_')}": w for n, w, _, _ in self.sections}
        out["startup/total"], out["startup/total_cpu"] = self.total()
        return out

    def line(self) -> str:
        """'start-up 23.1s (CPU 30.2s): imports 4.2s, ..., compile 0.3s (cache 1 hit), ... |
        compilation cache DIR: 12 hits, 0 misses'."""
        wall, cpu = self.total()
        parts = ", ".join(f"{n} {w:.1f}s" + (f" ({note})" if note else "")
                          for n, w, _, note in self.sections)
        c = compile_counts()
        hits = c["cache_hits"] - self._counts0["cache_hits"]
        misses = c["cache_misses"] - self._counts0["cache_misses"]
        cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
        where = f"compilation cache {cache}: {hits} hits, {misses} misses" if cache else "compilation cache off"
        return f"start-up {wall:.1f}s (CPU {cpu:.1f}s): {parts} | {where}"
