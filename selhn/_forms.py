r"""What the lean backward keeps of each side, and which form it takes.

With :math:`g_a` the cotangent of anchor :math:`a`'s loss, the gradient with respect to the
scores has, per anchor, :math:`-c_a` at its positive (:attr:`State.positive_coef`,
:math:`c_a` = the weight its loss puts on the positive), :math:`+g_a w_{aj}` at each chosen
negative whose hinge is active (:attr:`State.hard_coef`), and :math:`+g_a k_a` at every
active hinge of an anchor that falls back (:math:`k_a` = :attr:`State.dense_coef`). The
chosen terms are O(kB) entries. The fallback terms keep one of four forms per side:

* ``full``: the side's thresholds :math:`t_a = s_p - m`; backward forms the coefficient
  matrix :math:`K_{an} = g_a k_a [s_{an} > t_a]` from the saved scores (one pass, compiled
  from B = ``COMPILE_MIN_BATCH``) and multiplies it with the embeddings;
* ``rows`` (at most half the anchors fall back, over embeddings): the falling-back anchors
  and a mask of their active hinges, so the products run over those rows only;
* ``low_rank`` (nearly every hinge active: a cold start): the *inactive* pairs. Counted as if
  every pair were active, anchor :math:`a`'s terms are :math:`g_a k_a \sum_n (t_n - t_a)`
  for image anchors (a rank-one product: :math:`g_a k_a (\sum_n t_n) - g_a k_a t_a` minus
  the positive, which is no hinge), corrected by subtracting the inactive pairs' entries;
* ``sparse`` (hardly any active: late training): the active pairs alone.

The last two save 20-25% of ``full``'s time below about 1.5% of a side's hinges on a CPU, and
pay on a GPU only below 0.3% - 0.7% (``benchmarks/bench_forms.py``): :data:`CPU_THRESHOLDS`,
:data:`GPU_THRESHOLDS`. Under ``torch.compile`` only ``full`` is taken.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Form = Literal["none", "full", "rows", "low_rank", "sparse"]


class FormThresholds(NamedTuple):
    """When a side's fallback terms take the low-rank or the sparse form: when its fallback
    anchors' inactive (active) hinges, excluded pairs counted inactive, are at most half this
    fraction of its pairs; 0 switches a form off."""

    low_rank: float
    sparse: float


#: On a CPU. From ``bench_forms.py`` (2-core CPU, D = 1024): at 1.5% of a side's hinges, the
#: low-rank (sparse) form takes 0.79 / 0.78 / 0.82 (0.74 / 0.73 / 0.77) of the full form's
#: time at B = 512 / 2048 / 4096.
CPU_THRESHOLDS = FormThresholds(low_rank=1 / 32, sparse=1 / 32)
#: On every other device: on an H200 (``bench_forms.py --device cuda``) both forms break even
#: at 0.3% - 0.7% of a side's hinges; at 1/512 the low-rank (sparse) form takes 0.87 / 0.60
#: (0.76 / 0.56) of the full form's time at B = 4096 / 16384.
GPU_THRESHOLDS = FormThresholds(low_rank=1 / 512, sparse=1 / 512)


def pair_form_fractions(device: torch.device) -> FormThresholds:
    """The thresholds that apply on ``device``, or those forced here."""
    forced = _forced_fractions.get()
    if forced is not None:
        return forced
    return CPU_THRESHOLDS if device.type == "cpu" else GPU_THRESHOLDS


_forced_fractions: contextvars.ContextVar[FormThresholds | None] = contextvars.ContextVar(
    "selhn_forced_pair_form_fractions", default=None
)


@contextlib.contextmanager
def forced_pair_form_fractions(low_rank: float, sparse: float) -> Iterator[None]:
    """Use these (low-rank, sparse) thresholds on every device in the block: 1.0 forces a form where
    allowed, 0.0 switches it off. A context variable: other threads and tasks keep theirs."""
    token = _forced_fractions.set(FormThresholds(float(low_rank), float(sparse)))
    try:
        yield
    finally:
        _forced_fractions.reset(token)


def low_rank_or_sparse(inactive: float, n_active: float, n_pairs: int, device: torch.device) -> bool | None:
    """True (low rank), False (sparse) or None for a side's fallback anchors with these inactive
    and active hinges among its ``n_pairs`` (the thresholds count both sides)."""
    low_rank, sparse = pair_form_fractions(device)
    if low_rank > 0 and inactive <= low_rank * n_pairs / 2:
        return True
    if sparse > 0 and n_active <= sparse * n_pairs / 2:
        return False
    return None


class FullData(NamedTuple):
    """``full``: the side's thresholds :math:`t_a = s_p - m` (its saved scores are kept beside)."""

    threshold: Tensor  # (L,)


class RowsData(NamedTuple):
    """``rows``: the anchors that fall back and the mask of their active hinges."""

    subset: Tensor  # (R,) anchor indices
    active: Tensor  # (R, C) boolean


class PairsData(NamedTuple):
    """``low_rank``: the fallback anchors' inactive pairs; ``sparse``: their active pairs."""

    pairs: Tensor  # (2, P): row 0 the anchor, row 1 the candidate


SideData = FullData | RowsData | PairsData | None
_DATA: dict[Form, type[FullData] | type[RowsData] | type[PairsData]] = {
    "full": FullData,
    "rows": RowsData,
    "low_rank": PairsData,
    "sparse": PairsData,
}


class State(NamedTuple):
    """What backward needs of both sides (row 0: the image anchors, row 1: the caption anchors).

    ``forms[s]`` says what ``data[s]`` holds (module docs); the coefficient tensors are (2, L).
    """

    hard_index: Tensor | None  # the hardest negative's candidate, where hard terms exist
    hard_coef: Tensor | None  # 1 where the hardest negative's hinge is used and active, else 0
    dense_coef: Tensor | None  # k_a: the weight of each active hinge of a falling-back anchor, else 0
    positive_coef: Tensor  # c_a: the weight each anchor's loss puts on its positive (negated in the gradient)
    forms: tuple[Form, ...]
    data: tuple[SideData, ...]


def plan_pair_forms(
    matrices: list[Tensor],
    layout: Sequence[tuple[int, int]],
    offset: int,
    forms: list[Form],
    kept: list[SideData],
    falls_back: Tensor,
    count: Tensor,
    n_falling: Sequence[int],
) -> None:
    """Step 4 of the forward pass (over embeddings, eager): a ``full`` side whose fallback
    anchors have nearly every hinge active takes the low-rank form, one with hardly any active
    the sparse form; updates each side's ``forms`` and ``kept`` data in place. One device read
    for both sides. ``layout``: (score matrix, along) per side (:data:`selhn._forward.SQUARE`)."""
    n_anchors, n_candidates = falls_back.shape[1], matrices[0].shape[layout[0][1]]
    everyone_falls = sum(n_falling) == 2 * n_anchors
    n_active = (count.sum(1) if everyone_falls else (count * falls_back).sum(1)).tolist()
    device = matrices[0].device
    for s, (k, along) in enumerate(layout):
        data = kept[s]
        if forms[s] != "full" or not isinstance(data, FullData):
            continue
        inactive = n_falling[s] * (n_candidates - 1) - n_active[s]  # (excluded pairs count inactive)
        low_rank = low_rank_or_sparse(inactive, n_active[s], n_anchors * n_candidates, device)
        if low_rank is None:
            continue
        pairs = torch.empty(2, 0, dtype=torch.long, device=device)
        if inactive if low_rank else n_active[s]:
            threshold = data.threshold.unsqueeze(along)
            chosen = torch.le(matrices[k], threshold) if low_rank else torch.gt(matrices[k], threshold)
            if low_rank:  # excluded pairs are inactive hinges; the positive is no hinge at all
                chosen.diagonal(offset).fill_(False)
            pairs = chosen.logical_and_(falls_back[s].unsqueeze(along)).nonzero().t()  # (row, column) of the matrix
            del chosen  # (before the other side's: one B x B mask at a time)
        forms[s] = "low_rank" if low_rank else "sparse"
        kept[s] = PairsData(pairs if along == 1 else pairs.flip(0))  # row 0: the anchor
