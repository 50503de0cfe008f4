"""The batch CLIs where two things meet (issue 28): one writer per --out, outputs that never
replace inputs or unrelated files, memory that does not grow with the manifest, which
checkpoint step made an --out's results, and the messages of the unclear cases."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pbe_jax import batch_edit, locks
from pbe_jax.batch_edit import Row, read_manifest, write_results
from pbe_jax.pipeline import PaintByExample
from tests.test_faults_data import png_bomb
# the tiny model and one edit's input files: the sample fault tests' fixtures
from tests.test_faults_sample import EDIT, files, model_dir, pipe  # noqa: F401
from tests.test_sample import H, W, _images
from tests.test_weights_orbax import _train_checkpoint
from tests.train_utils import REPO, subprocess_env


def _manifest(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _one_row(tmp_path, files, rid="a") -> str:
    return _manifest(tmp_path / "m.jsonl", [{"id": rid, "source": str(files / "s.png"),
                                              "mask": str(files / "m.png"), "reference": str(files / "r.png")}])


def _sample(args, model_dir=None, **kw):
    model = [f"--model={model_dir}"] if model_dir else []
    return subprocess.run([sys.executable, "-m", "pbe_jax.sample", *model, *args], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, timeout=300, **kw)


# argv[1]: a JSON list of steps run in turn in one process: a `pbe_jax.sample` command line
# (parsed as `cli_flags.run` parses it, then main runs; a SystemExit message is printed to
# stderr and exits 1, as absl's app.run does), or ["mv", a, b], ["rm", path], ["ls", dir].
SAMPLE_EACH = """
import contextlib, io, json, os, shutil, sys, traceback
from absl import flags
from pbe_jax import cli_flags, sample
sample.define_flags()
for step in json.loads(sys.argv[1]):
    if step[0] in ("mv", "rm", "ls"):
        if step[0] == "mv":
            shutil.move(step[1], step[2])
        elif step[0] == "rm":
            os.remove(step[1])
        else:
            print("LS " + json.dumps(sorted(os.listdir(step[1]))), flush=True)
        continue
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = sample.main(flags.FLAGS(cli_flags.dashes_to_underscores(["sample", *step])))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except Exception:
            rc = 1
            traceback.print_exc()
    print("RESULT " + json.dumps({"returncode": rc or 0, "stdout": out.getvalue(), "stderr": err.getvalue()}),
          flush=True)
"""


def _sample_each(steps: list) -> list:
    """The results of `steps` (SAMPLE_EACH) run in one process, in order: a SimpleNamespace
    (returncode, stdout, stderr) per command line, the listing per ["ls", dir]. One start-up and
    one load of the edit program for several command lines where their parsing, checks and
    messages are what is tested (the lock tests run the command line itself)."""
    r = subprocess.run([sys.executable, "-c", SAMPLE_EACH, json.dumps(steps)], capture_output=True,
                       text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = [SimpleNamespace(**json.loads(x[len("RESULT "):])) if x.startswith("RESULT ") else json.loads(x[3:])
           for x in r.stdout.splitlines() if x.startswith(("RESULT ", "LS "))]
    assert len(got) == sum(s[0] != "mv" and s[0] != "rm" for s in steps), r.stdout[-3000:]
    return got


# ---------------------------------------------------------------------------------------------
# One writer per --out
# ---------------------------------------------------------------------------------------------


def test_sample_and_evaluate_refuse_an_out_another_run_holds(files, model_dir, tmp_path):
    out = tmp_path / "out"
    manifest = _one_row(tmp_path, files)
    with locks.hold(out, "--out"):  # a run of this process (pid) holds --out
        t0 = time.monotonic()
        p = _sample([f"--manifest={manifest}", f"--out={out}", "--steps=2"], model_dir)
        e = subprocess.run([sys.executable, "-m", "pbe_jax.evaluate", f"--bench={manifest}",
                            f"--model={model_dir}", f"--out={out}", "--steps=2"], capture_output=True,
                           text=True, env=subprocess_env(), cwd=REPO, timeout=300)
        assert sorted(os.listdir(out)) == [locks.LOCK_NAME]  # nothing written by either
    assert time.monotonic() - t0 < 120  # refused at start, not after editing
    for r in (p, e):
        assert r.returncode != 0, r.stdout + r.stderr[-2000:]
        assert f"in use by pid {os.getpid()}" in r.stderr and "--reclaim_lock" in r.stderr, r.stderr[-2000:]


HOLDING_RUN = """
import os, sys, time
from absl import app
from pbe_jax import batch_edit, sample
real = batch_edit._edit_batch
def slow(*a, **kw):  # the first run is mid-edit while the second starts
    open(sys.argv[-1] + ".editing", "w").close()
    while not os.path.exists(sys.argv[-1] + ".go"):
        time.sleep(0.1)
    return real(*a, **kw)
batch_edit._edit_batch = slow
sample.define_flags()
app.run(lambda argv: sys.exit(sample.main(argv)), argv=sys.argv[:-1])
"""


@pytest.mark.slow
def test_two_sample_runs_on_one_out_the_second_refuses(files, model_dir, tmp_path):
    out, flag = tmp_path / "out", str(tmp_path / "first")
    manifest = _one_row(tmp_path, files)
    first = subprocess.Popen([sys.executable, "-c", HOLDING_RUN, f"--model={model_dir}",
                              f"--manifest={manifest}", f"--out={out}", "--steps=2", "--scheduler=ddim", flag],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(flag + ".editing"):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = _sample([f"--manifest={manifest}", f"--out={out}", "--steps=3"], model_dir)
        assert second.returncode != 0, second.stdout + second.stderr[-2000:]
        assert f"in use by pid {first.pid}" in second.stderr, second.stderr[-2000:]
    finally:
        open(flag + ".go", "w").close()
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0 and "1/1 rows done" in stdout, stderr[-2000:]
    assert json.loads((out / "settings.json").read_text())["steps"] == 2
    assert sorted(os.listdir(out)) == ["a_0.png", "settings.json"]  # the lock is gone


# ---------------------------------------------------------------------------------------------
# Outputs never touch inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_single_edit_leaves_an_unrelated_name_0_png_alone(files, model_dir, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    unrelated = np.random.default_rng(1).integers(0, 256, (H, W, 3), np.uint8)
    Image.fromarray(unrelated).save(d / "cat_0.png")
    before = (d / "cat_0.png").read_bytes()
    p = _sample([f"--source={files / 's.png'}", f"--mask={files / 'm.png'}", f"--reference={files / 'r.png'}",
                 f"--out={d / 'cat.png'}", "--steps=2", "--scheduler=ddim"], model_dir)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert (d / "cat_0.png").read_bytes() == before  # not renamed, not touched
    edited = np.asarray(Image.open(d / "cat.png"), np.int16)
    assert edited.shape == (H, W, 3) and np.abs(edited - unrelated).mean() > 5  # an edit, made now
    assert sorted(os.listdir(d)) == ["cat.png", "cat_0.png"]


def test_single_edit_refuses_an_input_or_a_foreign_file_as_out_and_num_samples_zero(files, model_dir, tmp_path):
    inputs = [f"--source={files / 's.png'}", f"--mask={files / 'm.png'}", f"--reference={files / 'r.png'}"]
    source = (files / "s.png").read_bytes()
    (tmp_path / "photo.png").write_bytes(source)
    as_source, foreign, zero = _sample_each([
        ["--model=no/such-model", *inputs, f"--out={files / 's.png'}", "--overwrite"],
        ["--model=no/such-model", *inputs, f"--out={tmp_path / 'photo.png'}"],
        [f"--model={model_dir}", f"--manifest={_one_row(tmp_path, files)}", f"--out={tmp_path / 'out'}",
         "--num_samples=0"]])
    p = as_source
    assert p.returncode != 0 and "is the --source file" in p.stderr, p.stderr[-2000:]
    p = foreign
    assert p.returncode != 0 and "is not an output of this run" in p.stderr, p.stderr[-2000:]
    assert (files / "s.png").read_bytes() == source == (tmp_path / "photo.png").read_bytes()
    p = zero
    assert p.returncode != 0 and "--num_samples=0: must be at least 1" in p.stderr, p.stderr[-2000:]
    assert "ZeroDivisionError" not in p.stderr


def test_a_source_in_out_is_never_an_output_not_even_with_overwrite(pipe, tmp_path):
    """--out is the images folder and a row's id is its source's stem: `cat_0.png` was taken
    as the finished output (no edit), and --overwrite overwrote the source."""
    d = tmp_path / "images"
    d.mkdir()
    src, mask, ref = _images()
    src.save(d / "cat_0.png")
    mask.save(d / "m.png")
    ref.save(d / "r.png")
    src.save(d / "dog.png")
    before = (d / "cat_0.png").read_bytes()
    rows = lambda: [Row(id="cat", source=str(d / "cat_0.png"), mask=str(d / "m.png"),  # noqa: E731
                        reference=str(d / "r.png"), seed=1),
                    Row(id="dog", source=str(d / "dog.png"), mask=str(d / "m.png"),
                        reference=str(d / "r.png"), seed=2)]
    for overwrite in (False, True):
        written, failed = write_results(pipe, rows(), str(d), overwrite=overwrite, **EDIT)
        assert written == 1 and list(failed) == ["cat"], failed
        assert "is the source file of row cat" in failed["cat"], failed["cat"]
        assert (d / "cat_0.png").read_bytes() == before
    assert (d / "dog_0.png").exists()


def test_a_foreign_file_at_an_output_name_is_refused_unless_overwrite(pipe, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (W, H), (1, 2, 3)).save(out / "a_0.png")  # someone else's file
    before = (out / "a_0.png").read_bytes()
    rows = lambda: [Row(id=i, source=str(files / "s.png"), mask=str(files / "m.png"),  # noqa: E731
                        reference=str(files / "r.png"), seed=s) for i, s in (("a", 1), ("b", 2))]
    written, failed = write_results(pipe, rows(), str(out), **EDIT)
    assert written == 1 and list(failed) == ["a"] and "not an output of this run" in failed["a"], failed
    assert (out / "a_0.png").read_bytes() == before
    assert write_results(pipe, rows(), str(out), **EDIT) == (0, failed)  # b is done; a still refused
    written, failed = write_results(pipe, rows(), str(out), overwrite=True, **EDIT)
    assert (written, failed) == (2, {}) and (out / "a_0.png").read_bytes() != before
    assert write_results(pipe, rows(), str(out), **EDIT) == (0, {})  # now both are this run's


# ---------------------------------------------------------------------------------------------
# Bounded batch memory
# ---------------------------------------------------------------------------------------------


def _peak_bytes(rows: list[Row], out: str, monkeypatch) -> int:
    """tracemalloc peak (numpy buffers included) of write_results over `rows`, with the device
    edit replaced by a constant output, so only the host side is measured.

    Each edit waits until the decoding thread has finished the next batch: every batch then meets
    the most the one-batch read-ahead can hold (this batch and the next, decoded), whatever the
    threads' timing, so a 10-row run and a 1000-row run meet the same worst case."""
    rows_per_batch = EDIT["batch_size"] // EDIT["num_samples"]
    n_batches = -(-len(rows) // rows_per_batch)
    decoded = threading.Condition()
    count = {"decoded": 0, "edited": 0}
    decode_chunk = batch_edit._decode_chunk

    def counted_decode(chunk):
        try:
            return decode_chunk(chunk)
        finally:
            with decoded:
                count["decoded"] += 1
                decoded.notify_all()

    def edit_batch(pipe, chunk, *, num_samples, **kw):
        assert all(r.image is not None for r in chunk)
        count["edited"] += 1
        with decoded:
            assert decoded.wait_for(
                lambda: count["decoded"] >= min(count["edited"] + 1, n_batches), timeout=60), count
        return [np.zeros((4, 4, 3), np.uint8)] * (len(chunk) * num_samples)

    monkeypatch.setattr(batch_edit, "_decode_chunk", counted_decode)
    monkeypatch.setattr(batch_edit, "_edit_batch", edit_batch)
    tracemalloc.start()
    try:
        written, failed = write_results(None, rows, out, **EDIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (written, failed) == (len(rows), {})
    return peak


def test_peak_memory_does_not_grow_with_the_manifest(tmp_path, monkeypatch):
    """Rows were all decoded before the first edit: 1,000 rows of 256 x 256 took ~460 MB."""
    n = 256
    y, x = np.mgrid[:n, :n]
    Image.fromarray(np.stack([x, y, x ^ y], -1).astype(np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(np.where((x > 64) & (y > 64), 255, 0).astype(np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.stack([y, x, x + y], -1).astype(np.uint8)).save(tmp_path / "r.png")
    rows = lambda k: [Row(id=f"{i:04d}", source=str(tmp_path / "s.png"),  # noqa: E731
                          mask=str(tmp_path / "m.png"), reference=str(tmp_path / "r.png"), seed=i)
                      for i in range(k)]
    # small allocations still vary between runs: the 10-row peak is the highest of three
    small = max(_peak_bytes(rows(10), str(tmp_path / f"out10_{i}"), monkeypatch) for i in range(3))
    large = _peak_bytes(rows(1000), str(tmp_path / "out1000"), monkeypatch)
    print(f"peak: 10 rows {small / 2**20:.1f} MiB, 1000 rows {large / 2**20:.1f} MiB")
    assert large <= 1.5 * small, (small, large)


def test_input_size_limit_is_read_from_the_header_for_every_input(pipe, files, tmp_path):
    (files / "huge.png").write_bytes(png_bomb(12000, 12000))  # 144 megapixels in ~140 KB
    assert os.path.getsize(files / "huge.png") < 1_000_000
    base = dict(source=str(files / "s.png"), mask=str(files / "m.png"), reference=str(files / "r.png"))
    rows = [Row(id=what, seed=0, **{**base, what: str(files / "huge.png")})
            for what in ("source", "mask", "reference")] + [Row(id="ok", seed=0, **base)]
    tracemalloc.start()
    try:
        written, failed = write_results(pipe, rows, str(tmp_path / "out"), **EDIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == 1 and sorted(failed) == ["mask", "reference", "source"], failed
    for what in failed:
        assert f"{what} {files / 'huge.png'} is 12000x12000 = 144,000,000 px, over the input size " \
               "limit max_source_pixels=67,108,864" in failed[what], failed[what]
    assert peak < 100 * 2**20, peak  # never decoded (it would take 144 MB as gray, 432 MB as RGB)
    written, failed = write_results(pipe, [Row(id="s", seed=0, **base)], str(tmp_path / "small"),
                                    max_source_pixels=H * W - 1, **EDIT)
    assert written == 0 and "over the input size limit max_source_pixels=1,023" in failed["s"], failed


# ---------------------------------------------------------------------------------------------
# Provenance: one checkpoint step per --out
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resumed_sample_refuses_a_newer_training_step(pipe, files, tmp_path):
    wd = tmp_path / "run"
    _train_checkpoint(pipe, str(wd))  # steps 3 and 7
    newer = tmp_path / "later_7"
    shutil.move(wd / "checkpoints" / "7", newer)  # training has reached step 3 only
    manifest = _one_row(tmp_path, files)
    out = tmp_path / "out"
    args = [f"--model={wd}", f"--manifest={manifest}", f"--out={out}", "--steps=2", "--scheduler=ddim"]
    first, _, second, listed = _sample_each([
        args, ["ls", str(out)],
        ["mv", str(newer), str(wd / "checkpoints" / "7")],  # training went on
        ["rm", str(out / "a_0.png")],  # a row still to do
        args, ["ls", str(out)]])
    p = first
    assert p.returncode == 0, p.stderr[-2000:]
    weights = json.loads((out / "settings.json").read_text())["weights"]
    # EMA by default (issue 32): the run keeps EMA params, so they are the ones loaded
    assert weights["step"] == 3 and weights["ema"] is True, weights
    p = second
    assert p.returncode != 0, p.stdout + p.stderr[-2000:]
    assert "made by step 3 (EMA params" in p.stderr and "now loads step 7 (EMA params" in p.stderr, \
        p.stderr[-2000:]
    assert listed == sorted(os.listdir(out)) == ["settings.json"]  # nothing from step 7 mixed in


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_rows_failed_writes_no_settings_so_a_corrected_rerun_runs(files, model_dir, tmp_path):
    out = tmp_path / "out"
    bad = _manifest(tmp_path / "bad.jsonl", [{"id": "a", "source": str(files / "typo.png"),
                                              "mask": str(files / "m.png"), "reference": str(files / "r.png")}])
    good = _one_row(tmp_path, files)
    model = f"--model={model_dir}"
    p, listed, p2 = _sample_each([
        [model, f"--manifest={bad}", f"--out={out}", "--steps=2", "--scheduler=ddim"], ["ls", str(out)],
        # other settings (a seed: the edit program the other tests compiled) are not refused either
        [model, f"--manifest={good}", f"--out={out}", "--steps=2", "--seed=1", "--scheduler=ddim"]])
    assert p.returncode == 1 and "0/1 rows done" in p.stdout and "missing source file" in p.stdout
    assert listed == []
    p = p2
    assert p.returncode == 0 and "1/1 rows done" in p.stdout, p.stdout + p.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["a_0.png", "settings.json"]


def test_excel_utf8_bom_csv_manifest_is_read(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("id,source,mask,reference\r\na,s.png,m.png,r.png\r\n".encode("utf-8-sig"))
    (row,) = read_manifest(str(path), 0)
    assert (row.id, os.path.basename(row.source)) == ("a", "s.png")
    path = tmp_path / "m.jsonl"
    path.write_bytes('{"id": "b", "source": "s", "mask": "m", "reference": "r"}\n'.encode("utf-8-sig"))
    assert read_manifest(str(path), 0)[0].id == "b"


def test_a_mistyped_local_model_path_is_no_such_folder_not_a_hub_error(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*a, **kw):
        raise AssertionError("a local path went to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path, where in (("runs/wrkdir", "runs exists, wrkdir in it does not"),
                        (str(tmp_path / "runs" / "a" / "b"), f"{tmp_path / 'runs'} exists, a/b in it does not"),
                        ("./nope/x", "looked for in")):
        with pytest.raises(FileNotFoundError, match="no such folder") as e:
            PaintByExample.from_pretrained(path)
        assert where in str(e.value) and "Hub was not asked" in str(e.value), str(e.value)
