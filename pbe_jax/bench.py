r"""Benchmarks: pbe_jax side by side with the PyTorch stack it replaces, in one process.

  python -m pbe_jax.bench --what=all --size=small --json=bench.json
  python -m pbe_jax.bench --what=train --size=sd15 --reps=2          # 512 px, batch 1
  python -m pbe_jax.bench --what=train,sample --size=small --dtype=bf16   # on a GPU / TPU host
  python -m pbe_jax.bench --what=memory --size=sd15                  # AOT only, 8 fake devices
  python -m pbe_jax.bench --what=data                                # data pipeline
  python -m pbe_jax.bench --what=load --size=sd15 --reps=1           # checkpoint load time
  python -m pbe_jax.bench --what=crop --size=small                   # crop around the mask
  python -m pbe_jax.bench --what=gpu --json=gpu.json                 # every accelerator number
  python -m pbe_jax.bench --what=ops --size=small                    # UNet fwd+bwd op by op vs torch
  python -m pbe_jax.bench --what=recovery --json=recovery.json        # kill one of 2 processes: time to recover

`--what` takes a comma-separated list of {train, sample, data, memory, load, crop, gpu, ops, recovery}
or `all` (all but crop, gpu, ops and recovery):
- train: the full PbE training step, pbe_jax vs eager PyTorch (diffusers/transformers modules,
  the official recipe): images/s, step time, FLOPs/step, achieved FLOP/s and MFU
  (pbe_jax/benchmarks/train.py).
- sample: 50-step PLMS, guidance 5, batch 4, pbe_jax vs diffusers' PaintByExamplePipeline on
  identical weights (pbe_jax/benchmarks/sample.py).
- data: samples/s per worker process of the augmentation pipeline at 512 px from JPEGs, and its
  scaling with grain workers (pbe_jax/data/bench.py).
- memory: per-device bytes of the compiled train step, FSDP vs pure data parallel over 8 fake
  devices, remat off/on (pbe_jax/benchmarks/memory.py; runs in a subprocess when needed).
- load: seconds to read every tensor of a diffusers-layout checkpoint through the safetensors
  package, and to load it whole with `PaintByExample.from_pretrained` (pbe_jax/benchmarks/load.py).
- crop: one edit of a `--crop_source` photo (1600x1200) with a small mask, in a window around the
  mask at the model's resolution (`mask_crop_padding`) vs the whole image: time, pixels, XLA
  FLOPs and memory (pbe_jax/benchmarks/crop.py; the whole-image edit is timed when it fits).
- gpu: train and sample for each of `--gpu_sizes` (small,sd15) in bf16 (unless --dtype is
  given) with cuDNN attention on a GPU, against diffusers eager and torch.compile, plus MFU,
  compile times and peak device memory (pbe_jax/benchmarks/gpu.py). Runs on a CPU too.
- recovery: a 2-process demo run under `launch/local.sh --max_restarts=1`, one process SIGKILLed
  after a checkpoint: seconds to detect, relaunch and log the next step; steps trained again
  (pbe_jax/benchmarks/recovery.py).
`--attention_impl` (train, sample, gpu) picks the attention kernel (default: the config's 'xla';
gpu: 'cudnn' on a GPU); `--torch_compile` adds reference rows with `torch.compile` on the UNet.
`--size` is tiny | small | sd15 (pbe_jax/benchmarks/sizes.py). Each benchmark prints a markdown
table of medians (warm-up excluded) with the ratio pbe_jax / reference; `--json OUT` writes
`{name: {"ours", "reference", "ratio", "unit"}}` for every row.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from absl import app, flags

from pbe_jax import cli_flags, runtime
from pbe_jax.benchmarks import crop, gpu, load, memory, ops, recovery, sample, train
from pbe_jax.benchmarks.report import Row, machine_line, markdown_table
from pbe_jax.benchmarks.sizes import get_size
from pbe_jax.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from pbe_jax.data.bench import run

ALL = ("train", "sample", "data", "memory", "load")

_WHAT = flags.DEFINE_string("what", "data", "comma-separated benchmarks (train,sample,data,memory,load,crop,gpu,ops,recovery) or 'all'")
_SIZE = flags.DEFINE_enum("size", "small", ["tiny", "small", "sd15"], "model size")
_DTYPE = flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "compute dtype (params stay fp32)")
_JSON = flags.DEFINE_string("json", "", "write every result row to this JSON file")
flags.DEFINE_alias("json_out", "json")
_REPS = flags.DEFINE_integer("reps", 3, "timed repetitions (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", None, "untimed calls first (default: train 3, sample 1)")
_REFERENCE = flags.DEFINE_bool("reference", True, "also time the PyTorch reference")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = CPU count)")
_ATTENTION = flags.DEFINE_string("attention_impl", None, "attention kernel of our model (xla, cudnn, ...); "
                                 "default: the config's, gpu: cudnn on a GPU")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", None, "also time the reference with torch.compile "
                                   "on its UNet (default: on for gpu, off otherwise)")

# gpu
_GPU_SIZES = flags.DEFINE_list("gpu_sizes", list(gpu.DEFAULT_SIZES), "sizes of --what=gpu")

# sample
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", NUM_INFERENCE_STEPS, "PLMS steps")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 4, "images per call")
_SAMPLE_GUIDANCE = flags.DEFINE_float("sample_guidance", GUIDANCE_SCALE, "classifier-free guidance scale")

# memory
_MEMORY_COMPILE = flags.DEFINE_bool("memory_compile", True,
                                    "AOT-compile each mesh x remat (else state bytes only)")

# crop
_CROP_SOURCE = flags.DEFINE_string("crop_source", "1600x1200", "WxH of the photo to edit")
_CROP_PADDING = flags.DEFINE_integer("crop_padding", 32, "mask_crop_padding in px")
_CROP_FULL = flags.DEFINE_bool("crop_full", True, "also time the whole-image edit (when it fits in RAM)")

# data
_DATA_RES = flags.DEFINE_integer("data_resolution", 512, "source crop side in px")
_DATA_IMAGES = flags.DEFINE_integer("data_images", 64, "640x480 JPEGs written to a temp dir")
_DATA_SAMPLES = flags.DEFINE_integer("data_samples", 96, "samples timed in one process")
_DATA_WORKERS = flags.DEFINE_list("data_workers", ["1", "2"], "grain worker counts to time")
_DATA_BATCH = flags.DEFINE_integer("data_batch", 8, "batch size for the loader and transfer")
_DATA_SECONDS = flags.DEFINE_float("data_seconds", 10.0, "seconds per loader measurement")

# recovery
_RECOVERY_STEPS = flags.DEFINE_integer("recovery_steps", 12, "train.num_steps of the supervised run")
_RECOVERY_CKPT = flags.DEFINE_integer("recovery_ckpt_every", 4, "ckpt_every_steps; the kill comes after the first")
_RECOVERY_HEARTBEAT = flags.DEFINE_integer("recovery_heartbeat_seconds", 10, "config.watchdog.heartbeat_seconds")
_RECOVERY_LAUNCHER = flags.DEFINE_string("recovery_launcher", None,
                                         "launch/local.sh (default: the checkout's, for an editable install)")


runtime.define_flags()


def _size():
    return get_size(_SIZE.value)


def _warmup(default: int) -> int:
    return default if _WARMUP.value is None else _WARMUP.value


def bench_train() -> list:
    return train.run(_size(), dtype=_DTYPE.value, reps=_REPS.value, warmup=_warmup(3),
                     reference=_REFERENCE.value, attention_impl=_ATTENTION.value,
                     torch_compile=bool(_TORCH_COMPILE.value))


def bench_sample() -> list:
    return sample.run(_size(), dtype=_DTYPE.value, reps=_REPS.value, warmup=_warmup(1),
                      steps=_SAMPLE_STEPS.value, guidance=_SAMPLE_GUIDANCE.value,
                      batch=_SAMPLE_BATCH.value, reference=_REFERENCE.value,
                      attention_impl=_ATTENTION.value, torch_compile=bool(_TORCH_COMPILE.value))


def bench_gpu() -> list:
    dtype = _DTYPE.value if flags.FLAGS["dtype"].present else "bf16"
    return gpu.run(_GPU_SIZES.value, dtype=dtype, attention_impl=_ATTENTION.value,
                   reps=_REPS.value, warmup=_warmup(1), steps=_SAMPLE_STEPS.value,
                   guidance=_SAMPLE_GUIDANCE.value, sample_batch=_SAMPLE_BATCH.value,
                   reference=_REFERENCE.value,
                   torch_compile=_TORCH_COMPILE.value is not False)


def bench_memory() -> list:
    return memory.run(_size(), dtype=_DTYPE.value, compile=_MEMORY_COMPILE.value)


def bench_load() -> list:
    return load.run(_size(), reps=_REPS.value, warmup=_warmup(1))


def bench_crop() -> list:
    w, h = (int(v) for v in _CROP_SOURCE.value.lower().split("x"))
    return crop.run(_size(), source=(h, w), padding=_CROP_PADDING.value, steps=_SAMPLE_STEPS.value,
                    guidance=_SAMPLE_GUIDANCE.value, reps=_REPS.value, warmup=_warmup(1),
                    full=_CROP_FULL.value, dtype=_DTYPE.value)


def bench_ops() -> list:
    return ops.run(_size(), reps=_REPS.value, reference=_REFERENCE.value)


def bench_data() -> list:
    r = run(resolution=_DATA_RES.value, num_images=_DATA_IMAGES.value,
            num_samples=_DATA_SAMPLES.value,
            workers=tuple(int(w) for w in _DATA_WORKERS.value),
            batch_size=_DATA_BATCH.value, seconds=_DATA_SECONDS.value)
    name = f"data/{r['resolution']}px"
    rows = [Row(f"{name}/one_process", r["per_process"]["samples_per_s"], None, "samples/s")]
    for row in r["loader"]:
        w = row["workers"]
        rows.append(Row(f"{name}/loader_{w}_workers", row["samples_per_s"], None, "samples/s"))
        rows.append(Row(f"{name}/loader_{w}_workers_per_worker", row["samples_per_s_per_worker"], None,
                        "samples/s/worker"))
    return rows


def bench_recovery() -> list:
    return recovery.run(steps=_RECOVERY_STEPS.value, ckpt_every=_RECOVERY_CKPT.value,
                        heartbeat_seconds=_RECOVERY_HEARTBEAT.value, launcher=_RECOVERY_LAUNCHER.value)


BENCHMARKS: dict[str, Callable[[], list]] = {
    "train": bench_train,
    "sample": bench_sample,
    "data": bench_data,
    "memory": bench_memory,
    "load": bench_load,
    "crop": bench_crop,
    "gpu": bench_gpu,
    "ops": bench_ops,
    "recovery": bench_recovery,
}


def main(argv) -> None:
    del argv
    runtime.configure_from_flags()
    names = [n.strip() for n in _WHAT.value.split(",") if n.strip()]
    if names == ["all"]:
        names = list(ALL)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)} or 'all'")
    if {"train", "sample", "gpu", "ops"} & set(names) and _REFERENCE.value:
        import torch

        torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count() or 1)

    results = {}
    for name in names:
        rows = BENCHMARKS[name]()
        size = {"data": "data", "gpu": ",".join(_GPU_SIZES.value), "recovery": "demo, 2 processes"}.get(name, _SIZE.value)
        dtype = _DTYPE.value if name != "gpu" or flags.FLAGS["dtype"].present else "bf16"
        title = f"{name} ({size}, {dtype}; {machine_line()})"
        print(markdown_table(rows, title), flush=True)
        print(flush=True)
        results.update({r.name: r.as_json() for r in rows})
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    cli_flags.run(main)
