"""The single definition of *hinge*, *hardest negative* and *gap*.

Every loss, fast path and diagnostic in the package reads these three notions from here, so
they can never disagree about which negative is the hardest or which anchor is vanishing.

Conventions (see the "Losses" docs page):

* ``scores`` is (B, B); row ``i`` is image anchor ``i`` (image-to-text), column ``j`` is
  caption anchor ``j`` (text-to-image), ``scores[k, k]`` are the positives.
* A *direction view* is a matrix whose row ``a`` is anchor ``a``: ``scores`` itself for
  images, ``scores.T`` for captions.
* ``excluded[a, n]`` is ``True`` when candidate ``n`` is not a negative of anchor ``a``:
  the diagonal always, plus any pair masked by the user (e.g. a shared image id).
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses run in float32 for half-precision inputs, else in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def excluded_pairs(batch: int, mask: Tensor | None, device: torch.device) -> Tensor:
    """(B, B) boolean matrix of pairs that are not negatives: the diagonal plus ``mask``."""
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    return eye if mask is None else mask | eye


def direction_views(scores: Tensor, excluded: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The image-anchor view and the caption-anchor view of ``(scores, excluded)``."""
    return (scores, excluded), (scores.t(), excluded.t())


def negative_scores(view: Tensor, excluded: Tensor) -> Tensor:
    """The view with every non-negative replaced by ``-inf`` (a sentinel no score can beat)."""
    return view.masked_fill(excluded, float("-inf"))


def hinge(positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """``max(0, margin - positive + negative)``; ``negative = -inf`` gives exactly 0."""
    return torch.relu(margin - positive + negative)


def hardest_negative(negatives: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise highest score and its index (lowest index on ties) of a ``-inf``-masked view."""
    values, indices = negatives.max(dim=1)
    return values, indices


def gap(positive: Tensor, hardest: Tensor) -> Tensor:
    """``s_pos - s_hardest`` on detached scores (``+inf`` for an anchor with no negative)."""
    return positive.detach() - hardest.detach()


def vanishing(gap_: Tensor, epsilon: float) -> Tensor:
    """Anchors in the gradient-vanishing regime: ``|gap| < epsilon``."""
    return gap_.abs() < epsilon


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
