"""The attention core (`pbe_jax.models.attention`) against PyTorch's scaled_dot_product_attention:
values and the gradients of q, k and v, for the fp32 flash path (deferred normalisation, flash
backward), the one-key shortcut (Paint by Example's cross-attention) and under remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pbe_jax.models.attention import dot_product_attention


def _torch_ref(q, k, v, d_out, scale):
    tq, tk, tv = (torch.tensor(np.swapaxes(a, 1, 2), dtype=torch.float64, requires_grad=True)
                  for a in (q, k, v))  # [B, H, L, D]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
    out.backward(torch.tensor(np.swapaxes(d_out, 1, 2), dtype=torch.float64))
    back = lambda t: np.swapaxes(t.detach().numpy(), 1, 2)  # noqa: E731
    return back(out), back(tq.grad), back(tk.grad), back(tv.grad)


@pytest.mark.parametrize("lq,lk,heads,dim", [(37, 37, 3, 8), (16, 5, 2, 40), (64, 1, 4, 16)])
@pytest.mark.parametrize("remat", [False, True])
def test_xla_attention_values_and_grads_match_torch(lq, lk, heads, dim, remat):
    rng = np.random.default_rng(lq * lk + dim)
    q = rng.standard_normal((2, lq, heads, dim)).astype(np.float32) * 2
    k = rng.standard_normal((2, lk, heads, dim)).astype(np.float32) * 2
    v = rng.standard_normal((2, lk, heads, dim)).astype(np.float32)
    d_out = rng.standard_normal((2, lq, heads, dim)).astype(np.float32)
    scale = dim ** -0.5

    def f(q, k, v):
        return dot_product_attention(q, k, v, impl="xla", scale=scale)

    g = jax.checkpoint(f) if remat else f
    out, vjp = jax.vjp(jax.jit(g), q, k, v)
    dq, dk, dv = vjp(jnp.asarray(d_out))
    ref = _torch_ref(q, k, v, d_out, scale)
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=1e-5, err_msg=name)
    if lk == 1:  # a softmax over one key: exactly v, and exactly zero gradient for q and k
        np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(v, out.shape))
        assert not np.any(np.asarray(dq)) and not np.any(np.asarray(dk))


def test_xla_attention_bf16_matches_fp32_to_bf16_precision():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 16)), jnp.float32) for _ in range(3))
    full = dot_product_attention(q, k, v, impl="xla")
    half = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), impl="xla",
                                 upcast=True)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=3e-2)
