"""Hypothesis strategies for image-text matching batches.

Use them to property-test your own losses and training code::

    from hypothesis import given
    from selhn.testing import score_matrices

    @given(score_matrices())
    def test_my_loss_is_finite(scores):
        assert torch.isfinite(my_loss(scores))

This module needs the optional ``hypothesis`` dependency (``pip install hypothesis``, or selhn's ``testing`` extra);
``import selhn`` never imports it.

Tensors are generated from a drawn seed with ``torch.Generator`` (fast, reproducible: the
falsifying example hypothesis prints names the seed, shape and scale), while batch sizes,
dimensions, scales and id patterns are drawn directly so that they shrink to the smallest
failing case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

try:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("selhn.testing needs hypothesis: pip install hypothesis (selhn's 'testing' extra)") from error

from selhn import functional as F
from selhn._selection import negatives_mask
from selhn._validation import check_nonnegative, check_positive_int
from selhn.diagnostics import gradient_norms
from selhn.losses import RuleLoss
from selhn.rules import (
    Anchors,
    SelectionRule,
    SelHN,
    _checked_weights,
    _square_anchors,
    check_rule,
    is_sparse,
    square_losses,
)
from selhn.types import Fallback

__all__ = [
    "assert_finite_gradients",
    "assert_no_vanishing",
    "assert_per_anchor",
    "assert_rule_matches",
    "assert_selection_rule",
    "batch_sizes",
    "collapsed_embedding_pairs",
    "duplicate_ids",
    "embedding_pairs",
    "half_dtypes",
    "hardest_collapsed_pairs",
    "score_matrices",
]

_SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _check_dtype(dtype: object) -> torch.dtype:
    """A strategy's ``dtype``: a floating-point torch dtype (scores and embeddings are real numbers)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype (scores and embeddings are real), got {dtype}")
    return dtype


def _drawn(value: object, argument: str, least: int) -> int:
    """A size a user's strategy drew, checked: an int >= ``least``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(
            f"the {argument} strategy must draw integers >= {least}, it drew {value!r}: "
            f"use e.g. batch_sizes() or st.integers(min_value={least})"
        )
    return value


def _call(loss: Callable[..., object], *inputs: Tensor) -> Tensor:
    """``loss(*inputs)``, required to be a tensor that depends on the inputs (else the helpers
    would stop on torch's own error, which does not say what the loss did)."""
    value = loss(*inputs)
    if not isinstance(value, Tensor):
        raise AssertionError(
            f"the loss must return a torch.Tensor, got {type(value).__name__}: return the tensor itself "
            "(not .item() or a list), so that its gradient can be checked"
        )
    if not value.requires_grad:
        raise AssertionError(
            "the loss returned a value with no gradient to its inputs: it ignores them, detaches them or "
            "runs under torch.no_grad(); a training loss must depend on the scores or embeddings it is given"
        )
    return value


def batch_sizes(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[int]:
    """Batch sizes B in ``[min_size, max_size]`` (B = 1 has no negatives; B = 2 one each).

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import batch_sizes
        >>> @given(batch_sizes(2, 4))
        ... def check(size):
        ...     assert size in (2, 3, 4)
        >>> check()
    """
    min_size, max_size = check_positive_int(min_size, "min_size"), check_positive_int(max_size, "max_size")
    if max_size < min_size:
        raise ValueError(f"batch sizes need 1 <= min_size <= max_size, got {min_size} and {max_size}")
    return st.integers(min_value=min_size, max_value=max_size)


def half_dtypes() -> st.SearchStrategy[torch.dtype]:
    """``torch.float16`` or ``torch.bfloat16``.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> from selhn.testing import half_dtypes
        >>> @given(half_dtypes())
        ... def check(dtype):
        ...     assert torch.ones(2, dtype=dtype).dtype in (torch.float16, torch.bfloat16)
        >>> check()
    """
    return st.sampled_from([torch.float16, torch.bfloat16])


@st.composite
def score_matrices(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    scale: st.SearchStrategy[float] | None = None,
    levels: int | None = None,
) -> Tensor:
    """(B, B) score matrices with positives on the diagonal.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default :func:`batch_sizes`).
        dtype: dtype of the result (generated in float64, then cast).
        scale: strategy for the spread of the scores (default 0.01 to 3: scores are not
            assumed to lie in [-1, 1]).
        levels: if given, round the scores to ``levels`` distinct values per unit so that
            ties (equal negatives, gaps of exactly 0) occur often.

    Example:
        >>> from hypothesis import given
        >>> from selhn.functional import selhn_loss
        >>> from selhn.testing import score_matrices
        >>> @given(score_matrices(levels=4))
        ... def check(scores):
        ...     assert selhn_loss(scores).isfinite()
        >>> check()
    """
    _check_dtype(dtype)
    size = _drawn(draw(batch_size if batch_size is not None else batch_sizes()), "batch_size", 1)
    if levels is not None:
        check_positive_int(levels, "levels")
    spread = draw(scale if scale is not None else st.floats(min_value=0.01, max_value=3.0))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    scores = torch.randn(size, size, generator=generator, dtype=torch.float64) * spread
    if levels is not None:
        scores = torch.round(scores * levels) / levels
    result: Tensor = scores.to(dtype)
    return result


def _unit_rows(x: Tensor) -> Tensor:
    norms = x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    return torch.div(x, norms)


@st.composite
def embedding_pairs(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    dim: st.SearchStrategy[int] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    normalized: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pairs ``(img_emb, txt_emb)`` of (B, D) embeddings, L2-normalised by default.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default :func:`batch_sizes`).
        dim: strategy for D (default 2 to 16).
        dtype: dtype of the result (generated in float64, then cast).
        normalized: L2-normalise each row.

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import embedding_pairs
        >>> @given(embedding_pairs())
        ... def check(pair):
        ...     img, txt = pair
        ...     assert img.shape == txt.shape
        >>> check()
    """
    _check_dtype(dtype)
    size = _drawn(draw(batch_size if batch_size is not None else batch_sizes()), "batch_size", 1)
    width = _drawn(draw(dim if dim is not None else st.integers(min_value=2, max_value=16)), "dim", 1)
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    img = torch.randn(size, width, generator=generator, dtype=torch.float64)
    txt = torch.randn(size, width, generator=generator, dtype=torch.float64)
    if normalized:
        img, txt = _unit_rows(img), _unit_rows(txt)
    return img.to(dtype), txt.to(dtype)


@st.composite
def collapsed_embedding_pairs(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    dim: st.SearchStrategy[int] | None = None,
    noise: st.SearchStrategy[float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Near-collapsed L2-normalised pairs: one shared centre plus noise of a drawn scale.

    This is the state of a freshly initialised ITM model on real region features: every
    embedding sits near one direction, all scores are nearly equal and every anchor's gap
    is about 0, which is where hard-negative gradients vanish.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default 2 to 8).
        dim: strategy for D (default 4 to 16).
        noise: strategy for the noise scale relative to the unit centre
            (default 1e-4 to 1e-2).
        dtype: dtype of the result.

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import collapsed_embedding_pairs
        >>> @given(collapsed_embedding_pairs())
        ... def check(pair):
        ...     img, txt = pair
        ...     assert ((img @ txt.T) > 0.9).all()
        >>> check()
    """
    _check_dtype(dtype)
    size = _drawn(draw(batch_size if batch_size is not None else batch_sizes(2, 8)), "batch_size", 1)
    width = _drawn(draw(dim if dim is not None else st.integers(min_value=4, max_value=16)), "dim", 1)
    scale = draw(noise if noise is not None else st.floats(min_value=1e-4, max_value=1e-2))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    centre = _unit_rows(torch.randn(1, width, generator=generator, dtype=torch.float64))
    img = centre + scale * torch.randn(size, width, generator=generator, dtype=torch.float64)
    txt = centre + scale * torch.randn(size, width, generator=generator, dtype=torch.float64)
    return _unit_rows(img).to(dtype), _unit_rows(txt).to(dtype)


@st.composite
def duplicate_ids(draw: st.DrawFn, batch_size: int, *, max_distinct: int | None = None) -> Tensor:
    """(B,) integer image ids with repeats, as in COCO batches (5 captions per image).

    Args:
        draw: supplied by hypothesis.
        batch_size: B.
        max_distinct: most distinct ids (default ``max(1, B // 2)``, so repeats are common).

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import duplicate_ids
        >>> @given(duplicate_ids(6))
        ... def check(ids):
        ...     assert ids.shape == (6,) and len(set(ids.tolist())) <= 3
        >>> check()
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    distinct = check_positive_int(max_distinct, "max_distinct") if max_distinct is not None else max(1, batch_size // 2)
    values = draw(st.lists(st.integers(0, distinct - 1), min_size=batch_size, max_size=batch_size))
    return torch.tensor(values, dtype=torch.long)


def _hardest_collapsed(seed: int, size: int, dim: int, distance: float) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centre = _unit_rows(torch.randn(1, dim, generator=generator, dtype=torch.float64))
    base = 0.3 * torch.randn(size // 2, dim, generator=generator, dtype=torch.float64) / dim**0.5
    spread = base.repeat_interleave(2, dim=0)[:size]
    direction = _unit_rows(torch.randn(size, dim, generator=generator, dtype=torch.float64))
    txt = _unit_rows(centre + spread + distance * direction / 2)
    features = txt + 0.05 * torch.randn(size, dim, generator=generator, dtype=torch.float64) / dim**0.5
    return features, txt, torch.tensor(distance, dtype=torch.float64)


@st.composite
def hardest_collapsed_pairs(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    dim: st.SearchStrategy[int] | None = None,
    distance: st.SearchStrategy[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Batches whose hardest negatives collapse onto the positives while the rest stay apart.

    Captions come in near-duplicate pairs (``2k`` and ``2k+1`` at the drawn ``distance``),
    around a shared centre so that most scores lie within the margin of one another (most
    hinges active, as early in training); each image sits near its caption. Every anchor's
    hardest negative is then its duplicate: the max-violation gradient vanishes with the
    distance, while the average over all negatives does not, except for an anchor whose only
    active negative is its duplicate (then the average vanishes too).

    Returns ``(img_features, txt_emb)``: image features *before* L2 normalisation (their norms
    are near 1) and unit caption embeddings, in float64.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default even sizes 4 to 16).
        dim: strategy for D (default 8 to 32).
        distance: strategy for the distance between duplicates (default 1e-7 to 1e-4).

    Example:
        >>> from hypothesis import given
        >>> from selhn.diagnostics import vanishing_stats
        >>> from selhn.testing import hardest_collapsed_pairs
        >>> @given(hardest_collapsed_pairs())
        ... def check(pair):
        ...     features, txt = pair
        ...     img = features / features.norm(dim=1, keepdim=True)
        ...     assert vanishing_stats(img @ txt.T, epsilon=0.01).i2t.vanishing_fraction == 1
        >>> check()
    """
    size = _drawn(
        draw(batch_size if batch_size is not None else st.integers(2, 8).map(lambda k: 2 * k)), "batch_size", 2
    )
    if size % 2:
        raise ValueError(f"the batch_size strategy must draw even sizes (captions come in pairs), it drew {size}")
    width = _drawn(draw(dim if dim is not None else st.integers(min_value=8, max_value=32)), "dim", 2)
    gap = draw(distance if distance is not None else st.floats(min_value=1e-7, max_value=1e-4))
    features, txt, _ = _hardest_collapsed(draw(_SEEDS), size, width, gap)
    return features, txt


# --------------------------------------------------------------------------- property helpers
LossOverScores = Callable[[Tensor], Tensor]
LossOverEmbeddings = Callable[[Tensor, Tensor], Tensor]


def assert_finite_gradients(
    loss: LossOverScores | LossOverEmbeddings,
    *,
    over: Literal["embeddings", "scores"] = "embeddings",
    max_examples: int = 50,
) -> None:
    """Check with hypothesis that ``loss`` and its gradients are finite on ITM batches.

    Batches include B = 1 (no negatives), ties, near-collapsed batches and large scores.

    Args:
        loss: a callable returning a tensor (reduced or not), taking ``(img_emb, txt_emb)``
            when ``over="embeddings"`` or a (B, B) score matrix when ``over="scores"``.
        over: ``"embeddings"`` or ``"scores"``.
        max_examples: how many batches hypothesis tries.

    Raises:
        AssertionError: with the falsifying batch and what was not finite.

    Example:
        >>> import selhn
        >>> from selhn.testing import assert_finite_gradients
        >>> assert_finite_gradients(selhn.SelHNLoss(), max_examples=10)
        >>> assert_finite_gradients(selhn.functional.max_violation_loss, over="scores", max_examples=10)
    """
    max_examples = check_positive_int(max_examples, "max_examples")
    if over == "scores":
        inputs: st.SearchStrategy[tuple[Tensor, ...]] = st.one_of(
            score_matrices(levels=4), score_matrices(scale=st.floats(10.0, 1e4))
        ).map(lambda s: (s,))
    elif over == "embeddings":
        inputs = st.one_of(embedding_pairs(), collapsed_embedding_pairs(), embedding_pairs(batch_sizes(1, 1)))
    else:
        raise ValueError(f"over must be 'embeddings' or 'scores', got {over!r}")

    @settings(max_examples=max_examples, deadline=None)
    @given(inputs)
    def check(batch: tuple[Tensor, ...]) -> None:
        leaves = [x.clone().requires_grad_() for x in batch]
        value = _call(loss, *leaves)
        if not torch.isfinite(value).all():
            raise AssertionError(f"the loss is not finite on this batch: {value}")
        torch.autograd.backward(value.sum())
        for name, leaf in zip(("first input", "second input"), leaves, strict=False):
            if leaf.grad is not None and not torch.isfinite(leaf.grad).all():
                raise AssertionError(
                    f"the gradient with respect to the {name} is not finite: a NaN or Inf was introduced "
                    "by the loss (look for divisions by a count of negatives or -1e9-style sentinels)"
                )

    check()


def assert_no_vanishing(loss: LossOverEmbeddings, *, min_ratio: float = 0.1, max_examples: int = 25) -> None:
    """Check that ``loss`` keeps its gradient where the hardest negatives collapse, in both directions.

    Two batches of :func:`hardest_collapsed_pairs` are built per example, everything else
    equal but the distance of the hardest negatives from the positives (1e-2, then 1e-6):

    * image anchors: the captions come in near-duplicate pairs, and the gradient with
      respect to the image features (before L2 normalisation) is measured;
    * caption anchors: the same batch with the roles swapped (the images are the
      near-duplicates), and the gradient with respect to the caption features is measured.

    A loss whose gradient vanishes with that distance (max violation: ratio about 1e-4,
    from :func:`selhn.diagnostics.gradient_norms`) fails; one that keeps a gradient from the
    other negatives (SelHN, sum of hinges: ratio about 1) passes.

    When ``loss`` returns the per-anchor losses, shape (2, B) (row 0 image anchors, row 1
    caption anchors, as ``reduction="none"`` gives), each direction is checked on its own
    rows: a loss that takes hard negatives for one direction fails even when the other
    direction keeps the encoders learning. Any other output is summed and checked as a whole
    in both orientations; the terms of the two directions then share each gradient, so
    return per-anchor losses to hold each direction to the property.

    Args:
        loss: a callable ``loss(img_emb, txt_emb)`` over L2-normalised embeddings.
        min_ratio: smallest allowed ratio of the gradient norms (collapsed / apart).
        max_examples: how many batches hypothesis tries.

    Raises:
        AssertionError: naming the direction, with the batch, the measured ratio and the
            max-violation ratio.

    Example:
        >>> from functools import partial
        >>> import selhn
        >>> from selhn.testing import assert_no_vanishing
        >>> assert_no_vanishing(selhn.SelHNLoss(reduction="none"), max_examples=5)
        >>> try:
        ...     assert_no_vanishing(selhn.MaxViolationLoss(), max_examples=5)
        ... except AssertionError as error:
        ...     print(str(error).splitlines()[0])
        the gradient vanishes where the hardest negatives collapse: ...
    """
    min_ratio = check_nonnegative(min_ratio, "min_ratio")
    max_examples = check_positive_int(max_examples, "max_examples")
    anchors = ("image anchors", "caption anchors")

    def measure(features: Tensor, twins: Tensor, side: int) -> tuple[list[float], float]:
        """Gradient norms with respect to ``features`` (before normalisation), the side
        ``side`` (0: images, 1: captions) of the batch whose other side is ``twins``: one
        per direction for a per-anchor loss, else one for the whole loss; and max
        violation's."""
        leaf = features.clone().requires_grad_()
        unit = leaf / leaf.norm(dim=1, keepdim=True)
        img, txt = (unit, twins) if side == 0 else (twins, unit)
        value = _call(loss, img, txt)
        size = features.shape[0]
        parts = [value[0].sum(), value[1].sum()] if tuple(value.shape) == (2, size) else [value.sum()]
        norms = []
        for part in parts:
            (grad,) = torch.autograd.grad(part, leaf, retain_graph=True, allow_unused=True)
            norms.append(0.0 if grad is None else float(grad.norm()))
        plain_img, plain_txt = (unit.detach(), twins) if side == 0 else (twins, unit.detach())
        feature_norms = features.norm(dim=1)
        if side == 0:
            hard = gradient_norms(plain_img, plain_txt, "hn", img_norms=feature_norms).image.norm()
        else:
            hard = gradient_norms(plain_img, plain_txt, "hn", txt_norms=feature_norms).text.norm()
        return norms, float(hard)

    @settings(max_examples=max_examples, deadline=None)
    @given(_SEEDS, st.integers(2, 8).map(lambda k: 2 * k), st.integers(8, 32))
    def check(seed: int, size: int, dim: int) -> None:
        for side in (0, 1):  # the anchors whose hardest negatives collapse: images, then captions
            apart, hard_apart = measure(*_hardest_collapsed(seed, size, dim, 1e-2)[:2], side)
            together, hard_together = measure(*_hardest_collapsed(seed, size, dim, 1e-6)[:2], side)
            checked = [side] if len(apart) == 2 else [None]
            for direction in checked:
                index = 0 if direction is None else direction
                ratio = together[index] / max(apart[index], 1e-300)
                if ratio >= min_ratio:
                    continue
                which = "the whole loss" if direction is None else f"the {anchors[direction]}' losses"
                raise AssertionError(
                    f"the gradient vanishes where the hardest negatives collapse: for {which}, with the "
                    f"{anchors[side]}' hardest negatives collapsing, its norm fell by a factor {ratio:.2e} "
                    f"(allowed: {min_ratio:g}) when each hardest negative moved from 1e-2 to 1e-6 of its positive, "
                    f"other negatives unchanged; max violation's ratio on this batch is "
                    f"{hard_together / max(hard_apart, 1e-300):.2e}. A loss that keeps learning here must use "
                    "negatives other than the hardest one while the gap |s_pos - s_hardest| is near 0 (as SelHN does)."
                )

    check()


def assert_selection_rule(
    loss: LossOverScores,
    *,
    margin: float = 0.2,
    epsilon: float = 0.01,
    fallback: Fallback = "mean",
    max_examples: int = 50,
) -> None:
    """Check that a SelHN-like loss follows the selection rule, anchor by anchor.

    ``loss(scores)`` must return the per-anchor losses (2, B) (row 0 image anchors, row 1
    caption anchors) of :class:`selhn.rules.SelHN` ``(epsilon, fallback)``: where
    ``|s_pos - s_hardest| < epsilon`` the hinge averaged (``fallback="mean"``) or summed over
    the anchor's negatives, elsewhere its hardest-negative hinge. Score matrices include ties
    and gaps near epsilon.

    Args:
        loss: per-anchor loss over a score matrix.
        margin: the margin the loss uses.
        epsilon: the gap threshold the loss uses.
        fallback: ``"mean"`` or ``"sum"``, the fallback the loss uses.
        max_examples: how many batches hypothesis tries.

    Raises:
        AssertionError: naming the anchor, its gap, the branch it should take and both values.

    Example:
        >>> from functools import partial
        >>> from selhn.functional import selhn_loss
        >>> from selhn.testing import assert_selection_rule
        >>> assert_selection_rule(partial(selhn_loss, reduction="none"), max_examples=10)
    """
    margin = check_nonnegative(margin, "margin")
    rule = SelHN(epsilon, fallback)
    max_examples = check_positive_int(max_examples, "max_examples")

    @settings(max_examples=max_examples, deadline=None)
    @given(st.one_of(score_matrices(levels=100), score_matrices(scale=st.floats(0.001, 0.05))))
    def check(scores: Tensor) -> None:
        got = _call(loss, scores.clone().requires_grad_())
        if tuple(got.shape) != (2, scores.shape[0]):
            raise AssertionError(f"the loss must return per-anchor losses of shape (2, B), got {tuple(got.shape)}")
        expected = F.rule_loss(scores, rule, margin, reduction="none")  # the package's one SelHN
        flags = torch.stack([rule.falls_back(side) for side in _square_anchors(scores, None, margin)])
        hard = F.max_violation_loss(scores, margin, reduction="none")
        close = torch.isclose(got.to(expected.dtype), expected, rtol=1e-5, atol=1e-6)
        if not close.all():
            direction, anchor = (int(i) for i in (~close).nonzero()[0])
            names = ("image anchor (row)", "caption anchor (column)")
            branch = "fallback" if flags[direction, anchor] else "hardest negative"
            at = (direction, anchor)
            raise AssertionError(
                f"{names[direction]} {anchor} should take the {branch} branch "
                f"(expected {float(expected[at].detach()):.6g}, got {float(got[at].detach()):.6g}; "
                f"hard value {float(hard[at].detach()):.6g})"
            )

    check()


RuleReference = Callable[[Tensor, Tensor | None, float], Tensor]


def assert_rule_matches(
    rule: SelectionRule,
    reference: RuleReference,
    *,
    margin: float = 0.2,
    max_examples: int = 50,
) -> None:
    """Check with hypothesis that a selection rule's loss equals your literal definition of it,
    in values and gradients.

    ``reference(scores, mask, margin)`` is your loss written in its most literal form (loops
    over anchors and negatives are fine): the (2, B) per-anchor losses of a (B, B) float64 score
    matrix, row 0 the image anchors (rows), row 1 the caption anchors (columns), differentiable
    with respect to ``scores``; ``mask`` is None or a boolean (B, B), ``True`` where a pair is no
    negative (shared ids). The helper compares it, on score matrices with ties, masks of shared
    ids (a fully tied batch always among them), and B = 1 (no negatives), in float64, with
    every path that computes the rule's loss:
    :func:`selhn.functional.rule_loss` ``(scores, rule, margin, mask=mask, reduction="none")``,
    :class:`selhn.RuleLoss` over embeddings whose product is that matrix (with the ids), and,
    for a rule with a sparse form (:meth:`~selhn.rules.SelectionRule.select`), the plain autograd
    path that computes its dense view.

    Args:
        rule: the rule under test (a :class:`selhn.rules.SelectionRule` instance).
        reference: your literal per-anchor loss, as above.
        margin: the margin both use.
        max_examples: how many batches hypothesis tries.

    Raises:
        AssertionError: naming the batch size, the direction and anchor that differ, and both
            values (or the gradients' largest difference).

    Example:
        >>> import torch
        >>> from selhn.rules import MaxViolation
        >>> from selhn.testing import assert_rule_matches
        >>> def hardest(scores, mask, margin):
        ...     size = scores.shape[0]
        ...     rows = []
        ...     for direction in (0, 1):
        ...         s = scores if direction == 0 else scores.T
        ...         m = None if mask is None else (mask if direction == 0 else mask.T)
        ...         losses = []
        ...         for a in range(size):
        ...             negatives = [n for n in range(size) if n != a and (m is None or not m[a, n])]
        ...             best = max(negatives, key=lambda n: s[a, n].item(), default=None)  # ties: the first
        ...             hinge = (margin - s[a, a] + s[a, best]).clamp(min=0) if best is not None else s[a, a] * 0
        ...             losses.append(hinge)
        ...         rows.append(torch.stack(losses))
        ...     return torch.stack(rows)
        >>> assert_rule_matches(MaxViolation(), hardest, max_examples=10)
    """
    rule = check_rule(rule)
    margin = check_nonnegative(margin, "margin")
    max_examples = check_positive_int(max_examples, "max_examples")
    if not callable(reference):
        raise TypeError(f"reference must be a function (scores, mask, margin) -> (2, B) losses, got {reference!r}")

    @st.composite
    def batches(draw: st.DrawFn) -> tuple[Tensor, Tensor | None]:
        scores = draw(st.one_of(score_matrices(levels=8), score_matrices(batch_sizes(1, 1)), score_matrices()))
        return scores, draw(st.none() | duplicate_ids(scores.shape[0]))

    @settings(max_examples=max_examples, deadline=None)
    @given(batches())
    @example((torch.full((3, 3), 0.5, dtype=torch.float64), None))  # every negative tied: always tried
    def check(batch: tuple[Tensor, Tensor | None]) -> None:
        scores, ids = batch
        size = scores.shape[0]
        mask = None if ids is None else (ids.unsqueeze(0) == ids.unsqueeze(1)) & ~torch.eye(size, dtype=torch.bool)
        theirs = scores.clone().requires_grad_()
        expected = reference(theirs, mask, margin)
        if not isinstance(expected, Tensor) or tuple(expected.shape) != (2, size):
            shape = tuple(expected.shape) if isinstance(expected, Tensor) else type(expected).__name__
            raise AssertionError(f"reference must return the per-anchor losses (2, {size}), got {shape}")
        cotangent = torch.randn(2, size, generator=torch.Generator().manual_seed(size), dtype=scores.dtype)
        if expected.requires_grad:
            torch.autograd.backward((expected * cotangent.to(expected.dtype)).sum())
        their_grad = theirs.grad if theirs.grad is not None else torch.zeros_like(scores)
        for path, (got, our_grad) in _rule_paths(rule, scores, ids, mask, margin, cotangent).items():
            close = torch.isclose(got.detach(), expected.detach().to(got.dtype), rtol=1e-7, atol=1e-9)
            if not bool(close.all()):
                direction, anchor = (int(i) for i in (~close).nonzero()[0])
                names = ("image anchor (row)", "caption anchor (column)")
                raise AssertionError(
                    f"B = {size}, {path}: {names[direction]} {anchor}: the rule's loss is "
                    f"{float(got[direction, anchor]):.10g}, the reference's {float(expected[direction, anchor]):.10g}"
                )
            if not torch.allclose(our_grad, their_grad.to(our_grad.dtype), rtol=1e-7, atol=1e-9):
                difference = float((our_grad - their_grad).abs().max())
                raise AssertionError(
                    f"B = {size}, {path}: the gradients with respect to the scores differ by up to {difference:.3g} "
                    "(the values agree): look at ties (the first index wins) and at which hinges count as active (> 0)"
                )

    check()


def _rule_paths(
    rule: SelectionRule, scores: Tensor, ids: Tensor | None, mask: Tensor | None, margin: float, cotangent: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """A rule's per-anchor losses (2, B) and their gradient with respect to the scores (through
    ``cotangent``) on each path the package computes it by: over the score matrix, over
    embeddings whose product is exactly that matrix (identity images, captions the columns'
    transposes; ``ids`` for the mask), and for a rule with a sparse form also on the plain
    autograd path, which computes its dense view (:meth:`selhn.rules.SelectionRule.weights`)."""
    out = {}
    matrix = scores.clone().requires_grad_()
    losses = F.rule_loss(matrix, rule, margin, mask=mask, reduction="none")
    out["over the score matrix"] = (losses, _gradient(losses, cotangent, matrix))
    img = torch.eye(scores.shape[0], dtype=scores.dtype)
    txt = scores.t().clone().requires_grad_()  # img @ txt.T == scores, exactly
    losses = RuleLoss(rule, margin, reduction="none")(img, txt, ids)
    out["over embeddings"] = (losses, _gradient(losses, cotangent, txt).t())
    if is_sparse(rule):
        matrix = scores.clone().requires_grad_()
        losses = square_losses(matrix, mask, rule, margin)
        out["on the plain path (its dense weights)"] = (losses, _gradient(losses, cotangent, matrix))
    return out


def _gradient(losses: Tensor, cotangent: Tensor, wrt: Tensor) -> Tensor:
    """d(losses . cotangent)/d(wrt), zeros where ``wrt`` does not reach the losses."""
    (grad,) = torch.autograd.grad((losses * cotangent).sum(), wrt, allow_unused=True)
    return torch.zeros_like(wrt) if grad is None else grad


def assert_per_anchor(rule: SelectionRule, *, margin: float = 0.2, max_examples: int = 50) -> None:
    """Check with hypothesis that a selection rule chooses each anchor's weights from that
    anchor's row alone: removing other anchors, or putting them in another order, leaves every
    anchor's weights unchanged.

    The distributed loss hands each rank its own anchors against the global batch, so a rule
    that uses a statistic over the batch of anchors (the mean score of all anchors, say) gives
    another loss on several ranks than in one process. Built-in rules, top-k rules and SelHN
    pass; such a rule fails here, on one process, before it trains.

    Args:
        rule: the rule under test (a :class:`selhn.rules.SelectionRule` instance).
        margin: the margin its anchors carry.
        max_examples: how many batches hypothesis tries.

    Raises:
        AssertionError: naming the batch size, the anchors kept and the anchor whose weights changed.

    Example:
        >>> import torch
        >>> from selhn.rules import SelectionRule, SelHN
        >>> from selhn.testing import assert_per_anchor
        >>> assert_per_anchor(SelHN(0.05), max_examples=10)
        >>> class AboveTheBatchMean(SelectionRule):
        ...     def weights(self, anchors):          # the mean over every anchor: not per anchor
        ...         mean = anchors.scores[anchors.negatives].mean()
        ...         return (anchors.scores > mean).to(anchors.scores.dtype)
        >>> try:
        ...     assert_per_anchor(AboveTheBatchMean(), max_examples=20)
        ... except AssertionError as error:
        ...     print(str(error).split(":")[0])
        a rule must choose each anchor's weights from its own row
    """
    rule = check_rule(rule)
    margin = check_nonnegative(margin, "margin")
    max_examples = check_positive_int(max_examples, "max_examples")

    @settings(max_examples=max_examples, deadline=None)
    @given(st.one_of(score_matrices(levels=8), score_matrices()), st.data())
    def check(scores: Tensor, data: st.DataObject) -> None:
        size = scores.shape[0]
        order = data.draw(st.permutations(range(size)))
        kept = order[: data.draw(st.integers(min_value=1, max_value=size))]
        negatives = negatives_mask((size, size), torch.arange(size), None)
        rows = scores.masked_fill(~negatives, float("-inf"))

        def weights(anchors: list[int]) -> Tensor:
            index = torch.tensor(anchors, dtype=torch.long)
            side = Anchors(rows[index], scores.diagonal()[index], negatives[index], margin)
            return _checked_weights(rule, side)

        alone, together = weights(kept), weights(list(range(size)))[torch.tensor(kept)]
        differs = ~torch.isclose(alone, together, rtol=1e-12, atol=1e-12).all(dim=1)
        if bool(differs.any()):
            anchor = kept[int(differs.nonzero()[0, 0])]
            raise AssertionError(
                f"a rule must choose each anchor's weights from its own row: {rule!r} gives anchor {anchor} other "
                f"weights among the anchors {kept} than among all {size} of the batch (B = {size}), so the "
                "distributed loss, which hands each rank its own anchors, would differ from one process's"
            )

    check()
