"""Parity of pbe_jax.models.transformer.BasicTransformerBlock with diffusers' block.

Two forms are used in pbe_jax: the UNet's (self-attention + cross-attention, GEGLU, no attention
bias) and the Paint-by-Example mapper's (self-attention only, GELU, attention bias).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBlock
from flax import nnx

from pbe_jax.convert.torch_layout import CheckpointMismatchError, load_torch_state_dict
from pbe_jax.models.transformer import BasicTransformerBlock
from tests.helpers import randomize

B, L, DIM = 2, 12, 32


def _pair(kwargs: dict, seed: int = 0):
    tb = TorchBlock(**kwargs).eval()
    randomize(tb, seed)
    ours = BasicTransformerBlock(**kwargs, rngs=nnx.Rngs(seed))
    sd = {k: v.detach().numpy() for k, v in tb.state_dict().items()}
    report = load_torch_state_dict(ours, sd, source="torch block")
    assert report.loaded == len(sd)
    return tb, ours


def _compare(tb, ours, x, ctx):
    with torch.no_grad():
        ref = tb(torch.from_numpy(x), encoder_hidden_states=None if ctx is None else torch.from_numpy(ctx))
    ref = ref.numpy()
    out = np.asarray(ours(jnp.asarray(x), None if ctx is None else jnp.asarray(ctx)))
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err


UNET_FORM = dict(dim=DIM, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=24,
                 activation_fn="geglu", attention_bias=False)
MAPPER_FORM = dict(dim=DIM, num_attention_heads=1, attention_head_dim=DIM, activation_fn="gelu",
                   attention_bias=True)


@pytest.mark.parametrize("ctx_len", [5, 1])
def test_unet_form_parity(ctx_len):
    tb, ours = _pair(UNET_FORM)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, L, DIM), dtype=np.float32)
    ctx = rng.standard_normal((B, ctx_len, 24), dtype=np.float32)
    _compare(tb, ours, x, ctx)


def test_mapper_form_parity_and_layout():
    tb, ours = _pair(MAPPER_FORM, seed=3)
    # diffusers has no norm2/attn2 in the self-attention-only block; neither must we.
    assert ours.attn2 is None and ours.norm2 is None
    assert not any(k.startswith(("attn2", "norm2")) for k in tb.state_dict())
    rng = np.random.default_rng(2)
    for length in (1, 7):  # the mapper runs on a single token; 7 exercises the softmax path
        _compare(tb, ours, rng.standard_normal((B, length, DIM), dtype=np.float32), None)


def test_only_cross_attention_and_gelu_approximate():
    kwargs = dict(UNET_FORM, only_cross_attention=True, activation_fn="gelu-approximate",
                  attention_bias=True)
    tb, ours = _pair(kwargs, seed=5)
    rng = np.random.default_rng(3)
    _compare(tb, ours, rng.standard_normal((B, L, DIM), dtype=np.float32),
             rng.standard_normal((B, 3, 24), dtype=np.float32))


def test_one_token_shortcut_equals_full_attention():
    """The 1-key shortcut in Attention must equal the general softmax path exactly."""
    from pbe_jax.models.attention import dot_product_attention

    _, ours = _pair(UNET_FORM, seed=7)
    attn = ours.attn2
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((B, L, DIM), dtype=np.float32))
    ctx = jnp.asarray(rng.standard_normal((B, 1, 24), dtype=np.float32))
    q = attn.to_q(x).reshape(B, L, 2, 16)
    k = attn.to_k(ctx).reshape(B, 1, 2, 16)
    v = attn.to_v(ctx).reshape(B, 1, 2, 16)
    full = attn.to_out[0](dot_product_attention(q, k, v).reshape(B, L, DIM))
    np.testing.assert_array_equal(np.asarray(attn(x, ctx)), np.asarray(full))


def test_mismatched_key_is_named():
    tb = TorchBlock(**MAPPER_FORM)
    sd = {k: v.detach().numpy() for k, v in tb.state_dict().items()}
    sd["attn1.to_qq.weight"] = sd.pop("attn1.to_q.weight")
    ours = BasicTransformerBlock(**MAPPER_FORM, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointMismatchError, match=r"attn1\.to_q\.weight"):
        load_torch_state_dict(ours, sd)


def test_unsupported_activation_raises():
    with pytest.raises(ValueError, match="swiglu"):
        BasicTransformerBlock(**dict(MAPPER_FORM, activation_fn="swiglu"), rngs=nnx.Rngs(0))
