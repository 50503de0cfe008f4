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
  --dry_run     print what would start (the launcher commands with tpu/slurm) and start nothing

Every mode first prints the cost: `[sweep] 4 runs x 1000 steps = 4,000 training steps (48,000
images) + 2,400 VAE-stage steps ...` (the demo's lr_batch sweep: four full demo runs).

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

import shlex
import sys
from typing import Sequence

from absl import flags

from pbe_jax.training.sweeps import cost, expand, run_local, submit, summarize


def make_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("config", None, "PATH.py:ARG of a config file defining get_config and get_sweep",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "sweep root; run I writes to ROOT/<name I>", flag_values=fv)
    flags.DEFINE_enum("run", "print", ["local", "print", "tpu", "slurm"], "where to run", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "local: runs at once", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "print what would start and its cost, start nothing",
                      flag_values=fv)
    flags.DEFINE_string("summarize", None, "write ROOT/summary.{md,csv} and exit", flag_values=fv)
    flags.DEFINE_string("launch_dir", None, "the repository's launch/ folder (tpu/slurm); default "
                        "./launch or the checkout's", flag_values=fv)
    return fv


def parse(argv: Sequence[str]) -> tuple[flags.FlagValues, list[str]]:
    """(flags, the --config.a.b=v overrides that pass through to every run)."""
    argv = list(argv)
    extra = [a for a in argv if a.startswith("--config.")]
    fv = make_flags()
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\n" + fv.get_help())
        raise SystemExit(0)
    try:
        fv(["pbe_jax.sweep", *(a for a in argv if not a.startswith("--config."))])
    except flags.Error as e:
        raise SystemExit(f"error: {e} (only --config.a.b=v overrides pass through to the runs)") from None
    if not fv.summarize and not (fv.config and fv.workdir):
        raise SystemExit("error: --config and --workdir are required (or --summarize ROOT)")
    return fv, extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        md, _ = summarize(args.summarize)
        print(md, end="")
        print(f"[sweep] wrote {args.summarize}/summary.md and summary.csv")
        return 0
    runs = expand(args.config, args.workdir, extra)
    print(f"[sweep] {len(runs)} runs under {args.workdir}: {cost(runs)}", file=sys.stderr)
    if args.run == "print" or (args.dry_run and args.run == "local"):
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
        status = submit(runs, args.run, dry_run=args.dry_run, launch=args.launch_dir)
    failed = sorted(n for n, rc in status.items() if rc)
    if failed:
        print(f"[sweep] {len(failed)} of {len(runs)} runs failed: {failed}", file=sys.stderr)
        return 1
    if args.run == "local":
        print(f"[sweep] all {len(runs)} runs finished; summary: python -m pbe_jax.sweep --summarize {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
