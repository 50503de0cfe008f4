r"""The local web demo: `python -m pbe_jax.demo --model=DIR_OR_HUB_ID [--port=7860] [--share=false]`.

  pip install -e ".[demo]"
  python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=/tmp/pbe_demo   # or any PbE model
  python -m pbe_jax.demo --model=/tmp/pbe_demo          # then open http://127.0.0.1:7860

`--model` is a diffusers PbE repo (dir or hub id, e.g. Fantasy-Studio/Paint-by-Example) or a
pbe_jax training workdir / checkpoint (its held-out synthetic scenes become the examples). The
page (pbe_jax/webdemo.py) compiles the model once at start-up, queues concurrent users (one edit
at a time), and edits photos larger than the model's resolution in a window around the mask.
"""
from __future__ import annotations

from absl import app, flags

from pbe_jax import cli_flags, runtime
from pbe_jax.defaults import NUM_INFERENCE_STEPS
from pbe_jax.inference import model_resolution
from pbe_jax.models.hub import cast_dtype
from pbe_jax.pipeline import PaintByExample
from pbe_jax.webdemo import Settings, build_app, demo_examples, examples_data_config, serve

cli_flags.define_model_flags(("model", "dtype", "use_ema", "variant", "revision"))
_LORA = flags.DEFINE_string("lora", None, "a LoRA on --model: a pbe_jax LoRA run or a diffusers/PEFT .safetensors")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "--lora: its adapters' output times this")
_PORT = flags.DEFINE_integer("port", 7860, "port to serve on")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to serve on (0.0.0.0: every interface)")
_SHARE = flags.DEFINE_bool("share", False, "also open a public Gradio share link")
_STEPS = flags.DEFINE_integer("steps", NUM_INFERENCE_STEPS, "default denoising steps on the page")
_PADDING = flags.DEFINE_integer("mask_crop_padding", 32, "default crop padding around the mask (px)")
_MAX_MP = flags.DEFINE_float("max_megapixels", 40.0, "largest source the page accepts")
_EXAMPLES = flags.DEFINE_integer("examples", 3, "example triplets from held-out synthetic scenes")
flags.mark_flag_as_required("model")
runtime.define_flags()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (boolean flags take '=': --share=false)")
    runtime.configure_from_flags()  # the compilation cache: a restart compiles nothing
    F = flags.FLAGS
    pipe = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype), use_ema=F.use_ema,
                                          variant=F.variant, revision=F.revision).with_lora(
        _LORA.value, _LORA_SCALE.value, F.use_ema)
    examples = demo_examples(examples_data_config(F.model), _EXAMPLES.value,
                             resolution=max(model_resolution(pipe)))
    page = build_app(pipe, examples=examples, max_megapixels=_MAX_MP.value,
                     settings=Settings(steps=_STEPS.value, padding=_PADDING.value))
    page.queue(max_size=32, default_concurrency_limit=1)
    if not _SHARE.value:  # Gradio's own hint names launch(share=True), not this command's flag
        print(f"serving on http://{_HOST.value}:{_PORT.value} (a public link: add --share=true)", flush=True)
    serve(page, server_name=_HOST.value, server_port=_PORT.value, share=_SHARE.value, show_error=True,
          max_file_size="64mb", quiet=not _SHARE.value)  # until Ctrl-C / SIGTERM; then the result files go


if __name__ == "__main__":
    cli_flags.run(main)
