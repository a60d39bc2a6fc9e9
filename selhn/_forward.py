r"""The lean core's forward pass over anchors x candidates, in the paper's steps (:func:`forward_pass`).

A *side* is one direction's anchors: the rows (``along=1``) or the columns (``along=0``) of a
score matrix, each anchor with one positive candidate. The square batch is the two sides of
one matrix S (image anchors are its rows, caption anchors its columns); the distributed loss
is a rank's images against every rank's captions and its captions against every rank's
images, two rectangles. Both sides are always computed together, as (2, L) tensors: row 0
the image anchors, row 1 the caption anchors.

1. the positives :math:`s_p`, and every pair that is not a negative set to ``-inf``
   (:func:`_take_positives`);
2. the rule's choice on each side (:func:`_select`): its chosen negatives, whose weighted
   hinges are summed (max violation's hardest negative, SelHN's where the gap is wide), and
   each anchor's coefficient :math:`k_a` on all of its hinges (1 for the sum of hinges,
   :math:`1/|N_a|` where SelHN falls back, 0 elsewhere); the anchors with :math:`k_a \ne 0`
   *fall back* (:func:`_who_falls_back`). The candidates' exact copies are looked up only
   where a chosen hinge counts (:class:`CandidateCopies`);
3. for the anchors that fall back, the sum of their hinges and how many are active
   (:func:`_fallback_terms`), times :math:`k_a`;
4. the backward plan: which form each side's fallback terms keep for backward
   (:func:`selhn._forms.plan_pair_forms`), and the coefficients of the gradient
   (:class:`selhn._forms.State`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from selhn import _selection as sel
from selhn._forms import Form, FullData, RowsData, SideData, State, plan_pair_forms
from selhn._kernels import hinge_sums, kernel
from selhn.rules import Anchors, SelectionRule, _checked_selection
from selhn.types import Direction


class Options(NamedTuple):
    """One call's choices: the rule (one with a sparse form, :func:`selhn.rules.is_sparse`) and
    margin; ``lean``: eager, so data-dependent forms may be chosen (not under ``torch.compile``);
    ``embeddings``: the loss is over embeddings (the rows and pair forms apply)."""

    rule: SelectionRule
    margin: float
    lean: bool
    embeddings: bool


#: (score matrix, along) of each side: the square batch's two sides share one matrix, a rank's
#: two rectangles are one matrix each (its images' rows, its captions' rows).
SQUARE = ((0, 1), (0, 0))
RECTANGLES = ((0, 1), (1, 1))
Layout = tuple[tuple[int, int], ...]
#: Per side, :func:`selhn._selection.first_copies` of its candidates (the captions for the image
#: anchors, the images for the caption anchors); None where unknown (a score matrix) or none equal.
Copies = tuple[Tensor | None, Tensor | None]


def candidate_copies(img: Tensor, txt: Tensor) -> Copies:
    """The exact copies among each side's candidates: the captions', then the images'."""
    return sel.first_copies_of_pair(txt, img)


class Chosen(NamedTuple):
    """Step 2 of the forward pass, both sides: the chosen negatives' weighted hinges (2, L),
    their candidates and gradient coefficients (2, L, k; None where no side chose any), and each
    anchor's coefficient on all of its hinges (2, L; a number where it is every anchor's, on
    both sides; None where the rule gives none)."""

    hard_loss: Tensor
    hard_index: Tensor | None
    hard_coef: Tensor | None  # the slot's weight where its hinge is active, else 0
    every: Tensor | float | None


def _take_positives(matrices: list[Tensor], layout: Layout, offset: int, excluded: Tensor | None, lean: bool) -> Tensor:
    """Step 1: the positives (2, L), then every pair that is no negative set to ``-inf`` in
    place. Side ``s``'s anchors lie along dimension ``1 - along`` of ``matrices[k]``,
    ``(k, along) = layout[s]``; anchor ``a``'s positive is candidate ``offset + a``, on the
    diagonal from column ``offset`` (a square matrix's sides share it)."""
    n_anchors = matrices[0].shape[1 - layout[0][1]]
    on_matrix = {}
    for k, along in dict(layout).items():
        diagonal = matrices[k].diagonal(offset)
        if lean:
            on_matrix[k] = diagonal.clone()
        else:  # traced: a gather, which Inductor cannot alias with the fill below
            at = torch.arange(offset, offset + n_anchors, device=matrices[k].device).unsqueeze(along)
            on_matrix[k] = matrices[k].gather(along, at).squeeze(along)
        if excluded is not None:
            matrices[k].masked_fill_(excluded, float("-inf"))
        diagonal.fill_(float("-inf"))
    return torch.stack([on_matrix[k] for k, _ in layout])


def _lean_anchors(
    matrices: list[Tensor],
    layout: Layout,
    side: int,
    offset: int,
    positives: Tensor,
    excluded: Tensor | None,
    opt: Options,
    copies: Callable[[], Tensor | None],
) -> Anchors:
    """Side ``side``'s anchors as its rule sees them: its scores as rows (a view: no copy), and
    the negatives' mask, their count and the candidates' exact copies (``copies``) made only if
    the rule asks for them."""
    k, along = layout[side]
    scores = matrices[k] if along == 1 else matrices[k].t()
    n_anchors, n_candidates = scores.shape
    side_excluded = None if excluded is None else (excluded if along == 1 else excluded.t())

    def negatives() -> Tensor:  # anchor a's positive is candidate offset + a
        positive_column = torch.arange(offset, offset + n_anchors, device=scores.device)
        return sel.negatives_mask((n_anchors, n_candidates), positive_column, side_excluded)

    def count() -> Tensor:  # the candidates but the positive and the excluded pairs
        if side_excluded is None:
            return torch.full((n_anchors,), max(n_candidates - 1, 0), dtype=torch.long, device=scores.device)
        n_excluded = side_excluded.sum(1) - side_excluded.diagonal(offset).long()
        return n_candidates - 1 - n_excluded

    direction: Direction = "i2t" if side == 0 else "t2i"
    # (scores computed inside an autograd Function's forward: no graph, nothing to detach)
    return Anchors._deferred(scores, positives[side], opt.margin, negatives, count, copies, direction)


def _select(
    matrices: list[Tensor],
    layout: Layout,
    offset: int,
    positives: Tensor,
    excluded: Tensor | None,
    opt: Options,
    copies: Callable[[int], Tensor | None],
) -> Chosen:
    """Step 2: each side's rule chooses (:meth:`selhn.rules.SelectionRule.select`); the chosen
    negatives' hinges are weighted and summed. A slot whose candidate is no negative (``-inf``
    on the matrix) counts 0. ``copies(side)``: that side's candidates' exact copies, asked for
    only if its rule reads them."""
    n_anchors = positives.shape[1]
    sides, choices = [], []
    for side in range(len(layout)):
        side_copies = functools.partial(copies, side)
        anchors = _lean_anchors(matrices, layout, side, offset, positives, excluded, opt, side_copies)
        sides.append(anchors.scores)  # (anchors as rows)
        choices.append(_checked_selection(opt.rule, anchors, opt.rule.select(anchors)))
    every = _both_sides_every([choice.every for choice in choices], positives)
    widths = [0 if choice.candidate is None else choice.candidate.shape[1] for choice in choices]
    width = max(widths)
    if width == 0:
        return Chosen(positives.new_zeros(2, n_anchors), None, None, every)
    # (a side that chose fewer slots is padded with unused ones: candidate 0, weight 0)
    index = torch.stack([_padded_candidates(c.candidate, width, positives) for c in choices])
    weight = None  # 1 on every slot of both sides, where neither side gave weights
    if any(c.weight is not None for c in choices) or min(widths) < width:
        weight = torch.stack(
            [_padded_weights(c.weight, k, width, positives) for c, k in zip(choices, widths, strict=True)]
        )
    chosen = torch.stack([scores.gather(1, index[s]) for s, scores in enumerate(sides)])
    hinges = sel.hinge(positives.unsqueeze(2), chosen, opt.margin)
    # A slot counts only at a negative: where the candidate is -inf on the matrix, its hinge is 0,
    # or NaN with a -inf positive; either way it counts 0. An active hinge (> 0) is always at a
    # negative. Where a weight is 0 its hinge may be inf or NaN: it counts 0. A NaN score under a
    # weight stays, and propagates.
    if weight is None:
        hard_loss = _slot_sum(torch.where(chosen != -math.inf, hinges, 0.0))
        return Chosen(hard_loss, index, (hinges > 0).to(hinges.dtype), every)
    weight = weight * (chosen != -math.inf)
    hard_loss = _slot_sum(torch.where(weight != 0, weight * hinges, 0.0))
    return Chosen(hard_loss, index, weight * (hinges > 0), every)


def _padded_candidates(candidate: Tensor | None, width: int, positives: Tensor) -> Tensor:
    """One side's (L, k) chosen candidates padded to ``width`` slots with candidate 0 (None: none)."""
    if candidate is None:
        return positives.new_zeros(positives.shape[1], width, dtype=torch.long)
    return candidate if candidate.shape[1] == width else F.pad(candidate, (0, width - candidate.shape[1]))


def _padded_weights(weight: Tensor | None, k: int, width: int, positives: Tensor) -> Tensor:
    """One side's (L, k) slot weights (None: 1 on each of its ``k`` slots) padded to ``width``
    slots with weight 0 (unused)."""
    if weight is None:
        weight = positives.new_ones(positives.shape[1], k)
    return weight if k == width else F.pad(weight, (0, width - k))


def _both_sides_every(values: list[Tensor | float | None], positives: Tensor) -> Tensor | float | None:
    """The sides' coefficients on all of their anchors' hinges: None where neither side gives
    any (or both give 0), one number where both give the same, else (2, L)."""
    if all(value is None for value in values):
        return None
    first = values[0]
    if not isinstance(first, Tensor) and first is not None and all(value == first for value in values):
        return None if first == 0 else first
    n_anchors = positives.shape[1]
    return torch.stack(
        [value if isinstance(value, Tensor) else positives.new_full((n_anchors,), value or 0.0) for value in values]
    )


def _slot_sum(per_slot: Tensor) -> Tensor:
    """(2, L, k) -> (2, L), summed over the chosen slots (one slot, the usual case: a view)."""
    return per_slot.squeeze(2) if per_slot.shape[2] == 1 else per_slot.sum(dim=2)


class FallbackTerms(NamedTuple):
    """Step 3, per side: the sum of each anchor's hinges and the count of its active ones (0 for
    the anchors that do not fall back, where a side computed them for its own anchors only),
    and what backward keeps for them."""

    sums: list[Tensor]
    counts: list[Tensor]
    forms: list[Form]
    data: list[SideData]
    fused: bool  # whether a fused pass over a whole matrix ran (see _forward's -inf correction)


def _fallback_terms(
    matrices: list[Tensor],
    layout: Layout,
    thresholds: Sequence[Tensor],
    falls_back: Tensor,
    n_falling: Sequence[int],
    opt: Options,
) -> FallbackTerms:
    """Step 3: for each side, the hinge sums and active counts of its anchors that fall back.

    A side with no such anchor has none (form ``none``). Over embeddings, a side where at
    most half of the anchors fall back reads their rows alone (form ``rows``). Otherwise the
    hinges of every anchor of the matrix are summed in one fused pass, which a square
    matrix's two sides share (form ``full``)."""
    n_anchors = falls_back.shape[1]
    zeros = thresholds[0].new_zeros(n_anchors)
    fused: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}  # per matrix, per along: (sums, counts)
    terms = FallbackTerms([], [], [], [], fused=False)
    for s, (k, along) in enumerate(layout):
        scores = matrices[k]
        form: Form
        data: SideData
        if n_falling[s] == 0:
            sums, counts, form, data = zeros, zeros, "none", None
        elif opt.embeddings and opt.lean and 2 * n_falling[s] <= n_anchors:
            sums, counts, data = _rows_terms(scores, along, thresholds[s], falls_back[s], zeros)
            form = "rows"
        else:
            if k not in fused:
                alongs = tuple(a for m, a in layout if m == k)
                sums_kernel = kernel("hinge_sums", hinge_sums, n_anchors, opt.lean)
                fused[k] = dict(zip(alongs, sums_kernel(scores, thresholds[s], alongs), strict=True))
            (sums, counts), form, data = fused[k][along], "full", FullData(thresholds[s])
        terms.sums.append(sums)
        terms.counts.append(counts)
        terms.forms.append(form)
        terms.data.append(data)
    return terms._replace(fused=bool(fused))


def _rows_terms(
    scores: Tensor, along: int, threshold: Tensor, falls_back: Tensor, zeros: Tensor
) -> tuple[Tensor, Tensor, RowsData]:
    """The ``rows`` form: only the falling-back anchors' hinges, in one buffer per side."""
    subset = falls_back.nonzero().squeeze(1)
    arguments = (scores if along == 1 else scores.t()).index_select(0, subset)  # a copy: theirs alone
    arguments.sub_(threshold.index_select(0, subset).unsqueeze(1))  # the hinges' arguments s - t_a
    active = arguments > 0
    sums = zeros.index_copy(0, subset, arguments.clamp_(min=0).sum(dim=1))
    counts = zeros.index_copy(0, subset, active.sum(dim=1, dtype=zeros.dtype))
    return sums, counts, RowsData(subset, active)


class CandidateCopies:
    """Both sides' candidates' exact copies (:func:`candidate_copies`), searched only where they
    can change the loss: the search reads a line of every embedding, which costs about as much as
    a pass over the score matrix (its rows lie a page apart). The rules first choose seeing none
    (:meth:`unsearched`, what a batch of distinct candidates gives); only if a rule asked
    (:attr:`asked`) and a chosen hinge counts does the search run (:meth:`search`), and where it
    finds copies the rules choose again, seeing them (:meth:`searched`). A cold start, whose
    anchors all take all their hinges, never searches."""

    def __init__(self, candidates: tuple[Tensor, Tensor] | None) -> None:
        self.candidates = candidates  # (images, captions); None: unknown (a score matrix)
        self.asked = False
        self.found: Copies = (None, None)

    def unsearched(self, side: int) -> Tensor | None:
        """Before the search: none (and whether a rule asked is remembered)."""
        self.asked = self.asked or self.candidates is not None
        return None

    def search(self) -> bool:
        """Search both sides' candidates; whether any two are exact copies."""
        assert self.candidates is not None
        self.found = candidate_copies(*self.candidates)
        return self.found != (None, None)

    def searched(self, side: int) -> Tensor | None:
        """After the search: side ``side``'s copies (the captions' for the image anchors)."""
        return self.found[side]


def _who_falls_back(chosen: Chosen, n_anchors: int, lean: bool) -> tuple[Chosen, Tensor | None, list[int]]:
    """After step 2: which anchors take all their hinges (2, L; None where none does or every
    anchor does, at one coefficient) and how many per side. Where every anchor takes all its
    hinges and no chosen hinge counts (a cold start), the chosen negatives are dropped. Eager,
    one device read where the coefficients differ by anchor (and a second in a cold start);
    compiled, every anchor may take all its hinges."""
    if chosen.every is None:
        return chosen, None, [0, 0]
    falls_back = chosen.every != 0 if isinstance(chosen.every, Tensor) else None  # None: every anchor, alike
    if not lean:
        return chosen, falls_back, [n_anchors] * 2
    n_falling = [n_anchors] * 2 if falls_back is None else falls_back.sum(1).tolist()
    everyone = sum(n_falling) == 2 * n_anchors
    if everyone and chosen.hard_coef is not None and not bool(chosen.hard_coef.any()):
        chosen = chosen._replace(hard_index=None, hard_coef=None)
    return chosen, falls_back, n_falling


def forward_pass(
    matrices: list[Tensor],
    layout: Layout,
    offset: int,
    excluded: Tensor | None,
    opt: Options,
    candidates: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, State]:
    """Both sides' per-anchor losses (2, L) and the backward state. Overwrites the matrices'
    non-negatives with ``-inf``. See the module docs for the four steps. ``candidates``: the
    (images, captions) the scores came from, whose exact copies tie
    (:attr:`selhn.rules.Anchors.copies`); None for a score matrix."""
    positives = _take_positives(matrices, layout, offset, excluded, opt.lean)
    copies = CandidateCopies(candidates if opt.lean else None)
    choose = functools.partial(_select, matrices, layout, offset, positives, excluded, opt)
    n_anchors = positives.shape[1]
    chosen, falls_back, n_falling = _who_falls_back(choose(copies.unsearched), n_anchors, opt.lean)
    if copies.asked and chosen.hard_index is not None and copies.search():
        # a rule read the copies, a chosen hinge counts, and some candidates are exact copies:
        # the rules choose again, seeing them
        chosen, falls_back, n_falling = _who_falls_back(choose(copies.searched), n_anchors, opt.lean)
    hard_loss, hard_index, hard_coef, every = chosen
    hard_positive = None if hard_coef is None else _slot_sum(hard_coef)  # the chosen hinges' weight on s_p
    no_forms: tuple[Form, ...] = ("none", "none")
    if every is None or not any(n_falling):
        positive_coef = torch.zeros_like(hard_loss) if hard_positive is None else hard_positive
        return hard_loss, State(hard_index, hard_coef, None, positive_coef, no_forms, (None, None))
    if not isinstance(every, Tensor):  # every anchor takes all its hinges, at one coefficient
        falls_back = torch.ones_like(positives, dtype=torch.bool)
        every = torch.full_like(positives, every)
    assert falls_back is not None

    threshold = positives - opt.margin  # each hinge is relu(s - threshold)
    terms = _fallback_terms(matrices, layout, threshold.unbind(), falls_back, n_falling, opt)
    count = torch.stack(terms.counts)
    if opt.embeddings and opt.lean and "full" in terms.forms:
        plan_pair_forms(matrices, layout, offset, terms.forms, terms.data, falls_back, count, n_falling)

    total = torch.stack(terms.sums)
    if terms.fused:
        # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded cells:
        # its hinge sum is +inf when it has negatives (each hinge is), else 0. (Only a fused pass
        # over a whole matrix meets it: the rows form reads an embeddings' finite scores.)
        total = torch.where(torch.isneginf(threshold), torch.where(count > 0, math.inf, 0.0), total)
    positive_coef = count * every if hard_positive is None else torch.addcmul(hard_positive, count, every)
    loss = hard_loss + torch.where(falls_back, total * every, 0.0)
    return loss, State(hard_index, hard_coef, every, positive_coef, tuple(terms.forms), tuple(terms.data))
