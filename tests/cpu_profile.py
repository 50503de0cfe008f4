"""Opt-in pytest plugin: the CPU seconds of every test, its subprocesses included, one JSON row
per test (the suite is CPU-bound on CI's 2 cores, so CPU time, not wall time, says what a test
costs; wall times depend on what the other worker runs meanwhile).

  python -m pytest -n 2 -p tests.cpu_profile tests      # rows in cpu_profile.jsonl
  CPU_PROFILE_OUT=/tmp/cpu.jsonl python -m pytest -n 2 -p tests.cpu_profile tests

Each row: {"id": nodeid, "cpu": user + sys seconds of the worker and of the children it waited
for during the test, "wall": seconds}. Threads that spin while the other worker holds the core
count too, so a test's number moves by about 15% with its neighbour.
"""
from __future__ import annotations

import json
import os
import resource
import time

import pytest


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    c0, t0 = _cpu(), time.time()
    yield
    row = {"id": item.nodeid, "cpu": round(_cpu() - c0, 2), "wall": round(time.time() - t0, 2)}
    with open(os.environ.get("CPU_PROFILE_OUT", "cpu_profile.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
