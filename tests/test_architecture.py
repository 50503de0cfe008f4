"""The seams of the architecture: one noise schedule (loss, in-training sampler and export all
follow `config.model.scheduler`), one cached jitted edit function (a second training sample
grid compiles nothing), and no package code that reads files relative to the checkout."""
from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np
import pytest

from pbe_jax import inference
from pbe_jax import sharding as shd
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.schedulers import noise_schedule, pbe_scheduler_config
from pbe_jax.training import step as step_lib
from pbe_jax.training.loop import train_and_evaluate
from pbe_jax.training.samples import training_samples
from pbe_jax.training.state import Setup
from tests.train_utils import REPO, tiny_config

CUSTOM = {"beta_schedule": "linear", "beta_start": 0.0005, "beta_end": 0.015}


@contextlib.contextmanager
def compile_events():
    """Every trace / lowering / backend compile JAX does inside the block."""
    events = []

    def listener(name, *args, **kw):
        if name.startswith("/jax/core/compile/"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.slow
def test_loss_sampler_and_export_follow_the_model_scheduler(tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.num_steps": 2, "sample_every_steps": 2, "sample_steps": 2,
                         "sample_num": 2, "train.batch_size": 8})
    for k, v in CUSTOM.items():
        cfg.model.scheduler[k] = v
    want = noise_schedule(cfg.model.scheduler.to_dict())
    default = noise_schedule(pbe_scheduler_config())
    assert np.abs(want - default).max() > 1e-3  # the change is visible
    seen = {}
    real_loss, real_sched = step_lib.pbe_loss, inference.scheduler_for

    def loss_spy(model, batch, rng, schedule, **kw):
        seen["loss"] = np.asarray(schedule.alphas_cumprod)
        return real_loss(model, batch, rng, schedule, **kw)

    def sched_spy(model_config, name, steps, eta=0.0):
        s = real_sched(model_config, name, steps, eta)
        seen["sampler"] = np.asarray(s.alphas_cumprod)
        return s

    monkeypatch.setattr(step_lib, "pbe_loss", loss_spy)
    monkeypatch.setattr(inference, "scheduler_for", sched_spy)
    workdir = str(tmp_path / "run")
    train_and_evaluate(cfg, workdir)
    assert os.listdir(os.path.join(workdir, "images"))  # the sample grid was made
    out = str(tmp_path / "export")
    assert convert_main(["--from", "orbax", "--src", workdir, "--to", "diffusers", "--dst", out,
                         "--no-progress"]) == 0
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        exported = json.load(f)
    seen["export"] = noise_schedule(exported)
    for where in ("loss", "sampler", "export"):
        np.testing.assert_array_equal(seen[where], want, err_msg=where)
    assert {k: exported[k] for k in CUSTOM} == CUSTOM


def test_loss_target_follows_prediction_type():
    cfg = tiny_config()
    eps = NoiseSchedule.from_config({**cfg.model.scheduler.to_dict(), "prediction_type": "epsilon"})
    v = NoiseSchedule.from_config({**cfg.model.scheduler.to_dict(), "prediction_type": "v_prediction"})
    z0, noise = np.ones((2, 4, 4, 4), np.float32), np.full((2, 4, 4, 4), 2.0, np.float32)
    t = np.array([10, 900])
    np.testing.assert_array_equal(eps.target(z0, noise, t), noise)
    a = v.alphas_cumprod[t][:, None, None, None]
    np.testing.assert_allclose(v.target(z0, noise, t), np.sqrt(a) * noise - np.sqrt(1 - a) * z0, rtol=1e-6)
    x0 = NoiseSchedule.from_config({**cfg.model.scheduler.to_dict(), "prediction_type": "sample"})
    np.testing.assert_array_equal(x0.target(z0, noise, t), z0)  # diffusers' 'sample': the clean latent
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({**cfg.model.scheduler.to_dict(), "prediction_type": "x_start"})


@pytest.mark.slow
def test_second_training_grid_compiles_nothing():
    cfg = tiny_config(**{"sample_steps": 3, "sample_num": 2})
    mesh = shd.make_mesh("data:4,fsdp:2")
    setup = Setup(cfg, mesh)
    params, frozen = setup.random_params()
    state = setup.new_state(params)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
            "mask": np.where(rng.random((8, 32, 32, 1)) < 0.3, 0, 255).astype(np.uint8),
            "reference": rng.integers(0, 256, (8, 32, 32, 3), np.uint8)}
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    grid = lambda st: training_samples(setup.model(st["params"], frozen), batch, cfg)  # noqa: E731
    first = grid(state)
    # the next step's params: new arrays, same shardings (what the loop hands the grid; the train
    # step's out_shardings are these)
    nudge = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.01 + 1e-3, p), out_shardings=setup.params_sharding)
    state = {**state, "params": nudge(state["params"])}
    with compile_events() as events:
        second = grid(state)
    assert events == [], f"the second grid compiled: {events}"
    assert first.shape == second.shape and np.abs(first - second).max() > 0


# The layer rule: imports point only down these layers (a module may import its own layer and
# those below, never above). A module's layer is that of its longest listed prefix. Every import
# counts, module-level and function-local alike (a local import is no way around the rule).
LAYERS = (
    ("base", ("pbe_jax.outputs", "pbe_jax.locks", "pbe_jax.runtime", "pbe_jax.distributed",
              "pbe_jax.defaults", "pbe_jax.logs",
              "pbe_jax.metrics", "pbe_jax.sharding", "pbe_jax.checkpoint", "pbe_jax.convert",
              "pbe_jax.convert.torch_layout", "pbe_jax.convert.safetensors_io")),
    ("models", ("pbe_jax.models",)),
    ("building blocks", ("pbe_jax.convert.load", "pbe_jax.convert.diffusers_io", "pbe_jax.convert.ldm",
                         "pbe_jax.convert.ldm_io", "pbe_jax.convert.sd_init", "pbe_jax.convert.orbax_io",
                         "pbe_jax.convert.components", "pbe_jax.convert.report", "pbe_jax.convert.export",
                         "pbe_jax.convert.model_card", "pbe_jax.convert.lora_io", "pbe_jax.data", "pbe_jax.diffusion",
                         "pbe_jax.schedulers", "pbe_jax.sampler", "pbe_jax.evals")),
    ("inference, training", ("pbe_jax.inference", "pbe_jax.pipeline", "pbe_jax.batch_edit",
                             "pbe_jax.webdemo", "pbe_jax.training")),
    ("evaluation", ("pbe_jax.evaluation",)),  # runs inference; evals/ holds the metrics only
    ("configs, runs", ("pbe_jax.configs", "pbe_jax.training.loop", "pbe_jax.training.guards",
                       "pbe_jax.training.sweeps",
                       "pbe_jax.benchmarks")),
    ("command lines", ("pbe_jax", "pbe_jax.train", "pbe_jax.sample", "pbe_jax.demo", "pbe_jax.evaluate",
                       "pbe_jax.fit_vae", "pbe_jax.sweep", "pbe_jax.bench", "pbe_jax.convert.__main__",
                       "pbe_jax.data.preview", "pbe_jax.tools", "pbe_jax.cli_flags")),
)


def package_modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under the package directory `root`."""
    top = os.path.dirname(os.path.abspath(root))
    mods = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file; `from a import b` counts
    as importing a.b when that is a module, else a)."""
    import ast

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".")
                    parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):  # a package's own __init__ is no edge
                    graph[m].add(n)
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    best, level = "", None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            inside = module.startswith(p + ".") and "." in p  # the package itself holds only itself
            if (module == p or inside) and len(p) > len(best):
                best, level = p, i
    if level is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it")
    return level


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    for m in graph:
        layer_of(m, layers)
    return sorted(f"{m} ({layers[layer_of(m, layers)][0]}) imports {n} ({layers[layer_of(n, layers)][0]})"
                  for m, deps in graph.items() for n in deps if layer_of(n, layers) > layer_of(m, layers))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w), on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


PACKAGE = os.path.join(REPO, "pbe_jax")


def test_imports_point_down_the_layers():
    graph = import_graph(package_modules(PACKAGE))
    assert upward_imports(graph) == []


def test_no_import_cycles():
    graph = import_graph(package_modules(PACKAGE))
    assert import_cycles(graph) == []


def test_the_layer_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    """The checker on a fake package: a model importing the inference module, and a cycle made
    by a function-local import, are both found."""
    pkg = tmp_path / "pbe_jax"
    (pkg / "models").mkdir(parents=True)
    for f in ("__init__.py", "models/__init__.py", "schedulers.py", "sampler.py"):
        (pkg / f).write_text("")
    (pkg / "models" / "unet.py").write_text("import numpy as np\nfrom pbe_jax.models import layers\n")
    (pkg / "models" / "layers.py").write_text("")
    (pkg / "inference.py").write_text("from pbe_jax.models import unet\nfrom pbe_jax import sampler\n")
    graph = import_graph(package_modules(str(pkg)))
    assert upward_imports(graph) == [] and import_cycles(graph) == []
    (pkg / "models" / "unet.py").write_text("from pbe_jax.models import layers\n\n\ndef f():\n"
                                            "    from pbe_jax.inference import run_edit\n")
    graph = import_graph(package_modules(str(pkg)))
    assert upward_imports(graph) == [
        "pbe_jax.models.unet (models) imports pbe_jax.inference (inference, training)"]
    assert import_cycles(graph) == [["pbe_jax.inference", "pbe_jax.models.unet"]]
    (pkg / "sampler.py").write_text("from . import schedulers\n")
    (pkg / "schedulers.py").write_text("from .sampler import step\n")  # same layer, but a cycle
    graph = import_graph(package_modules(str(pkg)))
    assert ["pbe_jax.sampler", "pbe_jax.schedulers"] in import_cycles(graph)
    (pkg / "newthing.py").write_text("")
    with pytest.raises(AssertionError, match="newthing is in no layer"):
        upward_imports(import_graph(package_modules(str(pkg))))
