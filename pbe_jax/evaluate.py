r"""COCOEE evaluation: `python -m pbe_jax.evaluate` (the library is `pbe_jax.evaluation.benchmark`).

  # sample the benchmark with a model, then score (rerun resumes: finished images are kept)
  python -m pbe_jax.evaluate --bench=test_bench --model=Fantasy-Studio/Paint-by-Example \
      --out=eval/pbe --steps=50 --guidance=5 --scheduler=plms --batch_size=8 \
      --clip_model=openai/clip-vit-base-patch32 --inception=pt_inception-2015-12-05.pth \
      --fid_ref=coco/test2017 --gmm=coco2017_gmm_k20.npz

  # score results made elsewhere (e.g. the official PyTorch scripts), side by side with ours
  python -m pbe_jax.evaluate --results=official/results --bench=test_bench --out=eval/official ...

`--bench` is a COCOEE folder (`pbe_jax.evaluation.cocoee`) or a .jsonl/.csv manifest. Results go to
`OUT/results/<id>_0.png` (`pbe_jax.batch_edit.write_results`); scores to `OUT/metrics.json` (values, per-image
CLIP scores, what was skipped and why, the protocol) and `OUT/metrics.md` (a table). Result
files accepted by `--results`: `<id>.png`, `<id>_<k>.png` (k = `--sample_index`) and
`<id>_GT.png` / `_result` / `_output` / `_out` / `_pred` / `_sample` (any image extension);
numeric ids match with or without zero padding. Without `--out`, `--results` mode writes into
the results folder.

Metrics (`pbe_jax.evals.scoring`), each computed only when its weights are given:
- CLIP score (`--clip_model`: transformers CLIP ViT-B/32 dir or hub id): the paper's region
  CLIP score (`pbe_jax.evals.clip_score`).
- FID (`--fid_ref` + the feature net): results vs the reference set. `--fid_features=inception`
  (default) is standard FID (pool3 of `--inception`, pytorch-fid preprocessing);
  `--fid_features=clip` reproduces the authors' released script, which (despite its name)
  uses CLIP ViT-B/32 image embeddings (`pbe_jax.evals.fid`). `--fid_ref` is a folder of images
  (COCO test2017 raw or prepared: every image goes through the paper's Resize(512) +
  CenterCrop(512), idempotent on prepared images) or a `.npz` of statistics; folder statistics
  are cached to `--fid_ref_cache` (default `OUT/fid_ref_<features>_<hash>.npz`).
- QS (`--gmm`: `.npz`, see `pbe_jax.evals.qs`): on the features whose dimension matches the
  mixture: 2048 -> Inception pool3, otherwise CLIP embeddings (the paper's 512-d GMM).

Multi-process: sampling uses a mesh over all devices (process 0 writes the files, which the
other processes then read: OUT must be on a shared file system); each process extracts
features for its share of the images on its local devices, and the features are all-gathered.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
from absl import flags

from pbe_jax import cli_flags, distributed, locks
from pbe_jax.batch_edit import loaded_weights
from pbe_jax.evals.scoring import FID_FEATURES, MetricSpec
from pbe_jax.evaluation import cocoee
from pbe_jax.evaluation.benchmark import markdown, sample_bench, score_results
from pbe_jax.metrics import setup_logging
from pbe_jax.models.hub import cast_dtype
from pbe_jax.outputs import NotWritableError, ensure_writable
from pbe_jax.pipeline import PaintByExample


def _spec_from_flags(F) -> MetricSpec:
    return MetricSpec(clip_model=F.clip_model or "", inception=F.inception or "", fid_ref=F.fid_ref or "",
                      fid_features=F.fid_features, fid_ref_cache=F.fid_ref_cache or "", gmm=F.gmm or "",
                      batch_size=F.batch_size)


def main(argv) -> int:
    del argv
    F = flags.FLAGS
    distributed.initialize_from_flags()
    setup_logging()
    if not F.bench:
        raise SystemExit("--bench is required (a COCOEE folder or a .jsonl/.csv manifest)")
    if bool(F.model) == bool(F.results):
        raise SystemExit("give --model (sample, then score) or --results (score existing results), not both")
    if F.model and not F.out:
        raise SystemExit("--model needs --out")
    try:
        spec = _spec_from_flags(F)
        rows = cocoee.read_bench(F.bench, seed=F.seed, limit=F.limit)
        if F.out or os.path.isdir(F.results or ""):  # where the scores go, before any compute
            ensure_writable(F.out or F.results, "--out" if F.out else "--results")
    except (FileNotFoundError, ValueError, NotWritableError) as e:
        raise SystemExit(str(e)) from None
    out_dir = F.out or (F.results if os.path.isdir(F.results or "") else None)
    # One run writes an output folder at a time (process 0 holds its lock).
    lock = locks.hold(out_dir, "--out" if F.out else "--results", reclaim=F.reclaim_lock,
                      enabled=out_dir is not None and jax.process_index() == 0)
    try:
        with lock:
            return _sample_and_score(F, rows, spec)
    except locks.LockedError as e:
        raise SystemExit(f"error: {e}") from None


def _load(F):
    pipe, report = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype), use_ema=F.use_ema,
                                                  variant=F.variant, revision=F.revision,
                                                  return_report=True)
    pipe = pipe.with_lora(F.lora, F.lora_scale, F.use_ema)  # --lora (none: the same pipe)
    return pipe, loaded_weights(report, use_ema=F.use_ema)


def _sample_and_score(F, rows, spec) -> int:
    failed: dict[str, str] = {}
    extra: dict[str, Any] = {"bench": F.bench}
    if F.model:
        results_dir = os.path.join(F.out, "results")
        # which weights of --model: part of the settings a resumed run must share
        chosen = {k: v for k, v in (("use_ema", F.use_ema), ("variant", F.variant), ("revision", F.revision),
                                    ("lora", F.lora), ("lora_scale", F.lora and F.lora_scale)) if v}
        model_id = F.model + (f" {json.dumps(chosen, sort_keys=True)}" if chosen else "")
        failed = sample_bench(lambda: _load(F), rows, results_dir, model=model_id, steps=F.steps,
                              guidance=F.guidance, scheduler=F.scheduler, seed=F.seed, dtype=F.dtype,
                              batch_size=F.batch_size)
        extra.update(model=model_id, failed=failed, sampling={"steps": F.steps, "guidance": F.guidance,
                                                            "scheduler": F.scheduler, "seed": F.seed})
        sample_index = 0
    else:
        results_dir, sample_index = F.results, F.sample_index
        if not os.path.isdir(results_dir):
            raise SystemExit(f"--results {results_dir}: not a directory")
    out_dir = F.out or results_dir
    report = score_results(results_dir, rows, spec, out_dir=out_dir, sample_index=sample_index, extra=extra)
    if jax.process_index() == 0:
        print(markdown(report), end="")
        print(f"wrote {os.path.join(out_dir, 'metrics.json')} and metrics.md")
    return 1 if failed or report["missing"] else 0


def define_flags() -> None:
    cli_flags.define_model_flags()
    flags.DEFINE_string("bench", None, "COCOEE test_bench folder or a .jsonl/.csv manifest")
    flags.DEFINE_string("results", None, "score existing results in this folder instead of sampling")
    flags.DEFINE_string("out", None, "output folder (results/, metrics.json, metrics.md)")
    flags.DEFINE_integer("limit", 0, "only the first N bench triplets (0 = all)")
    flags.DEFINE_integer("batch_size", 8, "images per batch, for sampling and feature extraction")
    flags.DEFINE_string("lora", None, "a LoRA on --model: a pbe_jax LoRA run or a diffusers/PEFT .safetensors")
    flags.DEFINE_float("lora_scale", 1.0, "--lora: its adapters' output times this")
    flags.DEFINE_integer("sample_index", 0, "--results: which <id>_<k> sample to score")
    flags.DEFINE_string("clip_model", None, "CLIP ViT-B/32 (transformers dir or hub id): CLIP score, CLIP FID/QS")
    flags.DEFINE_string("inception", None, "FID Inception weights (pt_inception .pth / .safetensors)")
    flags.DEFINE_string("fid_ref", None, "FID reference: image folder (COCO test2017) or statistics .npz")
    flags.DEFINE_string("fid_ref_cache", None, "where to cache the reference statistics (.npz)")
    flags.DEFINE_enum("fid_features", "inception", list(FID_FEATURES),
                      "inception = standard FID; clip = the authors' released FID script")
    flags.DEFINE_string("gmm", None, "QS Gaussian mixture .npz (pbe_jax.evals.qs)")
    flags.DEFINE_bool("reclaim_lock", False, "take over the output folder's lock from a run that is gone "
                      "(e.g. on a host that died); a live holder on this host is never displaced")
    distributed.define_flags()


if __name__ == "__main__":
    define_flags()
    cli_flags.run(lambda argv: sys.exit(main(argv)))
