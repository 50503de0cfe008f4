"""Pod-grade failures on CPU (2 processes over 127.0.0.1 through launch/local.sh): a dead peer
ends the run with a message instead of a hang (`pbe_jax.training.watchdog`), and
`--max_restarts` restarts it from the newest checkpoint to the same result as an uninterrupted
run. One supervised run carries every assertion (multi-process runs are slow on 2 cores)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pbe_jax.training.watchdog import EXIT_PEER_LOST
from tests.train_utils import CONFIG_FILE, REPO, cli_overrides, read_metrics

LAUNCH = os.path.join(REPO, "launch", "local.sh")
STEPS = 12


def _launch(workdir, logs, *extra):
    cmd = [LAUNCH, "-n", "2", "-d", "1", "-l", str(logs), *extra, "--", sys.executable, "-m", "pbe_jax.train",
           f"--config={CONFIG_FILE}:demo", f"--workdir={workdir}",
           *cli_overrides(**{"train.num_steps": STEPS, "mesh": "data:2", "ckpt_every_steps": 4,
                             "watchdog.stall_minutes": 3, "watchdog.heartbeat_seconds": 10})]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DRY_RUN")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _params(workdir, step):
    """The params of a checkpoint as host arrays (whatever devices wrote it)."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ck = ocp.PyTreeCheckpointer()
    meta = ck.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    params = getattr(tree, "tree", tree)["params"]
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
    r = ck.restore(path, args=ocp.args.PyTreeRestore(item={"params": params}, restore_args={"params": args},
                                                     partial_restore=True))
    return jax.tree.leaves(r["params"])


@pytest.mark.slow
def test_sigkill_one_process_watchdog_message_then_supervised_restart_is_exact(tmp_path):
    """Process 1 is SIGKILLed after the checkpoint at step 4: process 0 exits EXIT_PEER_LOST
    at once (not JAX's C++ abort) naming the missing process and the step, with its Python
    stacks; `local.sh --max_restarts=1` restarts both, the run resumes from step 4 and ends
    with losses and params bitwise equal to an uninterrupted run; restarts.jsonl has the row."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted run first: the supervised run then reads its programs from the
    # compilation cache (as a restart does) instead of compiling them again beside it
    reference = _launch(ref, tmp_path / "ref_logs")
    _, ref_err = reference.communicate(timeout=900)
    supervised = _launch(run, tmp_path / "logs", "--max_restarts=1", "--restart_backoff=0")
    try:
        deadline = time.time() + 900
        while not (max(read_metrics(str(run)) or [0]) >= 6 and (run / "checkpoints" / "4").is_dir()):
            assert supervised.poll() is None, supervised.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(int((tmp_path / "logs" / "proc_1.pid").read_text()), signal.SIGKILL)
        killed = time.time()
        _, err = supervised.communicate(timeout=900)
    finally:
        for p in (reference, supervised):
            if p.poll() is None:
                p.kill()
    assert reference.returncode == 0, ref_err[-3000:]
    assert supervised.returncode == 0, err[-3000:]
    log0 = (tmp_path / "logs" / "proc_0.log").read_text()
    first = log0.split("==== launcher: restart 1")[0]
    assert "watchdog: process(es) [1] of 2 gone" in first and "at step " in first, first[-3000:]
    assert "Thread 0x" in first or "Current thread" in first, first[-3000:]  # the faulthandler dump
    assert "Check failure stack trace" not in first, first[-3000:]
    rows = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["exit_code"] in (EXIT_PEER_LOST, 128 + signal.SIGKILL), rows
    assert rows[0]["failed_at"] - killed < 60, rows  # the survivor's exit, well within the bound
    assert "resumed from" in log0.split("==== launcher: restart 1")[1]
    a, b = read_metrics(str(ref)), read_metrics(str(run))
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    for x, y in zip(_params(str(ref), STEPS), _params(str(run), STEPS)):
        np.testing.assert_array_equal(x, y)

