"""Fit the autoencoder of a small-domain run on the run's own images (`config.vae_fit`).

Paint by Example keeps Stable Diffusion's VAE frozen. A domain that no pretrained autoencoder
fits (the demo's synthetic scenes at 32 px; your own small images at low resolution) needs one
fitted first: this module trains the model's own diffusers `AutoencoderKL` (`config.model.vae`)
the way LDM trained SD's, without the two parts that need pretrained nets or hours:

    loss = mean |x - D(z)|^p + kl_weight * KL(q(z|x) || N(0, I)) / (H W 3),  z ~ q(z|x)

(p = 1 for `recon='l1'`, 2 for 'l2'; LDM adds LPIPS and a patch GAN, and weights the KL 1e-6
of the summed reconstruction, as `kl_weight` does here). The step is one jitted function with
the params, AdamW state and batch placed by the run's mesh and `config.sharding_rules`, like the
Paint-by-Example step (`training/state.py`).

Afterwards `scaling_factor` is set to 1 / std of the posterior samples of held-out images (how
SD picked 0.18215), so the latents the denoiser sees have unit variance, and the held-out
reconstruction PSNR is measured. The result is a diffusers-format folder (`save_pretrained`:
`config.json` with the scaling factor + safetensors) that `AutoencoderKL.from_pretrained` and
diffusers load, plus `fit.json` with the numbers.

Held-out images come from `config.data` with `config.vae_fit.heldout_data` applied
('synthetic_seed=1000': other synthetic scenes; 'annotations=val.json,images_dir=val/': your
validation split), through the same crop pipeline as training.

`python -m pbe_jax.fit_vae --config=... --workdir=DIR` runs it alone (writes DIR/vae);
`train_and_evaluate` runs it as the first phase of a run whose `config.vae_fit.steps > 0`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import safetensors
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from pbe_jax import checkpoint
from pbe_jax import sharding as shd
from pbe_jax.data.batch import HOST_KEYS
from pbe_jax.data.pipeline import make_dataset, make_loader
from pbe_jax.evals.reconstruction import vae_psnr
from pbe_jax.models.init import host_init
from pbe_jax.models.paint_by_example import component_kwargs
from pbe_jax.models.registry import slot_class
from pbe_jax.training.preemption import Preempted, Preemption
from pbe_jax.training.state import config_runtime

log = logging.getLogger("pbe_jax")

VAE_DIR = "vae"  # WORKDIR/vae: the fitted autoencoder, diffusers format
FIT_FILE = "fit.json"  # WORKDIR/vae/fit.json: steps, losses, scaling factor, held-out PSNR
RECON_LOSSES = ("l1", "l2")


@dataclasses.dataclass
class FittedVAE:
    """A fitted autoencoder: the module (params where the fit placed them, `config.scaling_factor`
    set from its latents) and what was measured."""

    vae: nnx.Module
    psnr: float  # held-out reconstruction PSNR, dB
    info: dict  # fit.json


def vae_loss(vae, image: jax.Array, rng: jax.Array, *, kl_weight: float, recon: str
             ) -> tuple[jax.Array, dict]:
    """image `[B, H, W, 3]` in [-1, 1] -> (scalar loss, {'recon', 'kl'}); see the module
    docstring. `kl` is KL per image element (summed over the latent, divided by H W 3)."""
    post = vae.encode(image)
    out = vae.decode(post.sample(rng))  # [B, H, W, 3] fp32
    err = out - image.astype(jnp.float32)
    rec = jnp.mean(jnp.abs(err)) if recon == "l1" else jnp.mean(jnp.square(err))
    kl = jnp.mean(post.kl()) / float(np.prod(image.shape[1:]))
    return rec + kl_weight * kl, {"recon": rec, "kl": kl}


def make_vae_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, kl_weight: float,
                  recon: str) -> Callable:
    """A pure `step(state, batch) -> (state, metrics)`: state {'params', 'opt_state', 'rng',
    'step'}, batch {'image': uint8 [B, H, W, 3], ...} (the loader's host contract)."""
    if recon not in RECON_LOSSES:
        raise ValueError(f"config.vae_fit.recon={recon!r}; expected one of {RECON_LOSSES}")

    def loss_fn(params, image, rng):
        return vae_loss(nnx.merge(graphdef, params), image, rng, kl_weight=kl_weight, recon=recon)

    def step(state, batch):
        rng, r = jax.random.split(state["rng"])
        image = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], image, r)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "rng": rng, "step": state["step"] + 1}
        return new, {"loss": loss, **aux, "grad_norm": optax.global_norm(grads)}

    return step


def make_optimizer(fit_cfg) -> optax.GradientTransformation:
    """AdamW (no decay) with a linear warm-up and a cosine decay to 10% over the fit."""
    steps = max(int(fit_cfg.steps), 1)
    warmup = min(int(fit_cfg.warmup_steps), steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, fit_cfg.lr, max(warmup, 1), steps,
                                               end_value=0.1 * fit_cfg.lr)
    return optax.adamw(sched, weight_decay=0.0)


def heldout_data_config(data_cfg: ml_collections.ConfigDict, overrides: str
                        ) -> ml_collections.ConfigDict:
    """`config.data` with 'key=value,key=value' applied (each value cast to the field's type)."""
    out = ml_collections.ConfigDict(data_cfg.to_dict())
    for item in filter(None, (p.strip() for p in overrides.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in out:
            raise ValueError(f"config.vae_fit.heldout_data: bad item {item!r}; expected "
                             f"'FIELD=VALUE' with FIELD a config.data field")
        kind = type(out[key])
        out[key] = kind(value.lower() in ("1", "true", "yes")) if kind is bool else kind(value.strip())
    return out


def heldout_images(config, num: int) -> np.ndarray:
    """uint8 `[num, R, R, 3]`: the source crops of the first `num` samples of the held-out data
    (`config.vae_fit.heldout_data`), as the training pipeline makes them."""
    ds = make_dataset(heldout_data_config(config.data, config.vae_fit.heldout_data),
                      seed=config.seed, num_epochs=1)
    if len(ds) < num:
        raise ValueError(f"config.vae_fit.heldout_images={num} but the held-out data has "
                         f"{len(ds)} records")
    return np.stack([ds[i]["image"] for i in range(num)])


def latent_scaling_factor(vae, images: np.ndarray, seed: int = 0) -> float:
    """1 / std of posterior samples of uint8 `images` (SD: 1 / 5.49 = 0.18215)."""
    graphdef, state = nnx.split(vae)

    @jax.jit  # one program (run eagerly, the encoder was ~90 programs to compile, op by op)
    def latent_std(state, x, key):
        return jnp.std(nnx.merge(graphdef, state).encode(x).sample(key))

    x = np.asarray(images, np.float32) / 127.5 - 1.0
    return float(1.0 / latent_std(state, x, jax.random.PRNGKey(seed)))


def random_vae(config, mesh: jax.sharding.Mesh):
    """(module, param shardings): the model's VAE (`config.model.vae`) with the random init the
    Paint-by-Example model gets (`host_init` on its 'vae/...' paths), each param placed by
    `config.sharding_rules` on `mesh`."""
    raw = config.model.vae.to_dict()
    cls = slot_class("vae", raw)
    rt = config_runtime(config)
    kw = component_kwargs("vae", dtype=rt["dtype"], attention_impl=rt["attention_impl"])
    abstract = cls.from_config(cls.config_class.from_dict(raw), abstract=True, **kw)
    graphdef, state = nnx.split(abstract, nnx.Param)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    shardings = shd.state_shardings(state, mesh, rules)
    shapes = nnx.to_pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
        key = ("vae",) + tuple(str(getattr(k, "key", k)) for k in path)
        arr = host_init(key, x.shape, int(config.seed))
        leaves.append(jax.make_array_from_callback(arr.shape, s, lambda idx, a=arr: a[idx]))
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
    return nnx.merge(graphdef, state), shardings


def fit_vae(config, mesh: jax.sharding.Mesh, stop: Preemption | None = None) -> FittedVAE:
    """Fit `config.model.vae` on `config.data` for `config.vae_fit.steps` steps (see the module
    docstring); the losses go to the console and `FittedVAE.info['history']`. `stop`: asked
    after every step; when it says stop (SIGTERM), raises `Preempted` (nothing is saved: the
    fit is not checkpointed, the next run fits again from the start)."""
    fc = config.vae_fit
    shd.check_batch_size(fc.batch_size, mesh, jax.process_count(), what="config.vae_fit.batch_size")
    vae, p_sh = random_vae(config, mesh)
    graphdef, params = nnx.split(vae, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(fc)
    opt_sh = shd.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    rep = shd.replicated(mesh)
    state_sh = {"params": p_sh, "opt_state": opt_sh, "rng": rep, "step": rep}
    state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
             "rng": jax.device_put(jax.random.PRNGKey(int(config.seed) + 2), rep),
             "step": jax.device_put(jnp.zeros((), jnp.int32), rep)}
    batch_sh = {k: shd.batch_sharding(mesh, 4) for k in HOST_KEYS}
    step_fn = jax.jit(make_vae_step(graphdef, tx, kl_weight=float(fc.kl_weight), recon=fc.recon),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                      donate_argnums=(0,))
    loader = make_loader(config.data, global_batch_size=int(fc.batch_size), seed=int(config.seed),
                         mesh=mesh)
    t0 = time.perf_counter()
    last, history = {}, []
    try:
        for i, batch in zip(range(int(fc.steps)), loader):
            state, m = step_fn(state, batch)
            if (i + 1) % int(config.log_every_steps) == 0 or i + 1 == int(fc.steps):
                last = {k: float(v) for k, v in jax.device_get(m).items()}
                history.append({"step": i + 1, **last})
                log.info("vae fit step %d/%d loss %.4g recon %.4g kl %.3g (%.1fs)", i + 1, fc.steps,
                         last["loss"], last["recon"], last["kl"], time.perf_counter() - t0)
            if stop is not None and stop.should_stop(i + 1):
                raise Preempted(f"SIGTERM during the VAE stage (step {i + 1}/{fc.steps} of the "
                                "fit): stopped without saving it (the VAE fit has no checkpoints); "
                                "the next run with this --workdir fits the VAE again from the "
                                "start, then trains")
    finally:
        loader.close()
    nnx.update(vae, _as_state(vae, state["params"]))
    held = heldout_images(config, int(fc.heldout_images))
    sf = latent_scaling_factor(vae, held, seed=int(config.seed))
    vae.config = dataclasses.replace(vae.config, scaling_factor=sf)
    value = vae_psnr(vae, held)
    info = {"steps": int(fc.steps), "final": last, "history": history, "scaling_factor": sf,
            "heldout_psnr": value,
            "heldout_images": int(fc.heldout_images), "heldout_data": fc.heldout_data,
            "seconds": time.perf_counter() - t0}
    log.info("vae fit: held-out PSNR %.2f dB on %d images, scaling_factor %.4g, %.0fs",
             value, len(held), sf, info["seconds"])
    return FittedVAE(vae=vae, psnr=value, info=info)


def _as_state(module, params: dict) -> nnx.State:
    """`module`'s Param state with the values of the pure dict `params`."""
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return state


def save_vae(fitted: FittedVAE, directory: str) -> str:
    """Write the fitted VAE as a diffusers `AutoencoderKL` folder (+ `fit.json`); process 0.
    Atomic: the folder is written as a temporary sibling (`<name>.tmp-<pid>`) and renamed into
    place when complete (replacing an older one), so a save cut short (a full disk, a kill)
    leaves no `directory` that a later run would take for a fitted VAE."""
    if jax.process_index() == 0:
        final = epath.Path(directory)
        tmp = final.parent / f"{final.name}{_TMP}{os.getpid()}"
        try:
            fitted.vae.save_pretrained(os.fspath(tmp))
            (tmp / FIT_FILE).write_text(json.dumps(fitted.info, indent=2, sort_keys=True))
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


_TMP = ".tmp-"  # WORKDIR/vae.tmp-<pid>: a VAE folder being written
_INCOMPLETE = ".incomplete-"  # WORKDIR/vae.incomplete-<UTC time>: an incomplete one, moved aside


def _replace_dir(new: epath.Path, final: epath.Path) -> None:
    """Rename the folder `new` to `final`; an existing `final` is renamed away first and
    deleted after (a crash in between leaves both siblings, never a mix)."""
    if not final.exists():
        new.rename(final)
        return
    old = final.parent / f"{final.name}.replaced-{os.getpid()}"
    final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def vae_folder_problem(directory: str) -> str | None:
    """Why `directory` is not a complete VAE folder (`config.json` and readable safetensors
    weights, as `save_vae` writes them), or None when it is one. Header checks only: the
    weights are read when a run loads them."""
    d = epath.Path(directory)
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"its config.json is missing or unreadable ({type(e).__name__})"
    weights = sorted(p for p in d.iterdir() if p.name.endswith((".safetensors", ".bin")))
    if not weights:
        return "it has no weights file (*.safetensors)"
    for w in weights:
        if w.name.endswith(".safetensors"):
            try:
                with safetensors.safe_open(os.fspath(w), "np") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001 (a cut file: safetensors' own error types)
                return f"its weights file {w.name} is incomplete ({e})"
    return None


def load_vae(directory: str, place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
             **runtime) -> nnx.Module:
    """A saved VAE folder (`save_vae`, or any diffusers `AutoencoderKL` folder); `place(path,
    array)` puts each param on devices (paths relative to the VAE)."""
    raw = json.loads((epath.Path(directory) / "config.json").read_text())
    return slot_class("vae", raw).from_pretrained(directory, place=place, **runtime)


def _checkpoint_scaling(ckpt) -> float | None:
    """The VAE scaling factor the newest checkpoint of a run trained with (None: unreadable)."""
    step_dir = checkpoint.step_dir(ckpt.directory, ckpt.steps()[-1])
    try:
        return float(checkpoint.read_config(step_dir)["model"]["vae"]["scaling_factor"])
    except Exception as e:  # noqa: BLE001 (a corrupt step: restore falls back and says so)
        log.warning("cannot read the VAE scaling factor of %s (%s)", step_dir, e)
        return None


def _check_saved(directory: str, model_vae: dict) -> float:
    """The scaling factor of the VAE saved in `directory`, after checking that its architecture
    is `config.model.vae`'s (everything but the scaling factor)."""
    saved = json.loads((epath.Path(directory) / "config.json").read_text())
    cls = slot_class("vae", saved).config_class
    a = dataclasses.asdict(cls.from_dict({**saved, "scaling_factor": 1.0}))
    b = dataclasses.asdict(cls.from_dict({**model_vae, "scaling_factor": 1.0}))
    diff = sorted(k for k in a if a[k] != b[k])
    if diff:
        raise ValueError(f"{directory}/config.json does not match config.model.vae in {diff} "
                         f"(saved {[a[k] for k in diff]}, config {[b[k] for k in diff]}); delete "
                         "that folder to fit again, or use the config it was fitted with")
    return float(saved["scaling_factor"])


def _set_aside_incomplete(directory: str, problem: str, has_ckpt: bool) -> None:
    """An incomplete `WORKDIR/vae` (a stage cut mid-save by an older version, or a folder put
    there by hand) is never reused: it is renamed to `vae.incomplete-<UTC time>` (process 0;
    never deleted) and the stage fits again (a run with checkpoints takes its VAE from them)."""
    d = epath.Path(directory)
    dest = d.parent / f"{d.name}{_INCOMPLETE}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_index() == 0:
        d.rename(dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("pbe_jax vae set aside")
    log.warning("vae: %s is incomplete (%s): moved aside to %s (delete it once you no longer "
                "need it); %s", directory, problem, dest,
                "the run's checkpoint holds its VAE" if has_ckpt else "fitting the VAE again")


def _fit_and_save(config, mesh: jax.sharding.Mesh, directory: str) -> float:
    """Fit the VAE and save it to `directory`; returns its scaling factor. A SIGTERM during the
    fit stops the stage without saving, one after it once the folder is written: `Preempted`
    either way (the command lines exit 0 with its message)."""
    d = epath.Path(directory)
    if jax.process_index() == 0:  # the workdir's lock is held: these are from a dead run
        for stale in d.parent.glob(f"{d.name}{_TMP}*"):
            log.info("vae: removing %s, left by a stage that was stopped mid-save", stale)
            shutil.rmtree(stale, ignore_errors=True)
    stop = Preemption(every=int(config.log_every_steps))
    try:
        fitted = fit_vae(config, mesh, stop=stop)
        save_vae(fitted, directory)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("pbe_jax vae saved")
        if stop.should_stop(0):  # step 0: every process asks, so they agree
            raise Preempted(f"SIGTERM during the VAE stage: {directory} is written; stopping "
                            "before training (the next run with this --workdir reuses it and "
                            "trains)")
    finally:
        stop.restore()
    return fitted.vae.config.scaling_factor


def frozen_with_vae(frozen: dict, directory: str, place: Callable[[tuple, np.ndarray], jax.Array]
                    ) -> dict:
    """The frozen params of a Paint-by-Example model with its VAE's taken from `directory`;
    `place((component, *path), array)` as `Setup.place_fn()`."""
    vae = load_vae(directory, place=lambda path, a: place(("vae", *path), a))
    return {**frozen, "vae": nnx.to_pure_dict(nnx.state(vae, nnx.Param))}


def run_vae_stage(config, workdir: str, mesh: jax.sharding.Mesh, ckpt) -> str | None:
    """The autoencoder stage of `train_and_evaluate`, before the model is built. With
    `config.vae_fit.steps > 0`: reuse `WORKDIR/vae` when it exists (an incomplete one is moved
    aside, `vae_folder_problem`), else fit and save it there (atomically, `save_vae`) when the
    workdir has no checkpoint yet (SIGTERM: `Preempted`, see `_fit_and_save`); then set `config.model.vae.scaling_factor` to the
    fitted one (a run resumed without `WORKDIR/vae` keeps its checkpoint's). Returns the VAE
    folder whose params a new run's frozen VAE takes (`load_vae`), or None (stage off; or a
    resumed run, whose checkpoint holds the frozen params)."""
    if int(config.vae_fit.steps) <= 0:
        return None
    directory = str(epath.Path(workdir) / VAE_DIR)
    has_ckpt = bool(ckpt.steps())
    problem = vae_folder_problem(directory) if epath.Path(directory).exists() else None
    if problem:
        _set_aside_incomplete(directory, problem, has_ckpt)
    if epath.Path(directory).exists():
        scaling = _check_saved(directory, config.model.vae.to_dict())
        log.info("vae: reusing %s (scaling_factor %.4g)", directory, scaling)
    elif has_ckpt:
        scaling = _checkpoint_scaling(ckpt)
        directory = None
    else:
        scaling = _fit_and_save(config, mesh, directory)
    if scaling is not None:
        with config.unlocked():
            config.model.vae.scaling_factor = float(scaling)
    return None if has_ckpt else directory
