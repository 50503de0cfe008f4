"""Run logging: console progress lines, `WORKDIR/metrics.jsonl`, TensorBoard event files.

Only process 0 writes. Images go to TensorBoard and as PNGs under `WORKDIR/images/`.

`metrics.jsonl` stays a clean history through kills and resumes: each row is one write of a
whole line, flushed; a line cut short (a kill or a full disk mid-write) is removed when the file
is next opened, never appended to; a resumed run drops the rows past the step it restored
(`MetricWriter.keep_until`), so the file holds exactly one row per logged step.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging as absl_logging
from etils import epath

from pbe_jax.outputs import atomic_write, write_png

log = logging.getLogger("pbe_jax")

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device, for MFU when `config.peak_flops` is 0.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "L4": 121e12, "A10": 125e12,
}


def peak_flops_per_device(configured: float = 0.0) -> float:
    """Configured value, else a table lookup by device kind, else a measured fp32 matmul peak."""
    if configured:
        return float(configured)
    kind = jax.devices()[0].device_kind
    for name, val in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return val
    return measure_matmul_peak()


def measure_matmul_peak(n: int = 1024, reps: int = 10) -> float:
    """Achieved FLOP/s of a square fp32 matmul on the first device (a CPU-side 'peak')."""

    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# Python packages a gs:// workdir needs (module, distribution): etils.epath writes metrics.jsonl,
# config and images through gcsfs, tensorboardX its events through google-cloud-storage.
GCS_PACKAGES = (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage"))


def check_workdir_backend(workdir: str) -> None:
    """Fail at start, naming the `gcs` extra, when a gs:// workdir lacks its packages (else the
    run would fail at the first write, or TensorBoard would silently be off)."""
    if not str(workdir).startswith("gs://"):
        return
    missing = []
    for module, dist in GCS_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise ImportError(f"workdir {workdir}: writing to gs:// needs {' and '.join(missing)}: "
                          "pip install 'pbe_jax[gcs]'")


def _summary_writer_class():
    """tensorboardX's SummaryWriter. Its module imports torch when torch is installed (1.3 s of
    start-up on 2 cores) only to accept torch tensors, which pbe_jax never passes: unless torch
    is already loaded, it is imported with torch hidden."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tb = None
        if self.enabled:
            check_workdir_backend(workdir)
            # epath: local paths and gs:// (or any fsspec/tf.io) workdirs alike
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._path = epath.Path(workdir) / METRICS_FILE
            _drop_cut_line(self._path)
            self._jsonl = self._path.open("ab")
            try:
                self._tb = _summary_writer_class()(os.path.join(workdir, "tb"))
            except ImportError:
                log.warning("tensorboardX not installed: no TensorBoard events (metrics.jsonl still written)")

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write((json.dumps(row) + "\n").encode())  # one write of the whole line
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)

    def tensorboard_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Values for TensorBoard only (not a metrics.jsonl row, e.g. a run's goodput)."""
        if self.enabled and self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)

    def keep_until(self, step: int) -> int:
        """Drop the rows logged after `step` (a run resumed at `step` logs them again; 0 for a
        fresh start). Returns how many were dropped."""
        if not self.enabled:
            return 0
        self._jsonl.close()
        rows = _rows(self._path)
        keep = [line for line, row in rows if row.get("step", 0) <= step]
        if len(keep) < len(rows):
            atomic_write(self._path, b"".join(keep))
            log.info("%s: dropped %d rows past step %d (the run resumes there)", self._path,
                     len(rows) - len(keep), step)
        self._jsonl = self._path.open("ab")
        return len(rows) - len(keep)

    def image(self, step: int, name: str, img: np.ndarray) -> str | None:
        """img: [H, W, 3] uint8 or float in [0, 1]. Also saved as WORKDIR/images/<name>_<step>.png."""
        if not self.enabled:
            return None

        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        d = epath.Path(self.workdir) / "images"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}_{step:07d}.png"
        write_png(path, img)
        if self._tb is not None:
            self._tb.add_image(name, img, step, dataformats="HWC")
        return str(path)

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _drop_cut_line(path: epath.Path) -> None:
    """Cut an unterminated last line (a write stopped by a kill or a full disk) off `path`."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        whole = data[:data.rfind(b"\n") + 1]
        log.warning("%s: removing a cut last line (%d bytes) left by an interrupted write",
                    path, len(data) - len(whole))
        atomic_write(path, whole)


def _rows(path: epath.Path) -> list[tuple[bytes, dict]]:
    """(line, parsed row) of each whole JSON line of `path`; other lines are left out."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith(b"\n") and isinstance(row, dict):
            out.append((line, row))
    return out


def last_logged_step(workdir: str) -> int:
    """The highest step in `WORKDIR/metrics.jsonl` (0 when there is none)."""
    return max((int(r.get("step", 0)) for _, r in _rows(epath.Path(workdir) / METRICS_FILE)),
               default=0)


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows: list of [N, H, W, 3] arrays in [0, 1] (same N, H, W) -> one [R*H, N*W, 3] image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def readable(img: np.ndarray, min_side: int = 512) -> np.ndarray:
    """[H, W, C] -> the same image repeated k x k (nearest neighbour, whole pixels kept) with the
    smallest k making its shorter side at least `min_side`: a 128 x 96 grid of 32 px crops
    becomes 768 x 576, large enough to see in an image viewer."""
    k = max(1, -(-int(min_side) // min(img.shape[:2])))
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1) if k > 1 else img


def setup_logging() -> None:
    """pbe_jax INFO lines on the console; orbax/absl chatter only from WARNING up."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
