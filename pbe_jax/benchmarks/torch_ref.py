"""The PyTorch reference the benchmarks time ours against: the official Paint-by-Example training
step (PBE_SPEC.md section 1) in eager PyTorch on diffusers/transformers modules, and diffusers'
`PaintByExamplePipeline`, both loaded from a directory our `save_pretrained` wrote, so the
weights are identical.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np

from pbe_jax.models.clip import CLIP_MEAN, CLIP_STD


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_components(path: str, device: str | None = None) -> dict[str, Any]:
    """unet / vae / image_encoder of an exported diffusers repo, with their own torch classes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

    device = device or torch_device()
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
               "image_encoder": PaintByExampleImageEncoder}
    out = {}
    for comp, cls in classes.items():
        model, info = cls.from_pretrained(path, subfolder=comp, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise RuntimeError(f"{path}/{comp}: torch loading reported {problems}")
        out[comp] = model.to(device)
    return out


def load_pipeline(path: str, device: str | None = None):
    """diffusers `PaintByExamplePipeline` on an exported repo (PNDM = PLMS, as released)."""
    import transformers
    from diffusers import PaintByExamplePipeline, PNDMScheduler

    parts = load_components(path, device)
    fe_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    pipe = PaintByExamplePipeline(
        vae=parts["vae"].eval(), image_encoder=parts["image_encoder"].eval(), unet=parts["unet"].eval(),
        scheduler=PNDMScheduler.from_pretrained(path, subfolder="scheduler"),
        feature_extractor=fe_cls.from_pretrained(path, subfolder="feature_extractor"),
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_torch_batch(batch: dict[str, np.ndarray], device: str, dtype=None) -> dict:
    """The uint8 NHWC host batch -> NCHW float tensors as the official dataset yields them:
    image in [-1, 1], mask in [0, 1] (1 = keep), reference CLIP-normalised."""
    import torch

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)

    image = nchw(batch["image"].astype(np.float32) / 127.5 - 1.0)
    mask = nchw(batch["mask"].astype(np.float32) / 255.0)
    ref = (batch["reference"].astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return {"image": image, "mask": mask, "reference": nchw(ref)}


class TorchTrainStep:
    """One official PbE step per call: VAE-encode image and masked image (posterior sample x
    0.18215) and the CLIP pooler output under no_grad, mapper -> LN -> proj, per-batch CFG drop
    (`random.uniform(0, 1) < 0.2` -> uncond_vector), noise at a random t, UNet fwd/bwd,
    torch.optim.AdamW(lr, weight_decay=0.01) over UNet + mapper/LN/proj/uncond_vector."""

    def __init__(self, parts: dict, *, lr: float = 1e-5, cond_drop_prob: float = 0.2,
                 scaling_factor: float = 0.18215, num_train_timesteps: int = 1000,
                 autocast_dtype=None, seed: int = 0):
        import torch

        self.unet, self.vae, self.enc = parts["unet"], parts["vae"], parts["image_encoder"]
        self.vae.eval().requires_grad_(False)
        self.enc.model.eval().requires_grad_(False)
        self.unet.train()
        trainable = (list(self.unet.parameters()) + list(self.enc.mapper.parameters())
                     + list(self.enc.final_layer_norm.parameters())
                     + list(self.enc.proj_out.parameters()) + [self.enc.uncond_vector])
        self.opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(next(self.unet.parameters()).device)
        self.sf, self.p_drop, self.autocast_dtype = scaling_factor, cond_drop_prob, autocast_dtype
        self.gen = torch.Generator(device=self.alphas_cumprod.device).manual_seed(seed)
        random.seed(seed)

    def __call__(self, batch: dict) -> float:
        import torch
        import torch.nn.functional as F

        image, mask, ref = batch["image"], batch["mask"], batch["reference"]
        dev = image.device
        ac = (torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype
              else torch.autocast(dev.type, enabled=False))
        with ac:
            with torch.no_grad():
                z = self.vae.encode(image).latent_dist.sample(self.gen) * self.sf
                z_m = self.vae.encode(image * mask).latent_dist.sample(self.gen) * self.sf
                m = F.interpolate(mask, size=z.shape[-2:], mode="bilinear")
                pooled = self.enc.model(pixel_values=ref).pooler_output
            ctx = self.enc.proj_out(self.enc.final_layer_norm(self.enc.mapper(pooled[:, None])))
            if random.uniform(0, 1) < self.p_drop:
                ctx = self.enc.uncond_vector.to(ctx.dtype).expand_as(ctx)
            b = z.shape[0]
            t = torch.randint(0, self.alphas_cumprod.shape[0], (b,), generator=self.gen, device=dev)
            noise = torch.randn(z.shape, generator=self.gen, device=dev)
            a = self.alphas_cumprod[t].view(b, 1, 1, 1)
            x_t = a.sqrt() * z + (1 - a).sqrt() * noise
            eps = self.unet(torch.cat([x_t, z_m, m], dim=1), t, ctx).sample
            loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())
