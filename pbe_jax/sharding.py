"""Device mesh, logical-axis rules, and the shardings of params, optimizer state and batches.

Mesh axes are `data` (pure data parallel: params replicated), `fsdp` (data parallel with params
and optimizer state sharded: ZeRO-3 style) and `tensor` (model parallel inside a layer). The
batch is split over `data` x `fsdp`. Params carry logical axis names (`pbe_jax.models.axes`);
`config.sharding_rules` maps each to a mesh axis. A dimension stays replicated when its rule
names no axis, the axis has size 1, the dimension does not divide evenly, or the whole array is
smaller than `MIN_SHARD_SIZE` (sharding a bias costs more in collectives than it saves).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 2**14

# Logical axis -> mesh axis. FSDP shards the large input/width dimension of every big kernel;
# tensor parallelism (when the `tensor` axis > 1) splits attention heads, MLP width and conv
# input channels.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "fsdp"),
    ("conv_in", "tensor"),
    ("norm", None),
    ("vocab", None),
)


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """'data:-1,fsdp:2,tensor:1' -> {'data': -1, 'fsdp': 2, 'tensor': 1} (axes in MESH_AXES)."""
    if isinstance(spec, str):
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, size = part.partition(":")
            if name not in MESH_AXES or not size.lstrip("-").isdigit():
                raise ValueError(f"bad mesh spec {spec!r}: use e.g. 'data:-1,fsdp:1,tensor:1' with axes {MESH_AXES}")
            out[name] = int(size)
    else:
        out = {str(k): int(v) for k, v in dict(spec).items()}
        bad = set(out) - set(MESH_AXES)
        if bad:
            raise ValueError(f"unknown mesh axes {sorted(bad)}; allowed {MESH_AXES}")
    return {a: out.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] = "data:-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, across processes). One size may
    be -1: it takes whatever the others leave."""
    sizes = parse_mesh_spec(spec)
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n % known:
            raise ValueError(f"mesh {sizes}: {n} devices not divisible by {known}")
        sizes[fill[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {n}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware device order on TPU/GPU; plain reshape elsewhere

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 (fake CPU devices have no topology)
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
    if not names or math.prod(shape) < MIN_SHARD_SIZE:
        return P()
    table = dict((k, v) for k, v in rules)
    used, spec = set(), []
    for name, dim in zip(names, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape.get(axis, 1) == 1 or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def _names_of(var) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """A pure-dict tree of NamedShardings for an (abstract or concrete) `nnx.State`, same
    structure as `nnx.to_pure_dict(state)`."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        flat.append((path, NamedSharding(mesh, logical_to_spec(_names_of(var), shape, mesh, rules))))
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def batch_sharding(mesh: Mesh, ndim: int = 1, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Leading (batch) dim split over the mesh's batch axes, the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} contain none of batch_axes {tuple(batch_axes)}")
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def check_batch_size(global_batch_size: int, mesh: Mesh | None, process_count: int = 1,
                     batch_axes: Sequence[str] = BATCH_AXES, what: str = "global_batch_size") -> None:
    """The one batch-divisibility rule: the global batch splits evenly over the mesh's batch
    axes (data x fsdp) and over the processes. Raises ValueError naming `what`."""
    if mesh is not None:
        axes = tuple(a for a in batch_axes if a in mesh.shape)
        if not axes:
            raise ValueError(f"mesh axes {mesh.axis_names} contain none of batch_axes {tuple(batch_axes)}")
        shards = math.prod(mesh.shape[a] for a in axes)
        if global_batch_size % shards:
            raise ValueError(f"{what} {global_batch_size} is not divisible by the {shards} batch shards "
                             f"of mesh axes {axes} {dict(mesh.shape)}")
    if global_batch_size % process_count:
        raise ValueError(f"{what} {global_batch_size} is not divisible by process_count {process_count}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def opt_state_shardings(opt_state_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer state laid out like the params it mirrors (Adam's mu/nu): every sub-tree whose
    structure equals the params' gets the params' shardings; scalars are replicated."""
    p_struct = jax.tree.structure(params_shardings)

    def assign(node):
        if jax.tree.structure(node) == p_struct:
            return params_shardings
        return None

    def walk(node):
        got = assign(node)
        if got is not None:
            return got
        if isinstance(node, (tuple, list)) and not hasattr(node, "shape"):
            items = [walk(n) for n in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if hasattr(node, "shape"):
            return replicated(mesh)
        return jax.tree.map(lambda _: replicated(mesh), node)

    return walk(opt_state_shapes)
