r"""Fit the run's autoencoder on its own images:
`python -m pbe_jax.fit_vae --config=configs/pbe.py:demo --workdir=DIR`.

Trains `config.model.vae` (a diffusers `AutoencoderKL`) on `config.data` for
`config.vae_fit.steps` steps, sets its `scaling_factor` from the fitted latents, measures the
held-out PSNR and writes `DIR/vae` (diffusers format, loadable by `AutoencoderKL.from_pretrained`
here and in diffusers) with `DIR/vae/fit.json`. See `pbe_jax/training/vae_fit.py`. A training
run with `config.vae_fit.steps > 0` does this itself, first, and reuses `WORKDIR/vae`.
"""
from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from pbe_jax import distributed, locks
from pbe_jax import sharding as shd
from pbe_jax.configs.validate import check_or_exit
from pbe_jax.metrics import setup_logging
from pbe_jax.training.preemption import Preempted, Preemption
from pbe_jax.training.vae_fit import VAE_DIR, fit_vae, save_vae


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pbe.py:demo",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory: the VAE goes to WORKDIR/vae")
    flags.DEFINE_bool("reclaim_lock", False, "take over the workdir's lock when its holder (named "
                      "in the refusal) is on another host that is known to be gone")
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()


def main(argv) -> None:
    del argv
    check_or_exit(flags.FLAGS.config)  # every field, with the command line's overrides
    distributed.initialize_from_flags()
    setup_logging()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if int(config.vae_fit.steps) <= 0:
        raise app.UsageError("config.vae_fit.steps is 0: nothing to fit (set "
                             "--config.vae_fit.steps=N)")
    stop = Preemption(every=int(config.log_every_steps))
    try:  # one writer per workdir, as training (which may be running its own VAE stage there)
        with locks.hold(workdir, "--workdir", enabled=jax.process_index() == 0,
                        reclaim=flags.FLAGS.reclaim_lock):
            fitted = fit_vae(config, shd.make_mesh(config.mesh), stop=stop)
            out = save_vae(fitted, os.path.join(workdir, VAE_DIR))
    except locks.LockedError as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        logging.getLogger("pbe_jax").warning("%s", e)
        return
    finally:
        stop.restore()
    print(f"wrote {out}: held-out PSNR {fitted.psnr:.2f} dB, scaling_factor "
          f"{fitted.vae.config.scaling_factor:.4g}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
