"""Sphinx configuration for selhn.

Offline by default: intersphinx is enabled only when SELHN_INTERSPHINX=1 (it needs network
access to fetch the inventories of Python and PyTorch), and formulas are written as MathML at
build time (docs/_ext/mathml.py), so the built site needs no CDN to show them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

from selhn import __version__

project = "selhn"
author = "selhn developers"
copyright = "2026, selhn developers"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "mathml",  # docs/_ext/mathml.py: formulas as MathML at build time, so they render offline
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
if os.environ.get("SELHN_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
    }

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
html_theme = "furo"
html_math_renderer = "mathml"
html_title = f"selhn {__version__}"
exclude_patterns = ["_build", "_ext"]
doctest_global_setup = "import torch\nimport selhn\n"
