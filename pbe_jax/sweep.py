r"""Hyper-parameter sweeps: one training run per point of a config file's `get_sweep(arg)`.

  # expand configs/pbe.py's `get_sweep('demo,sweep=lr_batch')` and run the points, 2 at a time
  python -m pbe_jax.sweep --config=configs/pbe.py:demo,sweep=lr_batch --workdir=/tmp/sweep \
      --run=local --parallel=2 --config.train.num_steps=200
  python -m pbe_jax.sweep --summarize /tmp/sweep        # -> /tmp/sweep/summary.{md,csv}

  --run print   print one `python -m pbe_jax.train ...` command per run (the default)
  --run local   run them here, at most --parallel at once; logs in ROOT/<name>/train.log
                (concurrent runs share this machine's devices: on a GPU host keep --parallel=1)
  --run tpu     one after the other on the pod slice of launch/tpu/pod.sh (TPU_NAME, ZONE, ...)
  --run slurm   one `sbatch launch/gpu/slurm.sbatch ...` job per run (parallel in the queue)
  --dry_run     with tpu/slurm: print the launcher commands instead of running them

A config file opts in by defining `get_sweep(arg) -> list[dict]`: each dict maps dotted config
fields to values (`{'train.lr': 1e-4, 'train.batch_size': 64}`), one dict per run. `get_sweep`
receives the whole ARG; each run's `--config` is ARG without its `sweep=NAME` token (a token
only `get_sweep` reads, to pick one of several sweeps in a file). Extra `--config.a.b=v` flags
on the sweep command line go to every run. Every point is checked against `get_config` before
anything starts (the config is locked, so a misspelt field or a wrong type fails here).

Run names derive from the overrides alone (`batch_size=64,lr=0.0001`: sorted keys, the last
dotted component unless two keys share it), so they are stable and filesystem safe. Each run's
workdir is ROOT/<name>; its `sweep_point.json` records the overrides and the command, and
`--summarize` reads it with the run's `metrics.jsonl` (written by pbe_jax.train on process 0).
"""
from __future__ import annotations

import argparse
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
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from etils import epath

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
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


def load_config_module(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (relative to {os.getcwd()})")
    # Compiled from source every time (no __pycache__): an edited config is always re-read.
    module = types.ModuleType(f"_pbe_sweep_cfg_{Path(path).stem}")
    module.__file__ = os.path.abspath(path)
    sys.modules[module.__name__] = module  # dataclasses and pickling look modules up there
    with open(path) as f:
        exec(compile(f.read(), module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


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
    import copy  # noqa: PLC0415

    c = copy.deepcopy(config)
    c.lock()  # as the training CLI locks it: no new fields
    try:
        c.update_from_flattened_dict(dict(point))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: override {point} does not fit the config: {e}") from e


def sweep_points(spec: str) -> list[dict[str, Any]]:
    """The list of override dicts of `--config=PATH:ARG`, validated against get_config."""
    path, arg = split_config_spec(spec)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg): nothing to sweep")
    points = module.get_sweep(arg)
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"{path}: get_sweep({arg!r}) must return a non-empty list of dicts, got {points!r}")
    config = module.get_config(strip_sweep_token(arg) or None)
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
        (d / "sweep_point.json").write_text(text)
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


def launcher_commands(runs: Sequence[Run], target: str) -> list[list[str]]:
    """The launcher invocation per run: `launch/tpu/pod.sh run --wait -- ...` (runs one after
    the other on one pod slice) or `sbatch ... launch/gpu/slurm.sbatch ...` (one job each)."""
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


def submit(runs: Sequence[Run], target: str, dry_run: bool = False) -> dict[str, int]:
    cmds = launcher_commands(runs, target)
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
        metrics, point = d / "metrics.jsonl", d / "sweep_point.json"
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
        raise FileNotFoundError(f"no runs under {root} (no */metrics.jsonl or */sweep_point.json)")
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="PATH.py:ARG of a config file defining get_config and get_sweep")
    p.add_argument("--workdir", help="sweep root; run I writes to ROOT/<name I>")
    p.add_argument("--run", default="print", choices=("local", "print", "tpu", "slurm"))
    p.add_argument("--parallel", type=int, default=1, help="local: runs at once")
    p.add_argument("--dry_run", action="store_true", help="tpu/slurm: print the launcher commands only")
    p.add_argument("--summarize", metavar="ROOT", help="write ROOT/summary.{md,csv} and exit")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad} (only --config.a.b=v overrides pass through to the runs)")
    if not args.summarize and not (args.config and args.workdir):
        p.error("--config and --workdir are required (or --summarize ROOT)")
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        md, _ = summarize(args.summarize)
        print(md, end="")
        print(f"[sweep] wrote {args.summarize}/summary.md and summary.csv")
        return 0
    runs = expand(args.config, args.workdir, extra)
    print(f"[sweep] {len(runs)} runs under {args.workdir}", file=sys.stderr)
    if args.run == "print":
        for run in runs:
            print(shlex.join(run.command("python")))
        return 0
    if args.run == "local":
        if "://" in args.workdir:
            print(f"error: --run=local writes train.log files under ROOT; use a local --workdir, "
                  f"not {args.workdir}", file=sys.stderr)
            return 2
        status = run_local(runs, args.parallel)
    else:
        status = submit(runs, args.run, dry_run=args.dry_run)
    failed = sorted(n for n, rc in status.items() if rc)
    if failed:
        print(f"[sweep] {len(failed)} of {len(runs)} runs failed: {failed}", file=sys.stderr)
        return 1
    if args.run == "local":
        print(f"[sweep] all {len(runs)} runs finished; summary: python -m pbe_jax.sweep --summarize {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
