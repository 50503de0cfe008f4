"""Time to recover from a dead process, measured with the real launcher: the demo model trains
in 2 processes (one CPU device each, mesh `data:2`) under `launch/local.sh --max_restarts=1`;
process 1 is SIGKILLed once the checkpoint at `ckpt_every` is written and a step past it is
logged. Rows (seconds unless said):

- `recovery/demo/detect_s`: kill -> the surviving process has exited (watchdog, exit 75) and
  the launcher has logged the failure (`restarts.jsonl` `failed_at`);
- `recovery/demo/relaunch_s`: failure logged -> processes relaunched (the backoff, here 0);
- `recovery/demo/kill_to_next_step_s`: kill -> the first step after the resumed checkpoint is
  logged (detection + relaunch + start-up from the compilation cache + restore + one step);
- `recovery/demo/steps_lost`: steps logged before the kill that the resume trains again.

The launcher lives in the checkout (`launch/local.sh`), not in the installed package:
`--recovery_launcher` points at it when the package is installed elsewhere.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from pbe_jax.benchmarks.report import Row
from pbe_jax.configs import pbe as pbe_configs
from pbe_jax.metrics import last_logged_step


def default_launcher() -> str:
    """`launch/local.sh` of the checkout this package runs from (editable install)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "launch", "local.sh")


def run(*, steps: int = 12, ckpt_every: int = 4, heartbeat_seconds: int = 10,
        launcher: str | None = None, workdir: str | None = None, timeout_s: float = 1800) -> list[Row]:
    launcher = launcher or default_launcher()
    if not os.path.isfile(launcher):
        raise FileNotFoundError(f"--what=recovery needs the launcher launch/local.sh; {launcher} does not "
                                "exist (set --recovery_launcher=PATH to a checkout's launch/local.sh)")
    if steps < 2 * ckpt_every:
        raise ValueError(f"--recovery_steps={steps} must be at least 2 x --recovery_ckpt_every={ckpt_every}")
    root = workdir or tempfile.mkdtemp(prefix="pbe_recovery_")
    wd, logs = os.path.join(root, "run"), os.path.join(root, "logs")
    over = {"train.num_steps": steps, "ckpt_every_steps": ckpt_every, "log_every_steps": 1,
            "mesh": "data:2", "vae_fit.steps": 0, "exemplar_eval.num_triplets": 0,
            "sample_every_steps": 0, "data.num_workers": 0, "watchdog.heartbeat_seconds": heartbeat_seconds}
    cmd = [launcher, "-n", "2", "-d", "1", "-l", logs, "--max_restarts=1", "--restart_backoff=0", "--",
           sys.executable, "-m", "pbe_jax.train", f"--config={pbe_configs.__file__}:demo", f"--workdir={wd}",
           *[f"--config.{k}={v}" for k, v in over.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DRY_RUN")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout_s
    try:
        ckpt = os.path.join(wd, "checkpoints", str(ckpt_every))
        while not (os.path.isdir(ckpt) and last_logged_step(wd) > ckpt_every):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the run ended or timed out before the kill: {proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        lost = last_logged_step(wd) - ckpt_every
        with open(os.path.join(logs, "proc_1.pid")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        killed = time.time()
        marker, want = "==== launcher: restart 1", f"step {ckpt_every + 1}/{steps} "
        next_step = None
        while proc.poll() is None and time.time() < deadline:
            if next_step is None:
                after = _read(os.path.join(logs, "proc_0.log")).partition(marker)[2]
                if want in after:
                    next_step = time.time()
            time.sleep(0.05)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"the supervised run failed (exit {proc.returncode}): {err[-3000:]}")
    with open(os.path.join(wd, "restarts.jsonl")) as f:
        restart = json.loads(f.readline())
    if next_step is None:
        raise RuntimeError("the resumed run logged no step past its checkpoint")
    return [Row("recovery/demo/detect_s", restart["failed_at"] - killed, None, "s"),
            Row("recovery/demo/relaunch_s", restart["restart_at"] - restart["failed_at"], None, "s"),
            Row("recovery/demo/kill_to_next_step_s", next_step - killed, None, "s"),
            Row("recovery/demo/steps_lost", float(lost), None, "steps")]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""
