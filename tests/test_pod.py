"""Pod-grade failures on CPU (several processes over 127.0.0.1): a dead peer ends the run with a
message instead of a hang (`pbe_jax.training.watchdog`)."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from pbe_jax.training.watchdog import EXIT_PEER_LOST
from tests.train_utils import read_metrics, subprocess_env, train_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkill_one_of_two_processes_the_other_exits_with_a_message(tmp_path):
    """Process 1 is SIGKILLed mid-run: process 0 exits EXIT_PEER_LOST within the bound (not
    JAX's C++ abort), its log names the missing process and the step, and holds the Python
    stacks."""
    wd = str(tmp_path / "run")
    port = _free_port()
    procs = [subprocess.Popen(
        train_cmd(wd, extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"],
                  **{"train.num_steps": 100000, "mesh": "data:2", "log_every_steps": 2,
                     "watchdog.stall_minutes": 0.5, "watchdog.heartbeat_seconds": 10}),
        env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        deadline = time.time() + 600
        while len(read_metrics(wd)) < 2:
            for pr in procs:
                assert pr.poll() is None, pr.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        took = time.time() - killed
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    assert procs[0].returncode == EXIT_PEER_LOST, err[-3000:]
    assert took < 30, took
    assert "watchdog: process(es) [1] of 2 gone" in err and "at step " in err, err[-3000:]
    assert "Thread 0x" in err or "Current thread" in err, err[-3000:]  # the faulthandler dump
    assert "Check failure stack trace" not in err, err[-3000:]
