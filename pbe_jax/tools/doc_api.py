"""What the API reference documents: the public names of pbe_jax's modules.

A module's public names are its `__all__`; where it has none, every name without a leading
underscore that the module itself defines (a function or class whose `__module__` is the module;
imported names belong to the module that defines them). A package whose `__all__` names its
submodules (`pbe_jax.data`) is documented submodule by submodule.

The docs' `{public-api}` directive (`docs/_ext/public_api.py`) renders exactly these names, so a
new public function appears in the reference without editing a page.
"""
from __future__ import annotations

import importlib
import inspect
import types

# The modules the API reference covers, in its order (docs/api/*.rst use these).
REFERENCE = ("pbe_jax", "pbe_jax.models", "pbe_jax.schedulers", "pbe_jax.data")


def public_names(module_name: str) -> list[str]:
    """The public names of `module_name` (see the module docstring), in `__all__` / source order."""
    mod = importlib.import_module(module_name)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(mod).items()
                 if not n.startswith("_") and getattr(obj, "__module__", None) == module_name
                 and (inspect.isclass(obj) or inspect.isfunction(obj))]
    return list(names)


def submodules(module_name: str) -> list[str]:
    """The submodules a package exports in its `__all__` (empty for a module)."""
    mod = importlib.import_module(module_name)
    out = []
    for n in getattr(mod, "__all__", ()):
        obj = getattr(mod, n, None)
        if obj is None:
            try:
                obj = importlib.import_module(f"{module_name}.{n}")
            except ModuleNotFoundError:
                continue
        if isinstance(obj, types.ModuleType):
            out.append(obj.__name__)
    return out


def documented_objects(module_name: str) -> list[str]:
    """Every fully qualified name the reference documents for `module_name`."""
    subs = submodules(module_name)
    if subs:
        return [f"{s}.{n}" for s in subs for n in public_names(s)]
    return [f"{module_name}.{n}" for n in public_names(module_name)]
