"""Read pbe_jax's markdown-style docstrings as reStructuredText, without rewriting them.

The docstrings are written to be read in a terminal: code in single backticks, bullet lists right
after a sentence, aligned tables and diagrams indented under a paragraph. Three small rewrites
(on the docstring as autodoc hands it over, never on the source) make them valid RST:

- an indented block after a blank line (a table of shapes, a pipeline diagram) becomes a literal
  block, as it reads in the source;
- a list that starts right under a sentence gets the blank line RST needs before it;
- a code span followed by a letter (`` `jax.Array`s ``) gets the escaped space RST needs after it;
- a `*` after `-` or `/` outside code (a glob in a name, `facebook/dinov2-*`) is escaped, not emphasis.

A module-level value that has no docstring of its own (a registry dict) would show its type's
docstring (`dict`'s); it shows none instead.

Single backticks render as code through `default_role = "code"` (conf.py).
"""
from __future__ import annotations

import inspect
import re

LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")
CODE_THEN_LETTER = re.compile(r"(?<!`)(`[^`\s][^`]*`)(?=[A-Za-z0-9])")
CODE_SPAN = re.compile(r"(`+[^`]*`+)")
GLOB_STAR = re.compile(r"(?<=[-/])\*")


def _escape_globs(line: str) -> str:
    parts = CODE_SPAN.split(line)
    return "".join(p if i % 2 else GLOB_STAR.sub(r"\\*", p) for i, p in enumerate(parts))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rewrite(lines: list[str]) -> list[str]:
    """The docstring `lines` (already dedented by autodoc) made valid RST; see the module docstring."""
    out: list[str] = []
    in_list = False
    in_literal = False
    for i, line in enumerate(lines):
        line = _escape_globs(CODE_THEN_LETTER.sub(r"\1\\ ", line)) if not in_literal else line
        blank = not line.strip()
        prev = out[-1] if out else ""
        if in_literal and not blank and _indent(line) == 0:
            in_literal = False
            if prev.strip():
                out.append("")
        if blank:
            in_list = False
            out.append(line)
            continue
        if in_literal:
            out.append(line)
            continue
        if _indent(line) > 0 and not prev.strip() and not in_list and not LIST_ITEM.match(line):
            # An indented block after a blank line: literal, as in the source.
            before = len(out) - 1
            while before >= 0 and not out[before].strip():
                before -= 1
            if before >= 0 and out[before].rstrip().endswith(":") and not out[before].rstrip().endswith("::"):
                out[before] = out[before].rstrip() + ":"
            else:
                out[-1:] = ["", "::", ""]
            in_literal = True
            out.append(line)
            continue
        if LIST_ITEM.match(line):
            if prev.strip() and not in_list and _indent(prev) <= _indent(line):
                out.append("")
            in_list = True
        out.append(line)
    return out


def _process(app, what, name, obj, options, lines):
    if what == "data" and lines and "\n".join(lines).strip() == (inspect.getdoc(type(obj)) or "").strip():
        lines[:] = []  # no docstring of its own: not its type's
        return
    lines[:] = rewrite(list(lines))


def setup(app):
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
