"""The lean core's two dense kernels over a score matrix, and their compile cache.

Both run once per ``full`` side: the forward pass's hinge sums (:func:`hinge_sums`) and the
backward pass's coefficient matrix (:func:`coefficient_blocks`). From ``COMPILE_MIN_BATCH`` on,
each runs compiled (one fused pass, no B x B temporaries), where the compiler works.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: Smallest batch for which the compiled dense kernels are used (compiling costs seconds once).
COMPILE_MIN_BATCH = 256


def hinge_sums(scores: Tensor, threshold: Tensor, alongs: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    """Per anchor of each side on ``scores``, in one pass (a square matrix's sides share their
    thresholds): the sum of its hinges ``relu(s - threshold)``, how many are active (as a float)."""
    out = []
    for along in alongs:
        t = threshold.unsqueeze(along)
        out.append((torch.relu(scores - t).sum(dim=along), (scores > t).sum(dim=along, dtype=scores.dtype)))
    return out


def coefficient_blocks(
    scores: Tensor, thresholds: Sequence[Tensor], coefs: Sequence[Tensor], alongs: Sequence[int]
) -> Tensor:
    """The ``full`` sides' coefficient matrix over ``scores``: ``coef[a]`` at each active hinge."""
    total: Tensor | None = None
    for threshold, coef, along in zip(thresholds, coefs, alongs, strict=True):
        block = torch.where(scores > threshold.unsqueeze(along), coef.unsqueeze(along), 0.0)
        total = block if total is None else total + block
    assert total is not None
    return total


_compiled: dict[str, Callable[..., Any]] = {}
#: The kernels whose compiled twin failed where the eager one worked (each is logged once).
_compile_failed: set[str] = set()


def kernel(name: str, eager: Callable[..., Any], size: int, lean: bool) -> Callable[..., Any]:
    """The compiled twin of ``eager`` when it pays off and works, else ``eager`` (also under an outer
    ``torch.compile`` and while autograd records). A failure switches that kernel (only) to eager,
    only when eager then succeeds on the same arguments; never an out-of-memory error."""
    if not lean or size < COMPILE_MIN_BATCH or torch.is_grad_enabled() or name in _compile_failed:
        return eager
    if os.environ.get("SELHN_COMPILE", "1") == "0":
        return eager
    if name in _compiled:
        return _compiled[name]
    compiled = torch.compile(eager, dynamic=True)

    def guarded(*args: Any) -> Any:
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise  # the eager kernel needs the memory too: not the compiler's failure
        except Exception as error:  # a missing C++ compiler, an unsupported backend, ...
            result = eager(*args)  # raises if the arguments, not the compiler, were the problem
            _compile_failed.add(name)
            logger.warning("selhn: compiled loss kernel %r unavailable (%s); using eager PyTorch", name, error)
            return result

    return _compiled.setdefault(name, guarded)
