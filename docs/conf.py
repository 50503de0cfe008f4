"""Sphinx configuration of the pbe_jax documentation (Sphinx + MyST, as flax / optax / orbax).

Build (strict: any warning, and any reference that does not resolve, fails):

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the checkout's pbe_jax, also without `pip install -e`
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))
# The API reference imports pbe_jax (and so jax); keep it on the CPU and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "pbe_jax"
author = "the pbe_jax authors"
copyright = "the pbe_jax authors"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "results_table",
    "public_api",
    "config_fields",
    "md_docstrings",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "results", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "none"  # signatures name jax / flax / numpy types: no inventory for them offline
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
# pbe_jax's docstrings quote code in single backticks (markdown style): show it as code
# (md_docstrings.py makes the rest of their markdown habits valid RST).
default_role = "code"

html_theme = "sphinx_book_theme"
html_title = "pbe_jax"
html_static_path = []
html_theme_options = {"show_toc_level": 2, "home_page_in_toc": True}

# `PaintByExampleTokenEncoder.config_class` is an alias of a config class that pbe_jax.models does
# not export (it is not public API), so the alias's link has no target.
nitpick_ignore = [("py:class", "pbe_jax.models.conditioner.PaintByExampleTokenEncoderConfig")]
