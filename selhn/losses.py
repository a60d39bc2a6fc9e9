"""``torch.nn.Module`` twins of :mod:`selhn.functional` over embeddings.

Each module takes the image and caption embeddings of a batch of B matched pairs (row ``i``
of each is a pair) and returns the loss of the functional form on ``img_emb @ txt_emb.T``, in
value and gradient. It computes that loss with its own autograd Function over the
embeddings, whose backward gathers embedding rows instead of forming the (B, B) gradient of
the scores. Embeddings are expected to be L2-normalised (as in VSE++, VSE-infinity and
RVSE++), so the scores are cosine similarities; the modules do not normalise for you.

The scores are computed in float32 for half-precision embeddings (autocast is disabled
inside the loss), so the hard/fallback choice never flips on rounding.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from selhn import _core
from selhn._validation import (
    Setting,
    as_fallback,
    as_reduction,
    check_bool,
    check_embeddings,
    check_nonnegative,
    ids_to_mask,
)
from selhn.rules import MaxViolation, SelectionRule, SelHN, SumOfHinges, check_rule
from selhn.types import Fallback, Reduction

__all__ = ["ContrastiveLoss", "MaxViolationLoss", "RuleLoss", "SelHNLoss", "SumHingeLoss"]


class _TripletLoss(nn.Module):
    """Shared plumbing: margin, reduction, ids -> mask, the VSE-infinity switch methods, and
    the last batch's scores for a monitor (``keep_scores``)."""

    margin: Setting[float] = Setting(check_nonnegative)
    reduction: Setting[Reduction] = Setting(as_reduction)

    def __init__(self, margin: float, reduction: Reduction) -> None:
        super().__init__()
        self.margin = margin
        self.reduction = reduction
        #: Keep the last batch's score matrix and mask (``last_scores``, ``last_mask``), so that
        #: a monitor reads exactly what the loss saw (ids included) without a second matmul.
        self.keep_scores = False
        self.last_scores: Tensor | None = None
        self.last_mask: Tensor | None = None

    def _keep(self, scores: Tensor, mask: Tensor | None) -> None:
        if self.keep_scores:
            self.last_scores, self.last_mask = scores.detach().clone(), mask

    def _loss(
        self,
        img_emb: Tensor,
        txt_emb: Tensor,
        ids: Any,
        rule: SelectionRule,
    ) -> Tensor:
        check_embeddings(img_emb, txt_emb)
        mask = ids_to_mask(ids, img_emb.shape[0], img_emb.device)
        observe = (lambda scores: self._keep(scores, mask)) if self.keep_scores else None
        per_anchor = _core.embedding_losses(img_emb, txt_emb, mask, self.margin, rule, observe=observe)
        return _core.reduce(per_anchor, self.reduction)

    def max_violation_on(self) -> None:
        """No-op, for drop-in use in VSE-infinity's training loop.

        This loss has a fixed objective; use :class:`ContrastiveLoss` for the switchable one.
        """

    def max_violation_off(self) -> None:
        """No-op, for drop-in use in VSE-infinity's training loop.

        This loss has a fixed objective; use :class:`ContrastiveLoss` for the switchable one.
        """

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class SelHNLoss(_TripletLoss):
    r"""Selectively hard negative (SelHN) triplet loss over embeddings.

    Computes ``scores = img_emb @ txt_emb.T`` and returns
    :func:`selhn.functional.selhn_loss` of it: per anchor and direction,

    .. math::

        \ell_a = \begin{cases}
            \frac{1}{|N_a|} \sum_{n \in N_a} \max(0,\, m - s_p + s_n)
                & \text{if } |s_p - s_{\hat n}| < \epsilon \\
            \max(0,\, m - s_p + s_{\hat n}) & \text{otherwise,}
        \end{cases}

    with :math:`\hat n` the hardest (highest-scoring) negative of the anchor. The default
    ``reduction="mean"`` returns exactly the value of the authors' RVSE++ code.

    :meth:`max_violation_on` / :meth:`max_violation_off` are no-ops: SelHN handles the cold
    start itself, so VSE-infinity's warm-up switch calls can stay in a training loop.

    Args:
        margin: triplet margin :math:`m` (>= 0).
        epsilon: gap threshold :math:`\epsilon` (>= 0), in score units. The default 0.01 is the
            authors' and reproduces their loss exactly; for training from scratch on cosine
            scores the docs' page "Which loss, which epsilon?" advises 0.05, measured there.
        fallback: ``"mean"`` (authors' code) or ``"sum"`` over the negatives.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` over the 2B per-anchor losses.

    Shape:
        - img_emb: :math:`(B, D)`, L2-normalised
        - txt_emb: :math:`(B, D)`, L2-normalised
        - ids: optional :math:`(B,)` integers; pairs sharing an id are not negatives
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> import selhn
        >>> _ = torch.manual_seed(0)
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> criterion = selhn.SelHNLoss(margin=0.2, epsilon=0.05)
        >>> loss = criterion(img, txt)
        >>> loss.backward()
        >>> loss.shape, img.grad.shape
        (torch.Size([]), torch.Size([8, 16]))
    """

    epsilon: Setting[float] = Setting(check_nonnegative)
    fallback: Setting[Fallback] = Setting(as_fallback)

    def __init__(
        self, margin: float = 0.2, epsilon: float = 0.01, *, fallback: Fallback = "mean", reduction: Reduction = "mean"
    ) -> None:
        super().__init__(margin, reduction)
        self.epsilon = epsilon
        self.fallback = fallback

    def forward(self, img_emb: Tensor, txt_emb: Tensor, ids: Any = None) -> Tensor:
        """Loss of a batch of matched (image, caption) embedding pairs; see the class docs."""
        return self._loss(img_emb, txt_emb, ids, self.rule)

    @property
    def rule(self) -> SelectionRule:
        """This loss's selection rule, :class:`selhn.rules.SelHN` with its settings."""
        return SelHN(self.epsilon, self.fallback)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, epsilon={self.epsilon}, fallback={self.fallback!r}, reduction={self.reduction!r}"


class MaxViolationLoss(_TripletLoss):
    r"""VSE++ max-violation (hardest negative) triplet loss over embeddings.

    .. math::

        \ell_a = \max_{n \in N_a} \max(0,\, m - s_p + s_n)

    Computes ``scores = img_emb @ txt_emb.T`` and returns
    :func:`selhn.functional.max_violation_loss` of it. With ``reduction="sum"`` it equals
    VSE++ / VSE-infinity's ``ContrastiveLoss(max_violation=True)`` exactly.
    :meth:`max_violation_on` / :meth:`max_violation_off` are no-ops (always hard negatives).

    Args:
        margin: triplet margin :math:`m` (>= 0).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Shape:
        - img_emb: :math:`(B, D)`, L2-normalised
        - txt_emb: :math:`(B, D)`, L2-normalised
        - ids: optional :math:`(B,)` integers; pairs sharing an id are not negatives
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> import selhn
        >>> img = torch.eye(3)
        >>> txt = torch.eye(3)
        >>> selhn.MaxViolationLoss(margin=0.2, reduction="sum")(img, txt)
        tensor(0.)
        >>> selhn.MaxViolationLoss(reduction="sum")(img, torch.ones(3, 3) / 3 ** 0.5)
        tensor(1.2000)
    """

    def __init__(self, margin: float = 0.2, *, reduction: Reduction = "mean") -> None:
        super().__init__(margin, reduction)

    def forward(self, img_emb: Tensor, txt_emb: Tensor, ids: Any = None) -> Tensor:
        """Loss of a batch of matched (image, caption) embedding pairs; see the class docs."""
        return self._loss(img_emb, txt_emb, ids, MaxViolation())

    @property
    def rule(self) -> SelectionRule:
        """This loss's selection rule, :class:`selhn.rules.MaxViolation`."""
        return MaxViolation()


class SumHingeLoss(_TripletLoss):
    r"""Sum-of-hinges triplet loss (VSE0) over embeddings.

    .. math::

        \ell_a = \sum_{n \in N_a} \max(0,\, m - s_p + s_n)

    Computes ``scores = img_emb @ txt_emb.T`` and returns
    :func:`selhn.functional.sum_hinge_loss` of it. With ``reduction="sum"`` it equals
    VSE++ / VSE-infinity's ``ContrastiveLoss(max_violation=False)`` exactly.
    :meth:`max_violation_on` / :meth:`max_violation_off` are no-ops (always all negatives).

    Args:
        margin: triplet margin :math:`m` (>= 0).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Shape:
        - img_emb: :math:`(B, D)`, L2-normalised
        - txt_emb: :math:`(B, D)`, L2-normalised
        - ids: optional :math:`(B,)` integers; pairs sharing an id are not negatives
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> import selhn
        >>> selhn.SumHingeLoss(reduction="sum")(torch.eye(3), torch.ones(3, 3) / 3 ** 0.5)
        tensor(2.4000)
    """

    def __init__(self, margin: float = 0.2, *, reduction: Reduction = "mean") -> None:
        super().__init__(margin, reduction)

    def forward(self, img_emb: Tensor, txt_emb: Tensor, ids: Any = None) -> Tensor:
        """Loss of a batch of matched (image, caption) embedding pairs; see the class docs."""
        return self._loss(img_emb, txt_emb, ids, SumOfHinges())

    @property
    def rule(self) -> SelectionRule:
        """This loss's selection rule, :class:`selhn.rules.SumOfHinges`."""
        return SumOfHinges()


class ContrastiveLoss(_TripletLoss):
    r"""Drop-in for VSE++ / VSE-infinity's switchable ``ContrastiveLoss``.

    Sum of hinges while ``max_violation`` is off, max violation while it is on, summed over
    both directions by default (``reduction="sum"``), exactly as those code bases compute it.
    :meth:`max_violation_on` and :meth:`max_violation_off` flip the switch, so VSE-infinity's
    warm-up (sum of hinges in epoch 0, hard negatives from epoch 1) is reproduced by its own
    training loop unchanged:

    .. math::

        \ell_a = \begin{cases}
            \max_{n \in N_a} \max(0,\, m - s_p + s_n) & \text{max violation on} \\
            \sum_{n \in N_a} \max(0,\, m - s_p + s_n) & \text{max violation off}
        \end{cases}

    Args:
        margin: triplet margin :math:`m` (>= 0).
        max_violation: initial state of the switch.
        reduction: ``"sum"`` (the VSE code bases) | ``"mean"`` | ``"none"``.

    Shape:
        - im: :math:`(B, D)`, L2-normalised image embeddings
        - s: :math:`(B, D)`, L2-normalised caption embeddings
        - ids: optional :math:`(B,)` integers; pairs sharing an id are not negatives
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> import selhn
        >>> criterion = selhn.ContrastiveLoss(margin=0.2, max_violation=False)
        >>> img, txt = torch.eye(3), torch.ones(3, 3) / 3 ** 0.5
        >>> criterion(img, txt)
        tensor(2.4000)
        >>> criterion.max_violation_on()
        >>> criterion(img, txt)
        tensor(1.2000)
    """

    max_violation: Setting[bool] = Setting(check_bool)

    def __init__(self, margin: float = 0.2, *, max_violation: bool = False, reduction: Reduction = "sum") -> None:
        super().__init__(margin, reduction)
        self.max_violation = max_violation

    def max_violation_on(self) -> None:
        """Switch to the VSE++ hardest-negative objective."""
        self.max_violation = True

    def max_violation_off(self) -> None:
        """Switch to the VSE0 sum-of-hinges objective."""
        self.max_violation = False

    def forward(self, im: Tensor, s: Tensor, ids: Any = None) -> Tensor:
        """Loss of a batch of matched (image, caption) embedding pairs; see the class docs."""
        return self._loss(im, s, ids, self.rule)

    @property
    def rule(self) -> SelectionRule:
        """The selection rule of the switch's current state (max violation or the sum of hinges)."""
        return MaxViolation() if self.max_violation else SumOfHinges()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"


class RuleLoss(_TripletLoss):
    r"""The triplet loss of any selection rule over embeddings.

    Computes ``scores = img_emb @ txt_emb.T`` and returns
    :func:`selhn.functional.rule_loss` of it: per anchor and direction, with the rule's
    (detached) weights :math:`w_{an}` of the anchor's negatives,

    .. math::

        \ell_a = \sum_{n \in N_a} w_{an} \max(0,\, m - s_p + s_n)

    For a built-in rule it is exactly :class:`SelHNLoss`, :class:`MaxViolationLoss` or
    :class:`SumHingeLoss`. A rule with a sparse form (:meth:`~selhn.rules.SelectionRule.select`)
    runs on their lean backward; a dense rule is computed by plain autograd, with the scores in
    float32 for half-precision embeddings, as the other modules do. :meth:`max_violation_on` /
    :meth:`max_violation_off` are no-ops (the rule decides).

    Args:
        rule: a :class:`selhn.rules.SelectionRule` instance.
        margin: triplet margin :math:`m` (>= 0).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` over the 2B per-anchor losses.

    Shape:
        - img_emb: :math:`(B, D)`, L2-normalised
        - txt_emb: :math:`(B, D)`, L2-normalised
        - ids: optional :math:`(B,)` integers; pairs sharing an id are not negatives
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> import selhn
        >>> from selhn.rules import SelectionRule
        >>> class ShareOfActive(SelectionRule):
        ...     "The sum of hinges while over half of the negatives are active, else the hardest."
        ...     def weights(self, anchors):
        ...         share = (anchors.hinges > 0).sum(dim=1) / anchors.count.clamp(min=1)
        ...         every = anchors.negatives.to(anchors.scores.dtype)
        ...         hard = anchors.one_hot(anchors.hardest_index)
        ...         return torch.where((share > 0.5).unsqueeze(1), every, hard)
        >>> criterion = selhn.RuleLoss(ShareOfActive(), margin=0.2, reduction="sum")
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> criterion(img, txt).backward()
        >>> img.grad.shape
        torch.Size([8, 16])
    """

    def __init__(self, rule: SelectionRule, margin: float = 0.2, *, reduction: Reduction = "mean") -> None:
        super().__init__(margin, reduction)
        self._rule = check_rule(rule)

    @property
    def rule(self) -> SelectionRule:
        """The selection rule this loss applies."""
        return self._rule

    def forward(self, img_emb: Tensor, txt_emb: Tensor, ids: Any = None) -> Tensor:
        """Loss of a batch of matched (image, caption) embedding pairs; see the class docs."""
        return self._loss(img_emb, txt_emb, ids, self._rule)

    def extra_repr(self) -> str:
        return f"rule={self._rule!r}, margin={self.margin}, reduction={self.reduction!r}"
