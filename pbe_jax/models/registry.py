"""Model classes by the name users already know: diffusers' `_class_name` / transformers'
`architectures[0]`, and the three slots of a Paint-by-Example pipeline.

Adding a backbone is one change: decorate its class with `@register(library)`. A component
config names its class with `_class_name` (diffusers) or `architectures` (transformers); a
config that names none gets the slot's default class (`PIPELINE_SLOTS`). `model_index.json`
entries (`[library, class]`) come from here too.
"""
from __future__ import annotations

from typing import Any, Mapping

# diffusers / transformers class name -> (pbe_jax class, library that owns the name)
_CLASSES: dict[str, tuple[type, str]] = {}

# The networks of a Paint-by-Example pipeline and the class each slot holds by default.
PIPELINE_SLOTS: dict[str, str] = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "image_encoder": "PaintByExampleImageEncoder",
}
COMPONENTS: tuple[str, ...] = tuple(PIPELINE_SLOTS)


def register(library: str, name: str | None = None):
    """Class decorator: make a model class loadable by its diffusers / transformers name."""
    def deco(cls: type) -> type:
        _CLASSES[name or cls.__name__] = (cls, library)
        return cls
    return deco


def class_name_of(raw: Mapping[str, Any] | None) -> str | None:
    """The class a config.json names (`_class_name`, else `architectures[0]`), or None."""
    if not raw:
        return None
    if raw.get("_class_name"):
        return str(raw["_class_name"])
    arch = raw.get("architectures")
    return str(arch[0]) if arch else None


def model_class(name: str) -> type:
    if name not in _CLASSES:
        raise KeyError(f"no pbe_jax model class is registered as {name!r}; known: {sorted(_CLASSES)}")
    return _CLASSES[name][0]


def library_of(name: str) -> str:
    return _CLASSES[name][1]


def slot_class(slot: str, raw: Any = None) -> type:
    """The class of pipeline slot `slot` for a component config: config.json fields (its named
    class if it names one we know, else the slot default) or a config object (the registered
    class whose `config_class` it is, else the slot default)."""
    if slot not in PIPELINE_SLOTS:
        raise KeyError(f"unknown pipeline component {slot!r}; components: {COMPONENTS}")
    if raw is not None and not isinstance(raw, Mapping):
        owners = [c for c, _ in _CLASSES.values() if getattr(c, "config_class", None) is type(raw)]
        return owners[0] if owners else model_class(PIPELINE_SLOTS[slot])
    named = class_name_of(raw)
    if named in _CLASSES:
        return _CLASSES[named][0]
    return model_class(PIPELINE_SLOTS[slot])


def registered() -> dict[str, type]:
    return {k: v[0] for k, v in _CLASSES.items()}
