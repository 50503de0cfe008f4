"""Where one UNet forward + backward spends its time, op by op: ours (the jitted XLA program,
timed with the JAX profiler) against the diffusers UNet in eager PyTorch (timed with
torch.profiler), same weights and inputs, grouped into the same op classes.

`python -m pbe_jax.bench --what=ops --size=small` prints one row per class: milliseconds per
forward + backward on each side and the ratio (ours / PyTorch; above 1 = ours slower), then
ours' slowest single ops. The loss is the mean square of the UNet's output; gradients with
respect to every UNet parameter (what the train step computes for the UNet).

Classes. XLA: the thunk names of the compiled program, by the HLO instruction each one runs
(`convolution` and the YNNPACK `ynn_fusion` custom fusions holding a convolution or a dot are
'conv' / 'matmul' by their HLO; loop fusions are 'elementwise / norm'). PyTorch: aten ops by
name (self CPU time, so a composite op is not counted twice).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.benchmarks import model as bm
from pbe_jax.benchmarks.report import Row, median_seconds

CLASSES = ("conv", "matmul", "attention", "elementwise / norm", "reduce", "copy / transpose",
           "other")

_TORCH = [  # (class, pattern on the aten op name), first match wins
    ("attention", r"scaled_dot_product|_flash_attention|_efficient_attention|softmax"),
    ("conv", r"conv|mkldnn_convolution"),
    ("matmul", r"\b(aten::)?(mm|addmm|bmm|baddbmm|matmul|linear|_mkl_linear|mkldnn_linear)"),
    ("reduce", r"sum|mean|_local_scalar|norm_backward_reduce"),
    ("copy / transpose", r"copy_|clone|contiguous|permute|transpose|cat|_to_copy|empty_strided|"
                         r"as_strided|expand|view|reshape|t$|slice|select|unsqueeze|squeeze"),
    ("elementwise / norm", r"add|mul|sub|div|silu|gelu|sigmoid|norm|exp|cos|sin|pow|rsqrt|sqrt|"
                           r"fill_|zero_|neg|where|ones|zeros|arange|threshold|mse|sigmoid"),
]


def _classify_torch(name: str) -> str:
    for cls, pat in _TORCH:
        if re.search(pat, name):
            return cls
    return "other"


def _classify_hlo(op: str, hlo_kinds: dict[str, str]) -> str:
    kind = hlo_kinds.get(op, "")
    text = op + " " + kind
    if "softmax" in text:
        return "attention"
    if "convolution" in text:
        return "conv"
    if "dot" in text or "gemm" in text or "matmul" in text:
        return "matmul"
    if "copy" in text or "transpose" in text or "concatenate" in text or "slice" in text \
            or "pad" in text or "bitcast" in text:
        return "copy / transpose"
    if "reduce" in text:
        return "reduce"
    if "fusion" in text or any(k in text for k in ("add", "multiply", "divide", "subtract",
                                                    "exponential", "rsqrt", "select", "logistic")):
        return "elementwise / norm"
    return "other"


def _hlo_kinds(compiled_text: str) -> dict[str, str]:
    """Instruction name -> what it computes: its opcode and, for a fusion or any instruction
    that calls computations, every opcode inside them (nested fusions too), from the compiled
    HLO text."""
    ops: dict[str, set] = {}
    calls: dict[str, set] = {}
    inst: dict[str, tuple[str, set]] = {}
    current = None
    for line in compiled_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            ops[current], calls[current] = set(), set()
            continue
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if not m or current is None:
            continue
        called = set(re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line))
        ops[current].add(m.group(2))
        calls[current] |= called
        inst[m.group(1)] = (m.group(2), called)

    memo: dict[str, set] = {}

    def inside(comp: str) -> set:
        if comp not in memo:
            memo[comp] = set()
            memo[comp] = set(ops.get(comp, ())).union(*(inside(c) for c in calls.get(comp, ())))
        return memo[comp]

    return {name: " ".join(sorted({opcode}.union(*(inside(c) for c in called))))
            for name, (opcode, called) in inst.items()}


def jax_op_seconds(fn, args, reps: int) -> tuple[dict[str, float], dict[str, str], float]:
    """Seconds per call of each op of the jitted `fn(*args)` (JAX profiler, XLA:CPU thunks),
    the compiled HLO's kinds for classifying them, and the median wall seconds of a call."""
    compiled = fn.lower(*args).compile()
    kinds = _hlo_kinds(compiled.as_text())
    wall, _ = median_seconds(lambda: jax.block_until_ready(compiled(*args)), reps=reps)
    with tempfile.TemporaryDirectory(prefix="pbe_ops_") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(compiled(*args))
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            raise RuntimeError(f"the JAX profiler wrote no perfetto trace under {d}")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        if name in kinds:  # an HLO instruction of the program (thunk), not a host annotation
            per_op[name] += e["dur"] * 1e-6 / reps
    return dict(per_op), kinds, wall


def torch_op_seconds(fn, reps: int) -> tuple[dict[str, float], float]:
    """Self CPU seconds per call of each aten op of `fn()` (torch.profiler), and the median
    wall seconds of a call (unprofiled)."""
    import torch

    wall, _ = median_seconds(fn, reps=reps, warmup=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    return {e.key: e.self_cpu_time_total * 1e-6 / reps for e in prof.key_averages()
            if e.key.startswith("aten::")}, wall


def by_class(per_op: dict[str, float], classify) -> dict[str, float]:
    out = dict.fromkeys(CLASSES, 0.0)
    for op, s in per_op.items():
        out[classify(op)] += s
    return out


def run(size, *, reps: int = 5, reference: bool = True, top: int = 8) -> list[Row]:
    import torch  # noqa: F401 (the reference side; a clear ImportError when missing)

    from pbe_jax.benchmarks import torch_ref

    name = f"ops/{size.name}"
    u = size.models["unet"]
    b, s = size.train_batch, u["sample_size"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, u["in_channels"])).astype(np.float32)
    t = rng.integers(0, 1000, (b,)).astype(np.int32)
    ctx = rng.standard_normal((b, 1, u["cross_attention_dim"])).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="pbe_ops_") as export:
        _, _, _, model = bm.build(size, export_dir=export if reference else None)
        graphdef, params = nnx.split(model.unet, nnx.Param)

        def loss(p, x, t, ctx):
            return jnp.mean(nnx.merge(graphdef, p)(x, t, ctx) ** 2)

        ours, kinds, ours_wall = jax_op_seconds(jax.jit(jax.value_and_grad(loss)), (params, x, t, ctx), reps)
        ref, ref_wall = {}, None
        if reference:
            unet = torch_ref.load_components(export, "cpu")["unet"].train()
            tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            tt, tc = torch.from_numpy(t).long(), torch.from_numpy(ctx)

            def step():
                unet.zero_grad(set_to_none=True)
                (unet(tx, tt, tc).sample ** 2).mean().backward()

            ref, ref_wall = torch_op_seconds(step, reps)
    ours_c = by_class(ours, lambda op: _classify_hlo(op, kinds))
    ref_c = by_class(ref, _classify_torch) if reference else {}
    rows = [Row(f"{name}/unet_fwd_bwd/wall_ms", ours_wall * 1e3,
                ref_wall * 1e3 if ref_wall is not None else None, "ms")]
    for cls in CLASSES + ("total",):
        o = sum(ours_c.values()) if cls == "total" else ours_c[cls]
        r = (sum(ref_c.values()) if cls == "total" else ref_c[cls]) if reference else None
        if o or r:
            rows.append(Row(f"{name}/unet_fwd_bwd/{cls.replace(' / ', '_').replace(' ', '_')}_ms",
                            o * 1e3, r * 1e3 if r is not None else None, "ms"))
    for op, sec in sorted(ours.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(Row(f"{name}/ours_top/{op} [{kinds.get(op, '?')[:60]}]", sec * 1e3, None, "ms"))
    if reference:
        for op, sec in sorted(ref.items(), key=lambda kv: -kv[1])[:top]:
            rows.append(Row(f"{name}/torch_top/{op}", sec * 1e3, None, "ms"))
    return rows
