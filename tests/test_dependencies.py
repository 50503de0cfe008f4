"""setup.py declares what the package imports, nothing more; a gs:// workdir without the `gcs`
extra fails at start naming it.

Every third-party import in `pbe_jax/` is read from the source (ast): an import at module level
must come from a core requirement (`CORE`), one inside a function (a lazy import of an optional
dependency) from a core requirement or an extra; every core requirement must be imported
somewhere. Module -> distribution names come from the installed packages' metadata.
"""
import ast
import importlib.metadata as md
import os
import re
import sys

import pytest

from pbe_jax.metrics import MetricWriter
from tests.train_utils import REPO

# Modules that may import an extra's package at module level, and the extra that provides it
# (a module only reached through a lazy import, e.g. a web app or a benchmark reference).
OPTIONAL_MODULES: dict[str, str] = {"pbe_jax.webdemo": "demo"}


def _setup_lists() -> tuple[list[str], dict[str, list[str]]]:
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CORE", "EXTRAS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["CORE"], found["EXTRAS"]


def _dist(requirement: str) -> str:
    """'etils[epath]' / 'jax>=0.7' / 'torch==2.13.0' -> normalised distribution name."""
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> list[tuple[str, str, bool]]:
    """(module file, top-level package, at module level?) of every third-party import."""
    out = []
    for d, _, files in os.walk(os.path.join(REPO, "pbe_jax")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            tree = ast.parse(open(path).read())
            lazy = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(fn)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "pbe_jax":
                        out.append((os.path.relpath(path, REPO), top, id(node) not in lazy))
    return out


def test_setup_declares_what_is_imported_nothing_more():
    core, extras = _setup_lists()
    core_dists = {_dist(r) for r in core}
    extra_dists = {_dist(r) for reqs in extras.values() for r in reqs}
    owners = md.packages_distributions()
    problems, used = [], set()
    for path, top, module_level in _imports():
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, [])}
        if not dists:
            problems.append(f"{path}: imports {top!r}, which no installed distribution provides")
            continue
        used |= dists
        module = path[:-3].replace(os.sep, ".")
        if module_level and module not in OPTIONAL_MODULES and not dists & core_dists:
            problems.append(f"{path}: imports {top!r} ({sorted(dists)}) at module level, not in CORE "
                            "(declare it, or import it lazily and put it in an extra)")
        elif not dists & (core_dists | extra_dists):
            problems.append(f"{path}: imports {top!r} ({sorted(dists)}), declared nowhere in setup.py")
    unused = sorted(core_dists - used)
    if unused:
        problems.append(f"setup.py CORE declares {unused}, which pbe_jax never imports")
    assert not problems, "\n".join(problems)
    assert "torch==2.13.0" in extras["test"]
    assert {_dist(r) for r in extras["gcs"]} == {"gcsfs", "google-cloud-storage"}


@pytest.mark.parametrize("absent", ["gcsfs", "google.cloud.storage"])
def test_gs_workdir_without_the_gcs_extra_names_it(absent, monkeypatch):
    monkeypatch.setitem(sys.modules, absent, None)  # importing it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pbe_jax\[gcs\]'") as e:
        MetricWriter("gs://bucket/run", enabled=True)
    assert {"gcsfs": "gcsfs", "google.cloud.storage": "google-cloud-storage"}[absent] in str(e.value)
