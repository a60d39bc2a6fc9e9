r"""Selection rules: which negatives' hinges count for each anchor, and with which weight.

Every triplet loss of this field has one form. For an anchor :math:`a` with positive score
:math:`s_p`, negatives :math:`n \in N_a` and hinges :math:`h_n = \max(0,\ m - s_p + s_n)`,

.. math::

    \ell_a = \sum_{n \in N_a} w_{an}\, h_n ,

where the weights :math:`w_{an}` are chosen from the (detached) scores and carry no
gradient. A *selection rule* is that choice. Most rules choose sparsely, and say so with a
:class:`Selection`: per anchor a few chosen negatives with their weights, plus a coefficient
on all of its hinges. The built-in rules are of that form, each defined once, here:

* :class:`MaxViolation` (VSE++): the hardest negative, weight 1;
* :class:`SumOfHinges` (VSE0): every hinge, coefficient 1;
* :class:`SelHN`: per anchor, all its hinges at :math:`1/|N_a|` (their mean) while the gap
  :math:`|s_p - s_{\hat n}|` is below epsilon, else the hardest negative.

Write your own by subclassing :class:`SelectionRule`: return a :class:`Selection` from
:meth:`SelectionRule.select` (it then runs on the package's lean forward and backward), or
dense weights from :meth:`SelectionRule.weights` (exact plain autograd over the weighted
hinges, :func:`side_losses`). It sees one direction's anchors at a time as an
:class:`Anchors` (scores, positives, which candidates are negatives, the hardest negative,
the gap, the hinges, a top-k). :class:`selhn.RuleLoss` and :func:`selhn.functional.rule_loss`
turn any rule into a loss over embeddings or over a score matrix;
:func:`selhn.distributed.global_loss` and :func:`selhn.diagnostics.gradient_norms` take a
rule too, and :mod:`selhn.testing`'s helpers test the loss it gives. The dense view of a
sparse rule (its :meth:`~SelectionRule.weights`) is derived from its selection; the tests hold
both paths to the literal loop references.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import Mode, as_fallback, as_mode, check_count, check_float_tensor, check_nonnegative
from selhn.types import Direction, Fallback

__all__ = [
    "Anchors",
    "MaxViolation",
    "SelHN",
    "Selection",
    "SelectionRule",
    "SumOfHinges",
    "is_sparse",
    "rule_settings",
    "side_losses",
]


class Anchors:
    """One direction's anchors of a batch, as a selection rule sees them. Every tensor is
    detached; anchors are rows, candidates columns.

    For image anchors (image-to-text) row ``a`` is image ``a`` against the captions; for
    caption anchors (text-to-image) row ``a`` is caption ``a`` against the images. Under
    :func:`selhn.distributed.global_loss` the candidates are the global batch. The attributes
    are read-only; what is derived from them (``negatives`` where the loss did not hand it
    over, ``hardest``, ``count``, ...) is computed on first use, once.

    Args:
        scores: (L, C) the score of each anchor with each candidate; ``-inf`` where the
            candidate is not a negative (the anchor's positive, and masked pairs).
        positive: (L,) each anchor's positive score.
        negatives: (L, C) boolean, ``True`` where the candidate is a negative of the anchor.
        margin: the triplet margin :math:`m`.
        copies: optional (C,) for each candidate the lowest index of a candidate whose
            embedding equals its own (:func:`selhn._selection.first_copies`), where the loss
            knows the embeddings; None (a score matrix, or no two equal) otherwise. Exact copies
            tie in exact arithmetic but not in rounded scores: with ``copies``, the hardest
            negative among them is the lowest-index copy that is a negative of the anchor. A
            rule may use them only to choose which of several copies a slot names, never to
            set a weight: the lean core looks them up only where a chosen hinge counts
            (:class:`SelectionRule`).
        direction: which anchors these are: ``"i2t"`` (image anchors against captions),
            ``"t2i"`` (caption anchors against images), or None where the caller does not say.

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

    def __init__(
        self,
        scores: Tensor,
        positive: Tensor,
        negatives: Tensor,
        margin: float,
        copies: Tensor | None = None,
        direction: Direction | None = None,
    ) -> None:
        self._set(scores, positive, margin, direction, lambda: negatives, None, lambda: copies)

    def _set(
        self,
        scores: Tensor,
        positive: Tensor,
        margin: float,
        direction: Direction | None,
        negatives: Callable[[], Tensor],
        count: Callable[[], Tensor] | None,
        copies: Callable[[], Tensor | None],
    ) -> None:
        """The given fields, and how to make the derived ones (``count``: None to sum ``negatives``)."""
        self._scores, self._positive, self._margin, self._direction = scores, positive, margin, direction
        self._make_negatives, self._make_count, self._make_copies = negatives, count, copies
        self._made: dict[str, Any] = {}  # what has been derived, by name (torch.compile traces a dict)

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` on first use of ``name``, then its result."""
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    @classmethod
    def _deferred(
        cls,
        scores: Tensor,
        positive: Tensor,
        margin: float,
        negatives: Callable[[], Tensor],
        count: Callable[[], Tensor],
        copies: Callable[[], Tensor | None],
        direction: Direction | None = None,
    ) -> Anchors:
        """Anchors whose ``negatives``, ``count`` and ``copies`` are made only if a rule reads
        them (the lean core's: a rule that never asks for the (L, C) mask costs none)."""
        anchors = cls.__new__(cls)
        anchors._set(scores, positive, margin, direction, negatives, count, copies)
        return anchors

    @property
    def scores(self) -> Tensor:
        """(L, C) scores, ``-inf`` where the candidate is no negative."""
        return self._scores

    @property
    def positive(self) -> Tensor:
        """(L,) each anchor's positive score."""
        return self._positive

    @property
    def margin(self) -> float:
        """The triplet margin :math:`m`."""
        return self._margin

    @property
    def direction(self) -> Direction | None:
        """``"i2t"`` (image anchors), ``"t2i"`` (caption anchors), or None where unknown."""
        return self._direction

    @property
    def negatives(self) -> Tensor:
        """(L, C) boolean, ``True`` where the candidate is a negative of the anchor."""
        negatives: Tensor = self._once("negatives", self._make_negatives)
        return negatives

    @property
    def copies(self) -> Tensor | None:
        """(C,) the lowest index of each candidate's exact copies, or None (see the class docs)."""
        copies: Tensor | None = self._once("copies", self._make_copies)
        return copies

    @property
    def count(self) -> Tensor:
        """(L,) the number of negatives of each anchor, :math:`|N_a|` (integers)."""
        make = self._make_count or (lambda: self.negatives.sum(dim=1))
        count: Tensor = self._once("count", make)
        return count

    def _in_memory_order(self) -> tuple[Tensor, int]:
        """The scores as they lie in memory and the dimension along which each anchor's
        candidates run: 0 where the anchors are the columns of a contiguous matrix (the lean
        core's caption anchors: read in place, no transposed copy), else 1 (contiguous rows)."""
        if not self._scores.is_contiguous() and self._scores.t().is_contiguous():
            return self._scores.t(), 0
        return self._scores.contiguous(), 1

    @property
    def _maximum(self) -> tuple[Tensor, Tensor]:
        """The row maxima and their first index, read in the scores' own memory order."""
        found: tuple[Tensor, Tensor] = self._once("maximum", lambda: sel.max_along(*self._in_memory_order()))
        return found

    @property
    def hardest(self) -> Tensor:
        """(L,) the hardest (highest-scoring) negative's score; ``-inf`` without negatives."""
        return self._maximum[0]

    @property
    def hardest_index(self) -> Tensor:
        """(L,) the hardest negative's candidate (ties, and exact copies: the lowest index)."""
        index: Tensor = self._once("hardest_index", lambda: sel.lowest_copy(self.scores, self._maximum[1], self.copies))
        return index

    @property
    def gap(self) -> Tensor:
        """(L,) ``positive - hardest``: SelHN's gradient-vanishing signal (``+inf`` without negatives)."""
        return sel.gap(self.positive, self.hardest)

    @property
    def hinges(self) -> Tensor:
        """(L, C) ``max(0, margin - positive + score)``: 0 where the candidate is no negative."""
        return sel.hinge(self.positive.unsqueeze(1), self.scores, self.margin)

    def one_hot(self, index: Tensor) -> Tensor:
        """(L, C) weights 1 at candidate ``index[a]`` of each anchor (0 where it is no negative)."""
        chosen = torch.zeros_like(self.scores).scatter_(1, index.unsqueeze(1), 1.0)
        return torch.where(self.negatives, chosen, 0.0)

    def top_k(self, k: int, below: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each anchor's ``k`` highest-scoring negatives, and which of them exist.

        Highest first; ties go to the lowest index, and ``k = 1`` is exactly
        :attr:`hardest_index` (exact copies included). With ``below`` (L,), only negatives
        scoring strictly below ``below[a]`` qualify. An anchor with fewer than ``k``
        qualifying negatives fills its other slots with ``chosen`` False: use the index only
        where ``chosen`` holds (:class:`Selection` weights of 0 there). No (L, C) buffer is
        formed (:func:`selhn._selection.top_k`).

        Args:
            k: how many negatives per anchor (>= 0).
            below: optional (L,) bound per anchor, e.g. ``positive + margin``.

        Returns:
            ``(index, chosen)``: (L, k) candidate indices, (L, k) boolean.

        Example:
            >>> import torch
            >>> from selhn.rules import Anchors
            >>> inf = float("-inf")
            >>> anchors = Anchors(torch.tensor([[inf, 0.5, 0.7, 0.5]]), torch.tensor([0.6]),
            ...                   torch.tensor([[False, True, True, True]]), margin=0.2)
            >>> anchors.top_k(2)
            (tensor([[2, 1]]), tensor([[True, True]]))
            >>> anchors.top_k(2, below=anchors.positive)      # only 0.5 and 0.5 qualify
            (tensor([[1, 3]]), tensor([[True, True]]))
            >>> anchors.top_k(4)[1]
            tensor([[ True,  True,  True, False]])
        """
        k = check_count(k, "k")
        n_anchors, n_candidates = self._scores.shape
        if below is not None:
            below = check_float_tensor(below, "below")
            if tuple(below.shape) != (n_anchors,):
                raise ValueError(
                    f"below must have shape ({n_anchors},), one bound per anchor, got {tuple(below.shape)}"
                )
        if k == 1 and below is None:
            return self.hardest_index.unsqueeze(1), (self.hardest > -math.inf).unsqueeze(1)
        width = min(k, n_candidates)
        index = torch.zeros(n_anchors, k, dtype=torch.long, device=self._scores.device)
        chosen = torch.zeros(n_anchors, k, dtype=torch.bool, device=self._scores.device)
        if width == 0 or n_anchors == 0:
            return index, chosen
        scores, dim = self._in_memory_order()
        values, found = sel.top_k(scores, width, dim, below)
        index[:, :width], chosen[:, :width] = found, values > -math.inf
        if k == 1:  # the hardest qualifying negative: among exact copies, the lowest-index one
            index[:, 0] = sel.lowest_copy(self._scores, index[:, 0], self.copies)
        return index, chosen

    def dense(self, selection: Selection) -> Tensor:
        """(L, C) the dense weights of a sparse :class:`Selection`: each chosen negative's weight
        (added where a candidate is chosen twice), plus ``every`` (the anchor's, or the one for
        all) on every candidate. (The loss keeps them at the negatives only.)"""
        weights = torch.zeros_like(self._scores)
        candidate, weight, every = selection
        if candidate is not None:
            if weight is None:  # 1 on each chosen negative
                weight = torch.ones_like(candidate, dtype=weights.dtype)
            weights.scatter_add_(1, candidate, weight)
        if isinstance(every, Tensor):
            weights += every.unsqueeze(1)
        elif every is not None:
            weights += every
        return weights


class Selection(NamedTuple):
    r"""A rule's choice in the sparse form the lean backward runs, for one direction's L anchors:

    .. math::

        \ell_a = \sum_{j} w_{aj}\, h_{a,\, i_{aj}} \;+\; e_a \sum_{n \in N_a} h_n ,

    ``k`` chosen negatives per anchor with their weights, plus a coefficient on every hinge of
    the anchor (the sum of hinges' term; :math:`e_a = 1/|N_a|` gives the mean). Every value is
    taken as a constant (no gradient flows through the choice) and must be finite. A slot
    whose candidate is no negative of its anchor counts 0, whatever its weight.

    The common cases need no tensor of constants: leave ``weight`` out for weight 1 on every
    chosen negative (max violation: ``Selection(anchors.hardest_index.unsqueeze(1))``), leave
    ``candidate`` out where no negative is chosen, and give ``every`` as a number where every
    anchor takes its hinges alike (the sum of hinges: ``Selection(every=1.0)``).

    Example:
        >>> import torch
        >>> from selhn.rules import Selection
        >>> index = torch.tensor([[2], [0]])
        >>> Selection(index, torch.ones(2, 1), every=torch.tensor([0.0, 0.5]))
        Selection(candidate=tensor([[2],
                [0]]), weight=tensor([[1.],
                [1.]]), every=tensor([0.0000, 0.5000]))
        >>> Selection(every=1.0)
        Selection(candidate=None, weight=None, every=1.0)
    """

    #: (L, k) the chosen candidates (integer indices); None: none chosen (k = 0).
    candidate: Tensor | None = None
    #: (L, k) the weight of each chosen candidate's hinge (0: the slot is unused); None: 1 for each.
    weight: Tensor | None = None
    #: (L,) the coefficient :math:`e_a` on all of each anchor's hinges, or a number for every
    #: anchor alike; None: 0.
    every: Tensor | float | None = None


class SelectionRule:
    """A selection rule: per anchor, the weight of each negative's hinge in its loss.

    Subclass it and implement one of two methods:

    * :meth:`select` returns a sparse :class:`Selection` (a few chosen negatives per anchor,
      plus a coefficient on all of its hinges): the form of max violation, the sum of hinges,
      SelHN, a top-k or semi-hard rule. Such a rule takes the package's lean backward.
    * :meth:`weights` returns dense (L, C) weights, for a rule that weighs every negative its
      own way (a softmax-like weighting). Such a rule takes the exact plain autograd path,
      which forms a few B x B tensors.

    The weights are taken as constants (no gradient flows through the selection), must be
    finite, and count only at negatives (whatever a rule returns elsewhere is ignored). A rule
    must choose each anchor's weights from that anchor's row alone (no statistic over the
    batch of anchors), or the distributed loss is not the one-process loss
    (:func:`selhn.testing.assert_per_anchor` checks it). Exact copies among the candidates
    (:attr:`Anchors.copies`, and through them :attr:`Anchors.hardest_index` and
    ``top_k(1)``) may decide which copy a slot names, never a weight or ``every``: looking them
    up reads a line of every embedding, so the lean core first lets the rule choose without
    them, looks them up only if a chosen hinge counts, and lets the rule choose again only
    where some exist (a cold start, where SelHN takes every anchor's hinges, never looks).
    Keep the rule's settings as
    attributes (a frozen dataclass is simplest): the distributed loss compares rules across
    ranks by class and attributes (:func:`rule_settings`). A readable ``repr`` helps too: the
    modules print it.

    Example:
        >>> import torch
        >>> import selhn
        >>> from selhn.rules import SelectionRule, Selection, is_sparse
        >>> class TopK(SelectionRule):
        ...     '''The k hardest negatives' hinges, averaged (over fewer where there are fewer).'''
        ...     def __init__(self, k: int) -> None:
        ...         self.k = k
        ...     def select(self, anchors):
        ...         index, chosen = anchors.top_k(self.k)
        ...         weight = chosen / chosen.sum(dim=1, keepdim=True).clamp(min=1)
        ...         return Selection(index, weight)
        >>> class Tempered(SelectionRule):
        ...     '''Every hinge weighted by exp((s_n - s_hardest) / T) (dense: the plain path).'''
        ...     def __init__(self, temperature: float) -> None:
        ...         self.temperature = temperature
        ...     def weights(self, anchors):
        ...         spread = anchors.scores - anchors.hardest.unsqueeze(1)   # <= 0 at the negatives
        ...         return torch.exp(spread / self.temperature)
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> bool(selhn.RuleLoss(TopK(3))(img, txt) >= 0), bool(selhn.RuleLoss(Tempered(0.05))(img, txt) >= 0)
        (True, True)
        >>> is_sparse(TopK(3)), is_sparse(Tempered(0.05))
        (True, False)
    """

    def select(self, anchors: Anchors) -> Selection:
        """The sparse choice for ``anchors`` (one direction's anchors); see :class:`Selection`."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse form: it defines weights()")

    def weights(self, anchors: Anchors) -> Tensor:
        """The (L, C) weights of the hinges of ``anchors`` (one direction's anchors). A rule
        with a sparse form gets them from :meth:`select` (:meth:`Anchors.dense`)."""
        return anchors.dense(_checked_selection(self, anchors, self.select(anchors)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def is_sparse(rule: SelectionRule) -> bool:
    """Whether a rule takes the lean path: its class (or the nearest base that defines either)
    defines :meth:`~SelectionRule.select` rather than :meth:`~SelectionRule.weights`. A
    subclass of a built-in rule that overrides ``weights`` alone is dense: its weights win."""
    owner = _form_owner(rule)
    return owner is not None and owner[0] == "select"


def _form_owner(rule: SelectionRule) -> tuple[str, type] | None:
    """The rule's form and the class that defines it: the nearest class above SelectionRule in
    the rule's MRO that defines ``select`` (``"select"``, checked first) or ``weights``; None
    where none does. (Read once per class: every loss call asks.)"""
    rule_class: Any = type(rule)  # (a class is hashable; mypy reads SelectionRule's __hash__ as None)
    if torch.compiler.is_compiling():  # traced once into the graph (Dynamo warns on a cached function)
        return _find_form_owner(rule_class)
    return _form_owner_of_class(rule_class)


def _find_form_owner(rule_class: type) -> tuple[str, type] | None:
    """:func:`_form_owner` of a class, looked up along its MRO."""
    for cls in rule_class.__mro__:
        if cls is SelectionRule:
            return None
        for method in ("select", "weights"):
            if method in cls.__dict__:
                return method, cls
    return None


#: :func:`_find_form_owner`, read once per class (every eager loss call asks).
_form_owner_of_class = functools.cache(_find_form_owner)


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

    def select(self, anchors: Anchors) -> Selection:
        return Selection(anchors.hardest_index.unsqueeze(1))  # weight 1


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

    def select(self, anchors: Anchors) -> Selection:
        return Selection(every=1.0)  # no chosen negative; every hinge at weight 1


@dataclass(frozen=True)
class SelHN(SelectionRule):
    r"""SelHN: per anchor, the mean (or sum) of all its hinges while
    :math:`|s_p - s_{\hat n}| < \epsilon`, else the hardest negative's hinge.

    This is the package's one definition of SelHN: the losses, the distributed loss, the
    diagnostics and :mod:`selhn.testing` all read it from here.

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

    def falls_back(self, anchors: Anchors) -> Tensor:
        """(L,) boolean: the anchors in the vanishing regime, :math:`|s_p - s_{\\hat n}| < \\epsilon`."""
        return sel.vanishing(anchors.gap, self.epsilon)

    def select(self, anchors: Anchors) -> Selection:
        vanishing = self.falls_back(anchors).to(anchors.scores.dtype)  # 1 where the gap is below epsilon, else 0
        hard = (1 - vanishing).unsqueeze(1)  # the hardest negative's hinge, where the gap is wide enough
        every = vanishing  # where it is not: the sum of all the hinges,
        if self.fallback == "mean":
            every = vanishing / anchors.count.clamp(min=1)  # or their mean
        return Selection(anchors.hardest_index.unsqueeze(1), hard, every)


def _checked_selection(rule: SelectionRule, anchors: Anchors, selection: object) -> Selection:
    """A rule's :class:`Selection`, checked (types, shapes, device, integer candidates in range,
    finite weights), detached and in the scores' dtype (a number for ``every`` as a float)."""
    if not isinstance(selection, Selection):
        raise TypeError(f"{_named(rule)}.select must return a selhn.rules.Selection, got {type(selection).__name__}")
    if _selects_as_built_in(rule):  # (the package's own selection: tested, not checked each call)
        return selection
    n_anchors, n_candidates = anchors.scores.shape
    index, weight, every = selection
    numeric_every = isinstance(every, (int, float)) and not isinstance(every, bool)
    for name, value in (("candidate", index), ("weight", weight), ("every", every)):
        if value is None or (name == "every" and numeric_every):
            continue
        if not isinstance(value, Tensor):
            kinds = "a torch.Tensor or a number" if name == "every" else "a torch.Tensor"
            raise TypeError(f"{_named(rule)}.select's {name} must be {kinds}, got {type(value).__name__}")
        if value.device != anchors.scores.device:
            raise ValueError(
                f"{_named(rule)}.select's {name} is on {value.device}, the scores on {anchors.scores.device}"
            )
    if index is None:
        if weight is not None:
            raise ValueError(f"{_named(rule)}.select gave a weight but no candidate: give the chosen candidates too")
    else:
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"{_named(rule)}.select's candidate must hold integer candidates, got dtype {index.dtype}")
        if index.ndim != 2 or index.shape[0] != n_anchors or (weight is not None and weight.shape != index.shape):
            got = tuple(index.shape) if weight is None else f"{tuple(index.shape)} and {tuple(weight.shape)}"
            raise ValueError(
                f"{_named(rule)}.select must return candidate and weight of shape ({n_anchors}, k), one row per "
                f"anchor, got {got}"
            )
    if isinstance(every, Tensor) and tuple(every.shape) != (n_anchors,):
        raise ValueError(f"{_named(rule)}.select's every must have shape ({n_anchors},), got {tuple(every.shape)}")
    for name, value in (("weight", weight), ("every", every)):
        if isinstance(value, Tensor) and not (value.is_floating_point() or value.dtype in _INTEGER_WEIGHTS):
            raise TypeError(f"{_named(rule)}.select's {name} must be real (floating-point), got dtype {value.dtype}")
    dtype = anchors.scores.dtype
    weight = None if weight is None else weight.detach().to(dtype)
    if isinstance(every, Tensor):
        every = every.detach().to(dtype)
    elif every is not None:  # a number, for every anchor alike
        every = float(every)
        if not math.isfinite(every):
            raise ValueError(f"{_named(rule)}.select returned every={every!r}: weights must be finite")
    index = None if index is None else index.long()
    checks = []  # (holds, message): one device read for all of them, when eager
    if index is not None:
        in_range = ((index >= 0) & (index < n_candidates)).all()
        checks.append((in_range, f"{_named(rule)}.select returned a candidate outside [0, {n_candidates})"))
    for value in (weight, every):
        if isinstance(value, Tensor):
            message = f"{_named(rule)}.select returned a NaN or infinite weight: weights must be finite"
            checks.append((torch.isfinite(value).all(), message))
    if checks:
        if torch.compiler.is_compiling():  # no Python branch on data in a graph: torch raises it (RuntimeError)
            for holds, message in checks:
                torch._assert_async(holds, message)
        elif not bool(functools.reduce(operator.and_, (holds for holds, _ in checks))):
            raise ValueError(next(message for holds, message in checks if not bool(holds)))
    return Selection(index, weight, every)


def _named(rule: SelectionRule) -> str:
    """The rule as its error messages name it: its repr (under torch.compile, which cannot trace
    a dataclass's repr, its class name)."""
    return type(rule).__name__ if torch.compiler.is_compiling() else repr(rule)


def _selects_as_built_in(rule: SelectionRule) -> bool:
    """Whether the rule is one of the built-in rules themselves (not a subclass, which may
    override ``select`` or ``falls_back``): its selection has the right types, shapes, device and
    dtype, candidates in range and finite weights by construction, as the tests hold, so it is
    not checked on every call."""
    return type(rule) in _BUILT_IN_RULES


#: The built-in rules, whose selections are not checked on every call (:func:`_selects_as_built_in`).
_BUILT_IN_RULES = (MaxViolation, SumOfHinges, SelHN)

#: The rules of the loss names (``"selhn"``, ``"hn"``, ``"sum"``), SelHN's at its defaults.
_BY_NAME: dict[Mode, Callable[[float, Fallback], SelectionRule]] = {
    "selhn": SelHN,
    "hn": lambda epsilon, fallback: MaxViolation(),
    "sum": lambda epsilon, fallback: SumOfHinges(),
}


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
        return _BY_NAME[as_mode(loss)](epsilon, as_fallback("mean" if fallback is None else fallback))
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
    if _form_owner(value) is None:
        raise TypeError(
            f"{name}: {type(value).__name__} defines neither select() (a sparse choice) nor weights() (dense "
            "weights): define one"
        )
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


def _side_anchors(
    scores: Tensor,
    positive_column: Tensor,
    excluded: Tensor | None,
    margin: float,
    copies: Tensor | None = None,
    direction: Direction | None = None,
) -> Anchors:
    """One direction's :class:`Anchors` of (L, C) ``scores`` (read detached): anchor ``a``'s
    positive is column ``positive_column[a]``, ``excluded`` marks the other candidates that are
    no negatives. NaN scores are refused, naming where."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores = scores.detach()
    positive = scores[rows, positive_column]
    negatives = sel.negatives_mask((scores.shape[0], scores.shape[1]), positive_column, excluded)
    _check_scores_are_numbers(scores, positive, negatives)
    return Anchors(scores.masked_fill(~negatives, -math.inf), positive, negatives, margin, copies, direction)


def _square_anchors(scores: Tensor, mask: Tensor | None, margin: float) -> tuple[Anchors, Anchors]:
    """The two directions' :class:`Anchors` of a square score matrix: the image anchors (rows),
    then the caption anchors (columns)."""
    diagonal = torch.arange(scores.shape[0], device=scores.device)
    return (
        _side_anchors(scores, diagonal, mask, margin, direction="i2t"),
        _side_anchors(scores.t(), diagonal, None if mask is None else mask.t(), margin, direction="t2i"),
    )


def _side_losses(
    scores: Tensor,
    positive_column: Tensor,
    excluded: Tensor | None,
    rule: SelectionRule,
    margin: float,
    copies: Tensor | None = None,
    direction: Direction | None = None,
) -> Tensor:
    """:func:`side_losses` on checked arguments (the package's own calls)."""
    anchors = _side_anchors(scores, positive_column, excluded, margin, copies, direction)
    weights = _checked_weights(rule, anchors)  # 0 wherever the candidate is no negative
    rows = torch.arange(scores.shape[0], device=scores.device)
    positive = scores[rows, positive_column]
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
            _side_losses(scores, diagonal, excluded, rule, margin, copies[0], "i2t"),
            _side_losses(
                scores.t(), diagonal, None if excluded is None else excluded.t(), rule, margin, copies[1], "t2i"
            ),
        ]
    )
