"""The single definition of *hinge*, *hardest negative* and *gap*.

Every loss, fast path and diagnostic in the package reads these three notions from here, so
they can never disagree about which negative is the hardest or which anchor is vanishing.

Conventions (see the "Losses" docs page):

* ``scores`` is (B, B); row ``i`` is image anchor ``i`` (image-to-text), column ``j`` is
  caption anchor ``j`` (text-to-image), ``scores[k, k]`` are the positives.
* A pair ``(i, j)`` is *excluded* (not a negative of image anchor ``i`` nor of caption
  anchor ``j``) when ``i == j`` or the user's mask marks it (e.g. a shared image id).
  :func:`fill_excluded_` sets excluded scores to ``-inf``, after which the hardest negative
  of image anchor ``i`` is the maximum of row ``i`` and that of caption anchor ``j`` the
  maximum of column ``j``.
* The hinge of a negative is ``max(0, margin - s_pos + s_neg)``; its subgradient at the
  kink (argument exactly 0) is 0, i.e. a hinge is *active* when its argument is ``> 0``.
* The hardest negative of an anchor is its highest-scoring negative; a tie goes to the
  lowest index (PyTorch's ``max``/``argmax`` rule). An anchor without negatives has hardest
  score ``-inf``, hence a zero hinge and an infinite gap.
* The gap is ``s_pos - s_hardest``; an anchor is in the vanishing regime when
  ``|gap| < epsilon``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Row block of the one-pass row and column maximum (rows of S stay in cache for both).
MAX_BLOCK = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses run in float32 for half-precision inputs, else in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def hinge(positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """``max(0, margin - positive + negative)``; ``negative = -inf`` gives exactly 0."""
    return torch.relu(margin - positive + negative)


def gap(positive: Tensor, hardest: Tensor) -> Tensor:
    """``s_pos - s_hardest`` on detached scores (``+inf`` for an anchor with no negative)."""
    return positive.detach() - hardest.detach()


def vanishing(gap_: Tensor, epsilon: float) -> Tensor:
    """Anchors in the gradient-vanishing regime: ``|gap| < epsilon``."""
    return gap_.abs() < epsilon


def hardest_negatives(scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hardest negative of every image anchor (row) and caption anchor (column).

    ``scores`` must have its non-negatives set to ``-inf`` (:func:`fill_excluded_`). Returns
    the row maxima and their indices, then the column maxima and their indices; ties go to
    the lowest index.

    Large matrices are reduced in blocks of rows: each block's row maxima and its column
    maxima are taken while it is in cache, and the running column maximum keeps the earlier
    (lower) index on ties, exactly like ``max(dim=0)``.
    """
    batch = scores.shape[0]
    if batch <= 4 * MAX_BLOCK or torch.compiler.is_compiling():
        rows = scores.max(dim=1)
        cols = scores.max(dim=0)
        return rows.values, rows.indices, cols.values, cols.indices
    row_values = scores.new_empty(batch)
    row_indices = torch.empty(batch, dtype=torch.long, device=scores.device)
    col_values = scores.new_full((scores.shape[1],), float("-inf"))
    col_indices = torch.zeros(scores.shape[1], dtype=torch.long, device=scores.device)
    for start in range(0, batch, MAX_BLOCK):
        block = scores[start : start + MAX_BLOCK]
        stop = start + block.shape[0]
        torch.max(block, dim=1, out=(row_values[start:stop], row_indices[start:stop]))
        values, indices = block.max(dim=0)
        better = values > col_values
        col_values = torch.where(better, values, col_values)
        col_indices = torch.where(better, indices + start, col_indices)
    return row_values, row_indices, col_values, col_indices


def fill_excluded_(scores: Tensor, mask: Tensor | None) -> Tensor:
    """In place: set every pair that is not a negative (diagonal, ``mask``) to ``-inf``.

    On the result the hardest negative of image anchor ``i`` is the maximum of row ``i``, that
    of caption anchor ``j`` the maximum of column ``j``, and every hinge of an excluded pair
    is exactly 0, in both directions at once.
    """
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    scores.diagonal().fill_(float("-inf"))
    return scores


def negative_counts(batch: int, mask: Tensor | None, device: torch.device) -> Tensor:
    """(2, B) number of negatives of each image anchor (row 0) and caption anchor (row 1)."""
    if mask is None:
        return torch.full((2, batch), batch - 1, dtype=torch.long, device=device)
    off_diagonal = mask & ~torch.eye(batch, dtype=torch.bool, device=device)
    return (batch - 1) - torch.stack([off_diagonal.sum(dim=1), off_diagonal.sum(dim=0)])
