r"""Candidate selection rules of the study "beyond SelHN" (docs: Results, section 5).

Each rule decides, per anchor, which negatives' hinges enter its loss. They are written
here densely and plainly over a (B, B) score matrix (rows image anchors, columns caption
anchors, positives on the diagonal, both directions used), for the study's batch of 128;
a rule moves into the library, with the lean backward, only if the study's protocol ships it.

With :math:`s_p` the anchor's positive score, :math:`s_n` its negatives' scores,
:math:`h_n = \max(0, m - s_p + s_n)` their hinges and :math:`\hat n` the hardest negative:

* ``selhn-sum``: SelHN's condition (:math:`|s_p - s_{\hat n}| < \epsilon`) with the sum of
  the hinges as the fallback instead of their mean, so that a collapsed anchor gets the sum
  of hinges' gradient (B - 1 times the mean's) rather than a vanishing one. In the library
  this is ``selhn_loss(..., fallback="sum")``.
* ``share-<tau>``: the sum of the hinges while more than a share ``tau`` of the anchor's
  negatives violate the margin, else the hardest negative's hinge. At initialisation every
  negative violates it, so training starts as the sum of hinges, before any collapse; an
  anchor that collapses later is back above ``tau`` and back on the sum.
* ``tempered-<T>``: every hinge weighted by :math:`w_n = e^{(s_n - s_{\hat n}) / T}`
  (detached; the hardest weighs 1): a smooth path from the sum of hinges (while the
  negatives' scores are within ``T`` of each other, as at a collapse) to the hardest
  negative (once they spread beyond ``T``). A hardness-weighted sum in the spirit of the
  smooth-max / multi-similarity weightings.
* ``semihard``: FaceNet's semi-hard negative (Schroff et al., CVPR 2015): the hardest
  negative scoring below the positive; an anchor with none takes its easiest negative, as
  TensorFlow Addons' ``triplet_semihard_loss`` does.

The losses are summed over anchors and directions (the VSE++ scale), or averaged with
``reduction="mean"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The study's candidates: name -> (rule, parameter). Fixed before the study's runs.
RULES: dict[str, tuple[str, float]] = {
    "selhn-sum": ("selhn-sum", math.nan),
    "share-0.5": ("share", 0.5),
    "share-0.1": ("share", 0.1),
    "tempered-0.02": ("tempered", 0.02),
    "tempered-0.1": ("tempered", 0.1),
    "semihard": ("semihard", math.nan),
}


def _one_direction(scores: Tensor, excluded: Tensor, margin: float, epsilon: float, rule: str, param: float) -> Tensor:
    """Per-anchor losses of the row anchors of ``scores`` (excluded pairs: ``True``)."""
    positive = scores.diagonal().unsqueeze(1)
    valid = ~excluded
    negatives = scores.masked_fill(excluded, -math.inf)
    hinges = torch.relu(margin - positive + negatives)  # excluded: exactly 0
    hardest = negatives.max(dim=1, keepdim=True).values
    has_negative = valid.any(dim=1)
    hard = hinges.max(dim=1).values  # the hardest negative's hinge
    total = hinges.sum(dim=1)
    if rule == "selhn-sum":
        gap = (positive - hardest).detach().squeeze(1)
        return torch.where(gap.abs() < epsilon, total, hard)
    if rule == "share":
        active = ((hinges > 0) & valid).sum(dim=1)
        share = active / valid.sum(dim=1).clamp(min=1)
        return torch.where(share.detach() > param, total, hard)
    if rule == "tempered":
        spread = (negatives - torch.where(has_negative.unsqueeze(1), hardest, 0.0)).detach()
        weights = torch.exp(spread / param)  # excluded: exp(-inf) = 0
        return (weights * hinges).sum(dim=1)
    if rule == "semihard":
        below = valid & (negatives < positive).detach()
        semi = negatives.masked_fill(~below, -math.inf).max(dim=1).values
        easiest = scores.masked_fill(excluded, math.inf).min(dim=1).values
        chosen = torch.where(below.any(dim=1), semi, easiest)
        loss = torch.relu(margin - positive.squeeze(1) + chosen)
        return torch.where(has_negative, loss, torch.zeros_like(loss))
    raise ValueError(f"rule must be one of selhn-sum, share, tempered, semihard, got {rule!r}")


def rule_loss(
    name: str, scores: Tensor, margin: float = 0.2, epsilon: float = 0.01, *, mask: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:  # fmt: skip
    """The loss of candidate ``name`` (a key of :data:`RULES`) over a (B, B) score matrix.

    ``mask`` (boolean, (B, B), optional) marks pairs that are not negatives; ``reduction`` is
    ``"sum"``, ``"mean"`` or ``"none"`` ((2, B): image anchors, then caption anchors).
    """
    if name not in RULES:
        raise ValueError(f"name must be one of {', '.join(RULES)}, got {name!r}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (B, B) matrix, got shape {tuple(scores.shape)}")
    rule, param = RULES[name]
    size = scores.shape[0]
    excluded = torch.eye(size, dtype=torch.bool, device=scores.device)
    if mask is not None:
        excluded = excluded | mask.to(torch.bool)
    per_anchor = torch.stack([
        _one_direction(scores, excluded, margin, epsilon, rule, param),
        _one_direction(scores.t(), excluded.t(), margin, epsilon, rule, param),
    ])  # fmt: skip
    if reduction == "sum":
        return per_anchor.sum()
    if reduction == "mean":
        return per_anchor.mean()
    return per_anchor
