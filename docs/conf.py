"""Sphinx configuration of the l2bn manual (``sphinx-build -W -b html docs docs/_build/html``)."""

import os
import sys

sys.path.insert(0, os.path.abspath("../src"))
os.environ.setdefault("KERAS_BACKEND", "torch")  # l2bn.keras imports keras; torch comes with l2bn

import l2bn  # noqa: E402

project = "l2bn"
author = "l2bn developers"
release = version = l2bn.__version__
copyright = "2026, l2bn developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "results/*/*-seed*", "**/tb"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # torch's docstrings use roles this site does not define
nitpicky = False

intersphinx_mapping = {}  # offline: no inventories are fetched
html_theme = "furo"
html_title = f"l2bn {release}"
html_static_path = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shape", ("Call arguments", "params_style")]
