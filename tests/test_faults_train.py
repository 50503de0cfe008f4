"""Training under faults: a corrupt newest checkpoint, a save that fails, deleted checkpoints, a
decompression bomb in the data, a cut metrics line, and SIGKILL at random moments (also while a
checkpoint is being written). Each reproduces a failure of issue 15 and checks it now holds."""
from __future__ import annotations

import errno
import glob
import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from pbe_jax.checkpoint import Checkpointer, CheckpointError
from pbe_jax.metrics import MetricWriter, last_logged_step
from pbe_jax.training import loop
from pbe_jax.training.loop import train_and_evaluate
from tests.test_data_bad_inputs import _encode, _picture, _write_coco
from tests.test_faults_data import png_bomb
from tests.test_train import _final_params
from tests.train_utils import read_metrics, subprocess_env, tiny_config, train_cmd


def logged_steps(workdir) -> list[int]:
    """The step of every row of metrics.jsonl, in file order (repeats included)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def corrupt(step_dir) -> None:
    """Cut every file of the step's train state in half (what a full disk, a bad copy or a
    dying node leaves)."""
    for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


def bomb_dataset(root: str) -> dict:
    """Config overrides that train on a COCO folder of 4 good images and 2 decompression bombs
    (one over PIL's own limit, one over `data.max_image_pixels`)."""
    pic_box = [(30, 20, 40, 36)]
    good = _encode(_picture(), quality=90)
    entries = [(f"good{i}.jpg", good, pic_box, (96, 72)) for i in range(4)] + [
        ("bomb.png", png_bomb(14000, 14000), [(2000, 2000, 7000, 7000)], (14000, 14000)),
        ("huge.png", png_bomb(9000, 9000), [(1000, 1000, 5000, 5000)], (9000, 9000)),
    ]
    ann, images = _write_coco(root, entries)
    return {"data.source": "coco", "data.annotations": ann, "data.images_dir": images,
            "data.max_image_pixels": 40_000_000}


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_moved_aside_and_training_resumes_past_it_twice(tmp_path):
    """Also on a dataset with decompression bombs: they are counted (`data/too_large`) and
    training goes on (a bomb used to kill the run, and the resumed stream hit it again)."""
    wd = str(tmp_path / "run")
    ck = os.path.join(wd, "checkpoints")
    data = bomb_dataset(str(tmp_path / "data"))
    cfg = lambda n: tiny_config(**data, **{"train.num_steps": n, "ckpt_every_steps": 2})  # noqa: E731
    train_and_evaluate(cfg(4), wd)
    first = read_metrics(wd)
    assert first[4]["data/too_large"] > 0, first[4]
    corrupt(os.path.join(ck, "4"))
    # Resume: step 4 does not restore -> moved aside, back to step 2, and on past step 4 (which
    # used to die with StepAlreadyExistsError at step 4, on every rerun).
    train_and_evaluate(cfg(6), wd)
    names = sorted(os.listdir(ck))
    aside = [n for n in names if n.startswith("4.corrupt-")]
    assert len(aside) == 1 and os.path.isdir(os.path.join(ck, aside[0], "state")), names
    assert {"4", "6"} <= set(names), names
    assert logged_steps(wd) == [1, 2, 3, 4, 5, 6]  # rows 3, 4 of the first run were dropped
    again = read_metrics(wd)
    for s in (3, 4):  # re-trained from step 2's state and data position: the same losses
        assert again[s]["loss"] == first[s]["loss"], (s, again[s]["loss"], first[s]["loss"])
        assert again[s]["data/too_large"] == first[s]["data/too_large"]
    # ... and a second resume goes on from 6, the corrupt copy still kept aside
    train_and_evaluate(cfg(8), wd)
    assert logged_steps(wd) == list(range(1, 9))
    assert aside[0] in os.listdir(ck) and "8" in os.listdir(ck)

    # The checkpoints deleted while metrics.jsonl shows history: no silent fresh start.
    shutil.rmtree(ck)
    with pytest.raises(CheckpointError, match=r"records training up to step 8.*does not exist"):
        train_and_evaluate(cfg(10), wd)
    assert logged_steps(wd) == list(range(1, 9))  # the history is untouched


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    """The other side of the rule above: rows up to 2 * ckpt_every_steps can predate the first
    finished checkpoint, so they are dropped and the run starts again from step 0."""
    wd = str(tmp_path)
    cfg = tiny_config(**{"ckpt_every_steps": 3})
    writer = MetricWriter(wd)
    for s in range(1, 7):
        writer.scalars(s, {"loss": 1.0})
    writer.close()
    os.makedirs(os.path.join(wd, "checkpoints"))
    loop._refuse_lost_history(wd, True, cfg)  # 6 <= 2 * 3: allowed
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    with pytest.raises(CheckpointError, match=r"up to step 7.*holds no checkpoint"):
        loop._refuse_lost_history(wd, True, cfg)


def test_metrics_cut_line_is_repaired_and_rows_past_the_resume_step_dropped(tmp_path):
    wd = str(tmp_path)
    rows = "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 5, "lo')  # a full disk mid-line
    writer = MetricWriter(wd)
    assert logged_steps(wd) == [1, 2, 3, 4]  # the cut line is gone, not appended to
    assert writer.keep_until(2) == 2
    writer.scalars(3, {"loss": 30.0})
    writer.close()
    assert logged_steps(wd) == [1, 2, 3]
    assert read_metrics(wd)[3]["loss"] == 30.0


def test_a_failed_save_raises_while_it_is_written_with_older_checkpoints_intact(tmp_path, monkeypatch):
    """A full disk while step 10 is written (injected into orbax's JSON writer, which runs in
    the save's background thread). The training loop calls `check()` after every step: the
    failure surfaces while that save is written, naming it and the checkpoint left intact;
    before, it surfaced only at the next save (one `ckpt_every_steps` of compute later)."""
    real = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_10(self, x, directory):
        if f"{os.sep}10." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return await real(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_10)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    state = {"params": {"w": np.arange(1000, dtype=np.float32)}, "step": np.int32(0)}
    frozen = {"vae": {"w": np.ones(10, np.float32)}}
    ckpt.save(5, state, frozen, {"position": 5}, {"seed": 0})
    ckpt.save(10, state, frozen, {"position": 10}, {"seed": 0})  # starts; the write fails later
    deadline = time.time() + 120
    with pytest.raises(CheckpointError) as e:
        while time.time() < deadline:  # what the loop does between steps 10 and 15
            ckpt.check()
            time.sleep(0.01)
    msg = str(e.value)
    assert "checkpoints/10 failed to write" in msg and "No space left" in msg, msg
    assert "intact are [5]" in msg and "resume from step 5" in msg, msg
    ckpt.close()  # the failure was reported once; closing does not raise it again
    assert sorted(n for n in os.listdir(ckpt.directory) if n.isdigit()) == ["5"]
    assert inspect.getsource(loop.train_and_evaluate).count("ckpt.check()") == 1


def _tmp_dirs(ck: str, since: float) -> list[str]:
    """orbax's `<step>.orbax-checkpoint-tmp*` folders (a save being written) made after `since`."""
    out = []
    for p in glob.glob(os.path.join(ck, "*.orbax-checkpoint-tmp*")):
        try:
            if os.stat(p).st_mtime >= since:
                out.append(p)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return out


def _complete_steps(ck: str) -> set[int]:
    """The steps whose checkpoint is complete (orbax renames the tmp folder into place last)."""
    return {int(d) for d in os.listdir(ck) if d.isdigit()} if os.path.isdir(ck) else set()


def _kill_when(p: subprocess.Popen, ready, deadline: float) -> None:
    while not ready():
        assert p.poll() is None, f"training exited (rc {p.returncode}) before the planned kill"
        assert time.time() < deadline, "no kill moment within the deadline"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    """Three SIGKILLs (right after a checkpoint is complete, while one is being written, at a
    random moment), a resume after each: the losses equal an uninterrupted run's bit for bit,
    metrics.jsonl holds exactly one row per step, and the final params are equal."""
    n, k = 12, 2  # 12 steps: the random kill still lands anywhere up to step n - 4 = 8
    over = {"train.num_steps": n, "ckpt_every_steps": k}
    env = subprocess_env(1)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    ck = os.path.join(killed, "checkpoints")
    reference = None  # started after the first kill: the train step is in the compilation cache then
    rng = random.Random(15)
    last = lambda: last_logged_step(killed)  # noqa: E731
    mid_write, retries, kills = 0, 2, []
    plan = ["right after a complete checkpoint", "during a checkpoint write", "random"]
    while plan:
        what = plan.pop(0)
        p = subprocess.Popen(train_cmd(killed, **over), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline, t0 = time.time() + 600, time.time()
        if what == "random":
            target = min(last() + rng.randint(1, 3), n - 4)
            pause = rng.uniform(0.0, 0.5)
            _kill_when(p, lambda: last() >= target and (time.sleep(pause) or True), deadline)
        elif what == "right after a complete checkpoint":
            newest = max(_complete_steps(ck), default=0)
            _kill_when(p, lambda: max(_complete_steps(ck), default=0) > newest, deadline)
        else:
            _kill_when(p, lambda: bool(_tmp_dirs(ck, t0)), deadline)
            if _tmp_dirs(ck, t0):  # still there after the kill: the write was cut
                mid_write += 1
            elif retries:  # the write finished just before the kill: try again
                retries -= 1
                plan.insert(0, what)
        kills.append((what, last(), sorted(os.listdir(ck)) if os.path.isdir(ck) else []))
        if reference is None:
            reference = subprocess.Popen(train_cmd(full, **over), env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
    assert mid_write >= 1, kills
    done = subprocess.run(train_cmd(killed, **over), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    assert logged_steps(killed) == list(range(1, n + 1)), kills
    a, b = read_metrics(full), read_metrics(killed)
    for s in range(1, n + 1):
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"], kills)
    for x, y in zip(jax.tree.leaves(_final_params(full, n)), jax.tree.leaves(_final_params(killed, n))):
        np.testing.assert_array_equal(x, y)
