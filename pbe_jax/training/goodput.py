"""Goodput: the share of a run's wall time spent in productive training steps, and where the
rest went (start-up, compile, restore, checkpoint blocking, data waits, evals, restarts).

The loop times its sections into one `Goodput` (`since('checkpoint', t0)`, ...); at the end
`report` gives the `goodput/*` values (TensorBoard, WORKDIR/goodput.json: not metrics.jsonl,
whose readers take a step's last row as the step's metrics) and the final line:

  goodput 71.2% of 412.0s: steps 293.3s | startup 41.2s, compile 22.1s, restore 0.0s,
  checkpoint 9.8s, data 1.1s, evals 44.5s | restarts 1 (lost 35.0s, restarts.jsonl)

Start-up sections come from the command line's `runtime.StartupClock` ('trace+lower' and
'compile' count as compile, 'params restore' as restore, the first step as a step, the rest as
start-up). Productive time is the loop's wall time less its checkpoint, eval and data-wait time.
Restarts: `WORKDIR/restarts.jsonl` (written by the launchers) gives each restart's downtime, from
the failure to the relaunch; the time the failed attempt ran since its last checkpoint is not
known here and is not counted.
"""
from __future__ import annotations

import contextlib
import json
import time

from etils import epath

LOST = ("startup", "compile", "restore", "checkpoint", "data", "evals")
_STARTUP_KIND = {"startup/trace_lower": "compile", "startup/compile": "compile",
                 "startup/params_restore": "restore", "startup/first_step": "steps"}


def restart_downtime(workdir: str) -> tuple[int, float]:
    """(restarts, seconds from each failure to its relaunch) of WORKDIR/restarts.jsonl."""
    path = epath.Path(workdir) / "restarts.jsonl"
    if not path.exists():
        return 0, 0.0
    n, lost = 0, 0.0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            lost += max(float(row["restart_at"]) - float(row["failed_at"]), 0.0)
            n += 1
        except (ValueError, KeyError, TypeError):
            continue  # a cut line: the launcher was killed while writing it
    return n, lost


class Goodput:
    def __init__(self):
        self.seconds = {k: 0.0 for k in ("steps", *LOST)}
        self._loop_start: float | None = None
        self._wait0 = 0.0

    def add_startup(self, sections: dict[str, float]) -> None:
        """The start-up clock's `as_dict()` (wall seconds per section)."""
        for k, v in sections.items():
            if k.startswith("startup/") and k not in ("startup/total", "startup/total_cpu"):
                self.seconds[_STARTUP_KIND.get(k, "startup")] += float(v)

    def loop_started(self, data_wait_s: float) -> None:
        """The loop's clock starts (after the first step); `data_wait_s`: the input pipeline's
        wait so far, counted in start-up."""
        self._loop_start, self._wait0 = time.perf_counter(), data_wait_s

    def since(self, kind: str, t0: float) -> None:
        """Count the time since `t0` (time.perf_counter()) as `kind`."""
        self.seconds[kind] += time.perf_counter() - t0

    @contextlib.contextmanager
    def timed(self, kind: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.since(kind, t)

    def report(self, workdir: str, data_wait_s: float) -> tuple[dict[str, float], str]:
        """({'goodput/...': value}, the final line), after the loop; `data_wait_s`: the input
        pipeline's total wait."""
        s = dict(self.seconds)
        data_wait_s = max(data_wait_s - self._wait0, 0.0) if self._loop_start is not None else 0.0
        s["data"] += data_wait_s
        if self._loop_start is not None:
            loop = time.perf_counter() - self._loop_start
            s["steps"] += max(loop - s["checkpoint"] - s["evals"] - data_wait_s, 0.0)
        restarts, downtime = restart_downtime(workdir)
        total = sum(s.values()) + downtime
        share = s["steps"] / total if total > 0 else 0.0
        values = {"goodput/share": share, "goodput/total_s": total, "goodput/restarts": restarts,
                  "goodput/restart_downtime_s": downtime, **{f"goodput/{k}_s": v for k, v in s.items()}}
        # 'startup', not 'start-up': the start-up clock's own line is the one that says 'start-up'
        lost = ", ".join(f"{k} {s[k]:.1f}s" for k in LOST)
        line = f"goodput {100 * share:.1f}% of {total:.1f}s: steps {s['steps']:.1f}s | {lost}"
        if restarts:
            line += f" | restarts {restarts} (lost {downtime:.1f}s, restarts.jsonl)"
        return values, line
