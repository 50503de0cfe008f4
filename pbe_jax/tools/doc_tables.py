"""The documentation's tables of measured numbers, generated from JSON files under `docs/results/`.

A result file is what one command wrote, wrapped with where it came from:

    {"kind": "bench" | "aot_compile" | "demo" | "adaptation",
     "meta": {"command": ..., "machine": ..., "date": ..., "commit": ..., "note": ...},
     "results": <the tool's own JSON: `pbe_jax.bench --json`, `tools.aot_compile --json_out`,
                 the demo run's metrics.jsonl eval rows + vae/fit.json,
                 or `tools.new_objects proof --json_out`>}

The docs render each file with the `{results-table}` directive (`docs/_ext/results_table.py`), so
no number is typed into prose. Re-measuring is re-running `record`:

    python -m pbe_jax.tools.doc_tables record docs/results/bench_small_cpu.json --kind=bench \\
        -- python -m pbe_jax.bench --what=all --size=small --torch_threads=2 --json={json}
    python -m pbe_jax.tools.doc_tables record docs/results/aot_v5p8_sd15.json --kind=aot_compile \\
        -- python -m pbe_jax.tools.aot_compile --config=configs/pbe.py:sd15 --topology=v5p-8 --json_out={json}
    python -m pbe_jax.tools.doc_tables record docs/results/demo.json --kind=demo \\
        -- python -m pbe_jax.train --config=configs/pbe.py:demo --workdir={workdir}
    python -m pbe_jax.tools.doc_tables record docs/results/adaptation_demo.json --kind=adaptation \\
        -- python -m pbe_jax.tools.new_objects proof --base=/tmp/pbe_demo --workdir={workdir} --json_out={json}
    python -m pbe_jax.tools.doc_tables show docs/results/demo.json     # the table as markdown
    python -m pbe_jax.tools.doc_tables check docs                      # every directive renders

`record` runs the command with `{json}` / `{workdir}` replaced by a temporary path (`--keep_workdir=DIR`:
by DIR, a new folder kept afterwards, e.g. for the run's image grids), then writes the file with the
command, the date (UTC), the machine and the git commit.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
import pathlib
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

import jax

from pbe_jax.benchmarks.report import format_number
from pbe_jax.training.goodput import LOST

KINDS = ("bench", "aot_compile", "demo", "adaptation")
META_KEYS = ("command", "machine", "date")
# `{results-table} results/x.json [more.json ...]` in a MyST page (```{results-table} ...```).
DIRECTIVE = re.compile(r"^[`:]{3,}\{results-table\}\s+(.+)$", re.M)
GiB = 2**30


class ResultFileError(ValueError):
    """A result file that is missing, not JSON, or lacks a field the table needs."""


def load(path: str | os.PathLike) -> dict:
    """The result file at `path`, checked: its kind, `meta` (command, machine, date), `results`."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such result file") from None
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{path}: not JSON ({e})") from None
    if doc.get("kind") not in KINDS:
        raise ResultFileError(f"{path}: 'kind' is {doc.get('kind')!r}, expected one of {KINDS}")
    missing = [k for k in META_KEYS if not doc.get("meta", {}).get(k)]
    if missing:
        raise ResultFileError(f"{path}: 'meta' lacks {missing} (every number says how it was made)")
    if not isinstance(doc.get("results"), dict) or not doc["results"]:
        raise ResultFileError(f"{path}: 'results' must be a non-empty object")
    return doc


def bench_table(doc: dict, rows: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """`pbe_jax.bench --json` rows (those matching the `rows` globs, in their order)."""
    res = doc["results"]
    names = list(res)
    if rows:
        names = [n for pat in rows for n in names if fnmatch.fnmatchcase(n, pat)]
        if not names:
            raise ResultFileError(f"no benchmark row matches {rows}; rows: {list(res)}")
    header = ["benchmark", "pbe_jax", "reference", "pbe_jax / reference", "unit"]
    out = []
    for n in names:
        r = res[n]
        ratio = r.get("ratio")
        ratio = "-" if ratio is None else f"{ratio:.2f}x" if abs(ratio) >= 0.01 else f"{ratio:.2g}x"
        out.append([n, format_number(r["ours"]), format_number(r.get("reference")), ratio, r["unit"]])
    return header, out


def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f} GiB"


def aot_table(docs: list[dict], budgets: list[float] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per `tools.aot_compile --json_out` report: the per-device memory and the verdict
    against the target's memory; with `budgets` (GiB), one verdict column per budget instead
    (the same compile's total against, e.g., a 16 GB and a 24 GB chip)."""
    header = ["target", "config", "params + optimizer", "frozen VAE + CLIP", "XLA temporaries",
              "generated code", "total per device"]
    header += [f"fits {b:g} GiB" for b in budgets] if budgets else ["verdict"]
    out = []
    for doc in docs:
        r, t = doc["results"], doc["results"]["target"]
        mem = r.get("compiled") or {}
        peak, least, refused = r.get("peak_bytes"), r.get("min_peak_bytes"), r.get("compile_error")
        total = f">= {_gib(least)} (refused by the compiler)" if budgets and refused and least else _gib(peak)

        def fits(budget: float) -> str:
            if refused:  # only a lower bound above the budget says no
                return ("no" if least and least > budget * GiB else "unknown") + " (compile refused)"
            return "-" if peak is None else "yes" if peak <= budget * GiB else "no"

        if budgets:
            verdicts = [fits(b) for b in budgets]
        elif refused:
            verdicts = [f"does not fit: {refused}"]
        elif r.get("fits") is None:
            verdicts = ["-"]
        else:
            verdicts = [("fits" if r["fits"] else "does not fit") + f" ({_gib(r.get('device_memory_bytes'))})"]
        out.append([f"{t['name']} ({r['devices']} devices, mesh {r['mesh']})", r["config_arg"],
                    _gib(r.get("state_bytes")), _gib(r.get("frozen_bytes")), _gib(mem.get("temp")),
                    _gib(mem.get("generated_code")), total, *verdicts])
    return header, out


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


# The demo's rows: (label, key in the final eval row, format).
DEMO_EVALS = [
    ("exemplar closer (two-way, chance ~50%)", "eval/exemplar_closer", _pct),
    ("exemplar following (strict 8-way, chance 12.5%)", "eval/exemplar_following", _pct),
    ("self following (the masked object's own crop as reference)", "eval/self_following", _pct),
    ("PSNR outside the mask (no paste-back)", "eval/psnr_outside_mask", lambda v: f"{v:.1f} dB"),
    ("VAE PSNR on the eval sources", "eval/vae_psnr", lambda v: f"{v:.1f} dB"),
    # The identity score (pbe_jax/evals/identity.py) and the out-of-style triplets, where a
    # run logged them.
    ("exemplar identity (colour, shape and pattern all the reference's)",
     "eval/exemplar_identity", _pct),
    ("self identity", "eval/self_identity", _pct),
    ("out of style: exemplar following", "eval/offstyle_exemplar_following", _pct),
    ("out of style: exemplar identity", "eval/offstyle_exemplar_identity", _pct),
    ("out of style: PSNR outside the mask", "eval/offstyle_psnr_outside_mask",
     lambda v: f"{v:.1f} dB"),
    ("identity classifier's held-out accuracy (ground-truth renders)",
     "eval/identity_classifier_accuracy", _pct),
]


GOODPUT_PARTS = (*LOST, "restart_downtime")  # the goodput.json seconds besides the steps


def demo_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The demo run's scores: the last eval row of metrics.jsonl (earlier evals in brackets),
    the VAE stage's fit.json, the final loss and the command's wall time."""
    res = doc["results"]
    evals = res["evals"]
    last = evals[-1]
    out = []
    for label, key, fmt in DEMO_EVALS:
        if key not in last:
            continue
        earlier = ", ".join(f"step {e['step']}: {fmt(e[key])}" for e in evals[:-1] if key in e)
        out.append([f"{label} (`{key}`)", f"**{fmt(last[key])}** at step {last['step']}"
                    + (f" ({earlier})" if earlier else "")])
    fit = res.get("vae_fit")
    if fit:
        out.insert(0, ["VAE stage (`vae/fit.json`)",
                       f"held-out PSNR **{fit['heldout_psnr']:.2f} dB** on {fit['heldout_images']} crops "
                       f"after {fit['steps']} steps, `scaling_factor` {fit['scaling_factor']:.4f}, "
                       f"{fit['seconds']:.0f} s"])
    if res.get("final_loss") is not None:
        out.append(["final loss (`loss`)", f"{res['final_loss']:.3g} at step {last['step']}"])
    g = res.get("goodput")
    if g:
        parts = ", ".join(f"{name} {g[f'goodput/{name}_s']:.0f} s" for name in GOODPUT_PARTS
                          if g.get(f"goodput/{name}_s"))
        out.append(["goodput (`goodput.json`)", f"**{100 * g['goodput/share']:.1f}%** of "
                    f"{g['goodput/total_s']:.0f} s in steps ({g['goodput/steps_s']:.0f} s); {parts}"])
    if res.get("wall_s") is not None:
        m, s = divmod(round(res["wall_s"]), 60)
        cpu = (f" (CPU {res['cpu_user_s']:.0f} s user + {res['cpu_sys_s']:.0f} s sys)"
               if res.get("cpu_user_s") is not None else "")
        out.insert(0, ["the whole command", f"**{m} min {s:02d} s** wall{cpu}"])
    return ["what", "measured"], out


def config_label(argv: list[str]) -> str:
    """A command's config in a word: its `--config=...:ARG` argument and any
    `--config.FIELD=VALUE` overrides (`demo,scenes=identity data.ref_backdrop_prob=0`)."""
    arg = next((a.split("=", 1)[1].split(":", 1)[-1] for a in argv if a.startswith("--config=")), "?")
    return " ".join([arg] + [a[len("--config."):] for a in argv if a.startswith("--config.")])


def run_label(doc: dict) -> str:
    """The config of the command that made result file `doc` (`config_label`)."""
    return config_label(shlex.split(doc["meta"]["command"]))


def demo_comparison_table(docs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Several demo runs side by side (one column each, headed by its config, `run_label`): every
    score of their last eval rows, then the steps and each command's wall time."""
    header = ["score"] + [f"`{run_label(d)}`" for d in docs]
    lasts = [d["results"]["evals"][-1] for d in docs]
    rows = [[f"{label} (`{key}`)"] + [fmt(last[key]) if key in last else "-" for last in lasts]
            for label, key, fmt in DEMO_EVALS if any(key in last for last in lasts)]
    rows.append(["training steps"] + [str(last["step"]) for last in lasts])
    walls = [d["results"].get("wall_s") for d in docs]
    if any(w is not None for w in walls):
        rows.append(["the whole command (wall)"] + ["-" if w is None else f"{w / 60:.1f} min" for w in walls])
    return header, rows


ADAPTATION_SCORES = ("exemplar_following", "exemplar_closer", "self_following")


def adaptation_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Base vs LoRA vs full fine-tuning on objects the base never saw (`tools.new_objects proof`):
    per model, what trains, the checkpoint, the fine-tuning's wall time and the held-out scores
    on the new colours, then on the demo's own (what fine-tuning should keep)."""
    res = doc["results"]
    header = (["model", "trainable params", "checkpoint", "fine-tuning"]
              + [f"new colours: `{k}`" for k in ADAPTATION_SCORES] + ["demo colours: `exemplar_following`",
                                                                      "new colours its VAE keeps"])
    rows = []
    for name, r in res["runs"].items():
        n, total = r.get("trainable_params"), r.get("total_params")
        share = f" ({100 * n / total:.1f}%)" if n and total else ""
        train = (f"{res['steps']} steps, {r['train_s'] / 60:.1f} min" if r.get("train_s") is not None
                 else "none")
        s = r["scores"]
        rows.append([name, f"{n:,}{share}" if n else "-",
                     f"{r['checkpoint_bytes'] / 2**20:.1f} MiB" if r.get("checkpoint_bytes") else "-", train]
                    + [_pct(s["novel"][k]) for k in ADAPTATION_SCORES] + [_pct(s["demo"]["exemplar_following"])]
                    + [_pct(s["novel"]["vae_colour_kept"]) if "vae_colour_kept" in s["novel"] else "-"])
    return header, rows


def table(paths: list[str | os.PathLike], rows: list[str] | None = None,
          budgets: list[float] | None = None) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table for one or more result files of one kind (`rows`:
    a benchmark table's row globs; `budgets`: an AOT table's memory budgets in GiB)."""
    docs = [load(p) for p in paths]
    kinds = {d["kind"] for d in docs}
    if len(kinds) != 1:
        raise ResultFileError(f"{[str(p) for p in paths]}: one table needs one kind, got {sorted(kinds)}")
    kind = kinds.pop()
    if budgets and kind != "aot_compile":
        raise ResultFileError(f"{[str(p) for p in paths]}: budgets apply to aot_compile tables, not {kind}")
    if kind == "aot_compile":
        return aot_table(docs, budgets)
    if kind == "demo" and len(docs) > 1:
        return demo_comparison_table(docs)
    if len(docs) != 1:
        raise ResultFileError(f"a {kind} table takes one result file, got {len(docs)}")
    if kind == "adaptation":
        return adaptation_table(docs[0])
    return bench_table(docs[0], rows) if kind == "bench" else demo_table(docs[0])


def source_line(paths: list[str | os.PathLike]) -> str:
    """How the numbers were made: each file's command, machine and date (and its note)."""
    parts = []
    for p in paths:
        m = load(p)["meta"]
        s = f"`{m['command']}` on {m['machine']}, {m['date']}"
        if m.get("commit"):
            s += f", commit {m['commit']}"
        if m.get("note"):
            s += f" ({m['note']})"
        parts.append(f"{pathlib.Path(p).name}: {s}")
    return "; ".join(parts)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """The table as GitHub markdown (what `show` prints)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def directives(docs_dir: str | os.PathLike) -> list[tuple[pathlib.Path, list[pathlib.Path]]]:
    """Every `{results-table}` directive in the docs: (page, result files, resolved from the page)."""
    found = []
    for page in sorted(pathlib.Path(docs_dir).rglob("*.md")):
        if "_build" in page.parts:
            continue
        for m in DIRECTIVE.finditer(page.read_text()):
            found.append((page, [page.parent / a for a in m.group(1).split()]))
    return found


def check(docs_dir: str | os.PathLike) -> int:
    """Render every directive's table; the number of tables (an error names the page and file)."""
    found = directives(docs_dir)
    for page, paths in found:
        try:
            _, rows = table(paths)
        except (ResultFileError, KeyError, TypeError) as e:
            raise ResultFileError(f"{page}: {e}") from None
        if not rows:
            raise ResultFileError(f"{page}: {[str(p) for p in paths]} renders an empty table")
    return len(found)


def machine() -> str:
    """This machine in words: OS, CPU, cores, and the JAX devices when jax is importable."""
    s = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"
    try:
        d = jax.devices()
        s += f", {len(d)} x {d[0].device_kind}"
    except Exception:  # noqa: BLE001 (a machine line must not fail the record)
        pass
    return s


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def demo_results(workdir: pathlib.Path, wall_s: float, cpu: tuple[float, float] | None = None) -> dict:
    """The demo's results from its workdir: eval rows of metrics.jsonl, the final loss, fit.json."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")}
             for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ResultFileError(f"{workdir}/metrics.jsonl has no eval/* row")
    losses = [r["loss"] for r in rows if "loss" in r]
    out = {"evals": evals, "final_loss": losses[-1] if losses else None, "wall_s": wall_s}
    if cpu is not None:
        out["cpu_user_s"], out["cpu_sys_s"] = cpu
    goodput = workdir / "goodput.json"
    if goodput.exists():
        out["goodput"] = json.loads(goodput.read_text())
    fit = workdir / "vae" / "fit.json"
    if fit.exists():
        out["vae_fit"] = {k: v for k, v in json.loads(fit.read_text()).items() if k != "history"}
    return out


def record(out: str, kind: str, argv: list[str], keep_workdir: str | None = None) -> dict:
    """Run `argv` ({json} / {workdir} replaced by a temporary path) and write its result file.
    `keep_workdir`: {workdir} is this folder instead, kept afterwards (its images, checkpoints);
    it must not exist yet, so that the result is one fresh run's."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    if keep_workdir and os.path.exists(keep_workdir):
        raise FileExistsError(f"--keep_workdir={keep_workdir} exists; a result file records one fresh "
                              "run, so give a new folder (or remove it)")
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "out.json")
        workdir = keep_workdir or os.path.join(tmp, "workdir")
        cmd = [a.replace("{json}", json_path).replace("{workdir}", workdir) for a in argv]
        t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        rc = subprocess.run(cmd).returncode
        # aot_compile exits 3 for a measured "does not fit": a result, not a failure.
        if rc and not (kind == "aot_compile" and rc == 3):
            raise subprocess.CalledProcessError(rc, cmd)
        wall, r1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        if kind == "demo":
            cpu = (r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
            results = demo_results(pathlib.Path(workdir), wall, cpu)
        else:
            results = json.loads(pathlib.Path(json_path).read_text())
            if kind == "aot_compile":
                results["config_arg"] = config_label(argv)
    doc = {"kind": kind,
           "meta": {"command": shlex.join(argv), "machine": machine(),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "commit": _git_commit()},
           "results": results}
    pathlib.Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    load(out)  # what was written must render
    return doc


def main(argv: list[str]) -> int:
    usage = ("usage: python -m pbe_jax.tools.doc_tables record OUT.json --kind=KIND "
             "[--keep_workdir=DIR] -- COMMAND... | show FILE.json... | check DOCS_DIR")
    if len(argv) < 2 or argv[0] not in ("record", "show", "check"):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "record":
        if "--" not in argv or not any(a.startswith("--kind=") for a in argv[:argv.index("--")]):
            print(usage, file=sys.stderr)
            return 2
        head, cmd = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        kind = next(a.split("=", 1)[1] for a in head if a.startswith("--kind="))
        keep = next((a.split("=", 1)[1] for a in head if a.startswith("--keep_workdir=")), None)
        record(head[1], kind, cmd, keep_workdir=keep)
        print(markdown(*table([head[1]])))
    elif argv[0] == "show":
        print(markdown(*table(argv[1:])))
        print(f"\nSource: {source_line(argv[1:])}")
    else:
        print(f"{check(argv[1])} tables render")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
