"""Hyper-parameter sweeps as a library: expand a config file's `get_sweep(arg)` into runs,
name them, run them here or through the TPU / SLURM launchers, summarise their metrics.
`python -m pbe_jax.sweep` is the command line (its docstring has the usage)."""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from etils import epath

from pbe_jax.configs import load_config, load_module
from pbe_jax.configs.validate import check_run
from pbe_jax.metrics import METRICS_FILE
from pbe_jax.outputs import atomic_write

MAX_NAME = 100
SUMMARY_KEYS = ("step", "loss", "loss_last5", "grad_norm", "lr", "images_per_s", "mfu", "nan_skips")


@dataclass(frozen=True)
class Run:
    """One point of a sweep. `train_args`: the arguments after `python -m pbe_jax.train`."""
    name: str
    overrides: dict[str, Any]
    workdir: str
    train_args: tuple[str, ...] = field(default=())

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "pbe_jax.train", *self.train_args]


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------


def split_config_spec(spec: str) -> tuple[str, str]:
    """'configs/pbe.py:demo,sweep=lr' -> ('configs/pbe.py', 'demo,sweep=lr')."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ValueError(f"--config={spec!r}: expected PATH.py[:ARG]")
    return path, arg


def strip_sweep_token(arg: str) -> str:
    """ARG without its `sweep=NAME` token: what each run's get_config receives."""
    return ",".join(t for t in arg.split(",") if t and not t.strip().startswith("sweep="))


def _fmt_value(v: Any) -> str:
    """A value as it appears in a run name: short, unique per value, filesystem safe."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: 0.0001, 1e-05, 0.2
    if isinstance(v, (tuple, list)):
        return "x".join(_fmt_value(x) for x in v)
    if v is None:
        return "none"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(v)).strip("_") or "empty"


def run_name(overrides: dict[str, Any]) -> str:
    """Stable, filesystem-safe name of a sweep point: 'batch_size=64,lr=0.0001'.

    Keys are sorted (the name does not depend on dict order); each is shortened to its last
    dotted component unless another key of the point shares it. Names over MAX_NAME characters
    keep a prefix and gain a hash of the full overrides.
    """
    if not overrides:
        return "base"
    keys = sorted(overrides)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for k, leaf in zip(keys, leaves):
        label = leaf if leaves.count(leaf) == 1 else k
        parts.append(f"{label}={_fmt_value(overrides[k])}")
    name = ",".join(parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def flag_value(v: Any) -> str:
    """A value as ml_collections' `--config.a.b=VALUE` flag parser reads it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return repr(tuple(v))
    return repr(v) if isinstance(v, float) else str(v)


def check_point(config, point: dict[str, Any], where: str) -> None:
    """Apply `point` to a copy of the locked config: unknown fields and wrong types fail here,
    naming the run, instead of minutes later inside one of the runs."""

    c = copy.deepcopy(config)
    c.lock()  # as the training CLI locks it: no new fields
    try:
        c.update_from_flattened_dict(dict(point))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: override {point} does not fit the config: {e}") from e


def sweep_points(spec: str) -> list[dict[str, Any]]:
    """The list of override dicts of `--config=PATH:ARG`, validated against get_config."""
    path, arg = split_config_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg): nothing to sweep")
    points = module.get_sweep(arg)
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"{path}: get_sweep({arg!r}) must return a non-empty list of dicts, got {points!r}")
    config = load_config(f"{path}:{strip_sweep_token(arg)}", lock=False)
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise ValueError(f"{path}: get_sweep point {i} must be a dict of 'a.b' -> value, got {p!r}")
        check_point(config, p, f"{path}: get_sweep({arg!r}) point {i}")
    return [dict(p) for p in points]


def expand(spec: str, root: str, extra_flags: Sequence[str] = ()) -> list[Run]:
    """One Run per sweep point of `spec` (`PATH:ARG`), workdir ROOT/<name>. `extra_flags`
    (`--config.a.b=v`) go to every run after the point's own overrides."""
    path, arg = split_config_spec(spec)
    run_arg = strip_sweep_token(arg)
    base = f"--config={path}:{run_arg}" if run_arg else f"--config={path}"
    runs, seen = [], {}
    for i, point in enumerate(sweep_points(spec)):
        name = run_name(point)
        if name in seen:
            raise ValueError(f"sweep points {seen[name]} and {i} have the same run name {name!r}: "
                             f"{runs[seen[name]].overrides} vs {point}")
        seen[name] = i
        workdir = os.path.join(root, name)
        args = (base, f"--workdir={workdir}",
                *(f"--config.{k}={flag_value(v)}" for k, v in point.items()), *extra_flags)
        runs.append(Run(name, point, workdir, args))
    for run in runs:  # each run's config as its command line will see it, before any starts
        check_run(f"{path}:{run_arg}", run.train_args[2:], where=f"sweep run {run.name}")
    return runs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _write_point(run: Run, command: Sequence[str]) -> None:
    """WORKDIR/sweep_point.json: what `--summarize` reads the run's overrides from."""
    text = json.dumps({"name": run.name, "overrides": run.overrides, "command": list(command)},
                      indent=2, default=repr)
    try:
        d = epath.Path(run.workdir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "sweep_point.json", text)
    except Exception as e:  # noqa: BLE001 (e.g. gs:// without a GCS filesystem backend here)
        if "://" not in run.workdir:
            raise
        print(f"[sweep] warning: could not write {run.workdir}/sweep_point.json ({e}); "
              f"--summarize will show this run without its overrides", file=sys.stderr)


def run_local(runs: Sequence[Run], parallel: int = 1, python: str = sys.executable,
              env: dict | None = None, poll_s: float = 0.5) -> dict[str, int]:
    """Run every Run here, at most `parallel` at once (each a `python -m pbe_jax.train`
    subprocess, output in WORKDIR/train.log). Returns {name: exit status}."""
    pending, active, status = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < max(1, parallel):
            run = pending.pop(0)
            cmd = run.command(python)
            _write_point(run, cmd)
            log = open(os.path.join(run.workdir, "train.log"), "ab")
            print(f"[sweep] start {run.name}: {shlex.join(cmd)}", flush=True)
            active[run.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        for name, (proc, log, t0) in list(active.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            status[name] = rc
            del active[name]
            print(f"[sweep] {'done' if rc == 0 else f'FAILED (exit {rc})'} {name} in {time.time() - t0:.0f}s", flush=True)
        if active:
            time.sleep(poll_s)
    return status


def launch_dir(given: str | None = None) -> Path:
    """The repository's `launch/` folder (the TPU / SLURM launchers are scripts of the
    repository, not of the installed package): `given`, else `./launch`, else the one next to
    this package when it runs from a checkout."""
    candidates = [Path(given)] if given else [Path.cwd() / "launch",
                                              Path(__file__).resolve().parents[2] / "launch"]
    for c in candidates:
        if (c / "tpu" / "pod.sh").is_file():
            return c.resolve()
    raise FileNotFoundError(f"no launch/ folder with tpu/pod.sh at {[str(c) for c in candidates]}: run "
                            "from a pbe_jax checkout or pass --launch_dir=PATH/launch")


def launcher_commands(runs: Sequence[Run], target: str, launch: str | Path | None = None) -> list[list[str]]:
    """The launcher invocation per run: `launch/tpu/pod.sh run --wait -- ...` (runs one after
    the other on one pod slice) or `sbatch ... launch/gpu/slurm.sbatch ...` (one job each)."""
    LAUNCH = launch_dir(str(launch) if launch else None)  # noqa: N806
    out = []
    for run in runs:
        train = run.command("python")
        if target == "tpu":
            out.append([str(LAUNCH / "tpu" / "pod.sh"), "run", "--wait", "--", *train])
        elif target == "slurm":
            # SLURM writes the job log on a local/shared filesystem, never to gs://.
            log = (f"slurm-%j-{run.name}.out" if "://" in run.workdir
                   else os.path.join(run.workdir, "slurm-%j.out"))
            out.append(["sbatch", f"--job-name=pbe-{run.name}"[:120], f"--output={log}",
                        str(LAUNCH / "gpu" / "slurm.sbatch"), *train])
        else:
            raise ValueError(f"unknown launcher target {target!r}: expected 'tpu' or 'slurm'")
    return out


def submit(runs: Sequence[Run], target: str, dry_run: bool = False,
           launch: str | Path | None = None) -> dict[str, int]:
    cmds = launcher_commands(runs, target, launch)
    status = {}
    for run, cmd in zip(runs, cmds):
        print(("+ " if dry_run else "[sweep] ") + shlex.join(cmd), flush=True)
        if dry_run:
            continue
        _write_point(run, cmd)
        status[run.name] = subprocess.call(cmd)
    return status


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: epath.Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: skip it
                continue
    return rows


def _num_steps(run_dir: epath.Path) -> int | None:
    cfg = run_dir / "config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("train", {}).get("num_steps")


def collect(root: str) -> list[dict[str, Any]]:
    """One row per run directory under `root` that has metrics.jsonl or sweep_point.json:
    {'run', 'status', 'overrides', **final metrics, 'loss_last5'}."""
    rows = []
    for d in sorted(epath.Path(root).iterdir(), key=lambda p: p.name):
        metrics, point = d / METRICS_FILE, d / "sweep_point.json"
        if not d.is_dir() or not (metrics.exists() or point.exists()):
            continue
        overrides = json.loads(point.read_text())["overrides"] if point.exists() else {}
        logged = _read_jsonl(metrics) if metrics.exists() else []
        row: dict[str, Any] = {"run": d.name, "overrides": overrides}
        if logged:
            row.update(logged[-1])
            tail = [r["loss"] for r in logged[-5:] if "loss" in r]
            if tail:
                row["loss_last5"] = sum(tail) / len(tail)
        target = _num_steps(d)
        step = row.get("step")
        row["status"] = ("no metrics" if step is None else
                         "done" if target is not None and step >= target else f"at {step}/{target or '?'}")
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def summarize(root: str) -> tuple[str, str]:
    """Write ROOT/summary.md (key metrics) and ROOT/summary.csv (every metric) and return
    their texts. Rows are sorted by final loss (runs without metrics last)."""
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no runs under {root} (no */{METRICS_FILE} or */sweep_point.json)")
    rows.sort(key=lambda r: (r.get("loss") is None, r.get("loss", 0.0), r["run"]))
    okeys = sorted({k for r in rows for k in r["overrides"]})
    mkeys = [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
    head = ["run", *okeys, "status", *mkeys]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], *(_cell(r["overrides"].get(k)) for k in okeys), r["status"],
                 *(_cell(r.get(k)) for k in mkeys)]
        md.append("| " + " | ".join(cells) + " |")
    md_text = "\n".join(md) + "\n"

    extra = sorted({k for r in rows for k in r} - {"run", "overrides", "status", *SUMMARY_KEYS})
    all_m = [k for k in SUMMARY_KEYS if any(k in r for r in rows)] + extra
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", *okeys, "status", *all_m])
    for r in rows:
        w.writerow([r["run"], *(r["overrides"].get(k, "") for k in okeys), r["status"],
                    *(r.get(k, "") for k in all_m)])
    csv_text = buf.getvalue()
    (epath.Path(root) / "summary.md").write_text(md_text)
    (epath.Path(root) / "summary.csv").write_text(csv_text)
    return md_text, csv_text
