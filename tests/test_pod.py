"""Pod-grade failures on CPU (2 processes x 2 devices over 127.0.0.1 through launch/local.sh): a
dead peer ends the run with a message instead of a hang (`pbe_jax.training.watchdog`),
`--max_restarts` restarts it from the newest checkpoint to the same result as an uninterrupted
run, and a checkpoint resumes on a smaller slice of another shape. One uninterrupted 2-process
run (a module fixture) is the reference of both, and is itself the launcher's plain 2-process
training test (multi-process runs are slow on 2 cores)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pbe_jax.training.watchdog import EXIT_PEER_LOST
from tests.train_utils import (CONFIG_FILE, FAST_COMPILE_FLAGS, REPO, cli_overrides, read_metrics,
                               subprocess_env, train_cmd)

LAUNCH = os.path.join(REPO, "launch", "local.sh")
STEPS = 12
RUN = {"train.num_steps": STEPS, "ckpt_every_steps": 4, "watchdog.stall_minutes": 3,
       "watchdog.heartbeat_seconds": 10}


def _launch(workdir, logs, *extra):
    cmd = [LAUNCH, "-n", "2", "-d", "2", "-l", str(logs), *extra, "--", sys.executable, "-m", "pbe_jax.train",
           f"--config={CONFIG_FILE}:demo", f"--workdir={workdir}",
           *cli_overrides(**{**RUN, "mesh": "data:2,fsdp:2"})]
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}  # local.sh adds the devices
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_COMPILE_FLAGS)
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 2 processes x 2 devices, mesh data:2,fsdp:2, checkpoints at 4, 8
    and 12. The supervised run then reads process 0's programs from the compilation cache (as a
    restart does) instead of compiling them again beside it."""
    tmp = tmp_path_factory.mktemp("pod_reference")
    proc = _launch(tmp / "ref", tmp / "ref_logs")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return tmp / "ref"


@pytest.mark.slow
def test_local_launcher_trains_two_processes(reference):
    """The demo training through launch/local.sh, 2 processes x 2 fake CPU devices over
    127.0.0.1 (the reference run): one global computation, so both processes log the same loss at
    every step; metrics.jsonl is written once (by process 0); checkpoints at every
    ckpt_every_steps."""
    logs = reference.parent / "ref_logs"
    losses = {}
    for i in range(2):
        text = (logs / f"proc_{i}.log").read_text()
        assert "over 4 devices, 2 processes" in text
        losses[i] = [float(x) for x in re.findall(rf"step \d+/{STEPS} loss ([0-9.]+)", text)]
        assert len(losses[i]) == STEPS, text[-2000:]
    assert losses[0] == losses[1]  # one global computation: both processes see the same loss
    rows = [line for line in (reference / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == STEPS  # written once, by process 0
    assert sorted(int(d) for d in os.listdir(reference / "checkpoints") if d.isdigit()) == [4, 8, STEPS]


@pytest.mark.slow
def test_sigkill_one_process_watchdog_message_then_supervised_restart_is_exact(tmp_path, reference):
    """Process 1 is SIGKILLed after the checkpoint at step 4: process 0 exits EXIT_PEER_LOST
    at once (not JAX's C++ abort) naming the missing process and the step, with its Python
    stacks; `local.sh --max_restarts=1` restarts both, the run resumes from step 4 and ends
    with losses and params bitwise equal to an uninterrupted run; restarts.jsonl has the row."""
    ref, run = reference, tmp_path / "run"
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
        if supervised.poll() is None:
            supervised.kill()
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



@pytest.mark.slow
def test_resume_on_a_smaller_slice_of_another_shape(tmp_path, reference):
    """The reference's step-4 checkpoint (2 processes x 2 devices, mesh data:2,fsdp:2) resumes
    in 1 process x 2 devices with mesh data:1,fsdp:2: params and optimizer state resharded on
    restore, the global data stream continues at the same batch, and every loss of steps 5-12
    follows the uninterrupted run within 1e-5 relative."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for step in (8, STEPS):  # the run as it stood at its step-4 checkpoint
        shutil.rmtree(run / "checkpoints" / str(step))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 4))
    r = subprocess.run(train_cmd(str(run), **{**RUN, "mesh": "data:1,fsdp:2"}), env=subprocess_env(2),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "over 2 devices, 1 processes" in r.stderr, r.stderr[-3000:]
    a, b = read_metrics(str(reference)), read_metrics(str(run))
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in range(5, STEPS + 1):
        np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5)


@pytest.mark.parametrize("coordinator", ["service", "process0"])
def test_a_dead_process_0_is_a_dead_peer_when_the_service_runs_apart(tmp_path, coordinator):
    """SIGKILL of process 0 (tests/peer_probe.py: the real runtime set-up, watchdog and one
    cross-process collective per step, no model). With the coordination service in its own
    process (local.sh's default) process 1 exits EXIT_PEER_LOST within the heartbeat, naming
    process 0 and its last step, with its Python stacks. With the service inside process 0
    (`--coordinator=process0`, JAX's default) it is a race: JAX's client aborts process 1 in C++
    (exit 134), unless its failed collective reaches the watchdog first (exit 75, "the
    coordinator, process 0, cannot be reached"); which is why the launchers keep the service
    apart."""
    logs = tmp_path / "logs"
    cmd = [LAUNCH, "-n", "2", "-d", "1", "-l", str(logs), f"--coordinator={coordinator}", "--",
           sys.executable, os.path.join(REPO, "tests", "peer_probe.py"), "--die_process=0", "--die_at_step=3",
           "--config.watchdog.heartbeat_seconds=5"]
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "PBE_JAX_COORDINATOR")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_COMPILE_FLAGS)
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr[-3000:]  # the first failure: process 0's
    assert time.time() - t0 < 120, r.stderr[-3000:]
    pid1 = (logs / "proc_1.pid").read_text().strip()
    log1 = (logs / "proc_1.log").read_text()
    assert "probe: step 2" in log1, log1[-3000:]
    if coordinator == "process0":
        status = re.search(rf"launcher: process {pid1} exited with status (\d+)", r.stderr)
        assert status and int(status.group(1)) in (134, EXIT_PEER_LOST), r.stderr[-3000:]
        if int(status.group(1)) == EXIT_PEER_LOST:
            assert "the coordinator, process 0, cannot be reached" in log1, log1[-3000:]
        return
    assert f"launcher: process {pid1} exited with status {EXIT_PEER_LOST}" in r.stderr, r.stderr[-3000:]
    assert "watchdog: process(es) [0] of 2 gone" in log1 and "stops at step 2" in log1, log1[-3000:]
    assert log1.count("watchdog: process(es) [0] of 2 gone") <= 2, log1[-3000:]  # one message (log + stderr)
    assert "Current thread" in log1 or "Thread 0x" in log1, log1[-3000:]  # the faulthandler dump
    assert "Check failure stack trace" not in log1 and "Fatal Python error: Aborted" not in log1, log1[-3000:]
    assert "coordinator: serving 2 processes" in (logs / "coordinator.log").read_text()


def test_a_peer_that_never_joins_ends_the_start_with_a_message(tmp_path):
    """Process 0 of 2 started alone (process 1 never starts): after --join_timeout_seconds it
    exits EXIT_PEER_LOST with a message saying what to check, not JAX's C++ abort after 300 s."""
    from tests.helpers import free_port
    env = {k: v for k, v in os.environ.items() if k != "PBE_JAX_COORDINATOR"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "peer_probe.py"),
                        f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=0",
                        "--join_timeout_seconds=3"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_PEER_LOST, r.stderr[-3000:]
    assert time.time() - t0 < 60
    assert "the run did not start within --join_timeout_seconds=3: process 0 is waiting for all 2 processes" \
        in r.stderr, r.stderr[-3000:]
    assert "Check failure stack trace" not in r.stderr and "probe: process" not in r.stdout
