"""The documentation's generated parts: the result tables rendered from docs/results/*.json, the
README's demo scores against the same file, the API reference's list of public names, and the
README's links into docs/. (The strict Sphinx build itself runs in CI, after the test command.)"""
import glob
import json
import os
import re
import sys

import pytest

from pbe_jax.benchmarks.report import Row, markdown_table
from pbe_jax.tools import doc_api, doc_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
RESULTS = sorted(glob.glob(os.path.join(DOCS, "results", "*.json")))


def _cells(markdown_line: str) -> list[str]:
    return [c.strip() for c in markdown_line.strip().strip("|").split("|")]


def test_every_results_table_in_the_docs_renders_from_an_existing_file():
    found = doc_tables.directives(DOCS)
    pages = {os.path.basename(p) for p, _ in found}
    assert {"demo.md", "performance.md", "scale_out.md", "editing.md"} <= pages
    for page, paths in found:
        for p in paths:
            assert p.is_file(), f"{page}: result file {p} is missing"
    assert doc_tables.check(DOCS) == len(found)


def test_every_result_file_says_how_it_was_made_and_is_shown():
    assert RESULTS, "no docs/results/*.json"
    shown = {os.path.realpath(p) for _, paths in doc_tables.directives(DOCS) for p in paths}
    for path in RESULTS:
        doc = doc_tables.load(path)
        assert all(doc["meta"][k] for k in ("command", "machine", "date")), path
        assert os.path.realpath(path) in shown, f"{path} is rendered by no results-table directive"


@pytest.mark.parametrize("path", [p for p in RESULTS if os.path.basename(p).startswith("bench_")])
def test_a_benchmark_table_is_the_table_the_bench_command_prints(path):
    # The docs' table and `python -m pbe_jax.bench`'s printed table agree on every row's name,
    # both values and unit (the same formatting), in the order of the --json file.
    doc = doc_tables.load(path)
    header, rows = doc_tables.bench_table(doc)
    printed = markdown_table([Row(n, r["ours"], r["reference"], r["unit"]) for n, r in doc["results"].items()])
    printed_rows = [_cells(line) for line in printed.splitlines()[2:]]
    assert len(rows) == len(printed_rows) == len(doc["results"])
    for ours, theirs in zip(rows, printed_rows):
        assert [ours[i] for i in (0, 1, 2, 4)] == [theirs[i] for i in (0, 1, 2, 4)]
    assert header[0] == "benchmark"


def test_the_readmes_demo_scores_are_those_of_the_results_file():
    demo = doc_tables.load(os.path.join(DOCS, "results", "demo.json"))["results"]
    last = demo["evals"][-1]
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## What the demo shows"):]
    section = section[:section.index("\n## ", 4)]
    rows = {_cells(line)[0]: _cells(line)[1] for line in section.splitlines() if line.startswith("| ")}
    want = {"exemplar following": f"{100 * last['eval/exemplar_following']:.1f}%",
            "exemplar closer": f"{100 * last['eval/exemplar_closer']:.1f}%",
            "held-out VAE PSNR": f"{demo['vae_fit']['heldout_psnr']:.2f} dB"}
    for label, value in want.items():
        got = [v for k, v in rows.items() if k.startswith(label)]
        assert got == [value], f"README's '{label}' row says {got}, docs/results/demo.json says {value}"


def test_the_readmes_conditioner_table_is_the_results_files():
    # clip vs dinov2 on the identity demo: the README shows four scores of the docs' comparison,
    # one row per run
    files = [os.path.join(DOCS, "results", f"demo_identity_{c}.json") for c in ("clip", "dinov2")]
    header, rows = doc_tables.demo_comparison_table([doc_tables.load(p) for p in files])
    keys = ("exemplar_following", "exemplar_identity", "offstyle_exemplar_following",
            "offstyle_exemplar_identity")
    picked = [next(r for r in rows if r[0].endswith(f"(`eval/{k}`)")) for k in keys]
    want = [["run"] + [f"`{k}`" for k in keys]]
    want += [[run] + [r[i] for r in picked] for i, run in enumerate(header[1:], 1)]
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## What the demo shows"):]
    section = section[:section.index("\n## ", 4)]
    lines = [_cells(line) for line in section.splitlines() if line.startswith("| ")]
    start = lines.index(want[0])
    assert lines[start:start + len(want)] == want, "README's clip vs dinov2 table differs from " \
        "`python -m pbe_jax.tools.doc_tables show docs/results/demo_identity_clip.json " \
        "docs/results/demo_identity_dinov2.json`"


def test_the_readmes_adaptation_table_is_the_results_files():
    doc = doc_tables.load(os.path.join(DOCS, "results", "adaptation_demo.json"))
    header, rows = doc_tables.adaptation_table(doc)
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Train on your own images"):]
    section = section[:section.index("\n## ", 4)]
    table = [_cells(line) for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == header and table[1:] == rows, "README's table differs from " \
        "`python -m pbe_jax.tools.doc_tables show docs/results/adaptation_demo.json`"
    assert [r[0] for r in rows] == ["base", "LoRA", "full"]


def test_a_bad_result_file_is_an_error_naming_the_file_and_the_field(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(doc_tables.ResultFileError, match="none.json: no such result file"):
        doc_tables.load(missing)
    no_meta = tmp_path / "no_meta.json"
    no_meta.write_text(json.dumps({"kind": "bench", "meta": {"command": "x"}, "results": {"a": {}}}))
    with pytest.raises(doc_tables.ResultFileError, match=r"no_meta.json: 'meta' lacks \['machine', 'date'\]"):
        doc_tables.load(no_meta)
    page = tmp_path / "page.md"
    page.write_text("# p\n\n```{results-table} none.json\n```\n")
    with pytest.raises(doc_tables.ResultFileError, match="page.md: .*none.json: no such result file"):
        doc_tables.check(tmp_path)


def test_record_wraps_what_the_command_wrote_with_its_provenance(tmp_path):
    out = tmp_path / "bench.json"
    rows = {"train/tiny/step_time": {"ours": 0.5, "reference": 1.0, "ratio": 0.5, "unit": "s"}}
    writer = f"import json, sys; json.dump({rows!r}, open(sys.argv[1], 'w'))"
    doc = doc_tables.record(str(out), "bench", [sys.executable, "-c", writer, "{json}"])
    assert doc["results"] == rows and json.loads(out.read_text()) == doc
    assert "{json}" in doc["meta"]["command"] and doc["meta"]["machine"] and doc["meta"]["date"]
    assert doc_tables.bench_table(doc)[1] == [["train/tiny/step_time", "0.500", "1.000", "0.50x", "s"]]

    # The demo: the eval rows of WORKDIR/metrics.jsonl, the last loss and vae/fit.json.
    script = ("import json, os, sys; d = sys.argv[1]; os.makedirs(d + '/vae');"
              "open(d + '/metrics.jsonl', 'w').write('\\n'.join(json.dumps(r) for r in ["
              "{'step': 10, 'loss': 0.5}, {'step': 20, 'eval/exemplar_following': 0.25},"
              "{'step': 20, 'loss': 0.25}]) + '\\n');"
              "json.dump({'steps': 5, 'heldout_psnr': 20.0, 'heldout_images': 4, 'scaling_factor': 0.5,"
              "'seconds': 3.0, 'history': [1, 2]}, open(d + '/vae/fit.json', 'w'))")
    demo = doc_tables.record(str(tmp_path / "demo.json"), "demo", [sys.executable, "-c", script, "{workdir}"])
    res = demo["results"]
    assert res["evals"] == [{"step": 20, "eval/exemplar_following": 0.25}] and res["final_loss"] == 0.25
    assert "history" not in res["vae_fit"] and res["wall_s"] > 0
    table = dict(doc_tables.demo_table(demo)[1])
    assert table["exemplar following (strict 8-way, chance 12.5%) (`eval/exemplar_following`)"] == "**25.0%** at step 20"
    # several demo files: one column per run, headed by its config argument and overrides
    other = dict(demo, meta=dict(demo["meta"], command="python -m pbe_jax.train "
                                 "--config=configs/pbe.py:demo,scenes=identity --workdir=w "
                                 "--config.data.ref_backdrop_prob=0"),
                 results=dict(res, evals=[{"step": 40, "eval/exemplar_following": 0.5,
                                           "eval/offstyle_exemplar_following": 0.125}]))
    header, rows = doc_tables.demo_comparison_table([demo, other])
    assert header[1:] == ["`?`", "`demo,scenes=identity data.ref_backdrop_prob=0`"]
    assert rows[0] == ["exemplar following (strict 8-way, chance 12.5%) (`eval/exemplar_following`)",
                       "25.0%", "50.0%"]
    assert rows[1][1:] == ["-", "12.5%"] and rows[2] == ["training steps", "20", "40"]
    # --keep_workdir: the run's folder stays (its image grids); an existing one is refused
    kept = tmp_path / "kept"
    again = doc_tables.record(str(tmp_path / "demo2.json"), "demo", [sys.executable, "-c", script, "{workdir}"],
                              keep_workdir=str(kept))
    assert again["results"]["evals"] == res["evals"] and (kept / "vae" / "fit.json").exists()
    with pytest.raises(FileExistsError, match="keep_workdir=.*kept exists"):
        doc_tables.record(str(tmp_path / "demo3.json"), "demo", [sys.executable, "-c", script, "{workdir}"],
                          keep_workdir=str(kept))


def test_the_api_reference_covers_every_public_name_of_the_four_packages():
    pages = "\n".join(open(p).read() for p in glob.glob(os.path.join(DOCS, "api", "*.rst")))
    documented = set()
    for module in doc_api.REFERENCE:
        assert f".. public-api:: {module}\n" in pages, f"no API page renders {module}"
        names = doc_api.documented_objects(module)
        assert names, f"{module} has no public name"
        documented |= set(names)
    assert {"pbe_jax.PaintByExample", "pbe_jax.models.UNet2DConditionModel", "pbe_jax.models.AutoencoderKL",
            "pbe_jax.schedulers.DDIM", "pbe_jax.schedulers.make_scheduler",
            "pbe_jax.data.pipeline.make_loader", "pbe_jax.data.batch.normalize_batch",
            "pbe_jax.data.sources.make_source"} <= documented
    # `__all__` wins where a module has one; else the names it defines, never imported ones.
    import pbe_jax.models
    import pbe_jax.schedulers
    assert doc_api.public_names("pbe_jax.models") == list(pbe_jax.models.__all__)
    assert "dataclass" not in doc_api.public_names("pbe_jax.schedulers")
    assert all(not n.startswith("_") for n in documented)


def test_the_readme_is_short_and_its_links_into_docs_resolve():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)\s]+)\)", readme)
    assert len(links) >= 10
    for link in links:
        path, _, anchor = link.partition("#")
        assert os.path.exists(os.path.join(REPO, path)), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", open(os.path.join(REPO, path)).read(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links to {link}: no heading '{anchor}' in {path}"


def test_record_keeps_a_does_not_fit_compile_and_labels_its_overrides(tmp_path):
    """aot_compile exits 3 for "does not fit": a measurement the table shows, not a failure;
    the row's config names the --config.X=Y overrides (a LoRA rank) after the config argument.
    Any other exit status still fails the record."""
    rep = {"target": {"name": "v5e-1", "kind": "tpu"}, "devices": 1, "mesh": {"data": 1},
           "state_bytes": 2**30, "frozen_bytes": 2**30, "compiled": {"temp": 2**31},
           "peak_bytes": 2**32, "device_memory_bytes": 2**31, "fits": False, "compile_error": None}
    writer = f"import json, sys; json.dump({rep!r}, open(sys.argv[1], 'w')); sys.exit(3)"
    out = tmp_path / "aot.json"
    doc = doc_tables.record(str(out), "aot_compile", [sys.executable, "-c", writer, "{json}",
                                                      "--config=configs/pbe.py:sd15,batch=8",
                                                      "--config.train.lora.rank=16"])
    assert doc["results"]["config_arg"] == "sd15,batch=8 train.lora.rank=16"
    row = doc_tables.aot_table([doc])[1][0]
    assert row[1] == "sd15,batch=8 train.lora.rank=16" and row[-1] == "does not fit (2.00 GiB)"
    with pytest.raises(Exception, match="exit status 1"):
        doc_tables.record(str(tmp_path / "bad.json"), "aot_compile",
                          [sys.executable, "-c", writer.replace("exit(3)", "exit(1)"), "{json}"])


def test_an_aot_table_with_budgets_gives_one_verdict_per_budget():
    """`:budgets: 16, 24`: the same compile's total against each budget (what docs/lora.md's
    16 / 24 GB table shows), instead of the verdict against the target's own memory."""
    GiB = 2**30

    def doc(peak, error=None, least=None):
        return {"results": {"target": {"name": "v5e-1", "kind": "tpu"}, "devices": 1, "mesh": {"data": 1},
                            "config_arg": "sd15", "state_bytes": GiB, "frozen_bytes": GiB, "compiled": {},
                            "peak_bytes": peak, "fits": None, "compile_error": error, "min_peak_bytes": least}}
    header, rows = doc_tables.aot_table([doc(10 * GiB), doc(20 * GiB), doc(30 * GiB), doc(None, "OOM"),
                                         doc(None, "OOM", 20 * GiB)], [16, 24])
    assert header[-2:] == ["fits 16 GiB", "fits 24 GiB"] and "verdict" not in header
    assert [r[-2:] for r in rows] == [["yes", "yes"], ["no", "yes"], ["no", "no"],
                                      ["unknown (compile refused)", "unknown (compile refused)"],
                                      ["no (compile refused)", "unknown (compile refused)"]]
    assert rows[-1][-3] == ">= 20.00 GiB (refused by the compiler)"
    assert doc_tables.aot_table([doc(10 * GiB)])[0][-1] == "verdict"
