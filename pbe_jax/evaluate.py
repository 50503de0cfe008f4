r"""COCOEE evaluation: `python -m pbe_jax.evaluate`, and the in-training eval hook.

  # sample the benchmark with a model, then score (rerun resumes: finished images are kept)
  python -m pbe_jax.evaluate --bench=test_bench --model=Fantasy-Studio/Paint-by-Example \
      --out=eval/pbe --steps=50 --guidance=5 --scheduler=plms --batch_size=8 \
      --clip_model=openai/clip-vit-base-patch32 --inception=pt_inception-2015-12-05.pth \
      --fid_ref=coco/test2017 --gmm=coco2017_gmm_k20.npz

  # score results made elsewhere (e.g. the official PyTorch scripts), side by side with ours
  python -m pbe_jax.evaluate --results=official/results --bench=test_bench --out=eval/official ...

`--bench` is a COCOEE folder (`pbe_jax.evals.cocoee`) or a .jsonl/.csv manifest. Results go to
`OUT/results/<id>_0.png` (`pbe_jax.sample.run`); scores to `OUT/metrics.json` (values, per-image
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

import functools
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np

from pbe_jax.evals import cocoee
from pbe_jax.evals.scoring import FID_FEATURES, Item, MetricSpec, plan, score  # noqa: F401 (API)

log = logging.getLogger("pbe_jax")


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


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
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _spec_from_flags(F) -> MetricSpec:
    return MetricSpec(clip_model=F.clip_model or "", inception=F.inception or "", fid_ref=F.fid_ref or "",
                      fid_features=F.fid_features, fid_ref_cache=F.fid_ref_cache or "", gmm=F.gmm or "",
                      batch_size=F.batch_size)


def _generate_results(F, rows, results_dir: str) -> dict[str, str]:
    """`pbe_jax.sample.run` into `results_dir`; refuses to mix settings with earlier results."""
    from pbe_jax import sample  # noqa: PLC0415
    from pbe_jax.models.hub import cast_dtype  # noqa: PLC0415
    from pbe_jax.pipeline import PaintByExample  # noqa: PLC0415

    settings = {"model": F.model, "steps": F.steps, "guidance": F.guidance, "scheduler": F.scheduler,
                "seed": F.seed, "dtype": F.dtype, "num_samples": 1, "paste_back": False,
                "reference_preprocess": "squash"}
    path = os.path.join(results_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{results_dir} holds results made with other settings {diff} (old, new); "
                             "use another --out or delete it")
    pipe = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype))
    mesh = None
    if jax.device_count() > 1:
        from pbe_jax.sharding import make_mesh  # noqa: PLC0415

        mesh = make_mesh("data:-1")
    if jax.process_index() == 0:
        os.makedirs(results_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)
    written, failed = sample.run(pipe, rows, results_dir, batch_size=F.batch_size, steps=F.steps,
                                 guidance=F.guidance, scheduler=F.scheduler, num_samples=1, paste_back=False,
                                 reference_preprocess="squash", mesh=mesh)
    print(f"sampling: {written} images written, {len(rows) - written - len(failed)} already there, "
          f"{len(failed)} failed")
    if jax.process_count() > 1:  # process 0 wrote the files; all processes read them next
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("pbe_jax.evaluate: results written")
    return failed


def main(argv) -> int:
    from absl import flags  # noqa: PLC0415

    from pbe_jax import distributed  # noqa: PLC0415
    from pbe_jax.train import setup_logging  # noqa: PLC0415

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
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    failed: dict[str, str] = {}
    extra: dict[str, Any] = {"bench": F.bench}
    if F.model:
        results_dir = os.path.join(F.out, "results")
        failed = _generate_results(F, rows, results_dir)
        extra.update(model=F.model, failed=failed, sampling={"steps": F.steps, "guidance": F.guidance,
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
    from absl import flags  # noqa: PLC0415

    from pbe_jax import distributed  # noqa: PLC0415

    flags.DEFINE_string("bench", None, "COCOEE test_bench folder or a .jsonl/.csv manifest")
    flags.DEFINE_string("model", None, "sample with this model (diffusers dir / hub id / pbe_jax workdir)")
    flags.DEFINE_string("results", None, "score existing results in this folder instead of sampling")
    flags.DEFINE_string("out", None, "output folder (results/, metrics.json, metrics.md)")
    flags.DEFINE_integer("limit", 0, "only the first N bench triplets (0 = all)")
    flags.DEFINE_integer("steps", 50, "denoising steps")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale (the paper's benchmark: 5)")
    flags.DEFINE_enum("scheduler", "plms", ["plms", "pndm", "ddim", "dpm++2m", "euler"], "sampler")
    flags.DEFINE_integer("seed", 0, "base seed (row i uses seed + 1000 i)")
    flags.DEFINE_integer("batch_size", 8, "images per batch, for sampling and feature extraction")
    flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "sampling compute dtype")
    flags.DEFINE_integer("sample_index", 0, "--results: which <id>_<k> sample to score")
    flags.DEFINE_string("clip_model", None, "CLIP ViT-B/32 (transformers dir or hub id): CLIP score, CLIP FID/QS")
    flags.DEFINE_string("inception", None, "FID Inception weights (pt_inception .pth / .safetensors)")
    flags.DEFINE_string("fid_ref", None, "FID reference: image folder (COCO test2017) or statistics .npz")
    flags.DEFINE_string("fid_ref_cache", None, "where to cache the reference statistics (.npz)")
    flags.DEFINE_enum("fid_features", "inception", list(FID_FEATURES),
                      "inception = standard FID; clip = the authors' released FID script")
    flags.DEFINE_string("gmm", None, "QS Gaussian mixture .npz (pbe_jax.evals.qs)")
    distributed.define_flags()


# ---------------------------------------------------------------------------------------------
# In-training evals
# ---------------------------------------------------------------------------------------------


def evals_config():
    """The default `config.evals` block (off: every_steps 0)."""
    import ml_collections  # noqa: PLC0415

    return ml_collections.ConfigDict({
        "every_steps": 0,  # 0 = off
        "bench": "",  # COCOEE folder or manifest
        "limit": 16,  # first N triplets
        "steps": 50, "guidance": 5.0, "scheduler": "plms", "seed": 0,
        "batch_size": 8,
        "clip_model": "", "inception": "", "fid_ref": "", "fid_features": "inception",
        "fid_ref_cache": "", "gmm": "",
    })


@functools.lru_cache(maxsize=8)
def _jitted_edit(graphdef, sched, cfg: bool, mesh):
    from pbe_jax import sharding as shd  # noqa: PLC0415
    from pbe_jax.inference import _edit_core  # noqa: PLC0415

    batch = shd.batch_sharding(mesh, 4) if mesh is not None else None

    def f(state, image, keep, ref, seeds, guidance):
        return _edit_core(graphdef, state, image, keep, ref, seeds, None, guidance, scheduler=sched, cfg=cfg,
                          masked_latents="sample", batch_sharding=batch)

    # Replicated output: every process can read the images, also when the model spans hosts.
    return jax.jit(f, out_shardings=shd.replicated(mesh) if mesh is not None else None)


def generate(model, rows, *, steps: int, guidance: float, scheduler: str, batch_size: int) -> list[np.ndarray]:
    """Sample `rows` (validated `pbe_jax.sample.Row`s) with a `PaintByExample` whose params may
    be sharded over a mesh -> uint8 `[H, W, 3]` per row, on every process. Same inputs, seeds
    and quantisation as `pbe_jax.sample.run` (one sample, no paste-back, squashed reference)."""
    from flax import nnx  # noqa: PLC0415

    from pbe_jax import sharding as shd  # noqa: PLC0415
    from pbe_jax.inference import pad_to_multiple, reference_pixels, resolve_scheduler, size_multiple  # noqa: PLC0415

    graphdef, state = nnx.split(model)
    sh = getattr(jax.tree.leaves(state)[0], "sharding", None)
    mesh = sh.mesh if isinstance(sh, jax.sharding.NamedSharding) else None
    core = _jitted_edit(graphdef, resolve_scheduler(model, scheduler, steps), float(guidance) != 1.0, mesh)
    k, r = size_multiple(model), model.image_encoder.config.vision.image_size
    out: dict[str, np.ndarray] = {}
    by_size: dict[tuple, list] = {}
    for row in rows:
        by_size.setdefault(row.image.shape[:2], []).append(row)
    for (h, w), group in by_size.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            padded = [pad_to_multiple(row.image, row.edit, k) for row in chunk]
            arrays = [np.stack([p[0] for p in padded]).astype(np.float32) / 127.5 - 1.0,
                      np.stack([(~p[1]).astype(np.float32)[..., None] for p in padded]),
                      np.stack([reference_pixels(row.ref, r, "squash") for row in chunk]),
                      np.asarray([row.seed for row in chunk], np.uint32)]
            n = len(chunk)
            if mesh is not None:  # pad to the batch shards, place batch-sharded
                pad = -n % shd.batch_axis_size(mesh)
                arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]
                arrays = [jax.device_put(a, shd.batch_sharding(mesh, a.ndim)) for a in arrays]
            images = core(state, *arrays, np.float32(guidance))
            images = np.asarray(images.addressable_data(0) if mesh is not None else images)[:n, :h, :w]
            for row, img in zip(chunk, images):
                out[row.id] = np.round(img * 255).astype(np.uint8)  # as edit()'s PIL output
    return [out[row.id] for row in rows]


def training_eval(model, config, step: int) -> dict[str, float]:
    """COCOEE metrics of `model` (a `PaintByExample`) on the first `config.evals.limit` bench
    triplets, every `config.evals.every_steps` steps (else {}). Returns e.g.
    {'eval/clip_score': ..., 'eval/fid': ..., 'eval/qs': ...} for the metrics whose weights are
    configured. Run by every process (sampling may span hosts); every process gets the dict."""
    from pbe_jax.sample import validate  # noqa: PLC0415

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
    images = generate(model, rows, steps=ev.steps, guidance=ev.guidance, scheduler=ev.scheduler,
                      batch_size=ev.batch_size)
    items = [Item(row.id, img, row.mask, row.reference) for row, img in zip(rows, images)]
    report = score(items, spec)  # reference statistics: ev.fid_ref_cache, and memoised per process
    for name, why in report["skipped"].items():
        log.info("eval/%s skipped: %s", name, why)
    return {f"eval/{k}": float(v) for k, v in report["metrics"].items()}


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
