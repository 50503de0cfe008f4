r"""The accelerator benchmark: every GPU number of the README from one command.

  python -m pbe_jax.bench --what=gpu --json=gpu.json
  # = for size in small, sd15: train and sample, bf16, cuDNN attention, against diffusers
  #   eager and torch.compile; --gpu_sizes / --dtype / --attention_impl / --torch_compile change it

For each size (`--gpu_sizes`, default small,sd15): the train step (images/s, MFU from the
compiled step's FLOPs against the device's bf16 peak in `metrics.PEAK_FLOPS`, compile seconds,
the compiled step's bytes, peak device memory) and sampling (50-step PLMS, guidance 5, batch 4 at
the size's resolution: 512 px for sd15; images/s, compile + first call seconds, peak device
memory), each against the PyTorch reference on the same device with the same weights: eager,
and with `torch.compile` on the UNet. Peak device memory is the allocator's high-water mark
(`jax.Device.memory_stats()['peak_bytes_in_use']`, `torch.cuda.max_memory_allocated`), so a
row holds the largest of the benchmarks run before it in this process; on a CPU it is absent.

Without an accelerator the same code runs on the CPU (the test runs `--gpu_sizes=tiny`).
Budget on one H100/H200-class GPU: the compiles dominate (XLA: the sd15 step and sampler;
torch.compile: the UNet forward+backward and forward); reps default to 3 after 1 warm-up.
"""
from __future__ import annotations

import logging

import jax

from pbe_jax.benchmarks import sample, train
from pbe_jax.benchmarks.report import Row
from pbe_jax.benchmarks.sizes import get_size

log = logging.getLogger("pbe_jax")

DEFAULT_SIZES = ("small", "sd15")


def default_attention_impl() -> str:
    """cuDNN's fused attention on an NVIDIA GPU, XLA's everywhere else."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def run(sizes=DEFAULT_SIZES, *, dtype: str = "bf16", attention_impl: str | None = None,
        reps: int = 3, warmup: int = 1, steps: int = 50, guidance: float = 5.0,
        sample_batch: int | None = None, reference: bool = True,
        torch_compile: bool = True) -> list[Row]:
    """Rows of `train.run` and `sample.run` for each size, in that order."""
    attention_impl = attention_impl or default_attention_impl()
    rows: list[Row] = []
    for name in sizes:
        size = get_size(name)
        log.info("gpu bench: train %s (%s, attention %s)", name, dtype, attention_impl)
        rows += train.run(size, dtype=dtype, reps=reps, warmup=warmup, reference=reference,
                          attention_impl=attention_impl, torch_compile=torch_compile)
        log.info("gpu bench: sample %s", name)
        rows += sample.run(size, dtype=dtype, reps=reps, warmup=warmup, steps=steps,
                           guidance=guidance, batch=sample_batch, reference=reference,
                           attention_impl=attention_impl, torch_compile=torch_compile)
    return rows
