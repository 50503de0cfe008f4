r"""Fine-tune on objects the model never saw, and measure it (`pbe_jax.evaluation.new_objects`).

  # a folder of "your own images": 256 scenes whose objects have 4 colours the demo never drew
  python -m pbe_jax.tools.new_objects write --out=/tmp/novel_images --num=256

  # held-out score of a model (+ a LoRA) on those new objects and on the demo's own colours
  python -m pbe_jax.tools.new_objects score --model=/tmp/pbe_demo [--lora=/tmp/novel_lora]

  # the whole comparison: write the folder, fine-tune the demo model on it with LoRA and in full
  # (the same data, steps and lr, through `pbe_jax.train` exactly as the README's commands),
  # then score base / LoRA / full; --json_out for docs/results (tools.doc_tables --kind=adaptation)
  python -m pbe_jax.tools.new_objects proof --base=/tmp/pbe_demo --workdir=/tmp/novel --steps=300

`score` prints `exemplar_following` (cross references: the painted colour is the reference's,
matched against all 12 colours; chance 1/4 among the new ones, 0 for a model that paints only demo
colours), `exemplar_closer`, `self_following` and `psnr_outside_mask`, for the new colours and
for the demo's own. A training run's EMA params are scored when it kept them (`--nouse_ema`:
the raw ones), for the base, a full fine-tune and a LoRA run alike.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import flags, logging

from pbe_jax import cli_flags, runtime
from pbe_jax.checkpoint import read_config, training_steps
from pbe_jax.outputs import write_json

COMMANDS = ("write", "score", "proof")
TRAINABLE = re.compile(r"trainable params: ([\d,]+) of ([\d,]+)")

_OUT = flags.DEFINE_string("out", None, "write: the folder to write the images and masks into")
_NUM = flags.DEFINE_integer("num", None, "write: images (default 256); score: held-out scenes, each "
                            "edited with its own and with another scene's object (default 64)")
_SEED = flags.DEFINE_integer("seed", None, "write: synthetic seed of the scenes (default 1); score: "
                             "of the held-out scenes (default 1000)")
_MODEL = flags.DEFINE_string("model", None, "score: a pbe_jax training workdir / checkpoint, or a "
                             "diffusers PbE folder with the demo's image size")
_LORA = flags.DEFINE_string("lora", None, "score: a LoRA on --model (a pbe_jax LoRA run or a PEFT file)")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "score: --lora's adapters' output times this")
_USE_EMA = flags.DEFINE_bool("use_ema", None, "score: a training run's EMA params (default: when the "
                             "run kept them; --nouse_ema: the raw ones), for --model and --lora alike")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 20, "score: denoising steps (the demo's eval: 20)")
_GUIDANCE = flags.DEFINE_float("guidance", 5.0, "score: classifier-free guidance scale")
_BASE = flags.DEFINE_string("base", None, "proof: the trained demo workdir to fine-tune")
_WORKDIR = flags.DEFINE_string("workdir", None, "proof: folder for the images, both runs and logs")
_STEPS = flags.DEFINE_integer("steps", 300, "proof: training steps of each fine-tuning run")
_RANK = flags.DEFINE_integer("rank", 16, "proof: LoRA rank")
# The demo's UNet is tiny and the reference's colour goes through the conditioner's mapper: LoRA
# on the UNet's attention alone moved the new-colour score from 17% to 20% in 300 steps, with the
# mapper and the feed-forward layers adapted too it reached the full fine-tune's score.
_LORA_COMPONENTS = flags.DEFINE_string("lora_components", "unet,image_encoder",
                                       "proof: config.train.lora.components of the LoRA run")
_LORA_TARGETS = flags.DEFINE_string("lora_targets", "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2",
                                    "proof: config.train.lora.targets of the LoRA run")
_JSON_OUT = flags.DEFINE_string("json_out", None, "score / proof: write the results here as JSON")
runtime.define_flags()


def _use_ema(path: str) -> bool:
    """--use_ema for a pbe_jax run at `path`: the flag, else whether the run kept EMA params."""
    if _USE_EMA.value is not None:
        return _USE_EMA.value
    steps = training_steps(path)
    return bool(steps) and float(read_config(steps[-1]).get("train", {}).get("ema_decay", 0) or 0) > 0


def load(model: str, lora: str | None = None, lora_scale: float = 1.0):
    """(pipe, the data config its held-out scenes follow) for `model` (+ `lora`)."""
    from pbe_jax.data.config import data_config  # noqa: PLC0415 (jax-heavy imports after flags)
    from pbe_jax.pipeline import PaintByExample  # noqa: PLC0415
    from pbe_jax.webdemo import examples_data_config  # noqa: PLC0415

    pipe = PaintByExample.from_pretrained(model, use_ema=_USE_EMA.value)
    if lora:
        pipe.load_lora(lora, scale=lora_scale, use_ema=_use_ema(lora) if training_steps(lora) else False)
    data_cfg = examples_data_config(model)
    if data_cfg is None:  # a diffusers folder: the demo's geometry at the model's resolution
        from pbe_jax.inference import model_resolution  # noqa: PLC0415
        data_cfg = data_config("demo")
        data_cfg.resolution = min(model_resolution(pipe))  # (H, W); the held-out crops are square
        data_cfg.reference_size = pipe.image_encoder.preprocess.size
    return pipe, data_cfg


def score(model: str, lora: str | None = None) -> dict:
    from pbe_jax.evaluation.new_objects import SCORE_SEED, score_model  # noqa: PLC0415

    pipe, data_cfg = load(model, lora, _LORA_SCALE.value)
    t0 = time.perf_counter()
    scores = score_model(pipe, data_cfg, num=_NUM.value or 64,
                         seed=SCORE_SEED if _SEED.value is None else _SEED.value,
                         steps=_SAMPLE_STEPS.value, guidance=_GUIDANCE.value)
    return {"model": model, "lora": lora, "scores": scores, "score_s": time.perf_counter() - t0}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def train_command(base: str, workdir: str, images: str, steps: int, rank: int,
                  lora_components: str = "", lora_targets: str = "") -> list[str]:
    """The `pbe_jax.train` command of one fine-tuning run (rank 0: in full) on `images`."""
    from pbe_jax.configs import pbe as pbe_configs  # noqa: PLC0415

    cmd = [sys.executable, "-m", "pbe_jax.train", f"--config={pbe_configs.__file__}:demo",
           f"--workdir={workdir}", "--config.data.source=folder", f"--config.data.images_dir={images}",
           "--config.init_from.format=orbax", f"--config.init_from.path={base}",
           f"--config.train.num_steps={steps}"]
    if not rank:
        return cmd
    # quoted: one string element, which `models.lora.names` splits at the commas (unquoted,
    # ml_collections reads `to_out.0` as Python and fails)
    return cmd + [f"--config.train.lora.rank={rank}"] + (
        [f"--config.train.lora.components='{lora_components}'"] if lora_components else []) + (
        [f"--config.train.lora.targets='{lora_targets}'"] if lora_targets else [])


def proof(base: str, workdir: str, steps: int, rank: int) -> dict:
    """Write the folder, fine-tune `base` on it with LoRA and in full, score the three."""
    from pbe_jax.evaluation.new_objects import write_folder  # noqa: PLC0415

    if not training_steps(base):
        raise SystemExit(f"error: --base {base} holds no pbe_jax training checkpoint (train the demo "
                         "first: python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=...)")
    images = os.path.join(workdir, "images")
    counts = write_folder(images, _NUM.value or 256,
                          **({} if _SEED.value is None else {"seed": _SEED.value}))
    logging.info("wrote %s images to %s: %s", sum(counts.values()), images, counts)
    runs: dict[str, dict] = {"base": {}}
    for name, r in (("LoRA", rank), ("full", 0)):
        run_dir = os.path.join(workdir, "lora" if r else "full")
        cmd = train_command(base, run_dir, images, steps, r, _LORA_COMPONENTS.value, _LORA_TARGETS.value)
        log_path = os.path.join(workdir, f"{os.path.basename(run_dir)}.log")
        logging.info("%s: %s (log %s)", name, " ".join(cmd), log_path)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        if rc:
            raise SystemExit(f"error: the {name} run exited {rc}; see {log_path}")
        with open(log_path) as f:
            found = TRAINABLE.findall(f.read())
        last = training_steps(run_dir)[-1]
        runs[name] = {"command": cmd, "train_s": time.perf_counter() - t0,
                      "trainable_params": int(found[-1][0].replace(",", "")) if found else None,
                      "total_params": int(found[-1][1].replace(",", "")) if found else None,
                      "checkpoint_bytes": _dir_bytes(str(last)), "run": run_dir}
    runs["base"].update(score(base))
    runs["LoRA"].update(score(base, runs["LoRA"]["run"]))
    runs["full"].update(score(runs["full"]["run"]))
    runs["base"]["checkpoint_bytes"] = _dir_bytes(str(training_steps(base)[-1]))
    return {"images": counts, "steps": steps, "rank": rank, "runs": runs}


def main(argv) -> int:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m pbe_jax.tools.new_objects {{{'|'.join(COMMANDS)}}} "
                         "--flags... (see --help)")
    command = argv[1]
    runtime.configure_from_flags()
    if command == "write":
        from pbe_jax.evaluation.new_objects import write_folder  # noqa: PLC0415
        if not _OUT.value:
            raise SystemExit("error: write needs --out=FOLDER")
        counts = write_folder(_OUT.value, _NUM.value or 256,
                              **({} if _SEED.value is None else {"seed": _SEED.value}))
        print(f"wrote {sum(counts.values())} images + masks to {_OUT.value}: {counts}")
        return 0
    if command == "score":
        if not _MODEL.value:
            raise SystemExit("error: score needs --model=DIR")
        result = score(_MODEL.value, _LORA.value)
        print(json.dumps(result["scores"], indent=1))
    else:
        if not (_BASE.value and _WORKDIR.value):
            raise SystemExit("error: proof needs --base=DEMO_WORKDIR and --workdir=DIR")
        from pbe_jax.tools.doc_tables import adaptation_table, markdown  # noqa: PLC0415
        result = proof(_BASE.value, _WORKDIR.value, _STEPS.value, _RANK.value)
        print(markdown(*adaptation_table({"results": result})))
    if _JSON_OUT.value:
        write_json(_JSON_OUT.value, result, indent=1)
    return 0


if __name__ == "__main__":
    cli_flags.run(lambda argv: sys.exit(main(argv)))
