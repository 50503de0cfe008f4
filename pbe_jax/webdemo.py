"""The local web demo (`python -m pbe_jax.demo`): a Gradio page where a person brushes the region
to edit on a photo, drops a reference image, and gets the edit next to the input.

    editor = DemoEditor(pipe)              # the model, a lock, the page's limits
    app = build_app(editor, examples=demo_examples(data_cfg))   # gr.Blocks
    app.queue(max_size=16).launch(server_name="127.0.0.1", show_error=True)

Each piece runs without a browser: `editor_inputs` turns the ImageEditor's value (the uploaded
background + brush layers) into a source and a bool mask; `DemoEditor.__call__` runs one edit
through `pbe_jax.inference.edit` (the one cached jitted edit function) and raises `gr.Error`
with a message for every bad input; `DemoEditor.warmup` compiles that function at start-up, in a
thread, while the page shows "compiling". Sources larger than the model's resolution are edited
in a window around the mask by default (`mask_crop_padding`), so every such edit has the
model's shape and reuses the start-up compilation.

The seed field takes 0 .. 2**32 - 1 (the sampler's uint32 seeds) or -1 for a new random seed per
edit (the status line names the seed used, so an edit can be repeated); anything else is refused
with a message on the page (`page_seed`). The result PNGs behind the download button live in a
temporary folder that keeps the newest `keep_results` files and is removed when the server stops:
`serve(app, ...)` (what `python -m pbe_jax.demo` runs) stops on Ctrl-C or SIGTERM alike and then
removes it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from pbe_jax import inference
from pbe_jax.checkpoint import read_config, training_steps
from pbe_jax.data.config import data_config
from pbe_jax.data.synthetic import synthetic_scene
from pbe_jax.data.transforms import pad_box
from pbe_jax.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from pbe_jax.inference import crop_window, larger_than_model, load_rgb, model_resolution, to_uint8
from pbe_jax.schedulers import own_scheduler_name, scheduler_names

try:
    import gradio as gr
except ImportError as e:  # the page is an extra; everything else works without it
    raise ImportError(f"the web demo needs gradio ({e}): pip install 'pbe_jax[demo]'") from e

BRUSH = ("#ff00ff", 0.6)  # what the painted region looks like on the page; any alpha > 0 is mask
SEED_MAX = 2**32 - 1  # the sampler's seeds are uint32
RANDOM_SEED = -1  # the seed field's value for "a new random seed each edit"

log = logging.getLogger("pbe_jax")


def page_seed(value) -> int:
    """The seed field's value -> the edit's seed: 0 .. SEED_MAX as is, -1 a random one; raises
    `gr.Error` with the accepted range for anything else (empty, fractional, out of range)."""
    accepted = f"use 0 to {SEED_MAX}, or {RANDOM_SEED} for a random seed"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise gr.Error(f"The seed is empty: {accepted}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The seed {value!r} is not a number: {accepted}.") from None
    if not number.is_integer():
        raise gr.Error(f"The seed {value} is not a whole number: {accepted}.")
    seed = int(number)
    if seed == RANDOM_SEED:
        return secrets.randbelow(SEED_MAX + 1)
    if not 0 <= seed <= SEED_MAX:
        raise gr.Error(f"The seed {seed} is out of range: {accepted}.")
    return seed


@dataclass(frozen=True)
class Settings:
    """The page's defaults (and the warm-up's, so the first edit with them compiles nothing)."""

    steps: int = NUM_INFERENCE_STEPS
    guidance: float = GUIDANCE_SCALE
    seed: int = 0
    scheduler: str | None = None  # None: the model's own (scheduler_config.json)
    paste_back: bool = True
    crop: bool = True
    padding: int = 32


def demo_examples(data_cfg=None, num: int = 3, *, resolution: int = 64) -> list[tuple[np.ndarray, ...]]:
    """`num` example triplets (uint8 source [H, W, 3], bool mask [H, W], uint8 reference) from
    synthetic scenes the demo model never trained on: indices from `data_cfg.synthetic_num_images`
    on (the training set is indices 0 .. n-1). Example k masks the largest object of scene
    n + 2k (its box grown by a tenth per side) and takes the reference from the largest object of
    scene n + 2k + 1. Without a training config, the scenes are drawn at 9/8 to 2x `resolution`."""
    if data_cfg is None:
        data_cfg = data_config("demo")
        sides = (resolution * 9 // 8, resolution * 2)
    else:
        sides = (int(data_cfg.synthetic_min_side), int(data_cfg.synthetic_max_side))
    first, seed = int(data_cfg.synthetic_num_images), int(data_cfg.synthetic_seed)
    style = data_cfg.get("synthetic_style", "varied")  # the run's scenes ('palette' in the demo)

    def largest(index):  # (image, pixel box of its largest object)
        img, boxes = synthetic_scene(index, seed=seed, min_side=sides[0], max_side=sides[1], style=style)
        h, w = img.shape[:2]
        px = np.round(boxes * [w, h, w, h]).astype(int)
        return img, tuple(px[np.argmax((px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1]))])

    out = []
    for k in range(num):
        src, (x0, y0, x1, y1) = largest(first + 2 * k)
        h, w = src.shape[:2]
        gx, gy = (x1 - x0) // 10, (y1 - y0) // 10
        mask = np.zeros((h, w), bool)
        mask[max(y0 - gy, 0):y1 + gy, max(x0 - gx, 0):x1 + gx] = True
        ref_img, box = largest(first + 2 * k + 1)
        rx0, ry0, rx1, ry1 = pad_box(box, ref_img.shape[1::-1], int(data_cfg.ref_pad))
        out.append((src, mask, ref_img[ry0:ry1, rx0:rx1]))
    return out


def editor_inputs(value: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """gr.ImageEditor value (numpy, RGBA: `background` [H, W, 4], brush `layers` [H, W, 4]) ->
    (uint8 source [H, W, 3] flattened on white, bool mask [H, W] = painted anywhere)."""
    bg = None if value is None else value.get("background")
    if bg is None:
        raise gr.Error("Upload a source image (left), then paint the region to edit on it.")
    bg = np.asarray(bg)
    if bg.ndim == 2:
        bg = np.repeat(bg[..., None], 3, axis=-1)
    if bg.shape[-1] == 4:  # transparent pixels count as white, as the page shows them
        a = bg[..., 3:].astype(np.float32) / 255.0
        bg = np.round(bg[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
    mask = np.zeros(bg.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        if layer.shape[:2] != mask.shape:
            raise gr.Error(f"the brush layer is {layer.shape[1]}x{layer.shape[0]} but the source is "
                           f"{mask.shape[1]}x{mask.shape[0]}; upload the source again")
        mask |= layer[..., 3] > 0
    if not mask.any():
        raise gr.Error("The mask is empty: paint the region to edit on the source with the brush.")
    return bg[..., :3].astype(np.uint8), mask


def example_files(examples, directory: str) -> list[list]:
    """gr.Examples rows [[editor value, reference path], ...] for `demo_examples` triplets: PNGs
    written under `directory` (the mask as a brush layer of the BRUSH colour)."""
    rows = []
    rgb = np.array([int(BRUSH[0][i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    for k, (src, mask, ref) in enumerate(examples):
        paths = {n: os.path.join(directory, f"example{k}_{n}.png")
                 for n in ("source", "mask", "composite", "ref")}
        layer = np.zeros((*mask.shape, 4), np.uint8)
        layer[mask] = (*rgb, round(255 * BRUSH[1]))
        shown = src.copy()  # what the page shows: the source under the painted region
        shown[mask] = np.round(src[mask] * (1 - BRUSH[1]) + rgb * BRUSH[1]).astype(np.uint8)
        for name, img in (("source", src), ("mask", layer), ("composite", shown), ("ref", ref)):
            Image.fromarray(img).save(paths[name])
        rows.append([{"background": paths["source"], "layers": [paths["mask"]],
                      "composite": paths["composite"]}, paths["ref"]])
    return rows


class DemoEditor:
    """The edit behind the page: the model, its defaults and limits, and one lock so the start-up
    compilation and the (queued) edits never run the model at the same time."""

    def __init__(self, pipe, *, settings: Settings = Settings(), max_megapixels: float = 40.0,
                 max_full_megapixels: float | None = None, keep_results: int = 64):
        self.pipe = pipe
        # the model's own sampler unless told otherwise (the demo's x0 model has no PLMS)
        self.settings = settings if settings.scheduler else dataclasses.replace(
            settings, scheduler=own_scheduler_name(pipe.scheduler_config))
        self.resolution = model_resolution(pipe)
        self.max_pixels = int(max_megapixels * 1e6)
        # A whole-image edit (crop off, or a small source) runs the UNet over the whole latent
        # grid: cap it at 4x the model's pixels unless told otherwise.
        rh, rw = self.resolution
        self.max_full_pixels = int(max_full_megapixels * 1e6) if max_full_megapixels else 4 * rh * rw
        self.lock = threading.Lock()
        self.state = "compiling"  # -> "ready" | "failed: <why>"
        self._out = tempfile.TemporaryDirectory(prefix="pbe_demo_")  # removed by close() / at exit
        self.out_dir = self._out.name
        # Gradio copies a returned file into its own cache, so older results can go.
        self.keep_results = max(int(keep_results), 1)
        self._results = 0
        self._warmup_thread: threading.Thread | None = None

    def warmup(self) -> None:
        """Compile the edit for the model's resolution with the default settings (the shape of
        every cropped edit) by running one on a blank image."""
        rh, rw = self.resolution
        mask = np.zeros((rh, rw), bool)
        mask[rh // 4:3 * rh // 4, rw // 4:3 * rw // 4] = True
        s = self.settings
        t0 = time.perf_counter()
        try:
            with self.lock:
                inference.edit(self.pipe, np.zeros((rh, rw, 3), np.uint8), mask, np.zeros((rh, rw, 3), np.uint8),
                         num_inference_steps=s.steps, guidance_scale=s.guidance, scheduler=s.scheduler,
                         seed=max(s.seed, 0), output_type="np")  # -1 (random): any seed compiles the same
        except Exception as e:  # noqa: BLE001 (shown on the page instead of a dead thread)
            self.state = f"failed: {type(e).__name__}: {e}"
            raise
        self.state = "ready"
        self.warmup_seconds = time.perf_counter() - t0

    def start_warmup(self) -> threading.Thread:
        """`warmup` in a thread (once), so the page is served while XLA compiles."""
        if self._warmup_thread is None:
            self._warmup_thread = threading.Thread(target=self.warmup, name="pbe-demo-warmup", daemon=True)
            self._warmup_thread.start()
        return self._warmup_thread

    def check_upload(self, payload: dict | None, what: str) -> str | None:
        """Why an uploaded file (gradio's FileData dict: `path`, `orig_name`) cannot be used,
        or None: not an image, or more pixels than the page takes (read from the header, before
        decoding)."""
        if not payload or not payload.get("path"):
            return None
        name = payload.get("orig_name") or os.path.basename(payload["path"])
        try:
            with Image.open(payload["path"]) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    return (f"The {what} {name} is {w}x{h} ({w * h / 1e6:.1f} Mpx); this page takes "
                            f"up to {self.max_pixels / 1e6:.0f} Mpx. Downscale it first.")
                im.load()
        except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, DecompressionBombError...)
            return f"The {what} {name} is not an image PIL can read ({type(e).__name__}: {e})."
        return None

    def save_result(self, image: Image.Image) -> str:
        """Write an edit's PNG for the download button into `out_dir`, keeping only the newest
        `keep_results` of them; returns its path."""
        self._results += 1
        path = os.path.join(self.out_dir, f"edit_{self._results:08d}.png")  # names sort by age
        image.save(path, format="PNG")
        results = sorted(n for n in os.listdir(self.out_dir) if n.startswith("edit_"))
        for old in results[:-self.keep_results]:
            try:
                os.remove(os.path.join(self.out_dir, old))
            except OSError:
                pass
        return path

    def close(self) -> None:
        """Remove the results folder (the examples' files too)."""
        self._out.cleanup()

    def status(self) -> str:
        if self.state == "ready":
            rh, rw = self.resolution
            return (f"**Ready.** The model works at {rw}x{rh}; larger photos are edited in a window "
                    "around the mask when *crop around the mask* is on.")
        if self.state == "compiling":
            return "**Compiling the model** (once, at start-up; the first edit waits for it) ..."
        return f"**The model failed to start:** {self.state[len('failed: '):]}"

    def __call__(self, editor_value, reference, steps, guidance, seed, scheduler, paste_back, crop,
                 padding) -> tuple[Image.Image, str, str]:
        """One edit for the page -> (result, PNG path for the download button, status line)."""
        if self.state.startswith("failed"):
            raise gr.Error(self.status())
        source, mask = editor_inputs(editor_value)
        if reference is None:
            raise gr.Error("Upload a reference image (middle): the object to paint into the region.")
        chosen = seed
        seed = page_seed(seed)
        try:
            reference = load_rgb(reference, "reference")
        except ValueError as e:
            raise gr.Error(str(e)) from None
        h, w = source.shape[:2]
        if h * w > self.max_pixels:
            raise gr.Error(f"The source is {w}x{h} ({h * w / 1e6:.1f} Mpx); this page takes up to "
                           f"{self.max_pixels / 1e6:.0f} Mpx. Downscale it first.")
        cropped = bool(crop) and larger_than_model(self.pipe, (h, w))
        if not cropped and h * w > self.max_full_pixels:
            raise gr.Error(f"A whole-image edit of {w}x{h} is over this page's limit of "
                           f"{self.max_full_pixels / 1e6:.2f} Mpx: turn on 'crop around the mask' "
                           "or use a smaller image.")
        t0 = time.perf_counter()
        try:
            with self.lock:
                out = inference.edit(self.pipe, source, mask, reference, num_inference_steps=int(steps),
                               guidance_scale=float(guidance), scheduler=scheduler, seed=int(seed),
                               paste_back=bool(paste_back), mask_crop_padding=int(padding) if cropped else None,
                               output_type="np")
        except ValueError as e:  # bad values the library names (sizes, settings)
            raise gr.Error(str(e)) from None
        result = Image.fromarray(to_uint8(out[0]))
        path = self.save_result(result)
        where = "the whole image"
        if cropped:
            x0, y0, x1, y1 = crop_window(mask, int(padding), self.resolution)
            where = f"a {x1 - x0}x{y1 - y0} window around the mask"
        status = (f"Edited {w}x{h} in {time.perf_counter() - t0:.1f} s: {where} at the model's "
                  f"{self.resolution[1]}x{self.resolution[0]}, {int(steps)} {scheduler} steps, seed {seed}"
                  + (" (random)." if float(chosen) == RANDOM_SEED else "."))
        return result, path, status


def build_app(pipe, *, examples=None, settings: Settings = Settings(), max_megapixels: float = 40.0,
              title: str = "Paint by Example") -> gr.Blocks:
    """The page for `pipe` (a `PaintByExample`, or a ready `DemoEditor`). `examples`:
    `demo_examples` triplets shown under the inputs. Starts the start-up compilation in a thread
    (unless it already ran); the Edit button is enabled when it is done. The editor is
    `app.editor`."""
    editor = pipe if isinstance(pipe, DemoEditor) else DemoEditor(pipe, settings=settings,
                                                                   max_megapixels=max_megapixels)
    s = editor.settings
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}\nPaint the region to edit on the source with the brush, upload a "
                    "reference image of what to put there, and press **Edit**.")
        status = gr.Markdown(editor.status(), elem_id="status")
        with gr.Row(equal_height=False):
            source = gr.ImageEditor(label="Source: paint the region to edit", type="numpy", image_mode="RGBA",
                                    sources=("upload", "clipboard"), transforms=(), layers=False,
                                    brush=gr.Brush(colors=[BRUSH], default_color=BRUSH, color_mode="fixed"),
                                    elem_id="source", scale=2)
            reference = gr.Image(label="Reference", type="numpy", image_mode="RGB", sources=("upload", "clipboard"),
                                 elem_id="reference", scale=1)
            with gr.Column(scale=2):
                result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="result")
                download = gr.DownloadButton("Download PNG", visible=False, elem_id="download")
        with gr.Row():
            run = gr.Button("Edit", variant="primary", interactive=editor.state == "ready", elem_id="run")
        with gr.Accordion("Settings", open=True):
            with gr.Row():
                steps = gr.Slider(1, 200, value=s.steps, step=1, label="steps")
                guidance = gr.Slider(1.0, 15.0, value=s.guidance, step=0.5, label="guidance scale")
                seed = gr.Number(value=s.seed, precision=0, label="seed",
                                 info=f"0 to {SEED_MAX}; {RANDOM_SEED}: a new random seed each edit")
                scheduler = gr.Dropdown(scheduler_names(), value=s.scheduler, label="scheduler")
            with gr.Row():
                paste_back = gr.Checkbox(value=s.paste_back, label="paste back (keep every pixel outside the "
                                         "mask; always on when cropping)")
                crop = gr.Checkbox(value=s.crop, label="crop around the mask (photos larger than the model)")
                padding = gr.Slider(0, 256, value=s.padding, step=8, label="crop padding (px)")
        if examples:
            gr.Examples(example_files(examples, editor.out_dir), inputs=[source, reference],
                        label="Examples (held-out demo scenes)")

        def _wrapped(*args):
            image, path, line = editor(*args)
            return image, gr.DownloadButton(value=path, visible=True), line

        def _upload_check(what):
            def check(payload):
                if isinstance(payload, dict) and "background" in payload:  # the ImageEditor
                    payload = payload["background"]
                why = editor.check_upload(payload, what)
                if why is None:
                    return gr.skip(), gr.skip()
                gr.Warning(why)
                return None, f"**Upload refused.** {why}"
            return check

        source.upload(_upload_check("source"), source, [source, status], preprocess=False)
        reference.upload(_upload_check("reference"), reference, [reference, status], preprocess=False)
        run.click(_wrapped, [source, reference, steps, guidance, seed, scheduler, paste_back, crop, padding],
                  [result, download, status], concurrency_limit=1, concurrency_id="edit")

        timer = gr.Timer(1.0, active=editor.state == "compiling")

        def _poll():
            done = editor.state != "compiling"
            return (editor.status(), gr.Button(interactive=editor.state == "ready"),
                    gr.Timer(active=not done))

        timer.tick(_poll, None, [status, run, timer], queue=False, show_progress="hidden")
        app.load(_poll, None, [status, run, timer], queue=False, show_progress="hidden")
    app.editor = editor
    if editor.state == "compiling":
        editor.start_warmup()
    return app


def serve(app: gr.Blocks, **launch_kwargs) -> None:
    """`app.launch(**launch_kwargs)` and serve until Ctrl-C or SIGTERM, then close the server and
    remove the page's results folder. SIGTERM only sets a flag (an exception raised wherever the
    main thread is, e.g. inside gradio's start-up, would skip the clean-up).

    Stopped while the model runs in another thread (the start-up compilation, an edit), it ends
    the process itself after the clean-up (`os._exit(0)`): an interpreter exit while XLA works in
    another thread aborts."""
    editor = getattr(app, "editor", None)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        app.launch(prevent_thread_lock=True, **launch_kwargs)
        while not stop.wait(0.5):  # the wait returns to run the handler when a signal arrives
            pass
        log.warning("SIGTERM: stopping the server")
    except KeyboardInterrupt:
        log.warning("Ctrl-C: stopping the server")
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
        if editor is not None:
            editor.close()
    warmup = getattr(editor, "_warmup_thread", None)
    if editor is not None and (editor.lock.locked() or (warmup is not None and warmup.is_alive())):
        log.warning("exiting while the model runs (%s)", editor.state)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def examples_data_config(model: str):
    """`config.data` of the training run at `model` (a workdir, its checkpoints/ or one step),
    so the examples are that run's held-out scenes; None for any other model."""
    steps = training_steps(model)
    if not steps:
        return None
    return ml_collections.ConfigDict(read_config(steps[-1])["data"])
