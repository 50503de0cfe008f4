"""Resume on another topology: a checkpoint of one process / device count / mesh resumes on
another (orbax restores into the new shardings; the data stream's position is global)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

from tests.train_utils import read_metrics, subprocess_env, train_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_resume_on_another_topology(tmp_path):
    """A checkpoint written by 2 processes x 4 devices (mesh data:4,fsdp:2) resumes in 1 process
    x 4 devices (data:2,fsdp:2): params and optimizer state resharded on restore, the global
    data stream continues at the same batch, the losses follow the uninterrupted 8-device run
    (the 2-process run itself, which goes on to step 4 from the same checkpoint)."""
    over = {"ckpt_every_steps": 2, "log_every_steps": 1}
    ref, run = tmp_path / "ref", tmp_path / "run"
    port = _free_port()
    first = [subprocess.Popen(
        train_cmd(str(ref), extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"],
                  **{**over, "train.num_steps": 4, "mesh": "data:4,fsdp:2"}),
        env=subprocess_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in first:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    # the run as it stood at its step-2 checkpoint: steps 3 and 4 must come from the resume
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "4")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 2))
    second = subprocess.run(train_cmd(str(run), **{**over, "train.num_steps": 4, "mesh": "data:2,fsdp:2"}),
                            env=subprocess_env(4), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "over 4 devices, 1 processes" in second.stderr
    a, b = read_metrics(str(ref)), read_metrics(str(run))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5)
