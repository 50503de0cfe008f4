"""Key maps between the original (CompVis LDM / Paint-by-Example) checkpoint and diffusers names.

The original `model.ckpt` of Paint by Example (and SD's `sd-v1-4.ckpt`) is one Lightning state
dict of `LatentDiffusion`:

| LDM prefix                              | diffusers component / key                    |
|-----------------------------------------|----------------------------------------------|
| `model.diffusion_model.*`               | `unet` (openaimodel `UNetModel` names)       |
| `first_stage_model.*`                   | `vae` (`encoder.down.i.block.j`, `mid.attn_1`)|
| `cond_stage_model.transformer.*`        | `image_encoder.model.*` (CLIPVisionModel)    |
| `cond_stage_model.mapper.resblocks.i.*` | `image_encoder.mapper.blocks.i.*` (`c_qkv` split) |
| `cond_stage_model.final_ln.*`           | `image_encoder.final_layer_norm.*`           |
| `proj_out.*`                            | `image_encoder.proj_out.*`                   |
| `learnable_vector`                      | `image_encoder.uncond_vector`                |

Everything here is key and array logic only (numpy in, numpy out; no torch, no diffusers). The
UNet and VAE maps are built from the architecture (`UNetConfig` / `VAEConfig`), module by module,
so they are exact bijections: a checkpoint key that no module claims is reported, never dropped.
The same maps run backwards (`*_to_ldm`) to write LDM-layout dicts (used by the tests, checked
against diffusers' own `convert_from_ckpt` converters).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
MAPPER_PREFIX = "cond_stage_model.mapper.resblocks."
EMA_PREFIX = "model_ema."

# Keys of a LatentDiffusion checkpoint that are not network weights, with the reason each is not
# loaded. A key in no component and not listed here is an error.
LDM_IGNORED: tuple[tuple[str, str], ...] = (
    ("betas", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("alphas_cumprod*", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("sqrt_*", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("log_one_minus_alphas_cumprod", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("posterior_*", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("logvar", "LatentDiffusion.logvar (fixed at 0, loss weighting only)"),
    ("lvlb_weights", "noise-schedule buffer (rebuilt from the scheduler config)"),
    ("scale_factor", "latent scale factor buffer (the VAE config's scaling_factor holds it)"),
    ("model_ema.decay", "EMA bookkeeping"),
    ("model_ema.num_updates", "EMA bookkeeping"),
    ("first_stage_model.loss.*", "VAE training loss (LPIPS / discriminator), not the autoencoder"),
    ("cond_stage_model.transformer.vision_model.embeddings.position_ids",
     "CLIP position_ids buffer (recomputed)"),
    ("cond_stage_model.transformer.text_model.*",
     "CLIP text tower of Stable Diffusion: Paint by Example replaces the text encoder by the CLIP "
     "vision tower (the official code drops these keys with load_state_dict(strict=False))"),
)
EMA_IGNORED = ("model_ema.*", "EMA copy of the UNet (pass use_ema=True / --use-ema to load it "
                              "instead of the raw weights)")


class LDMKeyError(KeyError):
    """An LDM checkpoint lacks a key a map needs, or holds one no component claims."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------------------- prefix maps


class PrefixMap:
    """A bijection between module prefixes of two naming schemes (`a` <-> `b`).

    A key maps by its longest dotted prefix that has an entry: `down_blocks.0.attentions.1.norm.
    weight` -> `input_blocks.2.1.norm.weight` with the pair (`down_blocks.0.attentions.1`,
    `input_blocks.2.1`). A prefix maps whole subtrees, so one pair covers a transformer block.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.a_to_b: dict[str, str] = {}
        self.b_to_a: dict[str, str] = {}
        for a, b in pairs:
            if a in self.a_to_b or b in self.b_to_a:
                raise ValueError(f"PrefixMap: duplicate entry {a!r} <-> {b!r}")
            self.a_to_b[a], self.b_to_a[b] = b, a

    @staticmethod
    def _map(key: str, table: Mapping[str, str]) -> str | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return ".".join([table[head], *parts[n:]])
        return None

    def forward(self, key: str) -> str | None:
        return self._map(key, self.a_to_b)

    def backward(self, key: str) -> str | None:
        return self._map(key, self.b_to_a)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


# LDM ResBlock (openaimodel) sub-modules, diffusers ResnetBlock2D names first.
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
# LDM ResnetBlock (autoencoder) sub-modules: the same names but the shortcut.
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("conv_shortcut", "nin_shortcut"))
# LDM AttnBlock (autoencoder mid-block) sub-modules; q/k/v/proj_out are 1x1 convs there.
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _expand(a: str, b: str, subs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{a}.{x}", f"{b}.{y}") for x, y in subs]


def unet_prefix_map(config) -> PrefixMap:
    """diffusers `UNet2DConditionModel` <-> LDM `UNetModel` (without `model.diffusion_model.`).

    LDM numbers every down-path module in one list `input_blocks` (0 = conv_in, then per level
    `layers_per_block` [ResBlock, SpatialTransformer] entries and one Downsample) and the up path
    in `output_blocks` (per level `layers_per_block + 1` [ResBlock, SpatialTransformer,
    Upsample] entries). SpatialTransformer names already equal diffusers' Transformer2DModel.
    """
    n = len(config.down_block_types)
    lpb = _per_block(config.layers_per_block, n)
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    k = 1
    for i, kind in enumerate(config.down_block_types):
        for j in range(lpb[i]):
            pairs += _expand(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1
    if config.mid_block_type is not None:
        pairs += _expand("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
        pairs.append(("mid_block.attentions.0", "middle_block.1"))
        pairs += _expand("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    up_lpb = tuple(reversed(lpb))
    k = 0
    for i, kind in enumerate(config.up_block_types):
        cross = kind.startswith("CrossAttn")
        for j in range(up_lpb[i] + 1):
            pairs += _expand(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET)
            if cross:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
            if j == up_lpb[i] and i < n - 1:
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv",
                              f"output_blocks.{k}.{2 if cross else 1}.conv"))
            k += 1
    return PrefixMap(pairs)


def vae_prefix_map(config) -> PrefixMap:
    """diffusers `AutoencoderKL` <-> LDM `AutoencoderKL` (without `first_stage_model.`).

    The LDM decoder numbers its levels from the lowest resolution up (`decoder.up.{n-1}` is run
    first), diffusers in run order (`decoder.up_blocks.0` first).
    """
    n = len(config.block_out_channels)
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.conv_norm_out", f"{part}.norm_out")]
        for r in range(2):
            pairs += _expand(f"{part}.mid_block.resnets.{r}", f"{part}.mid.block_{r + 1}", _VAE_RESNET)
        if config.mid_block_add_attention:
            pairs += _expand(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)
    for i in range(n):
        for j in range(config.layers_per_block):
            pairs += _expand(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                             _VAE_RESNET)
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                          f"encoder.down.{i}.downsample.conv"))
        ldm_i = n - 1 - i
        for j in range(config.layers_per_block + 1):
            pairs += _expand(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}",
                             _VAE_RESNET)
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv"))
    if config.use_quant_conv:
        pairs.append(("quant_conv", "quant_conv"))
    if config.use_post_quant_conv:
        pairs.append(("post_quant_conv", "post_quant_conv"))
    return PrefixMap(pairs)


def _rename(sd: Mapping[str, np.ndarray], fn, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
    out, unmatched = {}, []
    for key, value in sd.items():
        new = fn(key)
        if new is None:
            unmatched.append(key)
            continue
        if new in out:
            raise LDMKeyError(f"{what}: two checkpoint keys map to {new!r} (second: {key!r})")
        out[new] = value
    return out, unmatched


def _is_vae_attn_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions." in diffusers_key and diffusers_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))


# ------------------------------------------------------------------------ component converters


def unet_from_ldm(sd: Mapping[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], list[str]]:
    """LDM UNet keys (prefix `model.diffusion_model.` already removed) -> (diffusers keys, keys no
    module of `config` claims)."""
    return _rename(sd, unet_prefix_map(config).backward, "UNet")


def unet_to_ldm(sd: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """diffusers UNet state dict -> LDM `UNetModel` names (no prefix). Fails on unknown keys."""
    out, unmatched = _rename(sd, unet_prefix_map(config).forward, "UNet")
    if unmatched:
        raise LDMKeyError(f"UNet keys with no LDM name for this config: {sorted(unmatched)[:20]}")
    return out


def vae_from_ldm(sd: Mapping[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], list[str]]:
    """LDM autoencoder keys (prefix removed) -> (diffusers keys, unclaimed keys). The mid-block
    attention's 1x1-conv weights [C, C, 1, 1] become Linear weights [C, C]."""
    out, unmatched = _rename(sd, vae_prefix_map(config).backward, "VAE")
    for k, v in out.items():
        if _is_vae_attn_weight(k) and v.ndim == 4:
            out[k] = v[:, :, 0, 0]
    return out, unmatched


def vae_to_ldm(sd: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """diffusers VAE state dict -> LDM names, attention projections as 1x1 convs [C, C, 1, 1]."""
    out = {}
    pm = vae_prefix_map(config)
    for k, v in sd.items():
        new = pm.forward(k)
        if new is None:
            raise LDMKeyError(f"VAE key {k!r} has no LDM name for this config")
        out[new] = v[:, :, None, None] if _is_vae_attn_weight(k) and v.ndim == 2 else v
    return out


# The mapper's `xf.ResidualAttentionBlock` sub-modules, diffusers BasicTransformerBlock names first.
_MAPPER = (("attn1.to_out.0", "attn.c_proj"), ("norm1", "ln_1"), ("norm3", "ln_2"),
           ("ff.net.0.proj", "mlp.c_fc"), ("ff.net.2", "mlp.c_proj"))
_MAPPER_FROM_LDM = {b: a for a, b in _MAPPER}
_MAPPER_TO_LDM = dict(_MAPPER)
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
# (LDM prefix, diffusers prefix) of the encoder's top-level modules.
_ENCODER_TOP = (("cond_stage_model.final_ln.", "final_layer_norm."), ("proj_out.", "proj_out."))


def _encoder_key_from_ldm(key: str) -> str | None:
    if key == "learnable_vector":
        return "uncond_vector"
    if key.startswith(CLIP_PREFIX):
        return "model." + key[len(CLIP_PREFIX):]
    for src, dst in _ENCODER_TOP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def image_encoder_from_ldm(ckpt: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """LDM keys of the conditioning encoder -> (diffusers `PaintByExampleImageEncoder` keys, the
    input keys that belong to no encoder module).

    The mapper's fused `attn.c_qkv` [3D, D] splits into q, k, v in that order: with the mapper's
    single head, `xf.QKVMultiheadAttention` reads q, k, v as consecutive thirds (what diffusers'
    `convert_paint_by_example_checkpoint` does too).
    """
    out, unmatched = {}, []
    for key, v in ckpt.items():
        if not key.startswith(MAPPER_PREFIX):
            new = _encoder_key_from_ldm(key)
            if new is None:
                unmatched.append(key)
            else:
                out[new] = v
            continue
        idx, _, rest = key[len(MAPPER_PREFIX):].partition(".")
        mod, _, leaf = rest.rpartition(".")
        base = f"mapper.blocks.{idx}"
        if mod == "attn.c_qkv":
            if v.shape[0] % 3:
                raise LDMKeyError(f"{key}: shape {tuple(v.shape)}, first dim not divisible by 3")
            for name, part in zip(_QKV, np.split(np.asarray(v), 3, axis=0)):
                out[f"{base}.{name}.{leaf}"] = part
        elif mod in _MAPPER_FROM_LDM:
            out[f"{base}.{_MAPPER_FROM_LDM[mod]}.{leaf}"] = v
        else:
            unmatched.append(key)
    return out, unmatched


def image_encoder_to_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers `PaintByExampleImageEncoder` keys -> full-checkpoint LDM keys (q, k, v fused)."""
    out, qkv = {}, {}
    top = {dst: src for src, dst in _ENCODER_TOP}
    for key, v in sd.items():
        if key.startswith("model."):
            out[CLIP_PREFIX + key[len("model."):]] = v
        elif key == "uncond_vector":
            out["learnable_vector"] = v
        elif key.startswith("mapper.blocks."):
            idx, _, rest = key[len("mapper.blocks."):].partition(".")
            mod, _, leaf = rest.rpartition(".")
            if mod in _QKV:
                qkv.setdefault((idx, leaf), {})[mod] = v
            elif mod in _MAPPER_TO_LDM:
                out[f"{MAPPER_PREFIX}{idx}.{_MAPPER_TO_LDM[mod]}.{leaf}"] = v
            else:
                raise LDMKeyError(f"image encoder key {key!r} has no LDM name")
        elif key.split(".", 1)[0] + "." in top:
            head, _, tail = key.partition(".")
            out[top[head + "."] + tail] = v
        else:
            raise LDMKeyError(f"image encoder key {key!r} has no LDM name")
    for (idx, leaf), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise LDMKeyError(f"mapper block {idx}: {leaf} of {sorted(set(_QKV) - set(parts))} missing")
        out[f"{MAPPER_PREFIX}{idx}.attn.c_qkv.{leaf}"] = np.concatenate([np.asarray(parts[n]) for n in _QKV])
    return out


# ------------------------------------------------------------------------- whole checkpoints


@dataclass
class LDMParts:
    """A LatentDiffusion checkpoint split into diffusers-named component state dicts.

    `ignored` maps each reason to the checkpoint keys dropped for it (reported to the user);
    `unexpected` lists keys that belong to no component and no known reason (an error for the
    caller to raise, naming them)."""

    unet: dict[str, np.ndarray] = field(default_factory=dict)
    vae: dict[str, np.ndarray] = field(default_factory=dict)
    image_encoder: dict[str, np.ndarray] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def ignore(self, reason: str, key: str) -> None:
        self.ignored.setdefault(reason, []).append(key)


def ema_key(key: str) -> str:
    """LDM's `LitEma` stores `model.diffusion_model.a.b.c` as `model_ema.diffusion_modelabc`."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


_NOT_EMA = "raw (non-EMA) UNet weights: use_ema loads the model_ema.* copy instead"
_OTHER_ENCODER = ("conditioning encoder of the source checkpoint (SD init builds the Paint-by-Example "
                  "encoder from the CLIP vision tower and a fresh mapper)")


def split_ldm_checkpoint(ckpt: Mapping[str, np.ndarray], unet_config, vae_config, *,
                         with_encoder: bool = True, use_ema: bool = False) -> LDMParts:
    """Split a LatentDiffusion state dict into diffusers-named `unet`, `vae`, `image_encoder`.

    `with_encoder=False` (SD init: the conditioning encoder is not taken from the checkpoint)
    reports every `cond_stage_model.*` key as ignored instead of converting it. `use_ema` takes
    the UNet from its `model_ema.*` copy.
    """
    parts = LDMParts()
    rules = list(LDM_IGNORED) + ([] if use_ema else [EMA_IGNORED])
    ema_used = {ema_key(k): k for k in ckpt if k.startswith(UNET_PREFIX)} if use_ema else {}
    unet_raw, vae_raw, rest = {}, {}, {}
    for key, v in ckpt.items():
        reason = next((r for pat, r in rules if fnmatch.fnmatchcase(key, pat)), None)
        if reason is not None:
            parts.ignore(reason, key)
        elif key in ema_used:
            unet_raw[ema_used[key][len(UNET_PREFIX):]] = v
        elif key.startswith(UNET_PREFIX):
            if use_ema:
                parts.ignore(_NOT_EMA, key)
            else:
                unet_raw[key[len(UNET_PREFIX):]] = v
        elif key.startswith(VAE_PREFIX):
            vae_raw[key[len(VAE_PREFIX):]] = v
        else:
            rest[key] = v
    absent = sorted(k for k in ema_used if k not in ckpt)
    if absent:
        raise LDMKeyError(f"use_ema: the checkpoint has no EMA copy of {len(absent)} UNet keys, "
                          f"e.g. {absent[:5]}")
    parts.unet, bad = unet_from_ldm(unet_raw, unet_config)
    parts.unexpected += [UNET_PREFIX + k for k in bad]
    parts.vae, bad = vae_from_ldm(vae_raw, vae_config)
    parts.unexpected += [VAE_PREFIX + k for k in bad]
    if with_encoder:
        parts.image_encoder, bad = image_encoder_from_ldm(rest)
        parts.unexpected += bad
    else:
        for key in rest:
            if key.startswith(MAPPER_PREFIX) or _encoder_key_from_ldm(key) is not None:
                parts.ignore(_OTHER_ENCODER, key)
            else:
                parts.unexpected.append(key)
    parts.unexpected.sort()
    return parts


def to_ldm_checkpoint(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                      image_encoder: Mapping[str, np.ndarray], unet_config,
                      vae_config) -> dict[str, np.ndarray]:
    """diffusers-named component state dicts -> one LDM (`model.ckpt`-style) state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, vae_config).items()})
    out.update(image_encoder_to_ldm(image_encoder))
    return out
