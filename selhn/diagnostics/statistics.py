"""Gradient-vanishing statistics of a score matrix (:func:`vanishing_stats`), as tensors: no host sync.

Every statistic uses the package's single definition of hinge, hardest negative and gap, so
the vanishing fraction is exactly the share of anchors for which SelHN takes its fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import (
    check_mask,
    check_nonnegative,
    check_scores,
)

#: Quantiles of the gap reported by :func:`vanishing_stats`.
GAP_QUANTILES = (0.1, 0.5, 0.9)


# --------------------------------------------------------------------------- batch statistics
@dataclass(frozen=True)
class DirectionStats:
    """Statistics of one direction's anchors (0-d tensors, except ``gap_quantiles`` and
    ``vanishing``). Anchors without any negative are left out of every average, and an
    average over no anchors at all (a 1 x 1 batch, or every negative masked) is NaN.

    Attributes:
        vanishing_fraction: share of anchors with ``|gap| < epsilon`` (SelHN's fallback).
        gap_mean: mean of ``gap = s_pos - s_hardest``.
        gap_quantiles: the gap at :data:`GAP_QUANTILES` (10%, 50%, 90%).
        active_fraction: share of anchors whose hardest-negative hinge is active (> 0).
        positive_mean: mean positive similarity.
        hardest_mean: mean hardest-negative similarity.
        hard_loss_mean: mean hardest-negative hinge, the per-anchor max-violation loss;
            it equals the margin on the collapse plateau.
        vanishing: per-anchor flags (B,) of ``|gap| < epsilon``.

    Example:
        >>> import torch
        >>> from selhn.diagnostics import vanishing_stats
        >>> part = vanishing_stats(torch.eye(4)).i2t          # well separated
        >>> part.vanishing_fraction, part.gap_mean, part.active_fraction
        (tensor(0.), tensor(1.), tensor(0.))
        >>> sorted(part.to_dict("i2t/"))[:2]
        ['i2t/active_fraction', 'i2t/gap_mean']
    """

    vanishing_fraction: Tensor
    gap_mean: Tensor
    gap_quantiles: Tensor
    active_fraction: Tensor
    positive_mean: Tensor
    hardest_mean: Tensor
    hard_loss_mean: Tensor
    vanishing: Tensor

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat floats for loggers (one host sync); quantiles as ``gap_q10`` etc."""
        out: dict[str, float] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "vanishing":
                continue
            if field.name == "gap_quantiles":
                for q, v in zip(GAP_QUANTILES, value.tolist(), strict=True):
                    out[f"{prefix}gap_q{round(100 * q)}"] = v
            else:
                out[f"{prefix}{field.name}"] = float(value)
        return out


@dataclass(frozen=True)
class VanishingStats:
    """Per-direction statistics of a batch: ``i2t`` (image anchors, rows) and ``t2i``
    (caption anchors, columns), plus the collapse indicator ``offdiag_mean`` (mean score of
    the pairs that are negatives; near the positives' mean when the embeddings collapse).

    Example:
        >>> import torch
        >>> from selhn.diagnostics import vanishing_stats
        >>> stats = vanishing_stats(torch.full((4, 4), 0.5))   # fully collapsed
        >>> stats.i2t.vanishing_fraction, stats.t2i.hard_loss_mean
        (tensor(1.), tensor(0.2000))
        >>> stats.to_dict()["i2t/vanishing_fraction"]
        1.0
    """

    i2t: DirectionStats
    t2i: DirectionStats
    offdiag_mean: Tensor

    def to_dict(self) -> dict[str, float]:
        """Flat floats, ``{"i2t/vanishing_fraction": ..., "t2i/gap_mean": ..., ...}``."""
        out = self.i2t.to_dict("i2t/")
        out.update(self.t2i.to_dict("t2i/"))
        out["offdiag_mean"] = float(self.offdiag_mean)
        return out


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """The mean over the valid entries; NaN when there are none (a mean over no anchors)."""
    return torch.where(valid, values, 0).sum() / valid.sum()


def vanishing_stats(
    scores: Tensor, margin: float = 0.2, epsilon: float = 0.01, mask: Tensor | None = None
) -> VanishingStats:
    r"""Gradient-vanishing statistics of a (B, B) score matrix, as tensors (no host sync).

    For each anchor, the gap :math:`g = s_p - s_{\hat n}` to its hardest negative; the anchor
    is in the vanishing regime when :math:`|g| < \epsilon`, exactly the condition on which
    :func:`selhn.functional.selhn_loss` takes its fallback. An anchor whose row (image) or
    column (caption) holds a NaN or infinite score reads NaN in every statistic, so the
    batch's means are NaN too: non-finite scores never look healthy.

    Args:
        scores: (B, B) score matrix (rows images, columns captions, positives on the
            diagonal); it is read detached.
        margin: triplet margin (for the hinge statistics).
        epsilon: gap threshold.
        mask: optional boolean (B, B), ``True`` = not a negative (as in the losses).

    Returns:
        A :class:`VanishingStats`.

    Shape:
        - scores: :math:`(B, B)`
        - mask: :math:`(B, B)`, boolean

    Example:
        >>> import torch
        >>> from selhn.diagnostics import vanishing_stats
        >>> scores = torch.tensor([[0.9, 0.75, 0.8], [0.5, 0.5, 0.3], [0.0, 0.1, 0.8]])
        >>> stats = vanishing_stats(scores)
        >>> stats.i2t.vanishing, stats.t2i.vanishing
        (tensor([False,  True, False]), tensor([False, False,  True]))
    """
    check_scores(scores)
    margin = check_nonnegative(margin, "margin")
    epsilon = check_nonnegative(epsilon, "epsilon")
    mask = check_mask(mask, scores.shape[0], scores.device)
    work = scores.detach().to(sel.compute_dtype(scores.dtype)).clone()
    finite = torch.isfinite(work)
    positives = work.diagonal().clone()
    sel.fill_excluded_(work, mask)
    row_max, _, col_max, _ = sel.hardest_negatives(work)
    negatives = torch.isfinite(work)
    offdiag = _masked_mean(work, negatives)
    offdiag = torch.where(finite.all(), offdiag, math.nan)
    nan = torch.tensor(math.nan, dtype=work.dtype, device=work.device)
    parts = []
    for hardest, broken in ((row_max, ~finite.all(dim=1)), (col_max, ~finite.all(dim=0))):
        # an anchor with a non-finite score reads NaN in every statistic (and so do the means);
        # an anchor without negatives (all masked) is left out
        valid = torch.isfinite(hardest) | broken
        gap = sel.gap(positives, hardest)
        vanishing = sel.vanishing(gap, epsilon) & valid & ~broken
        hinge = sel.hinge(positives, hardest, margin)

        def mean(values: Tensor, broken: Tensor = broken, valid: Tensor = valid) -> Tensor:
            return _masked_mean(torch.where(broken, nan, values.to(nan.dtype)), valid)

        finite_gap = torch.where(valid & ~broken, gap, nan)
        quantiles = (
            torch.nanquantile(finite_gap, torch.tensor(GAP_QUANTILES, dtype=gap.dtype, device=gap.device))
            if gap.numel()
            else gap.new_full((len(GAP_QUANTILES),), math.nan)
        )
        parts.append(
            DirectionStats(
                vanishing_fraction=mean(vanishing),
                gap_mean=mean(gap),
                gap_quantiles=torch.where(broken.any(), nan, quantiles),
                active_fraction=mean(hinge > 0),
                positive_mean=mean(positives),
                hardest_mean=mean(hardest),
                hard_loss_mean=mean(hinge),
                vanishing=vanishing,
            )
        )
    return VanishingStats(i2t=parts[0], t2i=parts[1], offdiag_mean=offdiag)
