"""Per-step progress of an edit (issue 32): `pipe(..., callback=fn)` calls `fn(step, total)`
once per denoising step, `progress_bar=True` shows a tqdm bar; both reuse one compiled progress
variant, and an edit without them compiles and runs the program it always did."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax._src import dispatch, monitoring

from pbe_jax.benchmarks.model import build
from pbe_jax.benchmarks.sizes import get_size
from pbe_jax.pipeline import PaintByExample


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_model"))
    build(get_size("tiny"), export_dir=d)  # random weights, host init
    return PaintByExample.from_pretrained(d)


@pytest.fixture
def compiles():
    """The number of XLA compilations since the test started (a list, read its len)."""
    seen = []

    def listen(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            seen.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


@pytest.mark.slow  # ~35 s on 2 busy cores: two programs compile
def test_callback_per_step_and_default_program_unchanged(pipe, compiles, capsys):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (48, 40, 3), np.uint8)
    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 8:24] = 255
    ref = rng.integers(0, 255, (32, 32, 3), np.uint8)
    kw = dict(num_inference_steps=3, scheduler="ddim", output_type="np", seed=1)  # PLMS: 3 + 1 steps
    plain = pipe(src, mask, ref, **kw)
    n_plain = len(compiles)
    pipe(src, mask, ref, **kw)
    assert len(compiles) == n_plain  # the default program is compiled once
    calls = []
    out = pipe(src, mask, ref, callback=lambda step, total: calls.append((step, total)), **kw)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose(out, plain, atol=1e-5)  # progress does not change the edit
    n_progress = len(compiles)
    assert n_progress > n_plain  # the progress variant is its own program ...
    other = []
    pipe(src, mask, ref, callback=lambda step, total: other.append(step), progress_bar=True, **kw)
    assert other == [1, 2, 3] and "3/3" in capsys.readouterr().err
    pipe(src, mask, ref, **kw)
    assert len(compiles) == n_progress  # ... compiled once for any callback; the default reused
    assert calls == [(1, 3), (2, 3), (3, 3)]  # an edit without a callback calls none
