"""COCOEE evaluation as a library: score a results folder, sample the bench with a model, and
the in-training eval hook (`config.evals`). `python -m pbe_jax.evaluate` is its command line.

Metrics (`pbe_jax.evals.scoring`), each computed only when its weights are given: the region
CLIP score, FID (Inception or CLIP features) and QS; see `pbe_jax.evaluate` for the protocol.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from pbe_jax.batch_edit import check_settings, check_weights, edit_rows, validate, write_results
from pbe_jax.evals.scoring import Item, MetricSpec, score
from pbe_jax.evaluation import cocoee
from pbe_jax.outputs import atomic_write
from pbe_jax.sharding import make_mesh

log = logging.getLogger("pbe_jax")


def markdown(report: dict[str, Any]) -> str:
    """A one-row markdown table (rows of several runs paste together) plus notes."""
    m, proto = report["metrics"], report["protocol"]
    fid_name = f"FID ({proto['fid']['features']})" if "fid" in proto else "FID"
    cell = lambda k: f"{m[k]:.4f}" if k in m else "-"  # noqa: E731
    lines = [f"| results | images | {fid_name} | QS | CLIP score |", "|---|---|---|---|---|",
             f"| {report['results']} | {report['num_images']}/{report['num_bench']} | {cell('fid')} | "
             f"{cell('qs')} | {cell('clip_score')} |", ""]
    lines += [f"- {k} skipped: {why}" for k, why in report["skipped"].items()]
    if report.get("missing"):
        lines.append(f"- {len(report['missing'])} bench ids have no result (first: {report['missing'][:5]})")
    if report.get("failed"):
        lines.append(f"- {len(report['failed'])} rows failed to sample: {dict(list(report['failed'].items())[:5])}")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("metrics.json", json.dumps(report, indent=2)), ("metrics.md", markdown(report))):
        atomic_write(os.path.join(out_dir, name), text)


def score_results(results_dir: str, rows, spec: MetricSpec, *, out_dir: str, sample_index: int = 0,
                  extra: dict | None = None) -> dict[str, Any]:
    """Match `results_dir` to the bench `rows`, score, write OUT/metrics.{json,md}."""
    found = cocoee.match_results(results_dir, [r.id for r in rows], sample_index=sample_index)
    items = [Item(r.id, found[r.id], r.mask, r.reference) for r in rows if r.id in found]
    missing = [r.id for r in rows if r.id not in found]
    if missing:
        log.warning("%d of %d bench ids have no result in %s (e.g. %s)", len(missing), len(rows),
                    results_dir, missing[:3])
    report = {"results": results_dir, "num_images": len(items), "num_bench": len(rows),
              "missing": missing, **(extra or {}), **score(items, spec, cache_dir=out_dir)}
    write_report(out_dir, report)
    return report


def sample_bench(load_pipe: Callable[[], tuple[Any, dict | None]], rows, results_dir: str, *, model: str,
                 steps: int, guidance: float, scheduler: str, seed: int, dtype: str,
                 batch_size: int) -> dict[str, str]:
    """Sample the bench `rows` with the pipeline `load_pipe()` returns (with which weights it
    is: `batch_edit.loaded_weights`, or None) into `results_dir` (`batch_edit.write_results`:
    one sample, no paste-back, squashed reference; finished images are kept); refuses to mix
    settings with earlier results before loading anything, and weights (another training step)
    once loaded. Returns {row id: failure reason}."""
    settings = {"model": model, "steps": steps, "guidance": guidance, "scheduler": scheduler,
                "seed": seed, "dtype": dtype, "num_samples": 1, "paste_back": False,
                "reference_preprocess": "squash"}
    try:
        check_settings(results_dir, settings, remedy="use another --out or delete it")
        pipe, weights = load_pipe()
        if weights is not None:
            check_weights(results_dir, weights)
            settings["weights"] = weights
    except ValueError as e:
        raise SystemExit(str(e)) from None
    mesh = make_mesh("data:-1") if jax.device_count() > 1 else None
    written, failed = write_results(pipe, rows, results_dir, batch_size=batch_size, steps=steps,
                                    guidance=guidance, scheduler=scheduler, num_samples=1, paste_back=False,
                                    reference_preprocess="squash", mesh=mesh, log=log, settings=settings)
    print(f"sampling: {written} images written, {len(rows) - written - len(failed)} already there, "
          f"{len(failed)} failed")
    if jax.process_count() > 1:  # process 0 wrote the files; all processes read them next
        multihost_utils.sync_global_devices("pbe_jax.evaluate: results written")
    return failed


def generate(model, rows, *, steps: int, guidance: float, scheduler: str | None,
             batch_size: int) -> list[np.ndarray]:
    """Sample `rows` (validated `batch_edit.Row`s) with a `PaintByExampleModel` whose params may
    be sharded over a mesh (training) -> uint8 `[H, W, 3]` per row, on every process. Same
    inputs, seeds and quantisation as the batch CLI (one sample, no paste-back, squashed
    reference). `scheduler` None: the model's own."""
    out = dict((row.id, images[0]) for row, images in edit_rows(
        model, rows, batch_size=batch_size, steps=steps, guidance=guidance, scheduler=scheduler))
    return [out[row.id] for row in rows]


def training_eval(model, config, step: int) -> dict[str, float]:
    """COCOEE metrics of `model` (a `PaintByExample`) on the first `config.evals.limit` bench
    triplets, every `config.evals.every_steps` steps (else {}). Returns e.g.
    {'eval/clip_score': ..., 'eval/fid': ..., 'eval/qs': ...} for the metrics whose weights are
    configured. Run by every process (sampling may span hosts); every process gets the dict."""
    ev = config.evals
    if not ev.every_steps or step % ev.every_steps:
        return {}
    if not ev.bench:
        raise ValueError("config.evals.every_steps > 0 but config.evals.bench is empty")
    spec = MetricSpec(clip_model=ev.clip_model, inception=ev.inception, fid_ref=ev.fid_ref,
                      fid_features=ev.fid_features, fid_ref_cache=ev.fid_ref_cache, gmm=ev.gmm,
                      batch_size=ev.batch_size, progress=False)
    rows = []
    for row in cocoee.read_bench(ev.bench, seed=ev.seed, limit=ev.limit):
        reason = validate(row)
        if reason:
            log.warning("eval row %s skipped: %s", row.id, reason)
        else:
            rows.append(row)
    images = generate(model, rows, steps=ev.steps, guidance=ev.guidance, scheduler=ev.scheduler or None,
                      batch_size=ev.batch_size)
    items = [Item(row.id, img, row.mask, row.reference) for row, img in zip(rows, images)]
    report = score(items, spec)  # reference statistics: ev.fid_ref_cache, and memoised per process
    for name, why in report["skipped"].items():
        log.info("eval/%s skipped: %s", name, why)
    return {f"eval/{k}": float(v) for k, v in report["metrics"].items()}
