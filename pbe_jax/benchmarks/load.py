"""Checkpoint load time: a diffusers-layout folder of a benchmark size (fp32 weights, zeros of
the right shapes, written once to a temp dir: the values do not change the time) read with
`safetensors_io.open_safetensors` tensor by tensor, and loaded whole with
`PaintByExample.from_pretrained` (read, layout change, placement on the default device).

The page cache is warmed first, so the numbers are the library's cost, not the disk's.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from pbe_jax.benchmarks.report import Row, median_seconds
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.diffusers_io import SCHEDULER_FILE
from pbe_jax.convert.torch_layout import param_leaves, path_to_torch_key, to_torch_layout
from pbe_jax.models.registry import COMPONENTS, slot_class
from pbe_jax.pipeline import PaintByExample
from pbe_jax.schedulers import pbe_scheduler_config


def write_zero_checkpoint(models: dict, path: str) -> list[str]:
    """A diffusers folder for the `config.model`-shaped `models`, every weight zero (the writer
    hands the package pointers to calloc'd zeros: no host copy of the model is made).
    Returns the weight files."""
    files = []
    for comp in COMPONENTS:
        cls = slot_class(comp, models[comp])
        config = cls.config_class.from_dict(dict(models[comp]))
        leaves = param_leaves(cls.from_config(config, abstract=True))
        shapes = {path_to_torch_key(p): to_torch_layout(str(p[-1]), np.broadcast_to(
            np.zeros((), np.float32), v.get_value().shape)).shape for p, v in leaves.items()}
        d = os.path.join(path, comp)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        files.append(os.path.join(d, cls.WEIGHTS_NAMES[0] + ".safetensors"))
        stio.write_safetensors(files[-1], {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, SCHEDULER_FILE), "w") as f:
        json.dump(pbe_scheduler_config(), f)
    return files


def _read_all(files: list[str]) -> int:
    """Every tensor read once to a host array and dropped; returns the bytes read."""
    n = 0
    for f in files:
        for t in stio.open_safetensors(f).values():
            n += np.asarray(t).nbytes
    return n


def run(size, *, reps: int = 3, warmup: int = 1) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix=f"pbe_load_{size.name}_") as d:
        files = write_zero_checkpoint(size.models, d)
        nbytes = _read_all(files)  # also warms the page cache
        read_s, _ = median_seconds(lambda: _read_all(files), reps=reps, warmup=0)

        def load():
            jax.block_until_ready(nnx.state(PaintByExample.from_pretrained(d)))

        cpu0 = time.process_time()
        load_s, _ = median_seconds(load, reps=reps, warmup=warmup)
        cpu_s = (time.process_time() - cpu0) / (reps + warmup)
    name = f"load/{size.name}"
    return [Row(f"{name}/checkpoint_mib", nbytes / 2**20, None, "MiB"),
            Row(f"{name}/read_tensors_s", read_s, None, "s"),
            Row(f"{name}/read_gib_per_s", nbytes / 2**30 / read_s, None, "GiB/s"),
            Row(f"{name}/from_pretrained_s", load_s, None, "s"),
            Row(f"{name}/from_pretrained_cpu_s", cpu_s, None, "s")]
