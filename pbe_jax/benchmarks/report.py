"""Benchmark result rows, their markdown table and the `--json` file, plus the timing helper.

Every row is `{name: {"ours": x, "reference": y or None, "ratio": x / y or None, "unit": u}}`
so results can be compared across commits by name.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import jax


@dataclass(frozen=True)
class Row:
    name: str  # e.g. 'train/small/images_per_s'
    ours: float
    reference: float | None
    unit: str

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0) or self.ours is None:
            return None
        return self.ours / self.reference

    def as_json(self) -> dict:
        return {"ours": self.ours, "reference": self.reference, "ratio": self.ratio, "unit": self.unit}


def median_seconds(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `reps` calls after `warmup` untimed calls. `fn` must
    block until its work is done (block_until_ready / a host value)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def device_peak_bytes() -> float | None:
    """The first JAX device's allocator high-water mark in bytes (None on a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def torch_peak_bytes(device: str, reset: bool = False) -> float | None:
    """torch's CUDA high-water mark in bytes (None off CUDA); `reset` starts a new one."""
    import torch

    if device != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return float(torch.cuda.max_memory_allocated())


def compiled_bytes(compiled) -> float | None:
    """Device bytes of a compiled program: arguments + outputs + temporaries - donated aliases."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def format_number(x: float | None) -> str:
    """A measured number as the tables print it ('-' when missing)."""
    if x is None:
        return "-"
    a = abs(x)
    if a != 0 and (a >= 1e5 or a < 1e-2):
        return f"{x:.3g}"
    return f"{x:.3f}" if a < 10 else f"{x:.1f}"


def markdown_table(rows: list[Row], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| benchmark | pbe_jax | reference | pbe_jax / reference | unit |",
              "|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {format_number(r.ours)} | {format_number(r.reference)} | {ratio} | {r.unit} |")
    return "\n".join(lines)


def machine_line() -> str:
    """CPU count and load average, to print next to CPU timings (they are noisy when shared)."""

    dev = jax.devices()[0]
    load = os.getloadavg()
    return (f"{dev.platform} / {dev.device_kind}, {os.cpu_count()} CPUs, "
            f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
