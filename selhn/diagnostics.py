r"""See gradient vanishing happen: batch statistics, analytic gradient norms, a monitor.

* :func:`vanishing_stats` reads a score matrix (the one your loss already has: no second
  matmul) and returns per-direction statistics as tensors, without a host sync;
* :func:`gradient_norms` gives the exact gradient norms that a loss sends to each embedding,
  computed analytically (no backward pass), also with respect to the features before the
  L2 normalisation;
* :class:`TrainingMonitor` records, per step, the gradient norm of each encoder and the batch
  statistics, keeps a bounded history, exports CSV, TensorBoard scalars and a plot;
* :class:`CollapseAlarm` says once, in plain words, when hard-negative training sits on the
  collapse plateau, and what to do about it.

Every statistic uses the package's single definition of hinge, hardest negative and gap, so
the vanishing fraction is exactly the share of anchors for which SelHN takes its fallback.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from selhn import _core
from selhn import _selection as sel
from selhn._validation import (
    check_embeddings,
    check_mask,
    check_nonnegative,
    check_positive_int,
    check_scores,
)
from selhn.rules import SelectionRule, SelHN, SumOfHinges, check_rule, resolve_rule
from selhn.types import Fallback, LossName

__all__ = [
    "CollapseAlarm",
    "CollapseWarning",
    "DirectionStats",
    "GradientNorms",
    "TrainingMonitor",
    "VanishingStats",
    "gradient_norms",
    "plot_histories",
    "vanishing_stats",
]

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


# --------------------------------------------------------------------------- gradient norms
@dataclass(frozen=True)
class GradientNorms:
    """Gradient norms per embedding, shape (B,) each.

    Attributes:
        image: norm of the gradient of the summed per-anchor losses (``reduction="sum"``)
            with respect to image embedding ``i`` (or its pre-normalisation features).
        text: the same for caption embedding ``j``.
        image_anchor: norm of the gradient that image anchor ``i``'s own loss term sends to
            its own embedding: ``|t_hat - t_i|`` for an active hard hinge.
        text_anchor: the same for caption anchor ``j``: ``|v_hat - v_j|``.

    Example:
        >>> import torch
        >>> from selhn.diagnostics import gradient_norms
        >>> norms = gradient_norms(torch.eye(2), torch.eye(2), "hn", margin=2.0)
        >>> norms.image_anchor            # |t_hat - t_i| = sqrt(2), the hinge being active
        tensor([1.4142, 1.4142])
    """

    image: Tensor
    text: Tensor
    image_anchor: Tensor
    text_anchor: Tensor


def _through_normalisation(grad: Tensor, unit: Tensor, norms: Tensor | None) -> Tensor:
    """Gradient with respect to ``u`` where ``unit = u / |u|``: ``(I - v v^T) g / |u|``."""
    if norms is None:
        return grad
    radial = (grad * unit).sum(dim=1, keepdim=True)
    return (grad - radial * unit) / norms.reshape(-1, 1)


def gradient_norms(
    img_emb: Tensor,
    txt_emb: Tensor,
    loss: LossName | SelectionRule = "selhn",
    margin: float = 0.2,
    epsilon: float | None = None,
    *,
    fallback: Fallback | None = None,
    mask: Tensor | None = None,
    img_norms: Tensor | None = None,
    txt_norms: Tensor | None = None,
) -> GradientNorms:
    r"""Exact per-embedding gradient norms of a loss, computed analytically (no backward).

    For an image anchor :math:`i` with an active hard hinge, its own term sends
    :math:`\hat t - t_i` to :math:`v_i`; in SelHN's fallback it sends
    :math:`\frac{1}{|N_i|}\sum_{n\ \text{active}} (t_n - t_i)`. With ``img_norms`` /
    ``txt_norms`` (the norms :math:`|u|` of the features before L2 normalisation,
    :math:`v = u / |u|`), every gradient is taken with respect to :math:`u` instead:
    :math:`(I - v v^\top) g / |u|`.

    Args:
        img_emb: (B, D) L2-normalised image embeddings.
        txt_emb: (B, D) L2-normalised caption embeddings.
        loss: ``"selhn"``, ``"hn"`` (max violation) or ``"sum"`` (sum of hinges), or any
            :class:`selhn.rules.SelectionRule` (by autograd through the rule's loss: the lean
            backward for a rule with a sparse form, the plain path for a dense one).
        margin: triplet margin.
        epsilon: SelHN's gap threshold for ``loss="selhn"`` (None: 0.01); refused beside a
            rule, which carries its own.
        fallback: SelHN's fallback for ``loss="selhn"``, ``"mean"`` (None) or ``"sum"``;
            refused beside a rule.
        mask: optional boolean (B, B), ``True`` = not a negative.
        img_norms: optional (B,) norms of the image features before normalisation.
        txt_norms: optional (B,) norms of the caption features before normalisation.

    Returns:
        A :class:`GradientNorms` of (B,) tensors.

    Example:
        >>> import torch
        >>> from selhn.diagnostics import gradient_norms
        >>> img = torch.eye(3)
        >>> txt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> # caption 1 duplicates caption 0: it is image 1's hardest negative's twin
        >>> gradient_norms(img, txt, "hn").image_anchor
        tensor([0., 0., 0.])
        >>> gradient_norms(img, txt, "selhn").image_anchor   # image 1 averages in caption 2
        tensor([0.0000, 0.7071, 0.0000])
    """
    check_embeddings(img_emb, txt_emb)
    rule = resolve_rule(loss, epsilon, fallback)
    margin = check_nonnegative(margin, "margin")
    batch = img_emb.shape[0]
    mask = check_mask(mask, batch, img_emb.device)
    for name, norms in (("img_norms", img_norms), ("txt_norms", txt_norms)):
        if norms is not None and (not isinstance(norms, Tensor) or norms.shape != (batch,)):
            raise ValueError(f"{name} must be a ({batch},) tensor of feature norms, got {norms!r}")
    dtype = sel.embedding_compute_dtype(img_emb, txt_emb)
    img = img_emb.detach().to(dtype)
    txt = txt_emb.detach().to(dtype)
    d_img, d_txt, anchor_img, anchor_txt = _rule_gradients(img, txt, mask, rule, margin)
    return GradientNorms(
        image=_through_normalisation(d_img, img, img_norms).norm(dim=1),
        text=_through_normalisation(d_txt, txt, txt_norms).norm(dim=1),
        image_anchor=_through_normalisation(anchor_img, img, img_norms).norm(dim=1),
        text_anchor=_through_normalisation(anchor_txt, txt, txt_norms).norm(dim=1),
    )


def _rule_gradients(
    img: Tensor, txt: Tensor, mask: Tensor | None, rule: SelectionRule, margin: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients :func:`gradient_norms` reads, for any rule, by autograd through the loss
    (the lean backward for a rule with a sparse form). Image anchor ``i``'s loss depends on
    image ``i`` alone among the images (row ``i`` of the scores), so the image anchors' summed
    losses differentiated by the images give each anchor's gradient through its own loss;
    likewise for the caption anchors and the captions."""
    with torch.enable_grad():
        img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
        per_anchor = _core.embedding_losses(img, txt, mask, margin, rule)
        anchor_img, txt_from_images = torch.autograd.grad(per_anchor[0].sum(), (img, txt), retain_graph=True)
        img_from_captions, anchor_txt = torch.autograd.grad(per_anchor[1].sum(), (img, txt))
    return anchor_img + img_from_captions, txt_from_images + anchor_txt, anchor_img, anchor_txt


# --------------------------------------------------------------------------- the alarm
class CollapseWarning(UserWarning):
    """Hard-negative training sits on the collapse plateau (raised once by :class:`CollapseAlarm`).

    Example:
        >>> import warnings
        >>> from selhn.diagnostics import CollapseWarning
        >>> warnings.simplefilter("error", CollapseWarning)   # make the plateau stop a run
        >>> warnings.resetwarnings()
    """


class CollapseAlarm:
    r"""Detects the collapse plateau of hard-negative training and says so once.

    On the plateau every anchor's hardest negative sits on its positive, so the per-anchor
    max-violation loss is the margin (the summed VSE++ loss reads :math:`2 B m`) and the
    gradients to both encoders vanish. The alarm fires when, for ``patience`` consecutive
    checks, in both directions the mean hardest-negative hinge is within ``tolerance`` (a
    fraction of the margin) of the margin and at least ``min_vanishing`` of the anchors have
    their hardest negative within epsilon of their positive (the hinge alone cannot tell a
    collapse from a separated batch at margin 0). Non-finite statistics never read as the
    plateau. It warns once (a :class:`CollapseWarning`) with the fix, then stays quiet until
    training has left the plateau: once the vanishing fraction falls below ``rearm_below`` in
    both directions it re-arms, so that a second collapse later in the run (the one that
    unfreezing a backbone can cause) is reported too.

    Args:
        margin: the triplet margin.
        tolerance: relative tolerance around the margin.
        patience: consecutive plateau checks before firing.
        min_vanishing: share of anchors in the vanishing regime, per direction, that the
            plateau needs.
        rearm_below: vanishing fraction, in both directions, below which a fired alarm
            re-arms; ``None`` never re-arms (one warning per run).

    Example:
        >>> import torch, warnings
        >>> from selhn.diagnostics import CollapseAlarm, vanishing_stats
        >>> alarm = CollapseAlarm(margin=0.2, patience=2)
        >>> collapsed = vanishing_stats(torch.full((8, 8), 0.3))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     fired = [alarm.check(collapsed) for _ in range(3)]
        >>> fired, len(caught)
        ([False, True, False], 1)
    """

    def __init__(
        self,
        margin: float = 0.2,
        tolerance: float = 0.02,
        patience: int = 3,
        min_vanishing: float = 0.5,
        rearm_below: float | None = 0.1,
    ) -> None:
        self.margin = check_nonnegative(margin, "margin")
        self.tolerance = check_nonnegative(tolerance, "tolerance")
        self.patience = check_positive_int(patience, "patience")
        self.min_vanishing = check_nonnegative(min_vanishing, "min_vanishing")
        if self.min_vanishing > 1:
            raise ValueError(f"min_vanishing is a share of anchors, so in [0, 1], got {min_vanishing}")
        self.rearm_below = None if rearm_below is None else check_nonnegative(rearm_below, "rearm_below")
        if self.rearm_below is not None and self.rearm_below > self.min_vanishing:
            raise ValueError(
                f"rearm_below ({rearm_below}) must not exceed min_vanishing ({min_vanishing}): the alarm re-arms "
                "only once training has left the plateau"
            )
        self.streak = 0
        self.fired = False

    def on_plateau(self, stats: VanishingStats) -> bool:
        """Whether this batch reads as the plateau (one host sync)."""
        limit = self.tolerance * self.margin
        losses = torch.stack([stats.i2t.hard_loss_mean, stats.t2i.hard_loss_mean])
        vanishing = torch.stack([stats.i2t.vanishing_fraction, stats.t2i.vanishing_fraction])
        # NaN compares False: a batch with non-finite scores never reads as the plateau
        return bool(((losses - self.margin).abs() <= limit).all() & (vanishing >= self.min_vanishing).all())

    def left_plateau(self, stats: VanishingStats) -> bool:
        """Whether the vanishing fraction is below ``rearm_below`` in both directions (NaN: no)."""
        vanishing = torch.stack([stats.i2t.vanishing_fraction, stats.t2i.vanishing_fraction])
        return bool((vanishing < (self.rearm_below or 0.0)).all())

    def check(self, stats: VanishingStats, batch_size: int | None = None, rule: SelectionRule | None = None) -> bool:
        """Update with one batch; return ``True`` exactly when the alarm fires. ``rule``, the
        selection rule being trained (when known), decides the advice: a run that already
        trains with SelHN is not told to switch to SelHN."""
        self.streak = self.streak + 1 if self.on_plateau(stats) else 0
        if self.fired and self.rearm_below is not None and self.left_plateau(stats):
            self.fired = False
        if self.fired or self.streak < self.patience:
            return False
        self.fired = True
        vanishing = 50 * float(stats.i2t.vanishing_fraction + stats.t2i.vanishing_fraction)
        scale = f" (summed VSE++ scale: 2*B*margin = {2 * batch_size * self.margin:g})" if batch_size else ""
        message = (
            f"selhn: training looks stuck on the collapse plateau. For {self.streak} checks in a row the "
            f"hardest-negative loss per anchor has been the margin, {self.margin:g}{scale}, and "
            f"{vanishing:.0f}% of anchors have their hardest negative within epsilon of their positive: the "
            "hard-negative gradients to both encoders vanish here and recall stays at chance. " + advice(rule)
        )
        warnings.warn(message, CollapseWarning, stacklevel=2)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Where the alarm stands (the checks in a row on the plateau, and whether it has fired),
        as plain data for a checkpoint: a resumed run given it back warns no second time.

        Example:
            >>> from selhn.diagnostics import CollapseAlarm
            >>> alarm = CollapseAlarm()
            >>> alarm.streak, alarm.fired = 2, True
            >>> resumed = CollapseAlarm()
            >>> resumed.load_state_dict(alarm.state_dict())
            >>> resumed.streak, resumed.fired
            (2, True)
        """
        return {"streak": self.streak, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`state_dict`; an entry of the wrong kind is refused by name."""
        streak, fired = _state_entries(state, "CollapseAlarm", ("streak", "fired"))
        if not isinstance(streak, int) or isinstance(streak, bool) or streak < 0:
            raise ValueError(f"CollapseAlarm state: 'streak' must be an int >= 0, got {streak!r}")
        if not isinstance(fired, bool):
            raise ValueError(f"CollapseAlarm state: 'fired' must be a bool, got {fired!r}")
        self.streak, self.fired = streak, fired


def _epsilon_of(rule: SelectionRule | None, otherwise: float = 0.01) -> float:
    """The epsilon a monitor measures the vanishing fraction at: SelHN's own, else ``otherwise``."""
    return rule.epsilon if isinstance(rule, SelHN) else otherwise


def _state_entries(state: Any, owner: str, names: tuple[str, ...]) -> list[Any]:
    """The entries ``names`` of a state dict, in order; a state that is no mapping or lacks one is refused."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner} state must be a mapping (from state_dict()), got {type(state).__name__}")
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"{owner} state lacks {', '.join(map(repr, missing))} (it holds {sorted(state)})")
    return [state[name] for name in names]


#: The epsilon the docs advise for SelHN when training starts from scratch (cosine scores):
#: measured on the docs' calibrated benchmark, where the authors' 0.01 leaves the plateau late.
ADVISED_EPSILON = 0.05

_WHERE = "the docs' page 'Which loss, which epsilon?'"


def advice(rule: SelectionRule | None) -> str:
    """What the collapse alarm suggests, for the rule being trained (None: not known).

    The advice is the docs' page "Which loss, which epsilon?" in one paragraph: with hard
    negatives, switch to SelHN at epsilon 0.05 or warm up with the sum of hinges; a run that
    already trains with SelHN below 0.05 is told to raise epsilon to 0.05, not to switch to
    SelHN; with the sum of hinges the plateau ends by itself.
    """
    if isinstance(rule, SelHN):
        text = (
            f"This run trains with SelHN (epsilon {rule.epsilon:g}), which takes its fallback, the "
            f"{rule.fallback} over all negatives, for exactly these anchors, so their gradients do not vanish; "
        )
        if rule.epsilon < ADVISED_EPSILON:
            return text + (
                f"at this epsilon it leaves the plateau late. Pass epsilon={ADVISED_EPSILON:g} (scaled with the scores "
                "if they are not cosine similarities): on the docs' benchmark, from a cold start, it ended not worse "
                "than a sum-of-hinges warm-up (though it reached useful recall later), and after a backbone was "
                "unfrozen it recovered without a schedule. Or, from a cold start, warm up with the sum of hinges for "
                f"one epoch (selhn.ContrastiveLoss with max_violation_off(), then max_violation_on()); see {_WHERE}."
            )
        return text + (
            "on the docs' benchmark it left the plateau within a few hundred steps, at a cold start and after a "
            "backbone was unfrozen. If it does not: at a cold start, warm up with the sum of hinges for one epoch "
            "(selhn.ContrastiveLoss with max_violation_off(), then max_violation_on()); after a backbone was "
            "unfrozen, use VSE-infinity's whole schedule (the backbone unfrozen block by block, the loss ramped), "
            "not the warm-up alone, which went back to the plateau there. Check the learning rate in both cases; "
            f"see {_WHERE}."
        )
    if isinstance(rule, SumOfHinges):
        return (
            "This run trains with the sum of hinges, whose gradients do not vanish here: the plateau should end "
            "by itself; if it does not, check the learning rate and the features' scale."
        )
    return (
        f"Fix: train with selhn.SelHNLoss(epsilon={ADVISED_EPSILON:g}) (it falls back to all negatives for exactly "
        "these anchors), or warm up with the sum of hinges for one epoch (selhn.ContrastiveLoss with "
        "max_violation_off(), then max_violation_on()). If it started when a backbone was unfrozen, the same "
        f"selhn.SelHNLoss(epsilon={ADVISED_EPSILON:g}) recovered from that without a schedule on the docs' benchmark; "
        "or unfreeze the backbone block by block with the loss ramped, as VSE-infinity's whole schedule does (the "
        "docs measured both with the backbone at ten times the learning rate; see "
        f"{_WHERE})."
    )


# --------------------------------------------------------------------------- the monitor
def _parameters(source: nn.Module | Iterable[nn.Parameter], name: str) -> list[nn.Parameter]:
    if isinstance(source, nn.Module):
        return list(source.parameters())
    if isinstance(source, Tensor) or not isinstance(source, Iterable):
        raise TypeError(f"{name} must be an nn.Module or an iterable of its parameters, got {type(source).__name__}")
    params = list(source)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{name} must be an nn.Module or an iterable of its parameters (tensors)")
    return params


def _grad_norm(params: Sequence[Tensor], device: torch.device) -> Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2.0)
    total: Tensor = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
    return total


class TrainingMonitor:
    """Per-step gradient norms of two encoders plus the batch statistics, with low overhead.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.zero_grad()``. It adds
    no backward pass and no host sync: each step's values stay on the device as one small
    tensor, and they are read only every ``log_every`` steps (when the alarm is checked and
    :meth:`step` returns the values as floats) or when you export the history.

    Args:
        image_encoder: the image encoder (module or its parameters).
        text_encoder: the text encoder (module or its parameters).
        margin: triplet margin for the statistics.
        epsilon: SelHN's gap threshold for the statistics.
        history: most steps kept (older ones are dropped).
        log_every: read values back (and check the alarm) every this many steps.
        alarm: a :class:`CollapseAlarm`, ``True`` for a default one, ``False`` for none.
        rule: the selection rule being trained (a loss module's ``rule``), for the alarm's
            advice; set :attr:`rule` again when it changes (a warm-up's switch).

    Attributes:
        alarm_steps: the steps at which the alarm fired (empty while it never has).

    Example:
        >>> import torch, selhn
        >>> from selhn.diagnostics import TrainingMonitor
        >>> img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
        >>> monitor = TrainingMonitor(img_enc, txt_enc, log_every=1)
        >>> img = torch.nn.functional.normalize(img_enc(torch.randn(6, 4)), dim=1)
        >>> txt = torch.nn.functional.normalize(txt_enc(torch.randn(6, 5)), dim=1)
        >>> scores = img @ txt.T
        >>> loss = selhn.functional.selhn_loss(scores)
        >>> loss.backward()
        >>> logged = monitor.step(scores, loss)
        >>> sorted(logged)[:3]
        ['i2t/active_fraction', 'i2t/gap_mean', 'i2t/gap_q10']
        >>> monitor.history()["step"]
        [1.0]
    """

    def __init__(
        self,
        image_encoder: nn.Module | Iterable[nn.Parameter],
        text_encoder: nn.Module | Iterable[nn.Parameter],
        *,
        margin: float = 0.2,
        epsilon: float = 0.01,
        history: int = 100_000,
        log_every: int = 50,
        alarm: CollapseAlarm | bool = True,
        rule: SelectionRule | None = None,
    ) -> None:
        self.image_params = _parameters(image_encoder, "image_encoder")
        self.text_params = _parameters(text_encoder, "text_encoder")
        self.margin = check_nonnegative(margin, "margin")
        self.epsilon = check_nonnegative(epsilon, "epsilon")
        log_every = check_positive_int(log_every, "log_every")
        history = check_positive_int(history, "history")
        self.log_every = log_every
        if not isinstance(alarm, (CollapseAlarm, bool)):
            raise TypeError(
                f"alarm must be a CollapseAlarm, True (a default one) or False (none), got {type(alarm).__name__} "
                f"{alarm!r}"
            )
        self.alarm: CollapseAlarm | None = CollapseAlarm(margin) if alarm is True else (alarm or None)
        self.rule = None if rule is None else check_rule(rule)
        self._loss: Any = None  # the loss module followed (for_loss), or None
        self.steps = 0
        self.alarm_steps: list[int] = []
        self._records: deque[Tensor] = deque(maxlen=history)
        self._last: dict[str, float] = {}
        self.columns: list[str] = []

    @classmethod
    def for_loss(
        cls,
        loss: nn.Module,
        image_encoder: nn.Module | Iterable[nn.Parameter],
        text_encoder: nn.Module | Iterable[nn.Parameter],
        **options: Any,
    ) -> TrainingMonitor:
        """A monitor of a training run that uses ``loss`` (a selhn loss module): it takes the
        loss's margin, and at every step its rule (a warm-up's switch included) for the alarm's
        advice and, for SelHN, its epsilon for the vanishing fraction, so the monitor measures
        what the loss uses and never advises the rule already in use. ``options`` are the
        other arguments of :class:`TrainingMonitor` (``log_every``, ``alarm``, ``history``).

        Example:
            >>> import torch, selhn
            >>> from selhn.diagnostics import TrainingMonitor
            >>> criterion = selhn.SelHNLoss(epsilon=0.05)
            >>> image_encoder, text_encoder = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
            >>> monitor = TrainingMonitor.for_loss(criterion, image_encoder, text_encoder, log_every=1)
            >>> monitor.rule, monitor.epsilon, monitor.margin
            (SelHN(epsilon=0.05, fallback='mean'), 0.05, 0.2)
        """
        rule = getattr(loss, "rule", None)
        if not isinstance(rule, SelectionRule) or not hasattr(loss, "margin"):
            raise TypeError(
                f"loss must be a selhn loss module (with a rule and a margin, e.g. selhn.SelHNLoss), "
                f"got {type(loss).__name__}"
            )
        unknown = sorted(set(options) - {"history", "log_every", "alarm"})
        if unknown:
            raise TypeError(f"for_loss takes the margin, epsilon and rule from the loss; unknown option(s): {unknown}")
        margin: float = getattr(loss, "margin")  # noqa: B009 (a module's attribute: typed here)
        monitor = cls(image_encoder, text_encoder, margin=margin, epsilon=_epsilon_of(rule), rule=rule, **options)
        monitor._loss = loss
        return monitor

    def _follow_the_loss(self) -> None:
        """With :meth:`for_loss`: this step's rule and, for SelHN, its epsilon."""
        if self._loss is not None:
            self.rule = self._loss.rule
            self.epsilon = _epsilon_of(self.rule, self.epsilon)

    def step(
        self, scores: Tensor | None = None, loss: Tensor | None = None, *, mask: Tensor | None = None
    ) -> dict[str, float] | None:
        """Record one training step; returns its values as floats on logging steps, else None."""
        self._follow_the_loss()
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss must be a one-element torch.Tensor or None, got {type(loss).__name__}")
            if loss.is_meta:
                raise ValueError("loss is a meta tensor (a shape without values): the monitor records real values")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be the scalar training loss (one element), got shape {tuple(loss.shape)}: "
                    "reduce it first (reduction='mean' or 'sum')"
                )
        self.steps += 1
        device = scores.device if scores is not None else (loss.device if loss is not None else torch.device("cpu"))
        values: dict[str, Tensor] = {
            "step": torch.tensor(float(self.steps), device=device),
            "loss": loss.detach().float().reshape(()) if loss is not None else torch.tensor(math.nan, device=device),
            "image_grad_norm": _grad_norm(self.image_params, device),
            "text_grad_norm": _grad_norm(self.text_params, device),
        }
        stats = vanishing_stats(scores, self.margin, self.epsilon, mask) if scores is not None else None
        if stats is not None:
            for prefix, part in (("i2t/", stats.i2t), ("t2i/", stats.t2i)):
                for field in fields(part):
                    if field.name == "vanishing":
                        continue
                    value = getattr(part, field.name)
                    if field.name == "gap_quantiles":
                        for q, v in zip(GAP_QUANTILES, value, strict=True):
                            values[f"{prefix}gap_q{round(100 * q)}"] = v
                    else:
                        values[prefix + field.name] = value
            values["offdiag_mean"] = stats.offdiag_mean
        names = list(values)
        if self.columns and names != self.columns:
            raise ValueError("call step() the same way every time (with or without scores)")
        self.columns = names
        record = torch.stack([v.to(device=device, dtype=torch.float32) for v in values.values()])
        self._records.append(record)
        if self.steps % self.log_every:
            return None
        self._last = dict(zip(names, record.tolist(), strict=True))
        if self.alarm is not None and stats is not None:
            batch_size = scores.shape[0] if scores is not None else None
            if self.alarm.check(stats, batch_size=batch_size, rule=self.rule):
                self.alarm_steps.append(self.steps)
        return dict(self._last)

    def scalars(self) -> dict[str, float]:
        """The last logged values, for ``writer.add_scalar(name, value, step)``."""
        return {k: v for k, v in self._last.items() if k != "step"}

    def history(self) -> dict[str, list[float]]:
        """Every kept step's values, column by column (one host sync)."""
        if not self._records:
            return {name: [] for name in self.columns}
        table = torch.stack([r.cpu() for r in self._records]).t().tolist()
        return dict(zip(self.columns, table, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Where the monitor stands, as plain data for a checkpoint: its step count, the steps at
        which the alarm fired and the alarm's own state. The recorded history is not in it (write
        it with :meth:`to_csv`); a resumed run given this state back numbers its steps on and
        warns no second time for a collapse already reported.

        Example:
            >>> import torch
            >>> from selhn.diagnostics import TrainingMonitor
            >>> encoder = torch.nn.Linear(2, 2)
            >>> monitor = TrainingMonitor(encoder, encoder, log_every=1)
            >>> _ = monitor.step(torch.eye(3), torch.tensor(0.5))
            >>> resumed = TrainingMonitor(encoder, encoder, log_every=1)
            >>> resumed.load_state_dict(monitor.state_dict())
            >>> resumed.steps
            1
        """
        return {
            "steps": self.steps,
            "alarm_steps": list(self.alarm_steps),
            "alarm": None if self.alarm is None else self.alarm.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`state_dict`; an entry of the wrong kind is refused by name."""
        steps, alarm_steps, alarm = _state_entries(state, "TrainingMonitor", ("steps", "alarm_steps", "alarm"))
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"TrainingMonitor state: 'steps' must be an int >= 0, got {steps!r}")
        if not isinstance(alarm_steps, (list, tuple)) or not all(
            isinstance(step, int) and not isinstance(step, bool) for step in alarm_steps
        ):
            raise ValueError(f"TrainingMonitor state: 'alarm_steps' must be a list of ints, got {alarm_steps!r}")
        if self.alarm is not None and alarm is not None:
            self.alarm.load_state_dict(alarm)
        self.steps, self.alarm_steps = steps, list(alarm_steps)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the kept history as CSV, one row per step.

        The file is written whole or not at all: the rows go to a temporary file beside
        ``path``, which then replaces it, so a full disk or a crash leaves the previous file
        as it was (and no temporary file behind).
        """
        history = self.history()
        target = os.path.abspath(os.fspath(path))
        temporary: str | None = None
        try:
            # a temporary file of this call's own: two writers to one path never share one
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target)
            )
            with os.fdopen(descriptor, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(self.columns)
                writer.writerows(zip(*(history[c] for c in self.columns), strict=True))
            # mkstemp's file is private (0600): take the replaced file's mode, else an ordinary file's
            os.chmod(temporary, os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o644)
            os.replace(temporary, target)
        except BaseException as error:
            if temporary is not None:  # whatever failed, no temporary file stays behind
                with contextlib.suppress(OSError):
                    os.remove(temporary)
            if not isinstance(error, OSError):
                raise
            reason = error.strerror or str(error)
            raise OSError(
                error.errno, f"could not write the history to {target}: {reason} (any earlier file there is intact)"
            ) from error

    def plot(self, path: str | os.PathLike[str], **others: TrainingMonitor) -> None:
        """Draw this run (and any others, by label) with :func:`plot_histories`."""
        plot_histories(path, {"this run": self, **others})


def plot_histories(
    path: str | os.PathLike[str], runs: Mapping[str, TrainingMonitor | Mapping[str, Sequence[float]]]
) -> None:
    """Plot gradient norms, vanishing fraction and loss against the step, runs overlaid.

    Needs matplotlib (``pip install matplotlib``, or selhn's ``plot`` extra).

    Args:
        path: the PNG to write.
        runs: label -> a :class:`TrainingMonitor` or a history dict (as from
            :meth:`TrainingMonitor.history` or a CSV), e.g. ``{"HN": hn, "SelHN": selhn}``.

    Example:
        >>> import os, tempfile
        >>> from selhn.diagnostics import plot_histories
        >>> history = {"step": [1.0, 2.0], "loss": [0.2, 0.1], "image_grad_norm": [1.0, 0.5],
        ...            "text_grad_norm": [1.0, 0.4], "i2t/vanishing_fraction": [1.0, 0.5],
        ...            "t2i/vanishing_fraction": [1.0, 0.3]}
        >>> path = os.path.join(tempfile.mkdtemp(), "runs.png")
        >>> plot_histories(path, {"HN": history, "SelHN": history})
        >>> os.path.getsize(path) > 0
        True
    """
    try:  # a Figure on its own Agg canvas: no pyplot, so the caller's backend and figures are untouched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (selhn's 'plot' extra)") from error
    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for label, run in runs.items():
        history = run.history() if isinstance(run, TrainingMonitor) else run
        steps = history["step"]
        axes[0].plot(steps, history["image_grad_norm"], label=f"{label}: image encoder")
        axes[0].plot(steps, history["text_grad_norm"], "--", label=f"{label}: text encoder")
        if "i2t/vanishing_fraction" in history:
            both = [
                (a + b) / 2
                for a, b in zip(history["i2t/vanishing_fraction"], history["t2i/vanishing_fraction"], strict=True)
            ]
            axes[1].plot(steps, both, label=label)
        axes[2].plot(steps, history["loss"], label=label)
    axes[0].set(yscale="log", xlabel="step", ylabel="gradient norm", title="encoder gradient norms")
    axes[1].set(
        xlabel="step", ylabel="share of anchors", title="vanishing fraction (|gap| < epsilon)", ylim=(-0.02, 1.02)
    )
    axes[2].set(xlabel="step", ylabel="loss", title="loss")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
