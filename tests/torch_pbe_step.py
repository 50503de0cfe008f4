"""The official Paint-by-Example training step in PyTorch, with its random draws given: what
the train-step parity test holds pbe_jax's `make_train_step` against.

Modules: diffusers `UNet2DConditionModel` / `AutoencoderKL` / `PaintByExampleImageEncoder`
loaded from a pbe_jax export (`benchmarks.torch_ref.load_components`), so both sides hold the
same weights. The computation is the official `ddpm.py` (PBE_SPEC 1.2, 1.5):

- `LatentDiffusion.get_input`: z = posterior(image).sample() * scale and the same for the
  masked image (under no_grad), the mask resized bilinearly (torchvision 0.12 `Resize` on a
  tensor: no antialias), `x = cat(z, z_inpaint, mask_resize)`;
- `forward`: c = proj_out(final_ln(mapper(CLIP(ref).pooler_output[:, None]))), replaced by
  `learnable_vector.repeat(B, 1, 1)` for a dropped batch (the official draw is once per batch);
- `p_losses`: noise on the first 4 channels only, `x_noisy = cat(q_sample(z), x[:, 4:])`, target
  eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z (SD 2.x's `LatentDiffusion.get_v`), loss = MSE
  (`l_simple_weight` 1, `original_elbo_weight` 0, logvar 0), with LDM's schedule buffers
  (`register_schedule`: float64 numpy, stored as float32);
- `configure_optimizers`: one `torch.optim.AdamW(lr, weight_decay=0.01)` over the UNet, mapper,
  final LN, proj_out and the vector, stepped per batch by `LambdaLR(LambdaLinearScheduler)`;
  Lightning 1.4.2 calls `optimizer.zero_grad()`, which in torch 1.11 leaves zero tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pbe_jax.benchmarks.torch_ref import load_components, to_torch_batch


class LambdaLinearScheduler:
    """`ldm/lr_scheduler.py` LambdaLinearScheduler (one cycle): the LambdaLR multiplier."""

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths):
        self.lr_warm_up_steps, self.f_min, self.f_max = warm_up_steps, f_min, f_max
        self.f_start, self.cycle_lengths = f_start, cycle_lengths
        self.cum_cycles = np.cumsum([0] + list(cycle_lengths))

    def find_in_interval(self, n):
        interval = 0
        for cl in self.cum_cycles[1:]:
            if n <= cl:
                return interval
            interval += 1

    def schedule(self, n, **kwargs):
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            return ((self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n
                    + self.f_start[cycle])
        return (self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle])
                * (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle])


def ldm_schedule(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    """`DDPM.register_schedule` for beta_schedule 'linear' (= diffusers 'scaled_linear'):
    (sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod), float32 tensors [T]."""
    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps,
                            dtype=torch.float64) ** 2).numpy()
    ac = np.cumprod(1.0 - betas, axis=0)
    return (torch.tensor(np.sqrt(ac), dtype=torch.float32),
            torch.tensor(np.sqrt(1.0 - ac), dtype=torch.float32))


def _extract(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return table.gather(-1, t).reshape(t.shape[0], 1, 1, 1)  # LDM extract_into_tensor


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


class OfficialStep:
    """The official training step on a pbe_jax export `path` (fp32, CPU)."""

    def __init__(self, path: str, *, prediction_type: str, lr: float, warmup_steps: int,
                 warmup_init_factor: float, weight_decay: float = 0.01, scale_factor: float,
                 decay_uncond_vector: bool = True):
        self.parts = load_components(path, "cpu")
        self.unet, self.vae, self.enc = self.parts["unet"], self.parts["vae"], self.parts["image_encoder"]
        self.vae.eval().requires_grad_(False)
        self.enc.model.eval().requires_grad_(False)  # FrozenCLIPImageEmbedder.freeze()
        self.unet.train()
        self.prediction_type, self.scale_factor = prediction_type, scale_factor
        self.sqrt_ac, self.sqrt_1m_ac = ldm_schedule()
        params = self.trainable()
        vector = params.pop("image_encoder.uncond_vector")
        # one group, as the official code; the exemption puts the vector in a group without decay
        groups = ([{"params": [*params.values(), vector]}] if decay_uncond_vector else
                  [{"params": list(params.values())}, {"params": [vector], "weight_decay": 0.0}])
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=False)
        sched = LambdaLinearScheduler([warmup_steps], [1.0], [1.0], [warmup_init_factor], [10_000_000_000_000])
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda=sched.schedule)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The official parameter list, by diffusers key (`unet.*`, `image_encoder.*`)."""
        out = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        for part in ("mapper", "final_layer_norm", "proj_out"):
            out.update({f"image_encoder.{part}.{k}": p
                        for k, p in getattr(self.enc, part).named_parameters()})
        out["image_encoder.uncond_vector"] = self.enc.uncond_vector
        return out

    def _encode(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        post = self.vae.encode(x).latent_dist  # DiagonalGaussianDistribution, logvar clamped
        return (post.mean + post.std * eps) * self.scale_factor

    def loss(self, batch: dict, draws) -> torch.Tensor:
        """`LatentDiffusion.forward` + `p_losses` on the uint8 host batch with `draws`
        (`diffusion.LossDraws` of numpy arrays, NHWC; the drop is one decision per batch)."""
        b = to_torch_batch(batch, "cpu")
        image, mask, ref = b["image"], b["mask"], b["reference"]
        n = image.shape[0]
        vae_eps = _nchw(draws.vae_eps)
        with torch.no_grad():
            z = self._encode(image, vae_eps[:n])
            z_inpaint = self._encode(image * mask, vae_eps[n:])
            mask_resize = F.interpolate(mask, size=z.shape[-2:], mode="bilinear", align_corners=False)
            pooled = self.enc.model(pixel_values=ref).pooler_output
        x = torch.cat((z, z_inpaint, mask_resize), dim=1)
        c = self.enc.proj_out(self.enc.final_layer_norm(self.enc.mapper(pooled[:, None])))
        drop = np.asarray(draws.drop)
        if drop.any() != drop.all():
            raise ValueError("the official CFG drop is one decision per batch")
        if drop.all():
            c = self.enc.uncond_vector.repeat(n, 1, 1)
        t = torch.from_numpy(np.asarray(draws.t, np.int64))
        noise = _nchw(draws.noise)
        x_noisy = _extract(self.sqrt_ac, t) * x[:, :4] + _extract(self.sqrt_1m_ac, t) * noise
        x_noisy = torch.cat((x_noisy, x[:, 4:]), dim=1)
        out = self.unet(x_noisy, t, c).sample
        if self.prediction_type == "epsilon":
            target = noise
        else:  # get_v
            target = _extract(self.sqrt_ac, t) * noise - _extract(self.sqrt_1m_ac, t) * x[:, :4]
        return ((out - target) ** 2).mean(dim=[1, 2, 3]).mean()

    def step(self, batch: dict, draws) -> tuple[float, dict[str, np.ndarray]]:
        """One training step: zero_grad (zeros, not None: Lightning 1.4.2 + torch 1.11),
        loss, backward, AdamW step, LambdaLR step. Returns (loss, {key: grad or None})."""
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss(batch, draws)
        loss.backward()
        grads = {k: None if p.grad is None else p.grad.detach().numpy().copy()
                 for k, p in self.trainable().items()}
        self.opt.step()
        self.lr_sched.step()
        return float(loss.detach()), grads

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def params(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self.trainable().items()}

    def moments(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """AdamW state per param that has one: (exp_avg, exp_avg_sq, step)."""
        out = {}
        for k, p in self.trainable().items():
            st = self.opt.state.get(p)
            if st:
                out[k] = (st["exp_avg"].numpy().copy(), st["exp_avg_sq"].numpy().copy(), int(st["step"]))
        return out
