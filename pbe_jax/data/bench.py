"""Data pipeline benchmark: samples/s per worker process at 512 px from COCO-like JPEG files,
with every augmentation, its scaling with grain worker processes, a per-stage profile, and the
cost of moving uint8 vs float32 batches to the device.

  python -m pbe_jax.bench --what=data [--data_resolution=512] [--data_workers=1,2]

The images are synthetic scenes written as 640x480 JPEGs (quality 90, like COCO's) with a COCO
instances JSON into a temp dir, so the path measured is exactly the `coco` source's.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import cv2
import jax
import numpy as np

from pbe_jax.data.batch import normalize_batch
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import PbeSample, make_loader
from pbe_jax.data.sources import make_source
from pbe_jax.data.synthetic import synthetic_scene


def write_coco_fixture(root: str, num_images: int, *, width: int = 640, height: int = 480,
                       quality: int = 90, seed: int = 0) -> tuple[str, str]:
    """`num_images` synthetic scenes as JPEGs + `instances.json` under `root`; returns
    (annotations path, images dir)."""

    images_dir = os.path.join(root, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, boxes = synthetic_scene(i, seed=seed, min_side=min(width, height),
                                     max_side=max(width, height))
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
        name = f"{i:012d}.jpg"
        cv2.imwrite(os.path.join(images_dir, name), img[..., ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for j, (x0, y0, x1, y1) in enumerate(boxes * [width, height, width, height]):
            annotations.append({"id": len(annotations), "image_id": i, "category_id": 1,
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    ann = os.path.join(root, "instances.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "object"}]}, f)
    return ann, images_dir


def per_process_rate(cfg, num_samples: int) -> dict:
    """Samples/s of one process doing the whole per-sample path (read, decode, transforms),
    with the time split by stage."""

    source = make_source(cfg)
    transform = PbeSample(source, cfg)
    for i in range(8):  # warm-up: imports, cv2 thread pool, page cache
        transform.random_map(i % len(source), np.random.default_rng(i))
    transform.stage_seconds = {}
    t0 = time.perf_counter()
    for i in range(num_samples):
        transform.random_map(i % len(source), np.random.default_rng(1000 + i))
    dt = time.perf_counter() - t0
    stages = {k: round(v / num_samples * 1e3, 3) for k, v in transform.stage_seconds.items()}
    return {"samples_per_s": num_samples / dt, "ms_per_sample": dt / num_samples * 1e3,
            "stage_ms": stages}


def loader_rate(cfg, *, num_workers: int, batch_size: int, seconds: float) -> dict:
    """Samples/s out of `make_loader` with `num_workers` processes (after start-up)."""

    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = num_workers
    t_start = time.perf_counter()
    with make_loader(cfg, global_batch_size=batch_size, seed=0) as loader:
        next(loader)
        startup = time.perf_counter() - t_start
        for _ in range(2):
            next(loader)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(loader)
            n += batch_size
        dt = time.perf_counter() - t0
    rate = n / dt
    return {"workers": num_workers, "samples_per_s": rate,
            "samples_per_s_per_worker": rate / max(num_workers, 1), "startup_s": startup}


def host_normalize(batch: dict) -> dict:
    """What a float32 loader would do on the host: batch.normalize_batch in numpy, without
    masked_image (that one is cheap to form on the device either way)."""

    return {
        "image": batch["image"].astype(np.float32) / 127.5 - 1.0,
        "mask": batch["mask"].astype(np.float32) / 255.0,
        "reference": batch["reference"].astype(np.float32) / 255.0,
    }


def transfer_cost(batch_size: int, resolution: int, reference_size: int, reps: int = 10
                  ) -> dict:
    """uint8 batch -> device + `normalize_batch` on device, vs normalising to float32 on the
    host and moving 4x the bytes; median times on jax.devices()[0]."""

    rng = np.random.default_rng(0)
    u8 = {
        "image": rng.integers(0, 256, (batch_size, resolution, resolution, 3), np.uint8),
        "mask": rng.integers(0, 256, (batch_size, resolution, resolution, 1), np.uint8),
        "reference": rng.integers(0, 256, (batch_size, reference_size, reference_size, 3),
                                  np.uint8),
    }
    dev = jax.devices()[0]
    norm = jax.jit(normalize_batch)

    def timed(fn):
        jax.block_until_ready(fn())
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    f32 = host_normalize(u8)
    on_dev = jax.device_put(u8, dev)
    return {"device": str(dev), "batch_size": batch_size,
            "uint8_bytes": sum(v.nbytes for v in u8.values()),
            "float32_bytes": sum(v.nbytes for v in f32.values()),
            "uint8_put_ms": timed(lambda: jax.device_put(u8, dev)),
            "normalize_on_device_ms": timed(lambda: norm(on_dev)),
            "host_normalize_ms": timed(lambda: host_normalize(u8)),
            "float32_put_ms": timed(lambda: jax.device_put(f32, dev))}


def run(*, resolution: int = 512, num_images: int = 64, num_samples: int = 64,
        workers: tuple[int, ...] = (1, 2), batch_size: int = 8, seconds: float = 10.0) -> dict:
    """The whole data benchmark; prints a summary and returns the numbers."""
    cfg = data_config("sd15")
    cfg.resolution = resolution
    with tempfile.TemporaryDirectory() as root:
        cfg.source = "coco"
        cfg.annotations, cfg.images_dir = write_coco_fixture(root, num_images)
        out = {"resolution": resolution, "image_size": "640x480 JPEG q90",
               "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
        out["per_process"] = per_process_rate(cfg, num_samples)
        out["loader"] = [loader_rate(cfg, num_workers=w, batch_size=batch_size,
                                     seconds=seconds) for w in workers]
    out["transfer"] = transfer_cost(batch_size, resolution, cfg.reference_size)
    out["load_avg_end"] = os.getloadavg()[0]
    _print(out)
    return out


def _print(r: dict) -> None:
    p = r["per_process"]
    print(f"data @ {r['resolution']} px from {r['image_size']}, all augmentations "
          f"({r['cpu_count']} CPUs, load avg {r['load_avg_start']:.1f} -> {r['load_avg_end']:.1f})")
    print(f"  one process, whole per-sample path: {p['samples_per_s']:.1f} samples/s "
          f"({p['ms_per_sample']:.2f} ms/sample)")
    for stage, ms in p["stage_ms"].items():
        print(f"    {stage:28s} {ms:7.2f} ms")
    for row in r["loader"]:
        print(f"  grain loader, {row['workers']} worker process(es): {row['samples_per_s']:.1f} "
              f"samples/s ({row['samples_per_s_per_worker']:.1f} per worker; start-up "
              f"{row['startup_s']:.1f} s)")
    t = r["transfer"]
    print(f"  batch of {t['batch_size']} to {t['device']}: uint8 {t['uint8_bytes'] / 2**20:.1f} "
          f"MiB put {t['uint8_put_ms']:.2f} ms + normalize on device "
          f"{t['normalize_on_device_ms']:.2f} ms | float32 {t['float32_bytes'] / 2**20:.1f} MiB: "
          f"normalize on host {t['host_normalize_ms']:.2f} ms + put {t['float32_put_ms']:.2f} ms")
