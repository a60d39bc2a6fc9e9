"""Sphinx configuration for selhn.

Offline by default: intersphinx is enabled only when SELHN_INTERSPHINX=1 (it needs network
access to fetch the inventories of Python and PyTorch).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from selhn import __version__

project = "selhn"
author = "selhn developers"
copyright = "2026, selhn developers"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
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
html_title = f"selhn {__version__}"
exclude_patterns = ["_build"]
doctest_global_setup = "import torch\nimport selhn\n"
