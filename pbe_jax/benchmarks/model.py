"""Our model for a benchmark size, with its random weights also exported as a diffusers repo
for the PyTorch reference (so both sides run identical weights)."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.benchmarks.sizes import bench_config
from pbe_jax.convert.diffusers_io import save_diffusers
from pbe_jax.training.state import Setup


def build(size, *, dtype: str = "fp32", export_dir: str | None = None, batch: int | None = None,
          attention_impl: str | None = None):
    """(setup, params, frozen, model) on a one-device mesh; `export_dir` gets the weights in
    diffusers format (fp32). Params are host-initialised (`models.init.host_init`): an NNX
    jitted init of the sd15 model would spend minutes in XLA on a CPU."""
    config = bench_config(size, dtype=dtype, batch=batch)
    if attention_impl:  # e.g. 'cudnn' on a GPU; None keeps the config's ('xla')
        config.attention_impl = attention_impl
    mesh = shd.make_mesh("data:1", devices=[jax.devices()[0]])
    setup = Setup(config, mesh)
    params, frozen = setup.random_params()
    model = nnx.merge(setup.graphdef, params, frozen, setup.rest)
    if export_dir:
        save_diffusers(model, export_dir)
    return setup, params, frozen, model


def random_batch(batch: int, resolution: int, reference_size: int, seed: int = 0) -> dict:
    """The uint8 host contract (`pbe_jax.data.batch`): image [B,R,R,3], mask [B,R,R,1] (255 =
    keep, a box of 0 = the hole), reference [B,r,r,3]."""
    rng = np.random.default_rng(seed)
    mask = np.full((batch, resolution, resolution, 1), 255, np.uint8)
    for i in range(batch):
        x0, y0 = rng.integers(0, resolution // 2, 2)
        w, h = rng.integers(resolution // 4, resolution // 2, 2)
        mask[i, y0:y0 + h, x0:x0 + w] = 0
    return {"image": rng.integers(0, 256, (batch, resolution, resolution, 3), np.uint8),
            "mask": mask,
            "reference": rng.integers(0, 256, (batch, reference_size, reference_size, 3), np.uint8)}
