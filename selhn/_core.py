r"""The lean core: per-anchor losses over anchors x candidates of any rule in the sparse form
(:class:`selhn.rules.Selection`), with a lean backward.

Vocabulary
----------
A *side* is one direction's anchors: the rows (``along=1``) or the columns (``along=0``) of a
score matrix, each anchor with one positive candidate. The square batch is the two sides of
one matrix S (image anchors are its rows, caption anchors its columns); the distributed loss
is a rank's images against every rank's captions and its captions against every rank's
images, two rectangles. Both sides are always computed together, as (2, L) tensors: row 0
the image anchors, row 1 the caption anchors.

The forward pass, as the paper reads (:func:`_forward`)
--------------------------------------------------------
1. the positives :math:`s_p`, and every pair that is not a negative set to ``-inf``
   (:func:`_take_positives`);
2. the rule's choice on each side (:func:`_select`): its chosen negatives, whose weighted
   hinges are summed (max violation's hardest negative, SelHN's where the gap is wide), and
   each anchor's coefficient :math:`k_a` on all of its hinges (1 for the sum of hinges,
   :math:`1/|N_a|` where SelHN falls back, 0 elsewhere); the anchors with :math:`k_a \ne 0`
   *fall back*;
3. for the anchors that fall back, the sum of their hinges and how many are active
   (:func:`_fallback_terms`), times :math:`k_a`;
4. the backward plan: which form each side's fallback terms keep for backward
   (:func:`_plan_pair_forms`), and the coefficients of the gradient (:class:`State`).

The gradient (:func:`_entries`, :func:`_embedding_grads`, :func:`_score_grad`)
------------------------------------------------------------------------------
With :math:`g_a` the cotangent of anchor :math:`a`'s loss, the gradient with respect to the
scores has, per anchor, :math:`-c_a` at its positive (:attr:`State.positive_coef`,
:math:`c_a` = the weight its loss puts on the positive), :math:`+g_a w_{aj}` at each chosen
negative whose hinge is active (:attr:`State.hard_coef`), and :math:`+g_a k_a` at every
active hinge of an anchor that falls back (:math:`k_a` = :attr:`State.dense_coef`). The
chosen terms are O(kB) entries: one weighted gather of embedding rows per set. The fallback
terms keep one of four forms per side:

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
pay on a GPU only below 0.3% - 0.7% (``benchmarks/bench_forms.py``). Under ``torch.compile``
only ``full`` is taken. A dense rule (:meth:`selhn.rules.SelectionRule.weights` alone) takes
:mod:`selhn.rules`' plain autograd path: :func:`score_losses` and :func:`embedding_losses`
send each rule its way.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from selhn import _selection as sel
from selhn.rules import Anchors, SelectionRule, _checked_selection, _side_losses, is_sparse, square_losses
from selhn.types import Direction

logger = logging.getLogger(__name__)

#: Smallest batch for which the compiled dense kernels are used (compiling costs seconds once).
COMPILE_MIN_BATCH = 256

#: A side takes the low-rank (sparse) form when its fallback anchors' inactive (active) hinges,
#: excluded pairs counted inactive, are at most half this fraction of its pairs; 0 switches a
#: form off. From ``bench_forms.py`` (2-core CPU, D = 1024): at 1.5% of a side's hinges, the
#: low-rank (sparse) form takes 0.79 / 0.78 / 0.82 (0.74 / 0.73 / 0.77) of the full form's
#: time at B = 512 / 2048 / 4096.
LOW_RANK_FRACTION = 1 / 32
SPARSE_FRACTION = 1 / 32
#: The same on every other device: on an H200 (``bench_forms.py --device cuda``) both forms
#: break even at 0.3% - 0.7% of a side's hinges; at 1/512 the low-rank (sparse) form takes
#: 0.87 / 0.60 (0.76 / 0.56) of the full form's time at B = 4096 / 16384.
GPU_LOW_RANK_FRACTION = 1 / 512
GPU_SPARSE_FRACTION = 1 / 512

Form = Literal["none", "full", "rows", "low_rank", "sparse"]


class Ranks(Protocol):
    """This rank's first row in the global batch, the gather of every rank's (images,
    captions) and its adjoint: this rank's rows of the gradients summed over ranks."""

    offset: int

    def gather(self, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]: ...
    def scatter(self, d_img: Tensor, d_txt: Tensor) -> tuple[Tensor, Tensor]: ...


# --------------------------------------------------------------------------- options
def pair_form_fractions(device: torch.device) -> tuple[float, float]:
    """The (low-rank, sparse) thresholds that apply on ``device``, or those forced here."""
    forced = _forced_fractions.get()
    if forced is not None:
        return forced
    if device.type == "cpu":
        return LOW_RANK_FRACTION, SPARSE_FRACTION
    return GPU_LOW_RANK_FRACTION, GPU_SPARSE_FRACTION


_forced_fractions: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "selhn_forced_pair_form_fractions", default=None
)


@contextlib.contextmanager
def forced_pair_form_fractions(low_rank: float, sparse: float) -> Iterator[None]:
    """Use these (low-rank, sparse) thresholds on every device in the block: 1.0 forces a form where
    allowed, 0.0 switches it off. A context variable: other threads and tasks keep theirs."""
    token = _forced_fractions.set((float(low_rank), float(sparse)))
    try:
        yield
    finally:
        _forced_fractions.reset(token)


def _low_rank_or_sparse(inactive: float, n_active: float, n_pairs: int, device: torch.device) -> bool | None:
    """True (low rank), False (sparse) or None for a side's fallback anchors with these inactive
    and active hinges among its ``n_pairs`` (the thresholds count both sides)."""
    low_rank, sparse = pair_form_fractions(device)
    if low_rank > 0 and inactive <= low_rank * n_pairs / 2:
        return True
    if sparse > 0 and n_active <= sparse * n_pairs / 2:
        return False
    return None


class Options(NamedTuple):
    """One call's choices: the rule (one with a sparse form, :func:`selhn.rules.is_sparse`) and
    margin; ``lean``: eager, so data-dependent forms may be chosen (not under ``torch.compile``);
    ``embeddings``: the loss is over embeddings (the rows and pair forms apply)."""

    rule: SelectionRule
    margin: float
    lean: bool
    embeddings: bool


# --------------------------------------------------------------------------- kernels
def _hinge_sums(scores: Tensor, threshold: Tensor, alongs: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    """Per anchor of each side on ``scores``, in one pass (a square matrix's sides share their
    thresholds): the sum of its hinges ``relu(s - threshold)``, how many are active (as a float)."""
    out = []
    for along in alongs:
        t = threshold.unsqueeze(along)
        out.append((torch.relu(scores - t).sum(dim=along), (scores > t).sum(dim=along, dtype=scores.dtype)))
    return out


def _blocks(scores: Tensor, thresholds: Sequence[Tensor], coefs: Sequence[Tensor], alongs: Sequence[int]) -> Tensor:
    """The ``full`` sides' coefficient matrix over ``scores``: ``coef[a]`` at each active hinge."""
    total: Tensor | None = None
    for threshold, coef, along in zip(thresholds, coefs, alongs, strict=True):
        block = torch.where(scores > threshold.unsqueeze(along), coef.unsqueeze(along), 0.0)
        total = block if total is None else total + block
    assert total is not None
    return total


_compiled: dict[str, Callable[..., Any]] = {}
#: The kernels whose compiled twin failed where the eager one worked (each is logged once).
_compile_failed: set[str] = set()


def _kernel(name: str, eager: Callable[..., Any], size: int, lean: bool) -> Callable[..., Any]:
    """The compiled twin of ``eager`` when it pays off and works, else ``eager`` (also under an outer
    ``torch.compile`` and while autograd records). A failure switches that kernel (only) to eager,
    only when eager then succeeds on the same arguments; never an out-of-memory error."""
    if not lean or size < COMPILE_MIN_BATCH or torch.is_grad_enabled() or name in _compile_failed:
        return eager
    if os.environ.get("SELHN_COMPILE", "1") == "0":
        return eager
    if name in _compiled:
        return _compiled[name]
    compiled = torch.compile(eager, dynamic=True)

    def guarded(*args: Any) -> Any:
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise  # the eager kernel needs the memory too: not the compiler's failure
        except Exception as error:  # a missing C++ compiler, an unsupported backend, ...
            result = eager(*args)  # raises if the arguments, not the compiler, were the problem
            _compile_failed.add(name)
            logger.warning("selhn: compiled loss kernel %r unavailable (%s); using eager PyTorch", name, error)
            return result

    return _compiled.setdefault(name, guarded)


# --------------------------------------------------------------------------- what backward keeps
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


def _save(ctx: Any, state: State, **inputs: Tensor | None) -> None:
    """Save ``inputs`` and ``state`` for backward, every tensor under its name."""
    named: dict[str, Tensor | None] = dict(inputs)
    named.update(
        hard_index=state.hard_index,
        hard_coef=state.hard_coef,
        dense_coef=state.dense_coef,
        positive_coef=state.positive_coef,
    )
    for side, data in enumerate(state.data):
        if data is not None:
            named.update({f"side{side}.{field}": tensor for field, tensor in data._asdict().items()})
    ctx.saved_names, ctx.forms = tuple(named), state.forms
    ctx.save_for_backward(*named.values())


def _load(ctx: Any) -> tuple[dict[str, Tensor | None], State]:
    """The inputs saved by :func:`_save`, by name, and the state."""
    saved = dict(zip(ctx.saved_names, ctx.saved_tensors, strict=True))

    def side_data(side: int, form: Form) -> SideData:
        if form == "none":
            return None
        kind = _DATA[form]
        return kind(*(saved.pop(f"side{side}.{field}") for field in kind._fields))

    data = tuple(side_data(side, form) for side, form in enumerate(ctx.forms))
    state = State(
        hard_index=saved.pop("hard_index"),
        hard_coef=saved.pop("hard_coef"),
        dense_coef=saved.pop("dense_coef"),
        positive_coef=saved.pop("positive_coef"),
        forms=ctx.forms,
        data=data,
    )
    return saved, state


# --------------------------------------------------------------------------- the forward pass
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
    return sel.first_copies(txt), sel.first_copies(img)


class Chosen(NamedTuple):
    """Step 2 of the forward pass, both sides: the chosen negatives' weighted hinges (2, L),
    their candidates and gradient coefficients (2, L, k; None where no side chose any), and each
    anchor's coefficient on all of its hinges (2, L; None where the rule gives none)."""

    hard_loss: Tensor
    hard_index: Tensor | None
    hard_coef: Tensor | None  # the slot's weight where its hinge is active, else 0
    every: Tensor | None


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
    candidates: tuple[Tensor, Tensor] | None,
) -> Anchors:
    """Side ``side``'s anchors as its rule sees them: its scores as rows (a view: no copy), and
    the negatives' mask, their count and the candidates' exact copies made only if the rule
    asks for them."""
    k, along = layout[side]
    scores = matrices[k] if along == 1 else matrices[k].t()
    n_anchors, n_candidates = scores.shape
    side_excluded = None if excluded is None else (excluded if along == 1 else excluded.t())

    def negatives() -> Tensor:
        mask = torch.ones(n_anchors, n_candidates, dtype=torch.bool, device=scores.device)
        mask.diagonal(offset).fill_(False)
        return mask if side_excluded is None else mask.logical_and_(~side_excluded)

    def count() -> Tensor:  # the candidates but the positive and the excluded pairs
        if side_excluded is None:
            return torch.full((n_anchors,), max(n_candidates - 1, 0), dtype=torch.long, device=scores.device)
        n_excluded = side_excluded.sum(1) - side_excluded.diagonal(offset).long()
        return n_candidates - 1 - n_excluded

    def copies() -> Tensor | None:  # the captions' for the image anchors, the images' for the caption anchors
        if candidates is None or not opt.lean:
            return None
        return sel.first_copies(candidates[1] if side == 0 else candidates[0])

    direction: Direction = "i2t" if side == 0 else "t2i"
    return Anchors._deferred(scores.detach(), positives[side].detach(), opt.margin, negatives, count, copies, direction)


def _select(
    matrices: list[Tensor],
    layout: Layout,
    offset: int,
    positives: Tensor,
    excluded: Tensor | None,
    opt: Options,
    candidates: tuple[Tensor, Tensor] | None,
) -> Chosen:
    """Step 2: each side's rule chooses (:meth:`selhn.rules.SelectionRule.select`); the chosen
    negatives' hinges are weighted and summed. A slot whose candidate is no negative (``-inf``
    on the matrix) counts 0."""
    n_anchors = positives.shape[1]
    choices = []
    for side in range(len(layout)):
        anchors = _lean_anchors(matrices, layout, side, offset, positives, excluded, opt, candidates)
        choices.append(_checked_selection(opt.rule, anchors, opt.rule.select(anchors)))
    every = None
    if any(choice.every is not None for choice in choices):
        every = torch.stack([positives.new_zeros(n_anchors) if c.every is None else c.every for c in choices])
    width = max(choice.candidate.shape[1] for choice in choices)
    if width == 0:
        return Chosen(positives.new_zeros(2, n_anchors), None, None, every)
    index = torch.stack([F.pad(c.candidate, (0, width - c.candidate.shape[1])) for c in choices])
    weight = torch.stack([F.pad(c.weight, (0, width - c.weight.shape[1])) for c in choices])
    chosen = torch.stack(
        [(matrices[k] if along == 1 else matrices[k].t()).gather(1, index[s]) for s, (k, along) in enumerate(layout)]
    )
    weight = torch.where(chosen != -math.inf, weight, 0.0)  # (a NaN score stays, and propagates)
    hinges = sel.hinge(positives.unsqueeze(2), chosen, opt.margin)
    hard_loss = torch.where(weight != 0, weight * hinges, 0.0).sum(dim=2)
    return Chosen(hard_loss, index, weight * (hinges > 0), every)


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
                kernel = _kernel("hinge_sums", _hinge_sums, n_anchors, opt.lean)
                fused[k] = dict(zip(alongs, kernel(scores, thresholds[s], alongs), strict=True))
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


def _plan_pair_forms(
    matrices: list[Tensor],
    layout: Layout,
    offset: int,
    terms: FallbackTerms,
    falls_back: Tensor,
    count: Tensor,
    n_falling: Sequence[int],
) -> None:
    """Step 4 (over embeddings, eager): a ``full`` side whose fallback anchors have nearly every
    hinge active takes the low-rank form, one with hardly any active the sparse form; updates
    ``terms.forms`` and ``terms.data`` in place. One device read for both sides."""
    n_anchors, n_candidates = falls_back.shape[1], matrices[0].shape[layout[0][1]]
    everyone_falls = sum(n_falling) == 2 * n_anchors
    n_active = (count.sum(1) if everyone_falls else (count * falls_back).sum(1)).tolist()
    device = matrices[0].device
    for s, (k, along) in enumerate(layout):
        data = terms.data[s]
        if terms.forms[s] != "full" or not isinstance(data, FullData):
            continue
        inactive = n_falling[s] * (n_candidates - 1) - n_active[s]  # (excluded pairs count inactive)
        low_rank = _low_rank_or_sparse(inactive, n_active[s], n_anchors * n_candidates, device)
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
        terms.forms[s] = "low_rank" if low_rank else "sparse"
        terms.data[s] = PairsData(pairs if along == 1 else pairs.flip(0))  # row 0: the anchor


def _forward(
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
    hard_loss, hard_index, hard_coef, every = _select(matrices, layout, offset, positives, excluded, opt, candidates)
    n_anchors = positives.shape[1]
    falls_back = None if every is None else every != 0
    # how many anchors take all their hinges, per side, and whether any chosen hinge is active:
    # eager, one device read; compiled, every anchor may
    n_falling = [0, 0] if falls_back is None else [n_anchors] * 2
    if opt.lean and falls_back is not None:
        any_hard = hard_coef.ne(0).any().view(1) if hard_coef is not None else falls_back.new_zeros(1)
        *n_falling, hard_used = torch.cat([falls_back.sum(1), any_hard]).tolist()
        if not hard_used:  # (a cold start: no chosen hinge is active, or none was chosen)
            hard_index = hard_coef = None
    hard_positive = None if hard_coef is None else hard_coef.sum(dim=2)  # the chosen hinges' weight on s_p
    no_forms: tuple[Form, ...] = ("none", "none")
    if falls_back is None or not any(n_falling):
        positive_coef = torch.zeros_like(hard_loss) if hard_positive is None else hard_positive
        return hard_loss, State(hard_index, hard_coef, None, positive_coef, no_forms, (None, None))
    assert every is not None

    threshold = positives - opt.margin  # each hinge is relu(s - threshold)
    terms = _fallback_terms(matrices, layout, threshold.unbind(), falls_back, n_falling, opt)
    count = torch.stack(terms.counts)
    if opt.embeddings and opt.lean and "full" in terms.forms:
        _plan_pair_forms(matrices, layout, offset, terms, falls_back, count, n_falling)

    total = torch.stack(terms.sums)
    if terms.fused:
        # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded cells:
        # its hinge sum is +inf when it has negatives (each hinge is), else 0. (Only a fused pass
        # over a whole matrix meets it: the rows form reads an embeddings' finite scores.)
        total = torch.where(torch.isneginf(threshold), torch.where(count > 0, math.inf, 0.0), total)
    positive_coef = count * every if hard_positive is None else torch.addcmul(hard_positive, count, every)
    loss = hard_loss + torch.where(falls_back, total * every, 0.0)
    return loss, State(hard_index, hard_coef, every, positive_coef, tuple(terms.forms), tuple(terms.data))


# --------------------------------------------------------------------------- the backward pass
def _entries(grad: Tensor, coef: Tensor | None, state: State, anchor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse entries (i, j, w) of the gradient over the global (image, caption) pairs.

    In order: each anchor's positive (pair ``(anchor[a], anchor[a])``, weight :math:`-g_a c_a`
    summed over both sides, minus the low-rank sides' :math:`g_a k_a`, whose rank-one products
    count the positive as if it were an active hinge); both sides' hard terms
    (:math:`+g_a` at the hardest negative); each side's low-rank pairs (:math:`-g_a k_a`: the
    inactive hinges the rank-one products counted) and sparse pairs (:math:`+g_a k_a`).
    ``coef`` is :math:`g \\cdot k` (grad times dense_coef). Side 0 is the image anchors.
    """
    positive = (grad * state.positive_coef).sum(dim=0).neg_()
    for s, form in enumerate(state.forms):
        if form == "low_rank" and coef is not None:
            positive = positive - coef[s]
    rows, cols, weights = [anchor], [anchor], [positive]
    if state.hard_index is not None and state.hard_coef is not None:
        repeated = anchor.repeat_interleave(state.hard_index.shape[2])  # each anchor once per slot
        rows += [repeated, state.hard_index[1].reshape(-1)]  # image anchors' chosen captions; caption anchors' images
        cols += [state.hard_index[0].reshape(-1), repeated]
        weights.append((grad.unsqueeze(2) * state.hard_coef).reshape(-1))  # side 0's, then side 1's
    for s, (form, data) in enumerate(zip(state.forms, state.data, strict=True)):
        if form in ("low_rank", "sparse") and coef is not None and isinstance(data, PairsData):
            on_pair = coef[s].index_select(0, data.pairs[0])
            anchors = anchor.index_select(0, data.pairs[0])
            rows.append(anchors if s == 0 else data.pairs[1])
            cols.append(data.pairs[1] if s == 0 else anchors)
            weights.append(on_pair.neg() if form == "low_rank" else on_pair)
    return torch.cat(rows), torch.cat(cols), torch.cat(weights)


def _full_blocks(
    coef: Tensor | None, state: State, layout: Layout, matrix: int, scores: Tensor, lean: bool
) -> Tensor | None:
    """The coefficient matrix :math:`K` of the ``full`` sides on ``matrices[matrix]``, or None."""
    full = [s for s, (k, _) in enumerate(layout) if k == matrix and state.forms[s] == "full"]
    if not full or coef is None:
        return None
    thresholds = [_full_data(state.data[s]).threshold for s in full]
    kernel = _kernel("blocks", _blocks, scores.shape[0], lean)
    blocks: Tensor = kernel(scores, thresholds, [coef[s] for s in full], [layout[s][1] for s in full])
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


def _embedding_grads(
    grad: Tensor, state: State, layout: Layout, matrices: Sequence[Tensor | None], batch: Batch, lean: bool
) -> tuple[Tensor, Tensor]:
    """dL/d(global images), dL/d(global captions), (G, D), from the (2, L) cotangent ``grad``.

    With :math:`G = \\partial L / \\partial S`, :math:`\\partial L/\\partial V = G T` and
    :math:`\\partial L/\\partial T = G^\\top V`. A square batch with a ``full`` side forms
    :math:`G` and multiplies (:func:`_score_grad`); otherwise the sparse entries become one
    weighted gather of rows per set, then each form adds its part: the rectangles' ``full``
    blocks, the ``rows`` blocks, and the low-rank sides' rank-one products.
    """
    img, txt, img_all, txt_all, offset = batch
    coef = None if state.dense_coef is None else grad * state.dense_coef  # (before the parallel kernels)
    if layout == SQUARE and matrices[0] is not None and "full" in state.forms:  # dL/dS anyway
        d_scores = _score_grad(grad, coef, state, matrices[0], lean)
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
    if "low_rank" in state.forms:
        _add_rank_one_terms(coef, state.forms, batch, d_img, d_txt)
    return d_img, d_txt


def _add_rank_one_terms(coef: Tensor, forms: Sequence[Form], batch: Batch, d_img: Tensor, d_txt: Tensor) -> None:
    """The low-rank sides' products, every pair counted as an active hinge (the inactive pairs
    and the positive are subtracted as sparse entries, :func:`_entries`).

    For a low-rank side of image anchors with weights :math:`k_a` (this rank's rows, zero
    elsewhere): image :math:`a` gets :math:`k_a \\sum_c t_c` and caption :math:`c` gets
    :math:`\\sum_a k_a v_a`; likewise for caption anchors with :math:`k'`. So each set gets one
    ``addmm`` of (its own weights, ones) against (ones, the other side's weights) times the
    other set: a (G, 2) x (2, D) product.
    """
    img, _, img_all, txt_all, offset = batch
    size = img_all.shape[0]
    pad = (offset, size - offset - img.shape[0])  # this rank's rows within the global batch
    ones = img_all.new_ones(size)
    weights: list[Tensor | None] = []  # per side, k over the global rows (None: not low rank)
    for s, form in enumerate(forms):
        if form != "low_rank":
            weights.append(None)
        else:
            weights.append(F.pad(coef[s], pad) if any(pad) else coef[s])
    for s, (d, other) in enumerate(((d_img, txt_all), (d_txt, img_all))):
        terms: list[tuple[Tensor, Tensor]] = []  # (column over set s, row over the other set)
        own, opposite = weights[s], weights[1 - s]
        if own is not None:  # set s's own anchors: k_a times the sum of the other set
            terms.append((own, ones))
        if opposite is not None:  # the other side's anchors: sum_c k'_c other_c, to every row of set s
            terms.append((ones, opposite))
        if terms:
            d.addmm_(torch.stack([c for c, _ in terms], dim=1), torch.stack([r for _, r in terms]) @ other)


def _score_grad(grad: Tensor, coef: Tensor | None, state: State, scores: Tensor | None, lean: bool) -> Tensor:
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


# --------------------------------------------------------------------------- Functions
class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix (:mod:`selhn.functional`)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, rule: SelectionRule) -> Tensor:
        ctx.lean = not torch.compiler.is_compiling()
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        options = Options(rule, margin, ctx.lean, embeddings=False)
        losses, state = _forward([work], SQUARE, 0, mask, options)
        _save(ctx, state, scores=work if "full" in state.forms else None)
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        saved, state = _load(ctx)
        grad = grad.contiguous()
        coef = None if state.dense_coef is None else grad * state.dense_coef
        return _score_grad(grad, coef, state, saved["scores"], ctx.lean), None, None, None


class EmbeddingLoss(torch.autograd.Function):
    """Per-anchor losses (2, L) of this rank's images and captions against every rank's (``ranks``;
    None: this process's batch, one square matrix); the scores are kept only for a ``full`` side."""

    @staticmethod
    def forward(
        ctx: Any,
        img: Tensor,
        txt: Tensor,
        excluded: Tensor | None,
        margin: float,
        rule: SelectionRule,
        ranks: Ranks | None,
        observe: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        ctx.lean, ctx.ranks = not torch.compiler.is_compiling(), ranks
        if ranks is None:
            img_all, txt_all, offset, layout = img, txt, 0, SQUARE
            matrices = [img @ txt.t()]
            if observe is not None:  # (before the non-negatives are overwritten)
                observe(matrices[0])
        else:
            (img_all, txt_all), offset, layout = ranks.gather(img, txt), ranks.offset, RECTANGLES
            matrices = [img @ txt_all.t(), txt @ img_all.t()]
        options = Options(rule, margin, ctx.lean, embeddings=True)
        losses, state = _forward(matrices, layout, offset, excluded, options, (img_all, txt_all))
        ctx.layout, ctx.offset = layout, offset
        full = {k for form, (k, _) in zip(state.forms, layout, strict=True) if form == "full"}
        _save(
            ctx,
            state,
            img=img,
            txt=txt,
            img_all=None if ranks is None else img_all,
            txt_all=None if ranks is None else txt_all,
            **{f"matrix{k}": (m if k in full else None) for k, m in enumerate(matrices)},
        )
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved, state = _load(ctx)
        img, txt = saved["img"], saved["txt"]
        assert img is not None and txt is not None
        everyone = (img, txt) if ctx.ranks is None else (saved["img_all"], saved["txt_all"])
        batch = Batch(img, txt, *everyone, offset=ctx.offset)  # type: ignore[arg-type]
        matrices = [saved[f"matrix{k}"] for k in range(len(ctx.layout) if ctx.layout != SQUARE else 1)]
        d_img, d_txt = _embedding_grads(grad.contiguous(), state, ctx.layout, matrices, batch, ctx.lean)
        if ctx.ranks is not None:
            d_img, d_txt = ctx.ranks.scatter(d_img, d_txt)
        d_img_out = d_img if ctx.needs_input_grad[0] else None
        d_txt_out = d_txt if ctx.needs_input_grad[1] else None
        return d_img_out, d_txt_out, *([None] * 5)  # (no gradient for the 5 other arguments)


# --------------------------------------------------------------------------- the internal API
# (what selhn.functional, selhn.losses, selhn.distributed and selhn.diagnostics call): the one
# place that sends a rule with a sparse form to the lean Functions and any other to the plain path
def score_losses(scores: Tensor, mask: Tensor | None, margin: float, rule: SelectionRule) -> Tensor:
    """Per-anchor losses (2, B) of a score matrix under ``rule``, computed in float32 or wider."""
    scores = scores.to(sel.compute_dtype(scores.dtype))
    if not is_sparse(rule):
        return square_losses(scores, mask, rule, margin)
    losses: Tensor = ScoreLoss.apply(scores, mask, margin, rule)  # type: ignore[no-untyped-call]
    return losses


def embedding_losses(
    img: Tensor,
    txt: Tensor,
    excluded: Tensor | None,
    margin: float,
    rule: SelectionRule,
    ranks: Ranks | None = None,
    observe: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Per-anchor losses (2, L) of ``img`` and ``txt`` against the batch (every rank's with
    ``ranks``), scored in float32 or wider outside autocast: a rule with a sparse form with the
    lean backward, any other by plain autograd. ``observe`` (the square batch only) is handed
    the score matrix before it is used."""
    dtype = sel.embedding_compute_dtype(img, txt)
    with torch.autocast(device_type=img.device.type, enabled=False):
        img, txt = img.to(dtype), txt.to(dtype)
        if is_sparse(rule):
            losses: Tensor = EmbeddingLoss.apply(  # type: ignore[no-untyped-call]
                img, txt, excluded, margin, rule, ranks, observe
            )
            return losses
        if ranks is not None:
            return _plain_rectangles(img, txt, excluded, margin, rule, ranks)
        scores = img @ txt.t()
        if observe is not None:
            observe(scores)
        return square_losses(scores, excluded, rule, margin, candidate_copies(img, txt))


class _Gathered(torch.autograd.Function):
    """Every rank's (images, captions), differentiable: the gradient of the gathered rows goes
    back to the rank that owns them, summed over the ranks (the plain path's rectangles)."""

    @staticmethod
    def forward(ctx: Any, img: Tensor, txt: Tensor, ranks: Ranks) -> tuple[Tensor, Tensor]:
        ctx.ranks = ranks
        return ranks.gather(img, txt)

    @staticmethod
    def backward(ctx: Any, d_img_all: Tensor, d_txt_all: Tensor) -> tuple[Tensor, Tensor, None]:
        d_img, d_txt = ctx.ranks.scatter(d_img_all.contiguous(), d_txt_all.contiguous())
        return d_img, d_txt, None


def _plain_rectangles(
    img: Tensor, txt: Tensor, excluded: Tensor | None, margin: float, rule: SelectionRule, ranks: Ranks
) -> Tensor:
    """This rank's anchors' losses (2, L) under a dense rule, by plain autograd: its images
    against every rank's captions, its captions against every rank's images (positives at the
    offset)."""
    img_all, txt_all = _Gathered.apply(img, txt, ranks)  # type: ignore[no-untyped-call]
    positives = torch.arange(ranks.offset, ranks.offset + img.shape[0], device=img.device)
    caption_copies, image_copies = candidate_copies(img_all, txt_all)
    image_anchors = _side_losses(img @ txt_all.t(), positives, excluded, rule, margin, caption_copies, "i2t")
    caption_anchors = _side_losses(txt @ img_all.t(), positives, excluded, rule, margin, image_copies, "t2i")
    return torch.stack([image_anchors, caption_anchors])


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """Reduce (2, B) per-anchor losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    if reduction == "none":
        return per_anchor
    raise ValueError(f"reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")
