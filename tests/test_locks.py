"""The one-writer-per-folder lock: a second holder is refused with the first one named, a holder
that died (however) leaves a lock the next run takes over, and the contents-only path (object
stores) tells a dead local holder from a live one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


import pytest

from pbe_jax import locks

HOLD = """
import sys, time
from pbe_jax import locks
with locks.hold(sys.argv[1], "--workdir"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_and_named(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(locks.LockedError) as e:
            with locks.hold(tmp_path, "--workdir"):
                pass
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "--workdir" in msg and str(tmp_path) in msg
        # --reclaim_lock does not take a lock from a live holder either
        with pytest.raises(locks.LockedError):
            locks.FolderLock(tmp_path, "--workdir", reclaim=True).acquire()
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / locks.LOCK_NAME).exists()  # SIGKILL left the file behind
    with caplog.at_level("WARNING", logger="pbe_jax"):
        with locks.hold(tmp_path, "--workdir") as lock:
            assert lock.held
            assert locks.read_holder(tmp_path)["pid"] == os.getpid()
    assert f"pid {p.pid}" in caplog.text
    assert not (tmp_path / locks.LOCK_NAME).exists()  # released on exit


def test_release_and_reacquire_in_one_process(tmp_path):
    with locks.hold(tmp_path, "--out"):
        with pytest.raises(locks.LockedError):
            locks.FolderLock(tmp_path, "--out").acquire()
    with locks.hold(tmp_path, "--out"):
        pass
    with locks.hold(tmp_path, "--out", enabled=False) as lock:
        assert lock is None and not (tmp_path / locks.LOCK_NAME).exists()


def test_contents_only_lock_detects_dead_and_foreign_holders(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "_is_local", lambda path: False)
    # a dead process on this host: taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {**locks.holder_info("--workdir"), "pid": dead.pid, "start": "1"}
    (tmp_path / locks.LOCK_NAME).write_text(json.dumps(info))
    with locks.hold(tmp_path, "--workdir"):
        assert locks.read_holder(tmp_path)["pid"] == os.getpid()
    # a live process on this host whose start time differs (pid reused): taken over
    info = {**locks.holder_info("--workdir"), "start": "0"}
    (tmp_path / locks.LOCK_NAME).write_text(json.dumps(info))
    with locks.hold(tmp_path, "--workdir"):
        pass
    # another host: cannot be checked, refused unless reclaimed
    info = {**locks.holder_info("--workdir"), "host": "some-other-host", "since": "then"}
    (tmp_path / locks.LOCK_NAME).write_text(json.dumps(info))
    with pytest.raises(locks.LockedError, match="some-other-host.*--reclaim_lock"):
        with locks.hold(tmp_path, "--workdir"):
            pass
    with locks.hold(tmp_path, "--workdir", reclaim=True):
        assert locks.read_holder(tmp_path)["host"] != "some-other-host"
