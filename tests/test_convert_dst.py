"""`python -m pbe_jax.convert --dst`: exports are written whole (an interrupted re-export leaves the
previous export intact and loadable, and no temporary folder), a `--dst` that already holds
something is refused before any conversion work unless `--overwrite` (which replaces only a
previous export), one export writes a `--dst` at a time, and no export goes into a training
workdir (`--model=WORKDIR` keeps loading the run's newest step)."""
import os

import pytest

import pbe_jax.convert.__main__ as convert_cli
from pbe_jax import locks
from pbe_jax.convert import diffusers_io, orbax_io, safetensors_io
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.convert.safetensors_io import open_safetensors
from pbe_jax.pipeline import PaintByExample
from tests.test_weights_diffusers import assert_export_equals, tiny_pipeline
from tests.test_weights_orbax import _train_checkpoint

NO_PROGRESS = "--no-progress"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two different tiny pipelines (torch) and their diffusers dirs."""
    root = tmp_path_factory.mktemp("dst_src")
    out = []
    for seed in (60, 61):
        pipe = tiny_pipeline(seed=seed)
        pipe.save_pretrained(str(root / f"p{seed}"))
        out.append((pipe, str(root / f"p{seed}")))
    return out


def _convert(src, to, dst, *extra, fmt="diffusers"):
    return convert_main(["--from", fmt, "--src", str(src), "--to", to, "--dst", str(dst), *extra, NO_PROGRESS])


def _injected(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_interrupted_reexport_leaves_the_previous_export(tiny, tmp_path, monkeypatch, capsys):
    (pipe_a, src_a), (pipe_b, src_b) = tiny
    dst = tmp_path / "export"
    assert _convert(src_a, "diffusers", dst) == 0
    # what an export killed mid-way (SIGKILL) left: removed by the next export to the same --dst
    (tmp_path / ".export.export-tmp-0badc0de").mkdir()
    (tmp_path / ".export.export-tmp-0badc0de" / "unet").mkdir()
    # the scheduler config is written after unet/, vae/ and image_encoder/: fail there
    monkeypatch.setattr(diffusers_io, "write_json", _injected(OSError(28, "No space left on device")))
    assert _convert(src_b, "diffusers", dst, "--overwrite") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert_export_equals(str(dst), pipe_a)  # every component still the previous export's
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder, no lock file
    assert locks.LOCK_NAME not in os.listdir(dst)
    # SIGTERM while writing (the command turns it into SystemExit(143)): the same
    monkeypatch.setattr(diffusers_io, "write_json", _injected(SystemExit(143)))
    with pytest.raises(SystemExit):
        _convert(src_b, "diffusers", dst, "--overwrite")
    assert_export_equals(str(dst), pipe_a)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    monkeypatch.undo()
    assert _convert(src_b, "diffusers", dst, "--overwrite") == 0  # now replaced as a whole
    assert_export_equals(str(dst), pipe_b)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    with open(dst / "README.md") as f:
        assert f'from_pretrained("{dst}")' in f.read()  # the card names the folder, not the temp one


def test_interrupted_orbax_export_into_a_new_folder_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, src = tiny[0]
    dst = tmp_path / "orbax"
    monkeypatch.setattr(orbax_io, "write_json", _injected(OSError(28, "No space left on device")))
    assert _convert(src, "orbax", dst) == 1  # params/ written, then the config fails
    assert os.listdir(tmp_path) == []


def test_interrupted_ldm_export_keeps_the_old_file(tiny, tmp_path, monkeypatch):
    _, src = tiny[0]
    single = tmp_path / "pbe.safetensors"
    single.write_bytes(b"an older export")

    def cut(arrays, path, metadata=None):  # the disk fills up half-way through the file
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", cut)
    assert _convert(src, "ldm", single, "--overwrite") == 1
    assert single.read_bytes() == b"an older export"
    assert os.listdir(tmp_path) == ["pbe.safetensors"]  # no cut temporary file, no lock file


def test_existing_dst_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys):
    _, src = tiny[0]
    monkeypatch.setattr(convert_cli, "load_pipeline", _injected(AssertionError("loaded the source")))
    folder = tmp_path / "pbe.safetensors"  # a folder with a file's name
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert _convert(src, "ldm", folder) == 1
    assert "is a folder; an LDM checkpoint is one file" in capsys.readouterr().err
    assert _convert(src, "diffusers", folder) == 1
    assert "already holds files (notes.txt); pass --overwrite" in capsys.readouterr().err
    assert _convert(src, "orbax", folder, "--overwrite") == 1  # --overwrite replaces only an export
    assert "not a Paint-by-Example export" in capsys.readouterr().err
    single = tmp_path / "old.safetensors"
    single.write_bytes(b"an older file")
    assert _convert(src, "ldm", single) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["old.safetensors", "pbe.safetensors"]
    assert os.listdir(folder) == ["notes.txt"] and single.read_bytes() == b"an older file"
    fresh = tmp_path / "fresh"
    with locks.hold(fresh, "--dst"):  # another export writing it
        assert _convert(src, "diffusers", fresh) == 1
    assert "is in use by pid" in capsys.readouterr().err
    monkeypatch.undo()
    assert _convert(src, "ldm", single, "--overwrite") == 0  # a file: replaced by one rename
    assert "model.diffusion_model.input_blocks.0.0.weight" in open_safetensors(str(single))
    assert sorted(os.listdir(tmp_path)) == ["fresh", "old.safetensors", "pbe.safetensors"]
    assert os.listdir(fresh) == []


def test_export_into_a_training_workdir_is_refused(tiny, tmp_path, capsys):
    _, src = tiny[0]
    model = PaintByExample.from_pretrained(src)
    workdir = tmp_path / "run"
    _train_checkpoint(model, str(workdir))  # steps 3 and 7
    for fmt, dst in (("orbax", workdir), ("diffusers", workdir / "export"),
                     ("orbax", workdir / "checkpoints"), ("ldm", workdir / "pbe.safetensors")):
        assert _convert(workdir, fmt, dst, "--overwrite", fmt="orbax") == 1, (fmt, dst)
        err = capsys.readouterr().err
        assert "training workdir" in err and f"--model={workdir} loads" in err, err
    assert sorted(os.listdir(workdir)) == ["checkpoints"]
    # --model=WORKDIR still loads the run's newest step
    assert orbax_io.locate(str(workdir)) == ("train", workdir / "checkpoints" / "7")
    _, report = PaintByExample.from_pretrained(str(workdir), return_report=True)
    assert any("training checkpoint at step 7" in n for n in report.notes), report.notes
