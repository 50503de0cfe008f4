r"""Paint-by-Example training configs. One file, variants by argument. (`configs/pbe.py` at the
top of the repository points here, so `--config=configs/pbe.py:demo` and the installed package
read the same file.)

Run (from the repo root):

  # demo: from nothing on a CPU in minutes: fits a VAE on synthetic 32 px scenes (WORKDIR/vae),
  # then trains a tiny PbE model; writes checkpoints, metrics.jsonl + TensorBoard (loss, the
  # held-out exemplar-following score, the VAE's PSNR) and grids of held-out edits.
  python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=/tmp/pbe_demo
  # the demo's autoencoder stage alone (writes DIR/vae, diffusers format):
  python -m pbe_jax.fit_vae --config=configs/pbe.py:demo --workdir=DIR

  # the paper's recipe (PBE_SPEC.md section 1): SD v1.x + CLIP ViT-L/14 init, 512 px, AdamW 1e-5,
  # 10k linear warmup then constant, global batch 32, CFG drop 0.2, remat on.
  python -m pbe_jax.train --config=configs/pbe.py:sd15 --workdir=gs://BUCKET/pbe_sd15 \
      --config.data.source=openimages --config.data.annotations=.../oidv6-train-annotations-bbox.csv \
      --config.data.images_dir=.../train

  # the same recipe on SD 2.1 base (512 px, epsilon; its UNet has linear projections and
  # per-block heads, cross_attention_dim 1024) with the paper's CLIP ViT-L/14 tower:
  python -m pbe_jax.train --config=configs/pbe.py:sd21 --workdir=gs://BUCKET/pbe_sd21 \
      --config.data.source=openimages --config.data.annotations=... --config.data.images_dir=...

  # SD 2.1 (768 px, v-prediction: the loss target follows the init repo's scheduler config)
  # with an OpenCLIP ViT-H/14 tower in transformers format (gelu; mapper (32 + 1) // 5 = 6 blocks):
  python -m pbe_jax.train --config=configs/pbe.py:sd21_768,tower=vit_h14 --workdir=gs://BUCKET/pbe_sd21_768 \
      --config.data.source=openimages --config.data.annotations=... --config.data.images_dir=...
  # (equivalently any tower dir / Hub id: --config.init_from.clip=laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
  # with config.model.image_encoder describing it)

  # mesh / precision / size are arguments; any field can be overridden (the config is locked, so
  # a misspelt field fails):
  python -m pbe_jax.train --config=configs/pbe.py:sd15,mesh=data:-1,fsdp:8,tensor:1,dtype=bf16 \
      --workdir=DIR --config.train.batch_size=256 --config.data.source=coco ...

  # check the memory per chip before renting (libtpu needed; compiles on a CPU host):
  python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd21_768 --topology=v5p-8

Variants: `demo` (tiny, synthetic data), `sd15` (the paper: SD v1-4 + CLIP ViT-L/14), `sd21`
(SD 2.1 base, 512 px, epsilon), `sd21_768` (SD 2.1, 768 px, v_prediction). The paper variants
need a real data source: with the synthetic default the loader fails at start, naming the flags.

Arguments (comma separated after the variant): `mesh=AXIS:SIZE,...` (axes data/fsdp/tensor, one
size may be -1), `dtype=bf16|fp32` (compute dtype; params stay fp32), `res=INT` (image size),
`batch=INT` (global batch), `steps=INT`, `tower=vit_l14|vit_h14` (the image tower of the SD
variants: the paper's openai/clip-vit-large-patch14, or laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
`conditioner=NAME` (the exemplar encoder, models/exemplar.py CONDITIONERS: `clip`, the paper's
CLIP class token, default; `clip_tokens`, every CLIP token through the mapper; `dinov2`, AnyDoor's
DINOv2 class + patch tokens through a trained projection, `tower=dinov2_s14|b14|l14|g14`, default
g14 = facebook/dinov2-giant; in the demo a small DINOv2 tower trained with the rest),
`scenes=palette|identity` (the demo's synthetic scenes, default palette).

Departures from the official recipe, on purpose: the SD variants compute in bf16 by default (the
paper trained in fp32; pass dtype=fp32 for the exact recipe). The `demo` has no pretrained weights and
minutes of two CPU cores, so it earns its priors itself: it fits its own VAE first
(`vae_fit`), trains the CLIP tower with the rest (`train.train_image_tower`), predicts the clean
latent instead of the noise (`model.scheduler.prediction_type='sample'`, DDIM sampling), and
trains on 'palette' scenes (`data.synthetic_style`: 8 saturated object colours on muted
backgrounds) through the paper's box filter, crops, Bezier masks and reference augmentation.
`demo,scenes=identity` trains on 'identity' scenes instead (objects of 8 colours x 4 shapes x 5
patterns on muted or plain backgrounds) for 4000 steps, with 30% of its references the object
alone on a plain backdrop (`data.ref_backdrop_prob`, not in the paper), and adds the identity
score and the out-of-style triplets to the exemplar eval (`exemplar_eval.identity`,
`.offstyle_triplets`).
The SD variants keep the paper's frozen SD VAE and CLIP tower and their released schedules.
"""
from __future__ import annotations

import ml_collections

from pbe_jax.configs.validate import validate, vae_factor
from pbe_jax.data.config import data_config
from pbe_jax.evals.config import evals_config
from pbe_jax.models import conditioner_class
from pbe_jax.schedulers import pbe_scheduler_config
from pbe_jax.sharding import DEFAULT_RULES

VARIANTS = ("demo", "sd15", "sd21", "sd21_768")
DEMO_LR, PAPER_LR = 2e-3, 1e-5  # train.lr of the demo and of the SD variants (the paper's)
_TYPES = {"mesh": str, "dtype": str, "res": int, "batch": int, "steps": int, "tower": str,
          "conditioner": str, "scenes": str}
DEMO_SCENES = ("palette", "identity")  # scenes=: the demo's data.synthetic_style
# scenes=identity: data.ref_backdrop_prob (a share of references is the object alone on a plain
# backdrop, so that references brought that way work too) and train.num_steps
DEMO_BACKDROP_PROB = 0.3
DEMO_IDENTITY_STEPS = 4000


def parse_arg(arg: str | None) -> tuple[str, dict]:
    """'sd15,mesh=data:-1,fsdp:8,dtype=bf16' -> ('sd15', {'mesh': 'data:-1,fsdp:8', 'dtype': 'bf16'})."""
    variant, kw, last = "demo", {}, None
    for tok in filter(None, (t.strip() for t in (arg or "").split(","))):
        if "=" in tok:
            key, _, val = tok.partition("=")
            if key not in _TYPES:
                raise ValueError(f"unknown config argument {key!r}; known: {sorted(_TYPES)}")
            kw[key], last = val, key
        elif last == "mesh" and ":" in tok:  # the mesh spec itself contains commas
            kw["mesh"] += "," + tok
        elif tok in VARIANTS:
            variant, last = tok, None
        else:
            raise ValueError(f"bad config argument {tok!r}; variants are {VARIANTS}")
    return variant, {k: _TYPES[k](v) for k, v in kw.items()}


def demo_models() -> ml_collections.ConfigDict:
    # Tiny widths, 2 UNet levels on 16x16 latents. The demo's images are 32 px, so the VAE has
    # 2 levels (factor 2): it is fitted on the demo's own images first (config.vae_fit). The
    # CLIP tower has 4 layers so the mapper has (4+1)//5 = 1 block.
    return ml_collections.ConfigDict({
        "unet": {
            "in_channels": 9, "out_channels": 4, "sample_size": 16,
            "block_out_channels": (32, 64), "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 8,
        },
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 32,
            "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            # The VAE stage replaces this with 1 / std of its fitted latents (how SD's 0.18215
            # was picked). Without the stage (vae_fit.steps=0) the VAE stays random, and its
            # latents already have std ~1.
            "scaling_factor": 1.0,
        },
        "image_encoder": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 32,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "proj_size": 32,
        },
        # The one noise schedule (diffusers scheduler_config.json): training loss, samples,
        # evals and export all read it. SD's betas; the demo predicts the clean latent
        # ('sample', sampled with DDIM) instead of the noise: from scratch, in minutes, an
        # x0-predicting UNet paints coherent objects where an eps-predicting one still paints
        # noise (the paper fine-tunes SD's eps-UNet; sd15 keeps that).
        "scheduler": {**pbe_scheduler_config(), "_class_name": "DDIMScheduler",
                      "prediction_type": "sample"},
    })


# The image towers `sd-init` takes (`tower=` argument): transformers CLIPVisionConfig fields and
# the Hub repo holding them in transformers format. The mapper has (layers + 1) // 5 blocks of
# the tower's width (5 for ViT-L/14, 6 for ViT-H/14), as the paper's code.
TOWERS = {
    "vit_l14": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
                "openai/clip-vit-large-patch14"),
    "vit_h14": ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                 "hidden_act": "gelu", "layer_norm_eps": 1e-5},
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
}


# The demo's tower for `conditioner=dinov2`: a small DINOv2 (transformers Dinov2Config fields) on
# the demo's 32 px references, trained from scratch with the rest (as the demo's CLIP tower).
DEMO_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "mlp_ratio": 2,
               "image_size": 32, "patch_size": 8, "model_type": "dinov2", "reference_size": 32}


def towers_of(conditioner: str) -> dict:
    """The `tower=` choices of a conditioner: its own table (`TOWERS` on the class), else the
    CLIP towers above."""
    return getattr(conditioner_class(conditioner), "TOWERS", None) or TOWERS


def image_tower(tower: str, proj_size: int, conditioner: str = "clip") -> dict:
    """`config.model.image_encoder` for a tower of `towers_of(conditioner)`, as the conditioner
    builds it (the `clip` one writes the context width `proj_size` as `projection_dim` too:
    diffusers reads the encoder's proj_size from there)."""
    towers = towers_of(conditioner)
    if tower not in towers:
        raise ValueError(f"unknown tower={tower!r} for conditioner={conditioner}; known: {sorted(towers)}")
    return conditioner_class(conditioner).config_entry(towers[tower][0], proj_size)


def sd15_models() -> ml_collections.ConfigDict:
    # diffusers config.json fields of the released Fantasy-Studio/Paint-by-Example components.
    return ml_collections.ConfigDict({
        "unet": {
            "in_channels": 9, "out_channels": 4, "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
        },
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
        },
        "image_encoder": image_tower("vit_l14", proj_size=768),  # CLIP ViT-L/14
        # Replaced by the init checkpoint's scheduler config when `init_from` has one.
        "scheduler": pbe_scheduler_config(),
    })


def sd21_models(variant: str, tower: str, conditioner: str = "clip") -> ml_collections.ConfigDict:
    """SD 2.1 (`sd21`: stabilityai/stable-diffusion-2-1-base, 512 px, epsilon; `sd21_768`:
    stabilityai/stable-diffusion-2-1, 768 px, v_prediction, upcast attention): the repos'
    unet / vae config.json and scheduler_config.json fields, with the 9-channel conv_in, and
    the image tower `tower` with proj_size = the UNet's cross_attention_dim (1024)."""
    big = variant == "sd21_768"
    m = sd15_models().to_dict()  # the SD UNet / VAE skeleton (layout, widths, 4 levels)
    m["unet"].update({
        "sample_size": 96 if big else 64, "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": big,
    })
    m["vae"]["sample_size"] = 768  # both repos' vae/config.json say 768
    m["image_encoder"] = image_tower(tower, proj_size=1024, conditioner=conditioner)
    m["scheduler"] = {
        "_class_name": "DDIMScheduler" if big else "PNDMScheduler",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if big else "epsilon",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }
    return ml_collections.ConfigDict(m)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, kw = parse_arg(arg)
    demo = variant == "demo"
    if demo and "tower" in kw:
        raise ValueError("tower= picks the image tower of the SD variants, not of the demo")
    if not demo and "scenes" in kw:
        raise ValueError("scenes= picks the demo's synthetic scenes, not the SD variants' data")
    scenes = kw.get("scenes", "palette")
    if scenes not in DEMO_SCENES:
        raise ValueError(f"config argument scenes={scenes!r}; expected one of {DEMO_SCENES}")
    identity = demo and scenes == "identity"
    conditioner = kw.get("conditioner", "clip")
    encoder_cls = conditioner_class(conditioner)
    tower = kw.get("tower", getattr(encoder_cls, "DEFAULT_TOWER", "vit_l14"))
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.dtype = kw.get("dtype", "fp32" if demo else "bf16")
    c.mesh = kw.get("mesh", "data:-1,fsdp:1,tensor:1")
    c.sharding_rules = tuple(DEFAULT_RULES)
    c.attention_impl = "xla"  # 'cudnn' on NVIDIA GPUs (bf16), or a registered TPU kernel
    c.remat = not demo
    c.remat_policy = ""  # '' recomputes everything; or a jax.checkpoint_policies name
    if demo:
        c.model = demo_models()
        if conditioner != "clip":
            base = DEMO_DINOV2 if conditioner == "dinov2" else c.model.image_encoder.to_dict()
            c.model.image_encoder = encoder_cls.config_entry(base, 32)
    elif variant == "sd15":
        c.model = sd15_models()
        if tower != "vit_l14" or conditioner != "clip":
            c.model.image_encoder = image_tower(tower, proj_size=768, conditioner=conditioner)
    else:
        c.model = sd21_models(variant, tower, conditioner)

    # Where weights come from when the workdir has no checkpoint (precedence at the restore site:
    # workdir checkpoint > init_from > random init). format: '' (random init), 'diffusers' (a
    # PbE repo dir / hub id), 'ldm' (the original model.ckpt), 'sd-init' (the paper's init: SD
    # `path` (v1.x or 2.x, its scheduler kept) + a CLIP vision tower `clip`), 'orbax' (a
    # pbe_jax checkpoint dir).
    c.init_from = ml_collections.ConfigDict({"format": "", "path": "", "clip": ""})
    if not demo:
        c.init_from.format = "sd-init"
        c.init_from.path = {"sd15": "CompVis/stable-diffusion-v1-4",
                            "sd21": "stabilityai/stable-diffusion-2-1-base",
                            "sd21_768": "stabilityai/stable-diffusion-2-1"}[variant]
        c.init_from.clip = towers_of(conditioner)[tower][1]  # the conditioner's pretrained tower

    c.train = ml_collections.ConfigDict()
    t = c.train
    # paper: 40 epochs ~ 2M steps at 32; the identity demo's scenes take longer than 'palette''s
    t.num_steps = kw.get("steps", DEMO_IDENTITY_STEPS if identity else 1000 if demo else 2_000_000)
    t.batch_size = kw.get("batch", 8 if demo else 32)  # global
    t.lr = DEMO_LR if demo else PAPER_LR
    t.warmup_steps = 20 if demo else 10_000
    t.warmup_init_factor = 1e-6  # LambdaLinearScheduler f_start
    t.weight_decay = 0.01  # torch AdamW default, used by the official code
    # The official run decays uncond_vector too, from its first dropped batch on (torch AdamW
    # and a zeroed, not freed, .grad; see training/optim.py); False exempts it.
    t.decay_uncond_vector = True
    t.b1, t.b2, t.eps = 0.9, 0.999, 1e-8
    # AdamW's first moment stored in this dtype ('bfloat16': params + AdamW 10.3 -> 8.6 GiB for
    # sd15; the moment keeps bf16's 8 bits of mantissa, the update is computed in fp32).
    # 'float32' = the official optimizer.
    t.mu_dtype = "float32"
    t.grad_clip = 0.0  # global-norm clipping; 0 = off (the paper does not clip)
    t.grad_accum = 1
    # 0 = no EMA (the paper's use_ema False). The demo keeps one (horizon ~100 steps) and scores
    # it: at its high lr the EMA follows the exemplar more reliably than the last params.
    t.ema_decay = 0.99 if demo else 0.0
    t.cond_drop_prob = 0.2
    t.cond_drop_mode = "batch"  # official: one draw per batch; 'sample' draws per sample
    t.nan_policy = "skip"  # 'skip' the update and count it, or 'stop' (last good ckpt intact)
    # Train the CLIP vision tower too (the paper keeps it frozen). The demo has no pretrained
    # CLIP to freeze: a random tower carries a reference's colour only roughly.
    t.train_image_tower = demo
    # The noise schedule (betas, num_train_timesteps, prediction_type) is config.model.scheduler.
    # LoRA fine-tuning (pbe_jax/training/lora.py): rank > 0 trains adapters on the Linears named
    # by `targets` (PEFT target_modules; also ff.net.0.proj, ff.net.2, proj_in, proj_out where
    # Linear) with the base frozen, plus the `also_train` parts (path patterns); 0 = full.
    t.lora = ml_collections.ConfigDict({
        "rank": 0, "alpha": 0.0,  # alpha 0 = rank (multiplier 1)
        "targets": ("to_q", "to_k", "to_v", "to_out.0"), "components": ("unet",),
        "also_train": ("image_encoder.uncond_vector", "image_encoder.final_layer_norm",
                       "image_encoder.proj_out"),
        "base_dtype": "",  # '' = the config's param dtype; 'bfloat16' holds the frozen base in bf16
    })

    c.data = data_config("demo" if demo else "paper")
    if demo:  # 32 px 'palette' scenes: what a 2-level VAE and minutes of CPU can learn
        c.data.resolution = 32
        c.data.synthetic_style = scenes
        if identity:  # some references are the object alone on a plain backdrop, as users bring
            c.data.ref_backdrop_prob = DEMO_BACKDROP_PROB
    c.data.resolution = kw.get("res", 768 if variant == "sd21_768" else c.data.resolution)
    # One source for the image side: the UNet's sample_size (latent side, stated in an exported
    # model's config) follows config.data.resolution, through res= and through
    # --config.data.resolution / sweeps alike. Setting sample_size itself unlinks it; a pair
    # that disagrees is refused at start (pbe_jax/configs/validate.py).
    c.model.unet.sample_size = c.data.get_ref("resolution") // vae_factor(c.model)
    # The reference side the conditioner's tower takes (its preprocessing config).
    c.data.reference_size = encoder_cls.config_reference_size(c.model.image_encoder.to_dict())
    # A paper variant left on the synthetic default would train a real model on demo scenes:
    # the loader refuses it until --config.data.source (and its files) are set.
    c.data.allow_synthetic = demo

    c.log_every_steps = 25 if demo else 50
    c.ckpt_every_steps = 200 if demo else 5000
    c.keep_checkpoints = 3
    c.sample_every_steps = 500 if demo else 5000
    c.sample_steps = 20 if demo else 50
    c.sample_guidance = 5.0
    c.sample_num = 4
    # Pod robustness (pbe_jax/training/watchdog.py): a multi-process run whose peer died or hangs
    # exits (75 / 76, Python stacks in the log) instead of hanging; the launchers restart it.
    c.watchdog = ml_collections.ConfigDict({
        # no step finished for this long (the first step's compile not counted) -> exit 76;
        # above the longest eval / sample / checkpoint section; 0 = off
        "stall_minutes": 15.0,
        # jax.distributed heartbeat: a silent (hung, not exited) process is declared dead after
        # this; an exited or killed one at once
        "heartbeat_seconds": 100,
    })
    c.peak_flops = 0.0  # per device, for MFU; 0 = look up the device kind (or CPU estimate)
    # COCOEE metrics during training (off by default): set every_steps, bench and the metric
    # weights (clip_model / inception / fid_ref / gmm), see pbe_jax/evaluate.py.
    c.evals = evals_config()

    # The autoencoder stage (pbe_jax/training/vae_fit.py): with steps > 0 and no checkpoint in
    # the workdir yet, the run first fits config.model.vae on its own images, saves it to
    # WORKDIR/vae (reused when present) and trains with it frozen. Off (0) for sd15: the paper
    # uses SD's VAE as released. Skipped when init_from is a pbe_jax checkpoint (its VAE is
    # kept) unless refit. The frozen VAE's precedence: workdir checkpoint > init_from (orbax) >
    # this stage > random.
    c.vae_fit = ml_collections.ConfigDict({
        "steps": 600 if demo else 0,
        "batch_size": 16,
        "lr": 5e-3,
        "warmup_steps": 20,
        "kl_weight": 1e-6,  # LDM's weight of the KL against the summed reconstruction error
        "recon": "l2",  # 'l1' or 'l2' reconstruction error
        "heldout_data": "synthetic_seed=1000",  # config.data overrides for the held-out images
        "heldout_images": 64,
        # init_from a pbe_jax checkpoint (format orbax) brings its trained VAE and scaling
        # factor, and the stage is skipped; True fits a new VAE on this run's images instead.
        "refit": False,
    })
    # Held-out exemplar-following eval (pbe_jax/evaluation/exemplar.py) at every sample_every_steps
    # and at the end: num_triplets self + as many cross-reference edits of the demo's scenes
    # ('palette', or 'identity' with scenes=identity) of synthetic seed `seed`; 0 = off (sd15:
    # it scores the demo's synthetic domain only). offstyle_triplets: as many again of a style
    # the demo never trains on ('radial' scenes, rectangular holes, references drawn on a plain
    # backdrop); identity: fit the attribute classifier (pbe_jax/evals/identity.py, seed
    # identity_seed) and score identity too (both: scenes=identity only).
    c.exemplar_eval = ml_collections.ConfigDict({
        "num_triplets": 64 if demo else 0, "seed": 1000, "grid_rows": 4, "scheduler": "",
        "offstyle_triplets": 32 if identity else 0, "identity": identity, "identity_seed": 2000})
    validate(c, where=f"get_config({arg!r})")  # overrides are checked again where a run starts
    return c


# --------------------------------------------------------------------------------------------
# Sweeps: python -m pbe_jax.sweep --config=configs/pbe.py:VARIANT,sweep=NAME --workdir=ROOT
# --------------------------------------------------------------------------------------------

SWEEPS = ("lr_batch", "cond_drop", "mask_mix", "resolution")


def get_sweep(arg: str | None = None) -> list[dict]:
    """One override dict per run (dotted config fields -> values), for `pbe_jax.sweep`.

    ARG is get_config's argument plus an optional `sweep=NAME` token (default `lr_batch`):
    - lr_batch: learning rate x global batch, the variant's own lr included (demo: 2e-3 and
      1e-3 @ 8, 16; sd15: the paper's 1e-5 @ 32 and its neighbours).
    - cond_drop: the classifier-free-guidance drop rate (paper 0.2).
    - mask_mix: the share of Bezier-warped masks vs plain boxes (paper 0.5).
    - resolution: training image side (sd15 256 / 512; demo 32 / 64).
    """
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    names = [t.partition("=")[2] for t in tokens if t.startswith("sweep=")]
    name = names[-1] if names else "lr_batch"
    variant, _ = parse_arg(",".join(t for t in tokens if not t.startswith("sweep=")))
    demo = variant == "demo"
    if name == "lr_batch":  # each around (and with) the variant's own train.lr
        lrs = (DEMO_LR / 2, DEMO_LR) if demo else (PAPER_LR / 2, PAPER_LR, PAPER_LR * 2)
        batches = (8, 16) if demo else (32, 64)
        return [{"train.lr": lr, "train.batch_size": b} for b in batches for lr in lrs]
    if name == "cond_drop":
        return [{"train.cond_drop_prob": p} for p in (0.1, 0.2, 0.3)]
    if name == "mask_mix":
        return [{"data.arbitrary_mask_prob": p} for p in (0.0, 0.5, 1.0)]
    if name == "resolution":
        return [{"data.resolution": r} for r in ((32, 64) if demo else (256, 512))]
    raise ValueError(f"unknown sweep {name!r}; known: {SWEEPS}")
