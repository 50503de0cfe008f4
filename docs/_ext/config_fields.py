"""Sphinx directive `config-fields`: every field of `configs/pbe.py` for the named variants.

    ```{config-fields} demo sd15
    ```

One row per field (dotted path), one column per variant's default, from `get_config` at build
time, so the table is the config itself and cannot drift from it.
"""
from __future__ import annotations

import ml_collections
from docutils import nodes
from sphinx.util.docutils import SphinxDirective

from pbe_jax.configs.pbe import get_config

MAX_CHARS = 60


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{'a.b.c': value} for every leaf field of `cfg`, in insertion order."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= MAX_CHARS else s[:MAX_CHARS - 3] + "..."


def _entry(text: str) -> nodes.entry:
    e = nodes.entry()
    e += nodes.paragraph("", "", nodes.literal(text=text))
    return e


class ConfigFields(SphinxDirective):
    required_arguments = 1
    final_argument_whitespace = True

    def run(self) -> list[nodes.Node]:
        variants = self.arguments[0].split()
        flat = [flatten(get_config(v)) for v in variants]
        fields = list(dict.fromkeys(k for f in flat for k in f))
        table = nodes.table(classes=["config-fields"])
        group = nodes.tgroup(cols=1 + len(variants))
        table += group
        group += [nodes.colspec(colwidth=1) for _ in range(1 + len(variants))]
        head = nodes.thead()
        head += nodes.row("", *[nodes.entry("", nodes.paragraph(text=h)) for h in ["field", *variants]])
        group += head
        body = nodes.tbody()
        for k in fields:
            body += nodes.row("", _entry(f"config.{k}"),
                              *[_entry(_short(f[k]) if k in f else "-") for f in flat])
        group += body
        return [table]


def setup(app):
    app.add_directive("config-fields", ConfigFields)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
