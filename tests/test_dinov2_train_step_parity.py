"""One pbe_jax train step of the `dinov2` conditioner equals the same computation in PyTorch:
transformers `Dinov2Model` (frozen) + the projection (`torch.nn.Linear`) + diffusers
`UNet2DConditionModel` / `AutoencoderKL`, with the official PbE loss of tests/torch_pbe_step.py
(posterior noise, CFG drop, timesteps and noise given as `diffusion.LossDraws`).

The tiny model is the demo's `conditioner=dinov2` one with a 1-layer DINOv2 tower (the demo has
4: the same code, less to compile; the tower's own parity is tests/test_dinov2.py) on 32 px
references, 1 + 16 ID tokens, pbe_jax random init perturbed so no bias, norm or layer scale sits
at its init value. Checked: the loss, and every trainable parameter's gradient (UNet, proj_out,
uncond_vector) within 1e-4 relative, read from AdamW's first moment after the jitted step; the
tower is frozen (no gradient, not in the optimizer state). With 17 context tokens the UNet's
cross-attention q / k gradients are real (no one-token softmax shortcut to exempt) unless the
condition is dropped (17 copies of the uncond vector: a uniform softmax, zero q / k gradients).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pbe_jax import sharding as shd
from pbe_jax.benchmarks.model import random_batch
from pbe_jax.diffusion import LossDraws
from pbe_jax.models.dinov2 import DINOV2_MEAN, DINOV2_STD
from pbe_jax.training.optim import TorchAdamWState
from pbe_jax.training.state import Setup
from pbe_jax.training.step import make_train_step
from tests.test_train_step_parity import OFFICIAL, ONE_TOKEN_QK, _perturb, _rel, torch_named
from tests.torch_pbe_step import _extract, _nchw, ldm_schedule
from tests.train_utils import tiny_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

B = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_config("demo,conditioner=dinov2", **OFFICIAL,
                      **{"model.image_encoder.num_hidden_layers": 1})
    with cfg.unlocked():
        cfg.model.scheduler.prediction_type = "epsilon"
    setup = Setup(cfg, shd.make_mesh("data:1", devices=jax.devices()[:1]))
    params, frozen = (_perturb(t, s) for t, s in zip(setup.random_params(), (1, 2)))
    model = setup.model(params, frozen)
    d = tmp_path_factory.mktemp("dinov2_step")
    for comp in ("unet", "vae"):
        getattr(model, comp).save_pretrained(str(d / comp))
    model.image_encoder.model.save_pretrained(str(d / "tower"))  # a transformers Dinov2Model folder
    enc_sd = model.image_encoder.torch_state_dict()
    step = jax.jit(make_train_step(setup.graphdef, setup.rest, cfg.train, setup.tx, setup.schedule,
                                   setup.noise))
    return cfg, setup, params, frozen, d, enc_sd, step


class TorchDinov2Step:
    """The official PbE loss with AnyDoor's conditioning: c = proj_out(Dinov2(ref)[cls + patches])."""

    def __init__(self, d, enc_sd, scale_factor: float):
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(str(d / "unet")).train()
        self.vae = diffusers.AutoencoderKL.from_pretrained(str(d / "vae")).eval().requires_grad_(False)
        self.tower = transformers.Dinov2Model.from_pretrained(str(d / "tower")).eval().requires_grad_(False)
        w, b = enc_sd["proj_out.weight"], enc_sd["proj_out.bias"]
        self.proj = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.asarray(w)))
            self.proj.bias.copy_(torch.from_numpy(np.asarray(b)))
        self.uncond = torch.nn.Parameter(torch.from_numpy(np.asarray(enc_sd["uncond_vector"]).copy()))
        self.scale_factor = scale_factor
        self.sqrt_ac, self.sqrt_1m_ac = ldm_schedule()

    def trainable(self) -> dict:
        out = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        out.update({f"image_encoder.proj_out.{k}": p for k, p in self.proj.named_parameters()})
        out["image_encoder.uncond_vector"] = self.uncond
        return out

    def _encode(self, x, eps):
        post = self.vae.encode(x).latent_dist
        return (post.mean + post.std * eps) * self.scale_factor

    def grads(self, batch: dict, draws: LossDraws):
        image = _nchw(batch["image"].astype(np.float32) / 127.5 - 1.0)
        mask = _nchw(batch["mask"].astype(np.float32) / 255.0)
        ref = (batch["reference"].astype(np.float32) / 255.0 - np.float32(DINOV2_MEAN)) / np.float32(DINOV2_STD)
        n = image.shape[0]
        vae_eps = _nchw(draws.vae_eps)
        with torch.no_grad():
            z = self._encode(image, vae_eps[:n])
            z_inpaint = self._encode(image * mask, vae_eps[n:])
            mask_resize = torch.nn.functional.interpolate(mask, size=z.shape[-2:], mode="bilinear",
                                                          align_corners=False)
            tokens = self.tower(pixel_values=_nchw(ref)).last_hidden_state  # [B, 1 + N, D]
        c = self.proj(tokens)
        if np.asarray(draws.drop).all():
            c = self.uncond.expand_as(c)
        t = torch.from_numpy(np.asarray(draws.t, np.int64))
        noise = _nchw(draws.noise)
        x_noisy = _extract(self.sqrt_ac, t) * z + _extract(self.sqrt_1m_ac, t) * noise
        out = self.unet(torch.cat((x_noisy, z_inpaint, mask_resize), dim=1), t, c).sample
        loss = ((out - noise) ** 2).mean(dim=[1, 2, 3]).mean()
        loss.backward()
        return float(loss.detach()), {k: None if p.grad is None else p.grad.numpy().copy()
                                      for k, p in self.trainable().items()}


@pytest.mark.slow
@pytest.mark.parametrize("drop", [False, True], ids=["cond", "dropped"])
def test_dinov2_train_step_equals_torch(built, drop):
    cfg, setup, params, frozen, d, enc_sd, step = built
    batch = random_batch(B, cfg.data.resolution, cfg.data.reference_size, seed=0)
    rng = np.random.default_rng(100)
    h = cfg.data.resolution // 2 ** (len(cfg.model.vae.block_out_channels) - 1)
    c = cfg.model.vae.latent_channels
    draws = LossDraws(vae_eps=rng.standard_normal((2 * B, h, h, c)).astype(np.float32),
                      drop=np.full((B,), drop), t=np.array([3, 250, 611, 999], np.int32),
                      noise=rng.standard_normal((B, h, h, c)).astype(np.float32))
    t_loss, t_grads = TorchDinov2Step(d, enc_sd, cfg.model.vae.scaling_factor).grads(batch, draws)

    state = setup.new_state(jax.tree.map(jnp.asarray, params))
    new, metrics = step(state, frozen, batch, jax.tree.map(jnp.asarray, draws))
    new = jax.device_get(new)
    assert abs(float(metrics["loss"]) - t_loss) <= 1e-4 * abs(t_loss), (float(metrics["loss"]), t_loss)
    assert "model" not in new["params"]["image_encoder"]  # the tower is frozen
    adam = new["opt_state"][-1]
    assert isinstance(adam, TorchAdamWState)
    ours = {k: v / (1 - cfg.train.b1) for k, v in torch_named(adam.mu).items()}
    assert set(ours) == set(t_grads)
    top = max(float(np.max(np.abs(g))) for g in t_grads.values() if g is not None)
    bad = {}
    for k, g in t_grads.items():
        if g is None:  # not in the loss (the unused branch of the CFG drop)
            if np.any(ours[k]):
                bad[k] = "torch has no gradient, ours is nonzero"
            continue
        if drop and ONE_TOKEN_QK.search(k):
            # Dropped: every context token is the same uncond vector, so each cross-attention
            # softmax is uniform and its q / k gradients are zero up to rounding, both sides.
            size = max(float(np.max(np.abs(ours[k]))), float(np.max(np.abs(g)))) / top
            if size > 1e-5:
                bad[k] = f"{size:.2g} of the largest gradient, expected ~0"
            continue
        err = _rel(ours[k], g, 1e-6 * top)
        if err > 1e-4:
            bad[k] = err
    assert not bad, f"{len(bad)} gradients differ: {sorted(bad.items())[:8]}"
    assert (t_grads["image_encoder.uncond_vector"] is None) == (not drop)
    assert (t_grads["image_encoder.proj_out.weight"] is None) == drop
