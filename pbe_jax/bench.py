r"""Benchmarks, by name:

  python -m pbe_jax.bench --what=data            # data pipeline (pbe_jax/data/bench.py)
  python -m pbe_jax.bench --what=data --json_out=bench.json

`--what` takes a comma-separated list of names in BENCHMARKS. A benchmark is a function taking
no arguments (it reads its own `--<name>_*` flags) and returning a JSON-serialisable dict.
"""
from __future__ import annotations

import json
from typing import Callable

from absl import app, flags

_WHAT = flags.DEFINE_string("what", "data", "comma-separated benchmarks to run")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write all results to this JSON file")

# data
_DATA_RES = flags.DEFINE_integer("data_resolution", 512, "source crop side in px")
_DATA_IMAGES = flags.DEFINE_integer("data_images", 64, "640x480 JPEGs written to a temp dir")
_DATA_SAMPLES = flags.DEFINE_integer("data_samples", 96, "samples timed in one process")
_DATA_WORKERS = flags.DEFINE_list("data_workers", ["1", "2"], "grain worker counts to time")
_DATA_BATCH = flags.DEFINE_integer("data_batch", 8, "batch size for the loader and transfer")
_DATA_SECONDS = flags.DEFINE_float("data_seconds", 10.0, "seconds per loader measurement")


def bench_data() -> dict:
    from pbe_jax.data.bench import run

    return run(resolution=_DATA_RES.value, num_images=_DATA_IMAGES.value,
               num_samples=_DATA_SAMPLES.value,
               workers=tuple(int(w) for w in _DATA_WORKERS.value),
               batch_size=_DATA_BATCH.value, seconds=_DATA_SECONDS.value)


BENCHMARKS: dict[str, Callable[[], dict]] = {
    "data": bench_data,
}


def main(argv) -> None:
    del argv
    names = [n.strip() for n in _WHAT.value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    results = {name: BENCHMARKS[name]() for name in names}
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
