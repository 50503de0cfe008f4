"""Sphinx directive `results-table`: a table rendered at build time from `docs/results/*.json`.

    ```{results-table} ../results/bench_small_cpu.json
    :rows: train/small/*, sample/small/*
    ```

`:budgets: 16, 24` (AOT tables): one "fits N GiB" column per memory budget instead of the
verdict against the target's own memory.

Paths are relative to the page. The table comes from `pbe_jax.tools.doc_tables` (the same
code as `python -m pbe_jax.tools.doc_tables show`), followed by a line saying which command made
the numbers, on which machine and when. A missing or malformed file fails the build.
"""
from __future__ import annotations

import pathlib

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

from pbe_jax.tools import doc_tables


def _cell(text: str, parse) -> nodes.entry:
    entry = nodes.entry()
    entry += parse(text)
    return entry


class ResultsTable(SphinxDirective):
    required_arguments = 1
    final_argument_whitespace = True
    option_spec = {"rows": directives.unchanged, "budgets": directives.unchanged}

    def _inline(self, text: str) -> list[nodes.Node]:
        # Cells use markdown code spans and bold; parse them as the page's own markup.
        para = nodes.paragraph()
        inl, _ = self.state.inline_text(text, self.lineno)
        para += inl
        return [para]

    def run(self) -> list[nodes.Node]:
        page_dir = pathlib.Path(self.env.doc2path(self.env.docname)).parent
        paths = [page_dir / a for a in self.arguments[0].split()]
        for p in paths:
            self.env.note_dependency(str(p))
        rows_opt = self.options.get("rows")
        globs = [g.strip() for g in rows_opt.split(",")] if rows_opt else None
        try:
            budgets = [float(b) for b in self.options["budgets"].split(",")] if "budgets" in self.options else None
            header, rows = doc_tables.table(paths, globs, budgets)
            source = doc_tables.source_line(paths)
        except (doc_tables.ResultFileError, KeyError, TypeError, ValueError) as e:
            raise self.error(f"results-table: {e}") from None
        table = nodes.table(classes=["results-table"])
        group = nodes.tgroup(cols=len(header))
        table += group
        group += [nodes.colspec(colwidth=1) for _ in header]
        head = nodes.thead()
        head += nodes.row("", *[_cell(h, self._inline) for h in header])
        group += head
        body = nodes.tbody()
        for r in rows:
            body += nodes.row("", *[_cell(c, self._inline) for c in r])
        group += body
        note = nodes.paragraph(classes=["results-source"])
        note += nodes.emphasis(text="Generated from ")
        note += self._inline(source)[0].children
        return [table, note]


def setup(app):
    app.add_directive("results-table", ResultsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
