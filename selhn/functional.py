r"""Triplet losses over a score matrix (SCAN-style models, and any precomputed scores).

The per-anchor computation itself lives once, in :mod:`selhn._core` (one core over anchors x
candidates; its internal API: ``score_losses``, ``embedding_losses``, ``embedding_gradients``,
``reduce``), shared with the modules of :mod:`selhn.losses` (which score embeddings with a
leaner backward), the distributed loss and the diagnostic; the literal loop references in
``tests/reference.py`` judge them all.

Every function takes a (B, B) score matrix whose row ``i`` is image anchor ``i``
(image-to-text), whose column ``j`` is caption anchor ``j`` (text-to-image) and whose
diagonal holds the positives. The scores may come from ``img @ txt.T`` with L2-normalised
embeddings (cosine similarities) or from any other model, e.g. SCAN-style cross-attention;
they are not assumed to lie in [-1, 1].

Both directions are always used. ``reduction="none"`` returns the per-anchor losses with
shape (2, B): row 0 the image anchors, row 1 the caption anchors. ``"mean"`` averages those
2B values and ``"sum"`` adds them:

======================  ===========  ==============================================================
loss                    reduction    equals
======================  ===========  ==============================================================
``selhn_loss``          ``"mean"``   the SelHN authors' (RVSE++) returned value
``max_violation_loss``  ``"sum"``    VSE++ / VSE-infinity ``ContrastiveLoss(max_violation=True)``
``sum_hinge_loss``      ``"sum"``    VSE++ / VSE-infinity ``ContrastiveLoss(max_violation=False)``
======================  ===========  ==============================================================

Half-precision scores are upcast to float32 inside the loss (so the hard/fallback choice does
not flip on rounding) and the result is float32; other dtypes are kept.
"""

from __future__ import annotations

from torch import Tensor

from selhn import _core
from selhn._validation import REDUCTIONS, as_fallback, check_choice, check_mask, check_nonnegative, check_scores
from selhn.rules import MaxViolation, SelectionRule, SelHN, SumOfHinges, check_rule
from selhn.types import Fallback, Reduction

__all__ = ["max_violation_loss", "rule_loss", "selhn_loss", "sum_hinge_loss"]


def selhn_loss(
    scores: Tensor,
    margin: float = 0.2,
    epsilon: float = 0.01,
    *,
    fallback: Fallback = "mean",
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Selectively hard negative (SelHN) triplet loss over a score matrix.

    For each anchor ``a`` in each direction, with positive score :math:`s_p`, negatives
    :math:`n \in N_a` and hardest negative :math:`\hat n = \mathop{\mathrm{arg\,max}}_{n \in N_a} s_n`:

    .. math::

        h_n = \max(0,\, m - s_p + s_n), \qquad
        \ell_a = \begin{cases}
            \frac{1}{|N_a|} \sum_{n \in N_a} h_n & \text{if } |s_p - s_{\hat n}| < \epsilon
                \quad (\text{fallback="mean"}) \\
            h_{\hat n} & \text{otherwise.}
        \end{cases}

    The condition is evaluated on detached scores: while an anchor's hardest negative sits
    on its positive, the hardest-negative gradient vanishes and the anchor uses the hinge
    averaged over all its negatives (zero hinges included) instead.

    Args:
        scores: (B, B) score matrix, rows image anchors, columns caption anchors,
            positives on the diagonal.
        margin: triplet margin :math:`m` (>= 0).
        epsilon: gap threshold :math:`\epsilon` (>= 0), in score units; ``0`` gives max
            violation. The default 0.01 is the authors'; for training from scratch on cosine
            scores the docs' page "Which loss, which epsilon?" advises 0.05.
        fallback: ``"mean"`` (the authors' code) averages the hinges over the negatives,
            ``"sum"`` adds them.
        mask: optional boolean (B, B); ``True`` marks a pair that is not a negative (e.g.
            two captions of the same image). The diagonal is always the positive.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` over the 2B per-anchor losses.

    Returns:
        The loss: a scalar, or (2, B) for ``reduction="none"``.

    Shape:
        - scores: :math:`(B, B)`
        - mask: :math:`(B, B)`, boolean
        - output: :math:`()` or :math:`(2, B)` (row 0 image anchors, row 1 caption anchors)

    Example:
        >>> import torch
        >>> from selhn.functional import selhn_loss
        >>> scores = torch.tensor([[0.9, 0.75, 0.8],
        ...                        [0.5, 0.5,  0.3],
        ...                        [0.0, 0.1,  0.8]])
        >>> selhn_loss(scores, reduction="none")
        tensor([[0.1000, 0.1000, 0.0000],
                [0.0000, 0.4500, 0.1000]])
    """
    check_scores(scores)
    margin = check_nonnegative(margin, "margin")
    epsilon = check_nonnegative(epsilon, "epsilon")
    fallback_ = as_fallback(fallback)
    check_choice(reduction, "reduction", REDUCTIONS)
    mask = check_mask(mask, scores.shape[0], scores.device)
    return _core.reduce(
        _core.score_losses(scores, mask, margin, SelHN(epsilon, fallback_)),
        reduction,
    )


def max_violation_loss(
    scores: Tensor,
    margin: float = 0.2,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""VSE++ max-violation (hardest negative) triplet loss over a score matrix.

    .. math::

        \ell_a = \max_{n \in N_a} \max(0,\, m - s_p + s_n)

    for each image anchor (over its row) and each caption anchor (over its column).

    Args:
        scores: (B, B) score matrix, rows image anchors, columns caption anchors,
            positives on the diagonal.
        margin: triplet margin :math:`m` (>= 0).
        mask: optional boolean (B, B); ``True`` marks a pair that is not a negative.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``; ``"sum"`` equals VSE++'s
            ``ContrastiveLoss(max_violation=True)``.

    Returns:
        The loss: a scalar, or (2, B) for ``reduction="none"``.

    Shape:
        - scores: :math:`(B, B)`
        - mask: :math:`(B, B)`, boolean
        - output: :math:`()` or :math:`(2, B)`

    Example:
        >>> import torch
        >>> from selhn.functional import max_violation_loss
        >>> scores = torch.tensor([[0.9, 0.75, 0.8],
        ...                        [0.5, 0.5,  0.3],
        ...                        [0.0, 0.1,  0.8]])
        >>> max_violation_loss(scores, reduction="sum")
        tensor(0.9500)
    """
    check_scores(scores)
    margin = check_nonnegative(margin, "margin")
    check_choice(reduction, "reduction", REDUCTIONS)
    mask = check_mask(mask, scores.shape[0], scores.device)
    return _core.reduce(_core.score_losses(scores, mask, margin, MaxViolation()), reduction)


def sum_hinge_loss(
    scores: Tensor,
    margin: float = 0.2,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Sum-of-hinges triplet loss (VSE0, Kiros et al.) over a score matrix.

    .. math::

        \ell_a = \sum_{n \in N_a} \max(0,\, m - s_p + s_n)

    for each image anchor (over its row) and each caption anchor (over its column).

    Args:
        scores: (B, B) score matrix, rows image anchors, columns caption anchors,
            positives on the diagonal.
        margin: triplet margin :math:`m` (>= 0).
        mask: optional boolean (B, B); ``True`` marks a pair that is not a negative.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``; ``"sum"`` equals VSE++'s
            ``ContrastiveLoss(max_violation=False)``.

    Returns:
        The loss: a scalar, or (2, B) for ``reduction="none"``.

    Shape:
        - scores: :math:`(B, B)`
        - mask: :math:`(B, B)`, boolean
        - output: :math:`()` or :math:`(2, B)`

    Example:
        >>> import torch
        >>> from selhn.functional import sum_hinge_loss
        >>> scores = torch.tensor([[0.9, 0.75, 0.8],
        ...                        [0.5, 0.5,  0.3],
        ...                        [0.0, 0.1,  0.8]])
        >>> sum_hinge_loss(scores, reduction="sum")
        tensor(1.)
    """
    check_scores(scores)
    margin = check_nonnegative(margin, "margin")
    check_choice(reduction, "reduction", REDUCTIONS)
    mask = check_mask(mask, scores.shape[0], scores.device)
    return _core.reduce(_core.score_losses(scores, mask, margin, SumOfHinges()), reduction)


def rule_loss(
    scores: Tensor,
    rule: SelectionRule,
    margin: float = 0.2,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The triplet loss of any selection rule over a score matrix.

    For each anchor ``a`` in each direction, with the rule's (detached) weights
    :math:`w_{an}` of its negatives :math:`n \in N_a`:

    .. math::

        \ell_a = \sum_{n \in N_a} w_{an} \max(0,\, m - s_p + s_n)

    The built-in rules (:class:`~selhn.rules.SelHN`, :class:`~selhn.rules.MaxViolation`,
    :class:`~selhn.rules.SumOfHinges`) give exactly :func:`selhn_loss`,
    :func:`max_violation_loss` and :func:`sum_hinge_loss`. A rule with a sparse form
    (:meth:`~selhn.rules.SelectionRule.select`) runs on the same lean backward; a dense rule
    is computed by plain autograd over its weighted hinges (see :mod:`selhn.rules`).

    Args:
        scores: (B, B) scores, rows images, columns captions, positives on the diagonal.
        rule: a :class:`~selhn.rules.SelectionRule` instance.
        margin: triplet margin :math:`m` (>= 0).
        mask: optional boolean (B, B), ``True`` where a pair is not a negative.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` over the 2B per-anchor losses.

    Returns:
        A scalar, or (2, B) per-anchor losses for ``reduction="none"``.

    Shape:
        - scores: :math:`(B, B)`
        - mask: :math:`(B, B)`, boolean
        - output: :math:`()` or :math:`(2, B)` for ``reduction="none"``

    Example:
        >>> import torch
        >>> from selhn.functional import rule_loss
        >>> from selhn.rules import SelHN, SelectionRule
        >>> class Easiest(SelectionRule):               # the lowest-scoring negative only
        ...     def weights(self, anchors):
        ...         lowest = anchors.scores.masked_fill(~anchors.negatives, float("inf")).argmin(dim=1)
        ...         return anchors.one_hot(lowest)
        >>> scores = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.6, 0.4], [0.0, 0.5, 0.7]])
        >>> rule_loss(scores, Easiest(), reduction="none")
        tensor([[0.0000, 0.0000, 0.0000],
                [0.0000, 0.1000, 0.0000]])
        >>> rule_loss(scores, SelHN(epsilon=0.01), reduction="sum")
        tensor(0.6000)
    """
    scores = check_scores(scores)
    rule = check_rule(rule)
    margin = check_nonnegative(margin, "margin")
    mask = check_mask(mask, scores.shape[0], scores.device)
    check_choice(reduction, "reduction", REDUCTIONS)
    return _core.reduce(_core.score_losses(scores, mask, margin, rule), reduction)
