"""The web demo (`python -m pbe_jax.demo`, `pbe_jax.webdemo`): the edit behind the page and its
messages, no recompilation after start-up, and the page itself driven by a real headless
Chromium (Debian's `chromium`, through playwright; no browser download): upload a source, brush
a mask, upload a reference, press Edit, get an image of the source's size; a non-image upload
is refused with a message on the page."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web demo needs gradio (pip install -e '.[demo]')")

from pbe_jax.benchmarks.model import build  # noqa: E402
from pbe_jax.benchmarks.sizes import get_size  # noqa: E402
from pbe_jax.pipeline import PaintByExample  # noqa: E402
from pbe_jax.webdemo import (  # noqa: E402
    SEED_MAX,
    DemoEditor,
    Settings,
    build_app,
    demo_examples,
    editor_inputs,
    page_seed,
)
from tests.test_architecture import compile_events  # noqa: E402
from tests.train_utils import REPO, subprocess_env  # noqa: E402
from tests.helpers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo architecture (64 px) with random weights, as a diffusers repo."""
    d = str(tmp_path_factory.mktemp("demo_model"))
    build(get_size("tiny"), export_dir=d)  # host init: seconds, where NNX's jitted init takes a minute
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    return PaintByExample.from_pretrained(model_dir)


def _editor_value(h, w, box, seed=0):
    """What gr.ImageEditor(type='numpy', image_mode='RGBA') hands the edit: background + one
    brush layer painted over `box` (y0, y1, x0, x1)."""
    rng = np.random.default_rng(seed)
    bg = np.concatenate([rng.integers(0, 256, (h, w, 3), np.uint8), np.full((h, w, 1), 255, np.uint8)], -1)
    layer = np.zeros((h, w, 4), np.uint8)
    y0, y1, x0, x1 = box
    layer[y0:y1, x0:x1, 3] = 153
    return {"background": bg, "layers": [layer], "composite": bg}


def _ref(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)


def test_inputs_and_messages(pipe, tmp_path):
    value = _editor_value(30, 40, (5, 15, 10, 30))
    src, mask = editor_inputs(value)
    assert src.shape == (30, 40, 3) and src.dtype == np.uint8
    assert mask.sum() == 10 * 20 and mask[5:15, 10:30].all()
    with pytest.raises(gr.Error, match="Upload a source"):
        editor_inputs(None)
    with pytest.raises(gr.Error, match="mask is empty"):
        editor_inputs({**value, "layers": [np.zeros((30, 40, 4), np.uint8)]})
    editor = DemoEditor(pipe, settings=Settings(steps=STEPS), max_megapixels=0.001)
    editor.state = "ready"  # the checks below come before any model call
    args = (STEPS, 5.0, 0, "plms", True, True, 32)
    with pytest.raises(gr.Error, match="Upload a reference"):
        editor(value, None, *args)
    with pytest.raises(gr.Error, match=r"40x30 \(0.0 Mpx\); this page takes up to"):
        editor(_editor_value(30, 40, (5, 15, 10, 30)), _ref(), *args)  # 1200 px > 1000
    small = DemoEditor(pipe, settings=Settings(steps=STEPS))
    small.state = "ready"
    with pytest.raises(gr.Error, match="whole-image edit of 160x130"):  # crop off, > 4x 64x64 px
        small(_editor_value(130, 160, (5, 15, 10, 30)), _ref(), STEPS, 5.0, 0, "plms", True, False, 32)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not an image" in editor.check_upload({"path": str(text), "orig_name": "notes.png"}, "reference")
    big = tmp_path / "big.png"
    Image.new("RGB", (50, 40)).save(big)
    assert "50x40" in editor.check_upload({"path": str(big)}, "source")
    assert DemoEditor(pipe).check_upload({"path": str(big)}, "source") is None


def test_seed_field_range(pipe):
    """0 .. 2**32 - 1 as is, -1 a random seed; anything else a message naming the range (it was
    numpy's "out of bounds for uint32")."""
    assert page_seed(0) == 0 and page_seed(SEED_MAX) == SEED_MAX and page_seed(7.0) == 7
    drawn = {page_seed(-1) for _ in range(8)}
    assert all(0 <= s <= SEED_MAX for s in drawn) and len(drawn) > 1
    for bad, why in ((2**40, "out of range"), (-2, "out of range"), (None, "empty"), (1.5, "not a whole")):
        with pytest.raises(gr.Error, match=f"{why}.*use 0 to {SEED_MAX}, or -1 for a random seed"):
            page_seed(bad)
    editor = DemoEditor(pipe, settings=Settings(steps=STEPS))
    editor.state = "ready"  # refused before any model call
    with pytest.raises(gr.Error, match=f"The seed {2**40} is out of range"):
        editor(_editor_value(30, 40, (5, 15, 10, 30)), _ref(), STEPS, 5.0, 2**40, "plms", True, True, 32)


def test_result_files_are_bounded_and_removed_on_close(pipe):
    editor = DemoEditor(pipe, keep_results=2)
    paths = [editor.save_result(Image.new("RGB", (4, 4), (i, 0, 0))) for i in range(4)]
    assert sorted(os.listdir(editor.out_dir)) == sorted(os.path.basename(p) for p in paths[-2:])
    assert Image.open(paths[-1]).getpixel((0, 0)) == (3, 0, 0)
    editor.close()
    assert not os.path.exists(editor.out_dir)


def test_edits_after_startup_compile_nothing(pipe):
    editor = DemoEditor(pipe, settings=Settings(steps=STEPS))
    editor.warmup()
    assert editor.state == "ready"
    args = (STEPS, 5.0, 0, "plms", True, True, 16)
    with compile_events() as events:
        # two sources of different sizes, both larger than the model: cropped to its 64x64
        for (h, w), box in (((150, 200), (60, 90, 70, 110)), ((120, 90), (10, 40, 20, 50))):
            value = _editor_value(h, w, box)
            image, path, status = editor(value, _ref(), *args)
            assert image.size == (w, h) and Image.open(path).size == (w, h)
            assert "window around the mask" in status
            got, src = np.asarray(image), value["background"][..., :3]
            mask = value["layers"][0][..., 3] > 0
            np.testing.assert_array_equal(got[~mask], src[~mask])  # pasted back
            assert np.abs(got[mask].astype(int) - src[mask]).mean() > 5  # edited
    assert events == [], f"an edit after the start-up compilation compiled: {events}"


def test_examples_are_held_out_scenes():
    from pbe_jax.data.config import data_config
    from pbe_jax.data.synthetic import synthetic_scene

    cfg = data_config("demo")
    ex = demo_examples(cfg, 2)
    assert len(ex) == 2
    for k, (src, mask, ref) in enumerate(ex):
        scene, _ = synthetic_scene(cfg.synthetic_num_images + 2 * k, seed=cfg.synthetic_seed,
                                   min_side=cfg.synthetic_min_side, max_side=cfg.synthetic_max_side)
        np.testing.assert_array_equal(src, scene)  # past the training indices 0 .. n-1
        assert mask.shape == src.shape[:2] and 0 < mask.mean() < 1
        assert ref.ndim == 3 and min(ref.shape[:2]) >= 4


def _browser_available():
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is missing (pip install -e '.[test]')"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_browser_available() is not None, reason=str(_browser_available()))
def test_page_in_headless_chromium(pipe, tmp_path):
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), np.uint8)).save(tmp_path / "source.png")
    Image.fromarray(_ref()).save(tmp_path / "reference.png")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    editor = DemoEditor(pipe, settings=Settings(steps=STEPS))
    editor.lock.acquire()  # hold the start-up compilation: the page must say so, not freeze
    app = build_app(editor, examples=demo_examples(num=1))
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True,
               quiet=True)
    profile = tempfile.mkdtemp(prefix="pbe_chromium_")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,  # a fresh --user-data-dir
                headless=True, viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#status:has-text('Compiling')", timeout=60_000)
            assert page.locator("#run").is_disabled()
            editor.lock.release()
            page.wait_for_selector("#run:not([disabled])", timeout=300_000)
            page.wait_for_selector("#status:has-text('Ready')", timeout=30_000)

            page.locator("#source input[type=file]").set_input_files(str(tmp_path / "source.png"))
            # the editor selects its brush once the image is on the canvas
            page.wait_for_selector("#source button[aria-label='Brush'].highlight", timeout=180_000)
            page.locator("#reference input[type=file]").set_input_files(str(tmp_path / "reference.png"))
            page.wait_for_selector("#reference img", timeout=30_000)
            # Brush a stroke, let the editor take it, run. On a loaded machine the canvas can
            # still drop a stroke, and the page then says the mask is empty (as it must): brush
            # again, as a person would, at most three times. The page counts those messages
            # (they close by themselves, so they are counted as they appear).
            page.evaluate("""() => { window.__emptyMasks = 0; const seen = new WeakSet();
                new MutationObserver(() => { for (const e of document.querySelectorAll('.toast-body'))
                    if (!seen.has(e) && e.innerText.includes('mask is empty')) {
                        seen.add(e); window.__emptyMasks += 1; } })
                  .observe(document.body, {childList: true, subtree: true, characterData: true}); }""")
            for attempt in range(3):
                box = page.locator("#source canvas").last.bounding_box()
                cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(cx - 40, cy)
                page.mouse.down()
                for i in range(20):
                    page.mouse.move(cx - 40 + 4 * i, cy + 2 * i, steps=2)
                page.mouse.up()
                page.wait_for_timeout(1_000)  # the editor commits the stroke to its value
                empty = page.evaluate("() => window.__emptyMasks")
                page.locator("#run").click()
                outcome = page.wait_for_function(
                    "([w, h, n]) => { const i = document.querySelector('#result img');"
                    " if (i && i.complete && i.naturalWidth === w && i.naturalHeight === h) return 'edited';"
                    " return window.__emptyMasks > n ? 'empty' : false; }", arg=[200, 150, empty],
                    timeout=120_000).json_value()
                if outcome == "edited":
                    break
            assert outcome == "edited", "three brush strokes never registered as a mask"
            # the outputs render one by one: wait for each instead of reading them at once
            page.wait_for_selector("#status:has-text('Edited 200x150')", timeout=30_000)
            page.wait_for_selector("#download", state="visible", timeout=30_000)
            if os.environ.get("PBE_DEMO_SCREENSHOT"):
                page.screenshot(path=os.environ["PBE_DEMO_SCREENSHOT"], full_page=True)

            page.locator("#reference input[type=file]").set_input_files(str(tmp_path / "notes.png"))
            page.wait_for_selector("#status:has-text('not an image')", timeout=30_000)
            toast = page.locator(".toast-body").filter(has_text="not an image")
            toast.first.wait_for(timeout=30_000)
            assert "notes.png" in toast.first.inner_text()
            ctx.close()
    finally:
        if editor.lock.locked() and editor.state == "compiling":
            editor.lock.release()
        app.close()
        shutil.rmtree(profile, ignore_errors=True)


def test_cli_serves_the_page(model_dir, tmp_path):
    """... and SIGTERM stops it cleanly (exit 0), removing its results folder."""
    port = free_port()
    cmd = [sys.executable, "-m", "pbe_jax.demo", f"--model={model_dir}", f"--port={port}", "--steps=2",
           "--examples=1"]
    env = {**subprocess_env(), "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not serve its page in 240 s"
                time.sleep(1)
        assert "Paint by Example" in config and '"run"' in config
        assert [n for n in os.listdir(tmp_path) if n.startswith("pbe_demo_")]  # the examples' files
    finally:
        proc.terminate()  # SIGTERM
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("pbe_demo_")]
