"""Sphinx directive `public-api`: the API reference of one module, from its docstrings.

    .. public-api:: pbe_jax.schedulers

renders a summary table of the module's public names (`pbe_jax.tools.doc_api.public_names`:
`__all__`, or the names it defines) and then each one with autodoc. A package whose `__all__`
lists submodules gets one part per submodule. Nothing is listed by hand, so a new public
function appears without editing a page; a name that cannot be imported fails the build.
"""
from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

from pbe_jax.tools import doc_api


def _autodoc_lines(qualname: str) -> list[str]:
    mod_name, _, attr = qualname.rpartition(".")
    obj = getattr(importlib.import_module(mod_name), attr)
    if inspect.isclass(obj):
        return [f".. autoclass:: {qualname}", "   :members:", ""]
    if callable(obj):
        return [f".. autofunction:: {qualname}", ""]
    return [f".. autodata:: {qualname}", "   :no-value:", ""]


def _module_lines(module_name: str, names: list[str], title: str | None) -> list[str]:
    lines = []
    if title:
        lines += [title, "-" * len(title), ""]
    lines += [f".. automodule:: {module_name}", "   :no-members:", "", ".. autosummary::", "   :nosignatures:", ""]
    lines += [f"   {n}" for n in names] + [""]  # relative to the automodule above
    for n in names:
        lines += _autodoc_lines(f"{module_name}.{n}")
    return lines


class PublicApi(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        try:
            subs = doc_api.submodules(name)
            if subs:
                lines = [f".. automodule:: {name}", "   :no-members:", ""]
                for s in subs:
                    lines += _module_lines(s, doc_api.public_names(s), f"``{s}``")
            else:
                lines = _module_lines(name, doc_api.public_names(name), None)
        except (ImportError, AttributeError) as e:
            raise self.error(f"public-api {name}: {e}") from None
        node = nodes.section() if subs else nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=f"<public-api {name}>"), node)
        return node.children


def setup(app):
    app.add_directive("public-api", PublicApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
