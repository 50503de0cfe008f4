"""Checks of a run's config against its data and workdir, made when the run starts (after
`configs.validate`, which needs no data): what would otherwise fail or mislead minutes later.

- `config.vae_fit.heldout_images` over the held-out data's record count fails now, naming the
  field (it failed after the whole VAE stage, 5.5 minutes into a 20-image fine-tune);
- the exemplar eval (`config.exemplar_eval`) scores held-out *synthetic* scenes: on a run whose
  data is not the synthetic scenes it says nothing about the model, so it is switched off
  (`num_triplets = 0`, logged; the saved config records it).
"""
from __future__ import annotations

import logging

from etils import epath

from pbe_jax.data.sources import make_source
from pbe_jax.training.vae_fit import VAE_DIR, heldout_data_config

log = logging.getLogger(__name__)


def _vae_stage_will_fit(config, workdir: str) -> bool:
    """Whether `run_vae_stage` would fit a VAE: stage on, no saved `WORKDIR/vae`, no checkpoint."""
    if int(config.vae_fit.steps) <= 0:
        return False
    root = epath.Path(workdir)
    return not (root / VAE_DIR / "config.json").exists() and not any((root / "checkpoints").glob("[0-9]*"))


def check_data(config, workdir: str) -> None:
    """Raise ValueError naming the field for what cannot work with this data; adjust (and log)
    what would only mislead."""
    if _vae_stage_will_fit(config, workdir):
        want = int(config.vae_fit.heldout_images)
        held = heldout_data_config(config.data, config.vae_fit.heldout_data)
        n = len(make_source(held))
        if n < want:
            raise ValueError(
                f"config.vae_fit.heldout_images={want} but the held-out data (config.data with "
                f"config.vae_fit.heldout_data={config.vae_fit.heldout_data!r}, source {held.source!r}) "
                f"has {n} records: set --config.vae_fit.heldout_images={n} or fewer, or skip the VAE "
                "stage (--config.vae_fit.steps=0, e.g. when init_from brings a trained VAE)")
    if config.data.source != "synthetic" and int(config.exemplar_eval.num_triplets) > 0:
        log.info("exemplar eval off: config.exemplar_eval scores held-out synthetic scenes, and this run "
                 "trains on config.data.source=%r (num_triplets %d -> 0)", config.data.source,
                 int(config.exemplar_eval.num_triplets))
        with config.unlocked():
            config.exemplar_eval.num_triplets = 0
