"""The `config.evals` block: COCOEE metrics during training (off unless `every_steps` > 0)."""
from __future__ import annotations

import ml_collections


def evals_config() -> ml_collections.ConfigDict:
    """The default `config.evals` block (off: every_steps 0)."""
    return ml_collections.ConfigDict({
        "every_steps": 0,  # 0 = off
        "bench": "",  # COCOEE folder or manifest
        "limit": 16,  # first N triplets
        "steps": 50, "guidance": 5.0, "seed": 0,
        "scheduler": "",  # '' = the model's own (`config.model.scheduler`): the demo's x0 model is DDIM-only
        "batch_size": 8,
        "clip_model": "", "inception": "", "fid_ref": "", "fid_features": "inception",
        "fid_ref_cache": "", "gmm": "",
    })
