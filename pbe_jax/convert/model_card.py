"""The model card (`README.md`) written with every exported folder, as huggingface_hub's
`ModelCard`: YAML metadata the Hub reads (base model, pipeline tag, library, tags, evaluation
results as `model-index`) and a body with a summary of the training config, the evaluation
metrics, the architecture, and how to load the folder in pbe_jax and in diffusers.

What a card says comes from `CardInfo`, which `card_info(fmt, path)` fills from the checkpoint
that was converted: for a pbe_jax training run, its saved config, its step, and the evaluation
metrics found in the workdir (the newest `eval/*` row of `metrics.jsonl`, or the `metrics.json`
that `python -m pbe_jax.evaluate --out` writes, in the workdir or one folder below it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Mapping

import huggingface_hub
from etils import epath

from pbe_jax import checkpoint as ckpt
from pbe_jax.convert import orbax_io
from pbe_jax.metrics import METRICS_FILE
from pbe_jax.models.hub import is_hub_id, num_params
from pbe_jax.models.registry import COMPONENTS

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
PIPELINE_TAG = "image-to-image"
TAGS = ("paint-by-example", "image-editing", "exemplar-based-image-editing", "inpainting", "jax", "flax",
        "pbe_jax")
# The fields of a training config that the card's summary table shows (dotted paths).
SUMMARY_FIELDS = ("seed", "dtype", "mesh", "init_from.format", "init_from.path", "train.num_steps",
                  "train.batch_size", "train.lr", "train.warmup_steps", "train.grad_accum",
                  "train.ema_decay", "train.cond_drop_prob", "data.source", "data.resolution",
                  "data.reference_size")
# Metric names as pbe_jax reports them -> how the card (and the Hub's model-index) names them.
METRIC_NAMES = {"fid": "FID", "qs": "QS", "clip_score": "CLIP score"}
COCOEE_METRICS = ("fid", "qs", "clip_score")  # `config.evals` / `pbe_jax.evaluate`; the rest
# (exemplar_following, vae_psnr, ...) score held-out synthetic 'palette' scenes (evals/exemplar.py)
SYNTHETIC_DATASET = ("pbe-jax-synthetic-palette", "pbe_jax synthetic palette scenes (held out)")


def metric_dataset(metric: str) -> tuple[str, str]:
    """(dataset_type, dataset_name) a training/eval metric was measured on, for the card."""
    return ("cocoee", "COCOEE") if metric in COCOEE_METRICS else SYNTHETIC_DATASET


@dataclasses.dataclass
class CardInfo:
    """What the card says about where the weights come from. All fields optional."""

    source: str | None = None  # the converted checkpoint (path or Hub id)
    source_format: str | None = None  # diffusers | ldm | sd-init | orbax
    base_model: str | None = None  # a Hub repo id the weights were trained / converted from
    train_config: dict | None = None  # the run's config (a pbe_jax training checkpoint)
    step: int | None = None
    use_ema: bool = False
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics_source: str | None = None


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def read_metrics(workdir: str) -> tuple[dict[str, float], str | None]:
    """({metric: value}, file) of the newest evaluation found in `workdir`: the last
    `metrics.jsonl` row with `eval/*` values (training's `config.evals`), else a `metrics.json`
    of `python -m pbe_jax.evaluate` in the workdir or one level below; ({}, None) if none."""
    root = epath.Path(workdir)
    jsonl = root / METRICS_FILE
    if jsonl.exists():
        found = None
        for line in jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            evals = {k[len("eval/"):]: float(v) for k, v in row.items() if k.startswith("eval/")}
            if evals:
                found = (evals, f"{jsonl} (step {row.get('step')})")
        if found:
            return found
    for path in [root / "metrics.json", *sorted(root.glob("*/metrics.json"))]:
        if path.exists():
            try:
                report = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("%s: not JSON, ignored for the model card", path)
                continue
            values = report.get("metrics") if isinstance(report, dict) else None
            if isinstance(values, dict) and values:
                return {k: float(v) for k, v in values.items()}, str(path)
    return {}, None


def card_info(fmt: str, path: str, *, use_ema: bool = False) -> CardInfo:
    """The `CardInfo` of a checkpoint `path` of format `fmt` (as `convert.load.load_pipeline`
    takes them): a training run gives its config, step and metrics."""
    info = CardInfo(source=path, source_format=fmt, use_ema=use_ema)
    if fmt in ("diffusers", "sd-init") and is_hub_id(path):
        info.base_model = path
    if fmt == "orbax":
        kind, step_dir = orbax_io.locate(path)
        if kind == "train":
            info.train_config = ckpt.read_config(step_dir)
            info.step = int(step_dir.name)
            base = _get(info.train_config, "init_from.path")
            if isinstance(base, str) and is_hub_id(base):
                info.base_model = base
            info.metrics, info.metrics_source = read_metrics(str(step_dir.parent.parent))
    return info


def _architecture(model) -> list[str]:
    rows = ["| component | class | parameters |", "|---|---|---:|"]
    for comp in COMPONENTS:
        module = getattr(model, comp)
        rows.append(f"| `{comp}` | `{type(module).__name__}` | {num_params(module):,} |")
    return rows


def _training(info: CardInfo) -> list[str]:
    if not info.train_config:
        return []
    out = ["## Training", "",
           f"Trained with pbe_jax; exported from step {info.step} of the run"
           + (" (EMA weights)." if info.use_ema else " (raw weights, not the EMA copy)."), "",
           "| setting | value |", "|---|---|"]
    for field in SUMMARY_FIELDS:
        value = _get(info.train_config, field)
        if value not in (None, ""):
            out.append(f"| `{field}` | `{json.dumps(value)}` |")
    out += ["", "<details><summary>Full training config</summary>", "", "```json",
            json.dumps(info.train_config, indent=2, sort_keys=True), "```", "", "</details>", ""]
    return out


def _evaluation(info: CardInfo) -> list[str]:
    if not info.metrics:
        return []
    out = ["## Evaluation", "", f"Metrics from `{info.metrics_source}` (on COCOEE unless the row "
           "names another dataset):", "", "| metric | value |", "|---|---:|"]
    out += [f"| {METRIC_NAMES.get(k, k)}{'' if k in COCOEE_METRICS else f' ({metric_dataset(k)[1]})'} | {v:.4g} |"
            for k, v in sorted(info.metrics.items())]
    return out + [""]


def _usage(where: str, fmt: str) -> list[str]:
    out = ["## Use it", "", "pbe_jax (JAX / Flax NNX):", "", "```python",
           "from pbe_jax import PaintByExample", "",
           f'pipe = PaintByExample.from_pretrained("{where}")',
           'out = pipe("source.png", "mask.png", "reference.png", num_inference_steps=50, guidance_scale=5.0)',
           'out[0].save("edited.png")', "```", ""]
    if fmt != "diffusers":
        return out
    return out + [
        "diffusers (PyTorch; diffusers >= 0.40 cannot resolve the deprecated image encoder named in a "
        "Paint-by-Example `model_index.json`, so assemble the pipeline from its components):", "",
        "```python",
        "from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel",
        "from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder",
        "from transformers import CLIPImageProcessor", "",
        f'd = "{where}"',
        "pipe = PaintByExamplePipeline(",
        '    vae=AutoencoderKL.from_pretrained(d, subfolder="vae"),',
        '    image_encoder=PaintByExampleImageEncoder.from_pretrained(d, subfolder="image_encoder"),',
        '    unet=UNet2DConditionModel.from_pretrained(d, subfolder="unet"),',
        '    scheduler=PNDMScheduler.from_pretrained(d, subfolder="scheduler"),',
        '    feature_extractor=CLIPImageProcessor.from_pretrained(d, subfolder="feature_extractor"),',
        "    safety_checker=None, requires_safety_checker=False)", "```", ""]


def make_model_card(model, info: CardInfo | None = None, *, repo_id: str | None = None,
                    fmt: str = "diffusers", path: str | None = None) -> huggingface_hub.ModelCard:
    """The card of `model` (a `PaintByExampleModel`) exported as `fmt` to `path` / `repo_id`."""
    info = info or CardInfo()
    where = repo_id or path or "PATH"
    name = repo_id.split("/")[-1] if repo_id else "Paint-by-Example (pbe_jax export)"
    eval_results = [
        huggingface_hub.EvalResult(task_type=PIPELINE_TAG, dataset_type=metric_dataset(k)[0],
                                   dataset_name=metric_dataset(k)[1], metric_type=k, metric_name=METRIC_NAMES.get(k, k), metric_value=v)
        for k, v in sorted(info.metrics.items())] or None
    data = huggingface_hub.ModelCardData(
        base_model=info.base_model, pipeline_tag=PIPELINE_TAG, tags=list(TAGS),
        library_name="diffusers" if fmt == "diffusers" else None,
        model_name=name if eval_results else None, eval_results=eval_results)
    source = (f" Converted from the {info.source_format} checkpoint `{info.source}`."
              if info.source else "")
    body = [f"# {name}", "",
            "A [Paint by Example](https://arxiv.org/abs/2211.13227) model (exemplar-based image editing: "
            "paint a reference object into the masked region of an image), written by "
            f"pbe_jax as a {fmt} {'repository' if fmt == 'diffusers' else 'checkpoint'}."
            + source, "",
            "## Architecture", "", *_architecture(model), "",
            "Noise schedule (`scheduler/scheduler_config.json`): "
            f"`{json.dumps(model.scheduler_config, sort_keys=True)}`",
            "", *_training(info), *_evaluation(info), *_usage(where, fmt)]
    return huggingface_hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(model, path: str, info: CardInfo | None = None, *, repo_id: str | None = None,
                     fmt: str = "diffusers") -> str:
    """Write `make_model_card(...)` to `path/README.md`; returns the file."""
    card = make_model_card(model, info, repo_id=repo_id, fmt=fmt, path=path)
    out = epath.Path(path) / CARD_FILE
    out.write_text(str(card))
    return str(out)


def as_card_info(card: CardInfo | str | None, fmt: str = "orbax") -> CardInfo | None:
    """`save_pretrained(card=...)`: a CardInfo as is, or a checkpoint path to read one from."""
    if card is None or isinstance(card, CardInfo):
        return card
    return card_info(fmt, str(card))

