"""The lean core's backward pass: the gradient with respect to the scores or the embeddings
from what the forward pass kept (:class:`selhn._forms.State`; its module docs give the terms).
The chosen negatives' terms are sparse entries, one weighted gather of embedding rows per
set; each form adds the fallback anchors' terms its own way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from selhn._forms import FullData, PairsData, RowsData, SideData, State
from selhn._forward import SQUARE, Layout
from selhn._kernels import coefficient_blocks, kernel


def _entries(grad: Tensor, coef: Tensor | None, state: State, anchor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The sparse entries (i, j, w) of the gradient over the global (image, caption) pairs.

    In order: each anchor's positive (pair ``(anchor[a], anchor[a])``, weight :math:`-g_a c_a`
    summed over both sides, corrected for the low-rank sides, :class:`LowRankSides`); both
    sides' chosen negatives (:math:`+g_a w_{aj}` where the hinge is active); each side's sparse
    pairs (:math:`+g_a k_a`) and the low-rank sides' corrections. ``coef`` is :math:`g \cdot k`
    (grad times dense_coef). Side 0 is the image anchors.
    """
    low_rank = LowRankSides(state, coef)
    positive = (grad * state.positive_coef).sum(dim=0).neg_()
    for counted in low_rank.counted_at_the_positive():
        positive = positive - counted
    rows, cols, weights = [anchor], [anchor], [positive]
    if state.hard_index is not None and state.hard_coef is not None:
        width = state.hard_index.shape[2]
        repeated = anchor if width == 1 else anchor.repeat_interleave(width)  # each anchor once per slot
        rows += [repeated, state.hard_index[1].reshape(-1)]  # image anchors' chosen captions; caption anchors' images
        cols += [state.hard_index[0].reshape(-1), repeated]
        weights.append((grad.unsqueeze(2) * state.hard_coef).reshape(-1))  # side 0's, then side 1's
    for s, (form, data) in enumerate(zip(state.forms, state.data, strict=True)):
        if form == "sparse" and coef is not None and isinstance(data, PairsData):  # the active pairs alone
            i, j, w = _pair_entries(s, data, coef[s], anchor)
            rows.append(i)
            cols.append(j)
            weights.append(w)
    for i, j, w in low_rank.counted_at_inactive_pairs(anchor):
        rows.append(i)
        cols.append(j)
        weights.append(w)
    return torch.cat(rows), torch.cat(cols), torch.cat(weights)


def _pair_entries(side: int, data: PairsData, coef: Tensor, anchor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One side's kept pairs as (image, caption, weight) entries, weight ``coef[a]`` for anchor ``a``."""
    on_pair = coef.index_select(0, data.pairs[0])
    anchors = anchor.index_select(0, data.pairs[0])
    if side == 0:
        return anchors, data.pairs[1], on_pair
    return data.pairs[1], anchors, on_pair


class LowRankSides:
    """The low-rank form's invariant, in one place: its sides count every pair of their
    fallback anchors as an active hinge, in rank-one products (:meth:`add_products`), and take
    back as sparse entries what those counted wrongly: each anchor's positive, which is no hinge
    (:meth:`counted_at_the_positive`), and the inactive pairs the forward pass kept
    (:meth:`counted_at_inactive_pairs`; excluded pairs are among them)."""

    def __init__(self, state: State, coef: Tensor | None) -> None:
        self.coef = coef
        self.sides = [] if coef is None else [s for s, form in enumerate(state.forms) if form == "low_rank"]
        self.data = state.data

    def counted_at_the_positive(self) -> list[Tensor]:
        """Per side, (L,) what the products counted at each anchor's positive: :math:`g_a k_a`."""
        return [self.coef[s] for s in self.sides] if self.coef is not None else []

    def counted_at_inactive_pairs(self, anchor: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per side, the entries that take back the products' terms at its inactive pairs: :math:`-g_a k_a`."""
        out = []
        for s in self.sides:
            data = self.data[s]
            assert isinstance(data, PairsData) and self.coef is not None
            i, j, w = _pair_entries(s, data, self.coef[s], anchor)
            out.append((i, j, w.neg()))
        return out

    def add_products(self, batch: Batch, d_img: Tensor, d_txt: Tensor) -> None:
        """The products, every pair counted as an active hinge, added to the embeddings' gradients.

        For a low-rank side of image anchors with weights :math:`k_a` (this rank's rows, zero
        elsewhere): image :math:`a` gets :math:`k_a \\sum_c t_c` and caption :math:`c` gets
        :math:`\\sum_a k_a v_a`; likewise for caption anchors with :math:`k'`. So each set gets one
        ``addmm`` of (its own weights, ones) against (ones, the other side's weights) times the
        other set: a (G, 2) x (2, D) product.
        """
        if not self.sides:
            return
        assert self.coef is not None
        img, _, img_all, txt_all, offset = batch
        size = img_all.shape[0]
        pad = (offset, size - offset - img.shape[0])  # this rank's rows within the global batch
        ones = img_all.new_ones(size)
        weights: list[Tensor | None] = [None, None]  # per side, k over the global rows (None: not low rank)
        for s in self.sides:
            weights[s] = F.pad(self.coef[s], pad) if any(pad) else self.coef[s]
        for s, (d, other) in enumerate(((d_img, txt_all), (d_txt, img_all))):
            terms: list[tuple[Tensor, Tensor]] = []  # (column over set s, row over the other set)
            own, opposite = weights[s], weights[1 - s]
            if own is not None:  # set s's own anchors: k_a times the sum of the other set
                terms.append((own, ones))
            if opposite is not None:  # the other side's anchors: sum_c k'_c other_c, to every row of set s
                terms.append((ones, opposite))
            if terms:
                d.addmm_(torch.stack([c for c, _ in terms], dim=1), torch.stack([r for _, r in terms]) @ other)


def _full_blocks(
    coef: Tensor | None, state: State, layout: Layout, matrix: int, scores: Tensor, lean: bool
) -> Tensor | None:
    """The coefficient matrix :math:`K` of the ``full`` sides on ``matrices[matrix]``, or None."""
    full = [s for s, (k, _) in enumerate(layout) if k == matrix and state.forms[s] == "full"]
    if not full or coef is None:
        return None
    thresholds = [_full_data(state.data[s]).threshold for s in full]
    blocks_kernel = kernel("blocks", coefficient_blocks, scores.shape[0], lean)
    blocks: Tensor = blocks_kernel(scores, thresholds, [coef[s] for s in full], [layout[s][1] for s in full])
    return blocks


def _full_data(data: SideData) -> FullData:
    """A ``full`` side's data (its thresholds)."""
    assert isinstance(data, FullData)
    return data


def _sparse_rows(out_rows: Tensor, in_rows: Tensor, weights: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """``out[out_rows[k]] += weights[k] * source[in_rows[k]]`` into a fresh (B, D), ``rows`` =
    ``arange(B)``: one weighted gather-and-sum (``embedding_bag``), with no B x D scratch buffer
    (on a CPU each fresh one costs page faults comparable to the arithmetic)."""
    order = torch.argsort(out_rows, stable=True)
    starts = torch.searchsorted(out_rows.index_select(0, order), rows)  # where each row's entries start
    in_rows, weights = in_rows.index_select(0, order), weights.index_select(0, order)
    return F.embedding_bag(in_rows, source, starts, mode="sum", per_sample_weights=weights)


class Batch(NamedTuple):
    """The embeddings of one call: this rank's (``img``, ``txt``), everyone's (``img_all``,
    ``txt_all``; this rank's own for the square batch), and where this rank's rows start."""

    img: Tensor
    txt: Tensor
    img_all: Tensor
    txt_all: Tensor
    offset: int


def embedding_grads(
    grad: Tensor, state: State, layout: Layout, matrices: Sequence[Tensor | None], batch: Batch, lean: bool
) -> tuple[Tensor, Tensor]:
    """dL/d(global images), dL/d(global captions), (G, D), from the (2, L) cotangent ``grad``.

    With :math:`G = \\partial L / \\partial S`, :math:`\\partial L/\\partial V = G T` and
    :math:`\\partial L/\\partial T = G^\\top V`. A square batch with a ``full`` side forms
    :math:`G` and multiplies (:func:`score_grad`); otherwise the sparse entries become one
    weighted gather of rows per set, then each form adds its part: the rectangles' ``full``
    blocks, the ``rows`` blocks, and the low-rank sides' rank-one products.
    """
    img, txt, img_all, txt_all, offset = batch
    coef = None if state.dense_coef is None else grad * state.dense_coef  # (before the parallel kernels)
    if layout == SQUARE and matrices[0] is not None and "full" in state.forms:  # dL/dS anyway
        d_scores = score_grad(grad, coef, state, matrices[0], lean)
        d_img, d_txt = d_scores @ txt, d_scores.t() @ img
    else:
        every_row = torch.arange(img_all.shape[0], device=img.device)
        i, j, w = _entries(grad, coef, state, every_row.narrow(0, offset, img.shape[0]))
        d_img, d_txt = _sparse_rows(i, j, w, txt_all, every_row), _sparse_rows(j, i, w, img_all, every_row)
    # side s's own embeddings, the other set's, and their gradients (a rectangle's rows: side s's anchors)
    roles = ((img, txt_all, d_img, d_txt), (txt, img_all, d_txt, d_img))
    if layout != SQUARE:
        for m, scores in enumerate(matrices):
            blocks = None if scores is None else _full_blocks(coef, state, layout, m, scores, lean)
            if blocks is not None:
                own, other, d_own, d_other = roles[m]
                d_own.narrow(0, offset, own.shape[0]).addmm_(blocks, other)
                d_other.addmm_(blocks.t(), own)
    if coef is None:
        return d_img, d_txt
    for s, (form, data) in enumerate(zip(state.forms, state.data, strict=True)):
        if form == "rows" and isinstance(data, RowsData):
            own, other, d_own, d_other = roles[s]
            block = torch.where(data.active, coef[s].index_select(0, data.subset).unsqueeze(1), 0.0)
            d_own.index_add_(0, data.subset + offset if offset else data.subset, block @ other)
            d_other.addmm_(block.t(), own.index_select(0, data.subset))
    LowRankSides(state, coef).add_products(batch, d_img, d_txt)
    return d_img, d_txt


def score_grad(grad: Tensor, coef: Tensor | None, state: State, scores: Tensor | None, lean: bool) -> Tensor:
    """dL/dS (B, B) of a square matrix's two sides: their full blocks, plus the sparse entries."""
    size = grad.shape[1]
    out = None if scores is None else _full_blocks(coef, state, SQUARE, 0, scores, lean)
    if out is None:
        out = grad.new_zeros(size, size)
    i, j, w = _entries(grad, coef, state, torch.arange(size, device=grad.device))
    if lean:  # in place on the fresh coefficient matrix: no second B x B buffer
        out.view(-1).index_put_((i * size + j,), w.to(out.dtype), accumulate=True)
        return out
    # traced into the caller's graph: one out-of-place scatter-add, alike on every backend
    return out.reshape(-1).scatter_add(0, i * size + j, w.to(out.dtype)).view(size, size)
