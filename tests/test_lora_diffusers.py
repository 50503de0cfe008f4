"""LoRA in the ecosystem's format: an adapter exported as diffusers/PEFT
`pytorch_lora_weights.safetensors` loads into a diffusers UNet2DConditionModel with
`load_lora_adapter` and gives pbe_jax's UNet output; a merged (fused) model saves as an ordinary
diffusers Paint-by-Example folder that `PaintByExamplePipeline` loads."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import PaintByExamplePipeline  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pbe_jax.convert import lora_io  # noqa: E402
from pbe_jax.pipeline import PaintByExample  # noqa: E402
from tests.test_lora import _random_adapter  # noqa: E402
from tests.test_weights_diffusers import assemble_torch, tiny_pipeline  # noqa: E402


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 9, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, 12)).astype(np.float32)  # 3 tokens: to_q / to_k run too
    return x, np.array([10, 700]), ctx


@jax.jit
def _unet_jit(graphdef, state, x, t, ctx):
    return nnx.merge(graphdef, state)(x, t, ctx)


def _ours(model, x, t, ctx):
    """The UNet jitted: one compile per graph (LoRA / merged) costs less CPU than running it op by op."""
    return np.asarray(_unet_jit(*nnx.split(model.unet), jnp.asarray(x.transpose(0, 2, 3, 1)),
                                jnp.asarray(t), jnp.asarray(ctx)))


def _torch(unet, x, t, ctx):
    with torch.no_grad():
        out = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pipe = tiny_pipeline()
    d = str(tmp_path_factory.mktemp("tiny_pbe_lora"))
    pipe.save_pretrained(d)
    return d


def test_peft_export_loads_in_diffusers_and_matches_pbe_jax(tiny_dir, tmp_path):
    adapter = _random_adapter(tiny_dir, rank=2, alpha=6.0)
    path = lora_io.save_peft(adapter, str(tmp_path / "lora"))
    ours = PaintByExample.from_pretrained(tiny_dir)
    ours.load_lora(path)
    x, t, ctx = _inputs()
    unet = assemble_torch(tiny_dir).unet.eval()
    base_out = _torch(unet, x, t, ctx)  # before the adapter is loaded into it
    unet.load_lora_adapter(load_file(path), prefix="unet", adapter_name="pbe")
    ref, got = _torch(unet, x, t, ctx), _ours(ours, x, t, ctx)
    assert np.abs(ref - base_out).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # read back: the PEFT file gives the same model as the adapter it came from
    again = PaintByExample.from_pretrained(tiny_dir)
    again.load_lora(str(tmp_path / "lora"))
    np.testing.assert_allclose(_ours(again, x, t, ctx), got, atol=1e-6)


def test_merged_lora_saves_as_an_ordinary_diffusers_pipeline(tiny_dir, tmp_path):
    adapter = _random_adapter(tiny_dir, rank=2, alpha=2.0, seed=1)
    ours = PaintByExample.from_pretrained(tiny_dir)
    lora_io.apply_lora(ours, adapter, scale=0.7)
    x, t, ctx = _inputs(1)
    want = _ours(ours, x, t, ctx)
    lora_io.merge(ours)
    assert not lora_io.lora_layers(ours)
    out = ours.save_pretrained(str(tmp_path / "merged"))
    pipe = assemble_torch(out)  # PaintByExamplePipeline from the folder's components
    assert isinstance(pipe, PaintByExamplePipeline)
    np.testing.assert_allclose(_torch(pipe.unet.eval(), x, t, ctx), want, atol=1e-4, rtol=0)
