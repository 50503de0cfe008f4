"""Start-time checks against the data (issue 32): `config.vae_fit.heldout_images` over a
20-image folder fails at once naming the field (it failed after the whole VAE stage), and the
synthetic exemplar eval is switched off for a run on the user's own folder."""
import os
import subprocess
import sys
import time

import pytest

from pbe_jax.training import preflight
from tests.test_data_folder import _folder
from tests.train_utils import CONFIG_FILE, REPO, cli_overrides, subprocess_env, tiny_config


@pytest.fixture
def folder(tmp_path):
    return _folder(str(tmp_path), n_good=20)


def _folder_config(folder, **over):
    return tiny_config("demo", **{"data.source": "folder", "data.images_dir": folder,
                                  "data.use_given_masks": True, **over})


def test_heldout_images_over_the_data_fails_at_start(folder, tmp_path):
    config = _folder_config(folder, **{"vae_fit.steps": 5, "vae_fit.heldout_images": 64})
    with pytest.raises(ValueError, match=r"config\.vae_fit\.heldout_images=64 but .* has 22 records"):  # 20 pairs + 2 broken ones
        preflight.check_data(config, str(tmp_path / "run"))
    config = _folder_config(folder, **{"vae_fit.steps": 0, "vae_fit.heldout_images": 64})
    preflight.check_data(config, str(tmp_path / "run"))  # no VAE stage: nothing to check
    config = _folder_config(folder, **{"vae_fit.steps": 5, "vae_fit.heldout_images": 16})
    preflight.check_data(config, str(tmp_path / "run"))


def test_exemplar_eval_off_on_a_folder(folder, tmp_path):
    config = _folder_config(folder, **{"vae_fit.steps": 0, "exemplar_eval.num_triplets": 8})
    preflight.check_data(config, str(tmp_path / "run"))
    assert config.exemplar_eval.num_triplets == 0
    config = tiny_config("demo", **{"vae_fit.steps": 0, "exemplar_eval.num_triplets": 8})
    preflight.check_data(config, str(tmp_path / "run"))
    assert config.exemplar_eval.num_triplets == 8  # the synthetic scenes keep theirs


def test_train_cli_stops_before_the_vae_stage(folder, tmp_path):
    over = cli_overrides(**{"data.source": "folder", "data.images_dir": folder, "data.use_given_masks": True,
                            "vae_fit.steps": 5, "vae_fit.heldout_images": 64})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pbe_jax.train", f"--config={CONFIG_FILE}:demo",
                        f"--workdir={tmp_path / 'run'}", *over], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "config.vae_fit.heldout_images=64" in r.stderr, r.stderr[-2000:]
    assert "set --config.vae_fit.heldout_images=22 or fewer" in r.stderr  # said at start, with the fix
    assert not os.path.exists(tmp_path / "run" / "vae")
    assert time.perf_counter() - t0 < 120
