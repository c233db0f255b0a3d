"""Sphinx configuration: the API reference (autodoc + napoleon) and the guides (MyST Markdown).

Build (the test suite does, warnings as errors: ``tests/test_docs.py``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Dependencies: ``pip install -e ".[docs]"``. Every public module of ``isomax_jax`` has an
``automodule`` on one of the ``docs/api/*.rst`` pages (``tests/test_docs.py`` checks it).
Doctests run under pytest (``--doctest-modules``), not Sphinx.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's isomax_jax, installed or not
# Importing the modules for autodoc must not start accelerators or TensorFlow's GPU support.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import isomax_jax  # noqa: E402

project = "isomax_jax"
author = "the isomax_jax authors"
copyright = "the isomax_jax authors, Apache-2.0"  # noqa: A001
version = release = isomax_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
templates_path: list[str] = []

# Google-style docstrings (Args:, Returns:, Raises:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
    # A package's __all__ also lists what it re-exports (isomax_jax.data, ...): document each
    # object once, in the module that defines it.
    "ignore-module-all": True,
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True

# MyST: the guides in docs/*.md are pages of the site; ``$...$`` stays literal code-like text.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"isomax_jax {release}"
html_theme_options = {
    "description": "OOD detection with the IsoMax loss family in JAX/Flax",
    "fixed_sidebar": True,
}
