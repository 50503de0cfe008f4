"""What a checkpoint load did, and the strict checks every loader shares: the architecture
against the expected config, and `allow_missing` globs per component."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.paint_by_example import _plain
from pbe_jax.models.registry import COMPONENTS

# Config fields that do not change the network (its params or its computation).
NOT_ARCHITECTURE = ("sample_size",)


@dataclass
class PipelineReport:
    """What a load did: tensors per component, keys ignored or initialised (and why)."""

    source: str
    format: str
    loaded: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys / folders
    initialised: dict[str, list[str]] = field(default_factory=dict)  # how -> keys
    missing_allowed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ema: bool = False  # the weights loaded are an EMA copy (training checkpoint / LDM model_ema.*)

    def ignore(self, reason: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self.ignored.setdefault(reason, []).extend(keys)

    def summary(self) -> str:
        lines = [f"loaded {self.format} checkpoint {self.source}: "
                 + ", ".join(f"{c} {n} tensors" for c, n in self.loaded.items())]
        for reason, keys in self.ignored.items():
            lines.append(f"  ignored {len(keys)} keys ({reason}): {short(keys)}")
        for how, keys in self.initialised.items():
            lines.append(f"  {how}: {short(keys)}")
        if self.missing_allowed:
            lines.append(f"  missing, allowed (kept at init): {short(self.missing_allowed)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _config_fields(cfg) -> dict:
    return {k: v for k, v in _plain(cfg.to_dict()).items()
            if not k.startswith("_") and k not in NOT_ARCHITECTURE and k not in ("architectures", "model_type")}


def check_architecture(found: Mapping[str, Any], expected: Mapping[str, Any] | None, source: str,
                       exempt: Mapping[str, Iterable[str]] = ()) -> None:
    """Fail when the checkpoint's component configs differ from `expected` (parsed configs),
    listing every differing field. `exempt[component]` names fields the loader rewrites."""
    if expected is None:
        return
    exempt = {c: set(v) for c, v in dict(exempt).items()}
    diffs = []
    for comp in COMPONENTS:
        a, b = _config_fields(found[comp]), _config_fields(expected[comp])
        for k in sorted(set(a) | set(b)):
            if k in exempt.get(comp, ()):
                continue
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                diffs.append(f"{comp}.{k}: checkpoint {a.get(k, '<absent>')!r}, "
                             f"config {b.get(k, '<absent>')!r}")
    if diffs:
        raise ValueError(f"{source}: the checkpoint's architecture differs from the model config in "
                         f"{len(diffs)} fields:\n  " + "\n  ".join(diffs))


def component_patterns(patterns: Iterable[str], comp: str) -> list[str]:
    """Pipeline-level globs (`unet.conv_in.*`, `*.bias`) -> globs over the component's keys."""
    out = []
    for p in patterns:
        head = p.split(".", 1)[0]
        if head == comp:
            out.append(p.split(".", 1)[1] if "." in p else "*")
        elif head not in COMPONENTS:
            out.append(p)
    return out


def raise_unexpected(keys: list[str], source: str) -> None:
    if keys:
        raise CheckpointMismatchError(
            f"{source}: {len(keys)} unexpected keys (in no component, and not a known buffer): "
            + ", ".join(keys[:50]) + (f" ... (+{len(keys) - 50} more)" if len(keys) > 50 else ""))
