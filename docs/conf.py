"""Sphinx configuration for the safeflow documentation."""

from __future__ import annotations

import os
import sys

# The repository root, so ``import safeflow`` finds this checkout even without an install.
sys.path.insert(0, os.path.abspath(".."))

project = "safeflow"
author = "safeflow developers"
copyright = "2025, safeflow developers"

try:
    from safeflow import __version__ as release
except Exception:  # pragma: no cover - the docs still build without an importable package
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# No intersphinx: the build machines have no network access.

exclude_patterns = ["_build"]
templates_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = False

html_theme = "alabaster"
html_theme_options = {
    "description": "Learned safety polytopes over LLM hidden states",
    "fixed_sidebar": True,
}
html_title = f"safeflow {release}"
