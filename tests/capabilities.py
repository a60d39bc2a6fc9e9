"""What this machine's torch can do, for tests that need it."""

from __future__ import annotations

import torch


def compile_works() -> bool:
    """Whether ``torch.compile`` runs here (it needs a C++ compiler on a CPU)."""
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(2))
        return True
    except Exception:
        return False
