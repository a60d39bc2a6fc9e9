r"""Selection rules: which negatives' hinges count for each anchor, and with which weight.

Every triplet loss of this field has one form. For an anchor :math:`a` with positive score
:math:`s_p`, negatives :math:`n \in N_a` and hinges :math:`h_n = \max(0,\ m - s_p + s_n)`,

.. math::

    \ell_a = \sum_{n \in N_a} w_{an}\, h_n ,

where the weights :math:`w_{an}` are chosen from the (detached) scores and carry no
gradient. A *selection rule* is that choice:

* :class:`MaxViolation` (VSE++): weight 1 on the hardest negative, 0 elsewhere;
* :class:`SumOfHinges` (VSE0): weight 1 on every negative;
* :class:`SelHN`: per anchor, the sum of hinges' weights divided by :math:`|N_a|` (its mean)
  while the gap :math:`|s_p - s_{\hat n}|` is below epsilon, else max violation's.

Write your own by subclassing :class:`SelectionRule` and returning the weights from
:meth:`SelectionRule.weights`; it sees one direction's anchors at a time as an
:class:`Anchors` (scores, positives, which candidates are negatives, the hardest negative,
the gap, the hinges). :class:`selhn.RuleLoss` and :func:`selhn.functional.rule_loss` turn
any rule into a loss over embeddings or over a score matrix;
:func:`selhn.distributed.global_loss` and :func:`selhn.diagnostics.gradient_norms` take a
rule too, and :mod:`selhn.testing`'s helpers test the loss it gives.

Any rule is computed exactly by plain autograd over its weighted hinges (:func:`side_losses`).
The three built-in rules are also served by the package's lean backward (the same values
and gradients, in less time and memory; the tests hold both paths to the literal loop
references); a rule of your own takes the plain path, and so does a subclass of a built-in
rule.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import Mode, as_fallback, as_mode, check_float_tensor, check_nonnegative
from selhn.types import Fallback

__all__ = ["Anchors", "MaxViolation", "SelHN", "SelectionRule", "SumOfHinges", "rule_settings", "side_losses"]


@dataclass(frozen=True, eq=False)
class Anchors:
    """One direction's anchors of a batch, as a selection rule sees them. Every tensor is
    detached; anchors are rows, candidates columns.

    For image anchors (image-to-text) row ``a`` is image ``a`` against the captions; for
    caption anchors (text-to-image) row ``a`` is caption ``a`` against the images. Under
    :func:`selhn.distributed.global_loss` the candidates are the global batch.

    Attributes:
        scores: (L, C) the score of each anchor with each candidate; ``-inf`` where the
            candidate is not a negative (the anchor's positive, and masked pairs).
        positive: (L,) each anchor's positive score.
        negatives: (L, C) boolean, ``True`` where the candidate is a negative of the anchor.
        margin: the triplet margin :math:`m`.
        copies: optional (C,) for each candidate the lowest index of a candidate whose
            embedding equals its own (:func:`selhn._selection.first_copies`), where the loss
            knows the embeddings; None (a score matrix, or no two equal) otherwise. Exact copies
            tie in exact arithmetic but not in rounded scores: with ``copies``, the hardest
            negative among them is the lowest-index copy that is a negative of the anchor.

    Example:
        >>> import torch
        >>> from selhn.rules import Anchors
        >>> inf = float("-inf")
        >>> anchors = Anchors(torch.tensor([[inf, 0.5, 0.7]]), torch.tensor([0.6]),
        ...                   torch.tensor([[False, True, True]]), margin=0.2)
        >>> anchors.hardest, anchors.hardest_index, anchors.gap
        (tensor([0.7000]), tensor([2]), tensor([-0.1000]))
        >>> anchors.hinges
        tensor([[0.0000, 0.1000, 0.3000]])
    """

    scores: Tensor
    positive: Tensor
    negatives: Tensor
    margin: float
    copies: Tensor | None = None

    @functools.cached_property
    def _hardest(self) -> tuple[Tensor, Tensor]:
        values, index = sel.max_along(self.scores, 1)
        return values, sel.lowest_copy(self.scores, index, self.copies)

    @property
    def hardest(self) -> Tensor:
        """(L,) the hardest (highest-scoring) negative's score; ``-inf`` without negatives."""
        return self._hardest[0]

    @property
    def hardest_index(self) -> Tensor:
        """(L,) the hardest negative's candidate (ties, and exact copies: the lowest index)."""
        return self._hardest[1]

    @property
    def gap(self) -> Tensor:
        """(L,) ``positive - hardest``: SelHN's gradient-vanishing signal (``+inf`` without negatives)."""
        return sel.gap(self.positive, self.hardest)

    @property
    def hinges(self) -> Tensor:
        """(L, C) ``max(0, margin - positive + score)``: 0 where the candidate is no negative."""
        return sel.hinge(self.positive.unsqueeze(1), self.scores, self.margin)

    @property
    def count(self) -> Tensor:
        """(L,) the number of negatives of each anchor, :math:`|N_a|`."""
        return self.negatives.sum(dim=1)

    def one_hot(self, index: Tensor) -> Tensor:
        """(L, C) weights 1 at candidate ``index[a]`` of each anchor (0 where it is no negative)."""
        chosen = torch.zeros_like(self.scores).scatter_(1, index.unsqueeze(1), 1.0)
        return torch.where(self.negatives, chosen, 0.0)


class SelectionRule(abc.ABC):
    """A selection rule: per anchor, the weight of each negative's hinge in its loss.

    Subclass it and implement :meth:`weights`. The weights are taken as constants (no
    gradient flows through the selection), must be finite, and count only at negatives
    (whatever a rule returns elsewhere is ignored). Keep the rule's settings as attributes: the
    distributed loss compares rules across ranks by class and attributes (:func:`rule_settings`).
    A readable ``repr`` helps too: the modules print it. A rule must choose each anchor's weights
    from that anchor's row alone (no statistic over the batch of anchors), or the distributed
    loss is not the one-process loss.

    Example:
        >>> import torch
        >>> import selhn
        >>> from selhn.rules import SelectionRule
        >>> class Tempered(SelectionRule):
        ...     '''Every hinge weighted by exp((s_n - s_hardest) / T): near the sum of
        ...     hinges while the negatives are close, near the hardest negative once they spread.'''
        ...     def __init__(self, temperature: float) -> None:
        ...         self.temperature = temperature
        ...     def weights(self, anchors):
        ...         spread = anchors.scores - anchors.hardest.unsqueeze(1)   # <= 0 at the negatives
        ...         return torch.exp(spread / self.temperature)
        ...     def __repr__(self) -> str:
        ...         return f"Tempered({self.temperature})"
        >>> criterion = selhn.RuleLoss(Tempered(0.05))
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> loss = criterion(img, txt)
        >>> bool(loss >= 0)
        True
    """

    @abc.abstractmethod
    def weights(self, anchors: Anchors) -> Tensor:
        """The (L, C) weights of the hinges of ``anchors`` (one direction's anchors)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class MaxViolation(SelectionRule):
    r"""VSE++'s max violation: weight 1 on the hardest negative, :math:`\ell_a = h_{\hat n}`.

    Example:
        >>> import torch
        >>> from selhn.functional import rule_loss, max_violation_loss
        >>> from selhn.rules import MaxViolation
        >>> scores = torch.rand(5, 5)
        >>> torch.equal(rule_loss(scores, MaxViolation()), max_violation_loss(scores))
        True
    """

    def weights(self, anchors: Anchors) -> Tensor:
        return anchors.one_hot(anchors.hardest_index)


@dataclass(frozen=True)
class SumOfHinges(SelectionRule):
    r"""VSE0's sum of hinges: weight 1 on every negative, :math:`\ell_a = \sum_n h_n`.

    Example:
        >>> import torch
        >>> from selhn.functional import rule_loss, sum_hinge_loss
        >>> from selhn.rules import SumOfHinges
        >>> scores = torch.rand(5, 5)
        >>> torch.allclose(rule_loss(scores, SumOfHinges()), sum_hinge_loss(scores))
        True
    """

    def weights(self, anchors: Anchors) -> Tensor:
        return anchors.negatives.to(anchors.scores.dtype)


@dataclass(frozen=True)
class SelHN(SelectionRule):
    r"""SelHN: per anchor, the mean (or sum) of all its hinges while
    :math:`|s_p - s_{\hat n}| < \epsilon`, else the hardest negative's hinge.

    The built-in rules are frozen dataclasses: their settings are checked once, cannot be
    changed afterwards (make a new rule instead), and two rules with equal settings are equal.

    Args:
        epsilon: the gap threshold :math:`\epsilon` (>= 0; the authors' 0.01).
        fallback: ``"mean"`` (weights :math:`1 / |N_a|`, the authors' code) or ``"sum"``
            (weights 1) for an anchor in the vanishing regime.

    Example:
        >>> import torch
        >>> from selhn.functional import rule_loss, selhn_loss
        >>> from selhn.rules import SelHN
        >>> scores = torch.full((4, 4), 0.5)          # collapsed: every anchor falls back
        >>> torch.equal(rule_loss(scores, SelHN(0.01)), selhn_loss(scores, epsilon=0.01))
        True
    """

    epsilon: float = 0.01
    fallback: Fallback = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_nonnegative(self.epsilon, "epsilon"))
        object.__setattr__(self, "fallback", as_fallback(self.fallback))

    def weights(self, anchors: Anchors) -> Tensor:
        hard = anchors.one_hot(anchors.hardest_index)
        every = anchors.negatives.to(anchors.scores.dtype)
        if self.fallback == "mean":
            every = every / anchors.count.clamp(min=1).unsqueeze(1).to(every.dtype)
        vanishing = sel.vanishing(anchors.gap, self.epsilon)
        return torch.where(vanishing.unsqueeze(1), every, hard)


class LeanSettings(NamedTuple):
    """How the lean core computes a built-in rule: its mode and SelHN's settings."""

    mode: Mode
    epsilon: float
    fallback: Fallback


def lean_settings(rule: SelectionRule) -> LeanSettings | None:
    """The lean core's settings for exactly a built-in rule (not a subclass: it may have
    changed the weights); None for every other rule, which takes the plain path."""
    if type(rule) is MaxViolation:
        return LeanSettings("hn", 0.0, "mean")
    if type(rule) is SumOfHinges:
        return LeanSettings("sum", 0.0, "mean")
    if type(rule) is SelHN:
        return LeanSettings("selhn", rule.epsilon, rule.fallback)
    return None


def rule_for(mode: Mode, epsilon: float = 0.01, fallback: Fallback = "mean") -> SelectionRule:
    """The built-in rule of a loss name (``"selhn"``, ``"hn"``, ``"sum"``)."""
    if mode == "hn":
        return MaxViolation()
    if mode == "sum":
        return SumOfHinges()
    return SelHN(epsilon, fallback)


def rule_settings(rule: SelectionRule) -> str:
    """A rule as its class and settings, e.g. ``TopK(k=5)``: what the ranks of the distributed
    loss compare. Every instance attribute is shown, so two rules that differ in a parameter
    differ here even when their ``repr`` does not show it.

    Example:
        >>> from selhn.rules import SelectionRule, SelHN, rule_settings
        >>> class TopK(SelectionRule):
        ...     def __init__(self, k):
        ...         self.k = k
        ...     def weights(self, anchors):
        ...         return anchors.one_hot(anchors.hardest_index)
        >>> repr(TopK(1)) == repr(TopK(5)), rule_settings(TopK(5))
        (True, 'TopK(k=5)')
        >>> rule_settings(SelHN(0.05))
        "SelHN(epsilon=0.05, fallback='mean')"
    """
    settings = getattr(rule, "__dict__", None)
    if settings is None:  # (a rule with __slots__: its repr is all there is)
        return repr(rule)
    shown = ", ".join(f"{name}={value!r}" for name, value in sorted(settings.items()))
    return f"{type(rule).__qualname__}({shown})"


def resolve_rule(loss: object, epsilon: object = None, fallback: object = None) -> SelectionRule:
    """The rule a ``loss`` argument names: a loss name (``"selhn"``, ``"hn"``, ``"sum"``) with
    SelHN's ``epsilon`` (default 0.01) and ``fallback`` (default ``"mean"``), or a rule, which
    carries its own settings: then ``epsilon`` and ``fallback`` must be left out (None), since a
    value given beside a rule would be ignored."""
    if isinstance(loss, str):
        epsilon = 0.01 if epsilon is None else check_nonnegative(epsilon, "epsilon")
        return rule_for(as_mode(loss), epsilon, as_fallback("mean" if fallback is None else fallback))
    rule = check_rule(loss, "loss")
    given = [name for name, value in (("epsilon", epsilon), ("fallback", fallback)) if value is not None]
    if given:
        named = " and ".join(given)
        raise ValueError(
            f"{named} {'apply' if len(given) > 1 else 'applies'} to a loss given by name (loss='selhn'); the rule "
            f"{rule!r} carries its own settings: leave {named} out, or set them on the rule"
        )
    return rule


def check_rule(value: object, name: str = "rule") -> SelectionRule:
    """Require a :class:`SelectionRule` instance (a class, or a function, is refused by name)."""
    if isinstance(value, type) and issubclass(value, SelectionRule):
        raise TypeError(
            f"{name} must be a SelectionRule instance, got the class {value.__name__}: call it, e.g. {value.__name__}()"
        )
    if not isinstance(value, SelectionRule):
        raise TypeError(f"{name} must be a selhn.rules.SelectionRule (subclass it), got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- the plain path
def side_losses(
    scores: Tensor,
    positive_column: Tensor,
    excluded: Tensor | None,
    rule: SelectionRule,
    margin: float,
    copies: Tensor | None = None,
) -> Tensor:
    r"""One direction's per-anchor losses :math:`\ell_a = \sum_n w_{an} h_n` by plain autograd.

    Anchor ``a`` is row ``a`` of ``scores``; its positive is column ``positive_column[a]``;
    ``excluded`` marks the other candidates that are no negatives (shared ids). The rule's
    weights are computed on detached scores, so the gradient flows through the hinges only.

    Args:
        scores: (L, C) scores, differentiable.
        positive_column: (L,) integer column of each anchor's positive.
        excluded: optional (L, C) boolean, ``True`` = not a negative.
        rule: the selection rule.
        margin: the triplet margin.
        copies: optional (C,) exact copies among the candidates (:attr:`Anchors.copies`).

    Returns:
        (L,) per-anchor losses.

    Raises:
        TypeError: a rule that is no :class:`SelectionRule` instance, non-integer columns, a
            non-boolean ``excluded``, non-floating scores.
        ValueError: shapes that do not match, a column outside ``[0, C)``, a negative or
            non-finite margin, meta tensors.

    Example:
        >>> import torch
        >>> from selhn.rules import SumOfHinges, side_losses
        >>> scores = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
        >>> side_losses(scores, torch.arange(2), None, SumOfHinges(), margin=0.2)
        tensor([0.1000, 0.0000])
    """
    _check_side(scores, positive_column, excluded, copies)
    rule = check_rule(rule)
    margin = check_nonnegative(margin, "margin")
    return _side_losses(scores, positive_column, excluded, rule, margin, copies)


def _check_side(scores: Any, positive_column: Any, excluded: Any, copies: Any) -> None:
    """:func:`side_losses`' tensors: types, shapes, devices and the columns' range."""
    check_float_tensor(scores, "scores")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (L anchors, C candidates), got shape {tuple(scores.shape)}")
    n_anchors, n_candidates = scores.shape
    if not isinstance(positive_column, Tensor):
        raise TypeError(
            f"positive_column must be a torch.Tensor of integer columns, got {type(positive_column).__name__}"
        )
    if positive_column.is_floating_point() or positive_column.is_complex() or positive_column.dtype == torch.bool:
        raise TypeError(f"positive_column must hold integer columns, got dtype {positive_column.dtype}")
    if tuple(positive_column.shape) != (n_anchors,):
        raise ValueError(
            f"positive_column must have shape ({n_anchors},), one per anchor, got {tuple(positive_column.shape)}"
        )
    if positive_column.device != scores.device:
        raise ValueError(f"positive_column is on {positive_column.device}, the scores on {scores.device}")
    if n_anchors and bool((positive_column < 0).any() or (positive_column >= n_candidates).any()):
        raise ValueError(
            f"positive_column must be columns in [0, {n_candidates}), got values from "
            f"{int(positive_column.min())} to {int(positive_column.max())}"
        )
    for name, value, dtype, shape in (
        ("excluded", excluded, torch.bool, (n_anchors, n_candidates)),
        ("copies", copies, torch.int64, (n_candidates,)),
    ):
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dtype != dtype:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{name} must be None or a {dtype} tensor, got {got}")
        if tuple(value.shape) != shape or value.device != scores.device:
            raise ValueError(
                f"{name} must have shape {shape} on {scores.device}, got {tuple(value.shape)} on {value.device}"
            )


def _side_losses(
    scores: Tensor,
    positive_column: Tensor,
    excluded: Tensor | None,
    rule: SelectionRule,
    margin: float,
    copies: Tensor | None = None,
) -> Tensor:
    """:func:`side_losses` on checked arguments (the package's own calls)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    positive = scores[rows, positive_column]
    negatives = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    negatives[rows, positive_column] = False
    if excluded is not None:
        negatives &= ~excluded
    _check_scores_are_numbers(scores.detach(), positive.detach(), negatives)
    anchors = Anchors(
        scores=scores.detach().masked_fill(~negatives, -math.inf),
        positive=positive.detach(),
        negatives=negatives,
        margin=margin,
        copies=copies,
    )
    weights = _checked_weights(rule, anchors)  # 0 wherever the candidate is no negative
    hinges = sel.hinge(positive.unsqueeze(1), scores, margin)
    # only weighted hinges count: a zero weight never multiplies an infinite hinge into NaN
    weighted = torch.where(weights != 0, weights * hinges, 0.0)
    return weighted.sum(dim=1)


def _checked_weights(rule: SelectionRule, anchors: Anchors) -> Tensor:
    """The rule's weights, detached and checked (shape, dtype, finite at the negatives), and 0
    wherever the candidate is no negative: whatever the rule returned there (a NaN from
    ``-inf - -inf``, say) must not reach the product with the hinges, whose gradient would
    carry it even where the product is not selected."""
    weights = rule.weights(anchors)
    if not isinstance(weights, Tensor):
        raise TypeError(f"{rule!r}.weights must return a torch.Tensor, got {type(weights).__name__}")
    if tuple(weights.shape) != tuple(anchors.scores.shape):
        raise ValueError(
            f"{rule!r}.weights must return one weight per (anchor, candidate), shape {tuple(anchors.scores.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if not (weights.is_floating_point() or weights.dtype in _INTEGER_WEIGHTS):  # (complex: neither)
        raise TypeError(f"{rule!r}.weights must return real (floating-point) weights, got dtype {weights.dtype}")
    if weights.device != anchors.scores.device:
        raise ValueError(
            f"{rule!r}.weights must return weights on the scores' device {anchors.scores.device}, got {weights.device}"
        )
    weights = weights.detach().to(anchors.scores.dtype)
    finite = torch.isfinite(torch.where(anchors.negatives, weights, 0.0)).all()
    message = f"{rule!r}.weights returned a NaN or infinite weight for a negative: weights must be finite"
    if torch.compiler.is_compiling():  # no Python branch on data in a graph: torch raises it (RuntimeError)
        torch._assert_async(finite, message)
    elif not bool(finite):
        raise ValueError(message)
    return torch.where(anchors.negatives, weights, 0.0)


#: Integer and boolean weights a rule may return (taken as 0 / 1 / counts, cast to the scores' dtype).
_INTEGER_WEIGHTS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_scores_are_numbers(scores: Tensor, positive: Tensor, negatives: Tensor) -> None:
    """Refuse NaN scores before a rule sees them (a rule would be blamed for the NaN weights they
    give): say which anchor and candidate hold one. (+-inf scores are a score's own business:
    the hinges and the rule handle them.)"""
    if torch.compiler.is_compiling():
        return
    at_negatives = torch.where(negatives, scores, 0.0).isnan()
    at_positive = positive.isnan()
    if not bool(at_negatives.any() or at_positive.any()):
        return
    if bool(at_positive.any()):
        anchor = int(at_positive.nonzero()[0, 0])
        where = f"the positive of anchor {anchor}"
    else:
        anchor, candidate = (int(i) for i in at_negatives.nonzero()[0])
        where = f"anchor {anchor}, candidate {candidate}"
    count = int(at_negatives.sum() + at_positive.sum())
    raise ValueError(
        f"the scores hold {count} NaN value(s) (first at {where}; rows are anchors, columns candidates): "
        "the embeddings or the score matrix contain NaN, before any rule was applied"
    )


def square_losses(
    scores: Tensor,
    excluded: Tensor | None,
    rule: SelectionRule,
    margin: float,
    copies: tuple[Tensor | None, Tensor | None] = (None, None),
) -> Tensor:
    """Both directions' per-anchor losses (2, B) of a square score matrix by plain autograd:
    the rows (image anchors), then the columns (caption anchors). ``copies``: the exact copies
    among the captions, then among the images (:attr:`Anchors.copies`)."""
    diagonal = torch.arange(scores.shape[0], device=scores.device)
    return torch.stack(
        [
            _side_losses(scores, diagonal, excluded, rule, margin, copies[0]),
            _side_losses(scores.t(), diagonal, None if excluded is None else excluded.t(), rule, margin, copies[1]),
        ]
    )
