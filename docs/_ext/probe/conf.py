"""A one-page site for the test that the offline check fails a CDN math build (tests/test_docs_examples.py)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
extensions = ["mathml"]
