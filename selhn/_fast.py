"""The one core of the three triplet losses: per-anchor losses over anchors x candidates.

A *side* is one direction's anchors: the rows (``along=1``) or columns (``along=0``) of a score
matrix, each with one positive candidate. The square batch is the rows and columns of one S;
the distributed loss a rank's images against every rank's captions and its captions against
every rank's images, two rectangles. :func:`_side` computes a side's losses with the semantics
of :mod:`selhn._selection` (the tests' loop references judge it) and what its backward needs.
Two autograd Functions use it: :class:`ScoreLoss` over a score matrix (:mod:`selhn.functional`),
:class:`EmbeddingLoss` over embeddings (the modules, the distributed loss, whose collectives run
inside it, and the diagnostic).

A hard anchor's gradient touches one positive and one negative: O(B) entries, one weighted
gather of embedding rows per set. A side's dense anchors (SelHN's fallback, the sum of hinges)
keep one of four forms, chosen in eager forward from one or two device reads: ``full`` (the
threshold; backward forms the coefficients from the saved scores in one pass, compiled from
B = ``COMPILE_MIN_BATCH``, and multiplies); ``rows`` (at most half the anchors fall back: their
subset and a mask of their active hinges); ``low_rank`` (nearly every hinge active, a cold
start: the inactive pairs, with rank-one products for the matmuls); ``sparse`` (hardly any
active, late training: the active pairs). The last two save 20-25% of ``full``'s time below
about 1.5% of a side's hinges on a CPU, and pay on a GPU only below 0.3% - 0.7%
(``benchmarks/bench_forms.py``). Under ``torch.compile`` only ``full`` is taken.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import Fallback, Mode

logger = logging.getLogger(__name__)

#: Smallest batch for which the compiled dense kernels are used (compiling costs seconds once).
COMPILE_MIN_BATCH = 256

#: A side takes the low-rank (sparse) form when its dense anchors' inactive (active) hinges,
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
    cpu = device.type == "cpu"
    forced = _forced_fractions.get()
    return forced or ((LOW_RANK_FRACTION, SPARSE_FRACTION) if cpu else (GPU_LOW_RANK_FRACTION, GPU_SPARSE_FRACTION))


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
    """True (low rank), False (sparse) or None for a side's dense anchors with these inactive and
    active hinges among its ``n_pairs`` (the thresholds count both sides)."""
    low_rank, sparse = pair_form_fractions(device)
    if low_rank > 0 and inactive <= low_rank * n_pairs / 2:
        return True
    return False if sparse > 0 and n_active <= sparse * n_pairs / 2 else None


# --------------------------------------------------------------------------- kernels
def _hinge_sums(scores: Tensor, threshold: Tensor, alongs: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    """Per anchor of each side on ``scores``, in one pass (a square matrix's sides share their
    thresholds): the sum of its hinges ``relu(s - threshold)``, how many are active."""
    out = []
    for along in alongs:
        t = threshold.unsqueeze(along)
        out.append((torch.relu(scores - t).sum(dim=along), (scores > t).sum(dim=along)))
    return out


def _blocks(scores: Tensor, thresholds: Sequence[Tensor], coefs: Sequence[Tensor], alongs: Sequence[int]) -> Tensor:
    """The dense sides' coefficient matrix over ``scores``: ``coef[a]`` at each active hinge."""
    terms = zip(thresholds, coefs, alongs, strict=True)
    return functools.reduce(torch.add, (torch.where(scores > t.unsqueeze(a), k.unsqueeze(a), 0.0) for t, k, a in terms))


_compiled: dict[str, Callable[..., Any]] = {}
#: The kernels whose compiled twin failed where the eager one worked (each is logged once).
_compile_failed: set[str] = set()


def _kernel(name: str, eager: Callable[..., Any], size: int, lean: bool) -> Callable[..., Any]:
    """The compiled twin of ``eager`` when it pays off and works, else ``eager`` (also under an outer
    ``torch.compile`` and while autograd records). A failure switches that kernel (only) to eager,
    only when eager then succeeds on the same arguments; never an out-of-memory error."""
    off = os.environ.get("SELHN_COMPILE", "1") == "0" or torch.is_grad_enabled() or name in _compile_failed
    if off or not lean or size < COMPILE_MIN_BATCH:
        return eager
    compiled = _compiled[name] if name in _compiled else _compiled.setdefault(name, torch.compile(eager, dynamic=True))

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

    return guarded


# --------------------------------------------------------------------------- one side
class Side(NamedTuple):
    """What one side's backward needs; ``form`` says what ``data`` holds (module docs)."""

    hard_index: Tensor | None  # (L,) hardest negative's candidate, where hard terms exist
    hard_coef: Tensor | None  # (L,) 1 where the hard hinge is used and active
    dense_coef: Tensor | None  # (L,) weight of each active hinge of a dense anchor, else 0
    positive_coef: Tensor  # (L,) what each anchor puts on its positive, negated
    form: Form
    data: tuple[Tensor, ...]  # full: (threshold,); rows: (subset, active); low_rank / sparse: (pairs,)


class Options(NamedTuple):
    """One call's choices; ``lean``: eager (data-dependent forms), ``embeddings``: the lean forms."""

    mode: Mode
    margin: float
    epsilon: float
    fallback: Fallback
    lean: bool
    embeddings: bool


def _side(
    scores: Tensor, along: int, positive: Tensor, positives: Tensor,
    hinge_sums: Callable[[Tensor], tuple[Tensor, Tensor]], scale: Tensor | float, opt: Options,
) -> tuple[Tensor, Side]:  # fmt: skip
    """Losses (L,) of the anchors along dimension ``1 - along`` of ``scores`` (non-negatives at
    ``-inf``; anchor ``a``'s positive is candidate ``positive[a]``), given their positive scores,
    their hinge sums (on demand) and their dense terms' scale (1/|N_a| or 1)."""
    n_anchors, n_candidates, dtype = positives.shape[0], scores.shape[along], scores.dtype
    hard_index = hard_coef = None
    if opt.mode == "sum":
        dense = torch.ones(n_anchors, dtype=torch.bool, device=scores.device)
        hard_loss = scores.new_zeros(n_anchors)
    else:
        hardest, hard_index = sel.max_along(scores, along)
        hard_loss = sel.hinge(positives, hardest, opt.margin)
        hard_coef = coef = (hard_loss > 0).to(dtype)
        if opt.mode == "hn":
            return hard_loss, Side(hard_index, coef, None, coef, "none", ())
        dense = sel.vanishing(sel.gap(positives, hardest), opt.epsilon)
        coef.masked_fill_(dense, 0.0)
    threshold = positives - opt.margin  # hinge(s) = relu(s - threshold)
    n_dense = int(dense.sum()) if (opt.lean and opt.mode == "selhn") else n_anchors  # eager SelHN: one read
    if n_dense == 0:  # (an empty side of the sum of hinges has no coefficient: zeros)
        return hard_loss, Side(hard_index, hard_coef, None, hard_loss if hard_coef is None else hard_coef, "none", ())
    if opt.lean and n_dense == n_anchors:
        hard_index = hard_coef = None  # every anchor falls back (a cold start)
    dense_coef = dense.to(dtype) * scale
    form: Form = "full"
    data: tuple[Tensor, ...] = (threshold,)
    if opt.embeddings and opt.lean and 2 * n_dense <= n_anchors:  # only the fallback anchors' hinges
        subset = dense.nonzero().squeeze(1)
        rows = scores.index_select(1 - along, subset)
        arg = (rows if along == 1 else rows.t()) - threshold.index_select(0, subset).unsqueeze(1)
        active = arg > 0
        zero = scores.new_zeros(n_anchors)
        sums = zero.index_copy(0, subset, arg.clamp_(min=0).sum(dim=1))
        counts = zero.index_copy(0, subset, active.sum(dim=1, dtype=dtype))
        form, data = "rows", (subset, active)
    else:
        sums, n_active = hinge_sums(threshold)
        # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded
        # cells: its hinge sum is +inf when it has negatives (each hinge is), else 0
        sums = torch.where(torch.isneginf(threshold), torch.where(n_active > 0, math.inf, 0.0), sums)
        counts = n_active.to(dtype)
        if opt.embeddings and opt.lean:  # one read: the dense anchors' active hinges, hence the inactive ones
            n_on = float(counts.sum() if n_dense == n_anchors else (counts * dense).sum())
            inactive = n_dense * (n_candidates - 1) - n_on
            low_rank = _low_rank_or_sparse(inactive, n_on, n_anchors * n_candidates, scores.device)
            pairs = torch.empty(2, 0, dtype=torch.long, device=scores.device)
            if low_rank is not None and (inactive if low_rank else n_on):  # low rank: the inactive pairs
                t = threshold.unsqueeze(along)
                chosen = torch.le(scores, t) if low_rank else torch.gt(scores, t)
                if low_rank:  # excluded pairs are inactive hinges, the positive is not a hinge
                    chosen.scatter_(along, positive.unsqueeze(along), False)
                pairs = chosen.logical_and_(dense.unsqueeze(along)).nonzero().t()  # (row, column) of scores
            if low_rank is not None:
                form, data = ("low_rank" if low_rank else "sparse"), (pairs if along == 1 else pairs.flip(0),)
    positive_coef = counts * dense_coef
    if hard_coef is not None:
        positive_coef = positive_coef + hard_coef
    loss = torch.where(dense, sums * scale, hard_loss)
    return loss, Side(hard_index, hard_coef, dense_coef, positive_coef, form, data)


# --------------------------------------------------------------------------- both sides
#: (score matrix, along) of each side: the square batch shares one matrix, the ranks have two.
SQUARE = ((0, 1), (0, 0))
RECTANGLES = ((0, 1), (1, 1))


def _forward(
    matrices: list[Tensor], layout: tuple[tuple[int, int], ...], offset: int, excluded: Tensor | None, opt: Options
) -> tuple[Tensor, list[Side]]:
    """Losses (2, L) of both sides; overwrites the matrices' non-negatives with ``-inf``."""
    n_anchors = matrices[0].shape[1 - layout[0][1]]
    positive = torch.arange(offset, offset + n_anchors, device=matrices[0].device)
    positives = {}  # per matrix (the square one's two sides share theirs: its diagonal)
    for k, along in dict(layout).items():
        positives[k] = matrices[k].gather(along, positive.unsqueeze(along)).squeeze(along)
        if excluded is not None:
            matrices[k].masked_fill_(excluded, float("-inf"))
        matrices[k].scatter_(along, positive.unsqueeze(along), float("-inf"))
    sums: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}  # per matrix, its sides' hinge sums: one pass

    def hinge_sums(k: int, along: int, threshold: Tensor) -> tuple[Tensor, Tensor]:  # (a matrix's sides: one threshold)
        if k not in sums:
            alongs = tuple(a for m, a in layout if m == k)
            kernel = _kernel("hinge_sums", _hinge_sums, n_anchors, opt.lean)
            sums[k] = dict(zip(alongs, kernel(matrices[k], threshold, alongs), strict=True))
        return sums[k][along]

    results = []
    for k, along in layout:
        scale: Tensor | float = 1.0  # the dense terms': 1/|N_a| for SelHN's mean fallback, N_a the
        if opt.mode == "selhn" and opt.fallback == "mean":  # candidates but the positive and the excluded
            n: Tensor | int = matrices[k].shape[along] - 1
            if excluded is not None:
                n = n - excluded.sum(along) + excluded.gather(along, positive.unsqueeze(along)).squeeze(along).long()
            scale = 1.0 / n.clamp(min=1).to(matrices[k].dtype) if isinstance(n, Tensor) else 1.0 / max(n, 1)
        results.append(
            _side(matrices[k], along, positive, positives[k], functools.partial(hinge_sums, k, along), scale, opt)
        )
    return torch.stack([loss for loss, _ in results]), [side for _, side in results]


def _entries(grad: Tensor, sides: list[Side], offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse entries (i, j, w) of the gradient over the global (image, caption) pairs:
    the positives (pair ``offset + a`` for both sides' anchor ``a``), then each side's hard terms
    and low-rank / sparse pairs. Side 0's anchors are images, side 1's captions."""
    anchor = torch.arange(offset, offset + grad.shape[1], device=grad.device)
    positive = torch.zeros_like(grad[0])
    rows, cols, weights = [anchor], [anchor], [positive]
    for s, (side, g) in enumerate(zip(sides, grad, strict=True)):
        positive.sub_(g * side.positive_coef)
        a, c, w = [], [], []
        if side.hard_index is not None and side.hard_coef is not None:
            a, c, w = [anchor], [side.hard_index], [g * side.hard_coef]
        if side.form in ("low_rank", "sparse") and side.dense_coef is not None:
            (pairs,) = side.data
            k = g * side.dense_coef
            if side.form == "low_rank":  # its rank-one terms count the positive too
                positive.sub_(k)
            k = k.index_select(0, pairs[0])
            a, c, w = [*a, pairs[0] + offset], [*c, pairs[1]], [*w, k.neg() if side.form == "low_rank" else k]
        rows, cols = (rows + a, cols + c) if s == 0 else (rows + c, cols + a)
        weights += w
    return torch.cat(rows), torch.cat(cols), torch.cat(weights)


def _full_blocks(
    grad: Tensor, sides: list[Side], layout: tuple[tuple[int, int], ...], matrix: int, scores: Tensor, lean: bool
) -> Tensor | None:
    """The coefficient matrix of the ``full`` sides on ``matrices[matrix]``, or None."""
    full = [(side.data[0], g * side.dense_coef, along) for side, g, (k, along) in zip(sides, grad, layout, strict=True)
            if k == matrix and side.form == "full" and side.dense_coef is not None]  # fmt: skip
    if not full:
        return None
    return _kernel("blocks", _blocks, scores.shape[0], lean)(scores, *zip(*full, strict=True))  # type: ignore[no-any-return]


def _sparse_rows(out_rows: Tensor, in_rows: Tensor, weights: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """``out[out_rows[k]] += weights[k] * source[in_rows[k]]`` into a fresh (B, D), ``rows`` =
    ``arange(B)``: one weighted gather-and-sum (``embedding_bag``), with no B x D scratch buffer
    (on a CPU each fresh one costs page faults comparable to the arithmetic)."""
    order = torch.argsort(out_rows, stable=True)
    starts = torch.searchsorted(out_rows.index_select(0, order), rows)  # where each row's entries start
    in_rows, weights = in_rows.index_select(0, order), weights.index_select(0, order)
    return torch.nn.functional.embedding_bag(in_rows, source, starts, mode="sum", per_sample_weights=weights)


def _embedding_grads(
    grad: Tensor, sides: list[Side], layout: tuple[tuple[int, int], ...], matrices: Sequence[Tensor | None],
    offset: int, local: tuple[Tensor, Tensor], everyone: tuple[Tensor, Tensor], lean: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """dL/d(global images), dL/d(global captions), (G, D), from the (2, L) cotangent ``grad``."""
    (img, txt), (img_all, txt_all) = local, everyone
    if layout == SQUARE and matrices[0] is not None and any(side.form == "full" for side in sides):  # dL/dS anyway
        d_scores = _score_grad(grad, sides, matrices[0], lean)
        d_img, d_txt = d_scores @ txt, d_scores.t() @ img
    else:  # the sparse entries as one weighted gather per set, then the rectangles' full blocks
        i, j, w = _entries(grad, sides, offset)
        every_row = torch.arange(img_all.shape[0], device=img.device)
        d_img = _sparse_rows(i, j, w.to(img.dtype), txt_all, every_row)
        d_txt = _sparse_rows(j, i, w.to(img.dtype), img_all, every_row)
    roles = ((img, txt_all, d_img, d_txt), (txt, img_all, d_txt, d_img))  # own, other, d_own, d_other
    for m, scores in enumerate(matrices if layout != SQUARE else []):  # matrix m's rows: side m's anchors
        if scores is not None and (full := _full_blocks(grad, sides, layout, m, scores, lean)) is not None:
            own, other, d_own, d_other = roles[m]
            d_own.narrow(0, offset, own.shape[0]).addmm_(full.to(own.dtype), other)
            d_other.addmm_(full.t().to(own.dtype), own)
    if not any(side.form in ("rows", "low_rank") for side in sides):
        return d_img, d_txt
    ones, size = img_all.new_ones(img_all.shape[0]), img_all.shape[0]
    for side, g, (own, other, d_own, d_other) in zip(sides, grad, roles, strict=True):
        if side.form == "rows" and side.dense_coef is not None:
            subset, active = side.data
            block = torch.where(active, (g * side.dense_coef).index_select(0, subset).unsqueeze(1), 0.0)
            d_own.index_add_(0, subset + offset, block.to(own.dtype) @ other)
            d_other.addmm_(block.t().to(own.dtype), own.index_select(0, subset))
    k = [  # a low-rank side's coefficients over its whole set (0 off this rank's rows), else None
        torch.nn.functional.pad((g * side.dense_coef).to(img.dtype), (offset, size - offset - img.shape[0]))
        if side.form == "low_rank" and side.dense_coef is not None
        else None
        for side, g in zip(sides, grad, strict=True)
    ]
    for s, (d, other) in enumerate(((d_img, txt_all), (d_txt, img_all))):  # every pair counted active: set s
        terms = [(c, r) for c, r in ((k[s], ones), (ones, k[1 - s])) if c is not None and r is not None]
        if terms:  # gets k_a sum_c other_c from its own side, sum_c k'_c other_c from the other one
            d.addmm_(torch.stack([c for c, _ in terms], dim=1), torch.stack([r for _, r in terms]) @ other)
    return d_img, d_txt


def _score_grad(grad: Tensor, sides: list[Side], scores: Tensor | None, lean: bool) -> Tensor:
    """dL/dS (B, B) of a square matrix's two sides: their full blocks, plus the sparse entries."""
    size = grad.shape[1]
    if scores is None or (out := _full_blocks(grad, sides, SQUARE, 0, scores, lean)) is None:
        out = grad.new_zeros(size, size)
    i, j, w = _entries(grad, sides, 0)
    if lean:  # in place on the fresh coefficient matrix: no second B x B buffer
        out.view(-1).index_put_((i * size + j,), w.to(out.dtype), accumulate=True)
        return out
    # traced into the caller's graph: one out-of-place scatter-add, alike on every backend
    return out.reshape(-1).scatter_add(0, i * size + j, w.to(out.dtype)).view(size, size)


# --------------------------------------------------------------------------- Functions
def _save(ctx: Any, sides: list[Side], matrices: list[Tensor], *tensors: Tensor | None) -> None:
    """Save ``tensors``, the matrices a ``full`` side reads (None for the others), the sides."""
    full = {k for side, (k, _) in zip(sides, ctx.layout, strict=True) if side.form == "full"}
    tensors += tuple(m if k in full else None for k, m in enumerate(matrices))
    ctx.forms, ctx.n_inputs = [(side.form, len(side.data)) for side in sides], len(tensors)
    ctx.save_for_backward(*tensors, *(t for side in sides for t in (*side[:4], *side.data)))


def _load(ctx: Any) -> tuple[tuple[Tensor, ...], list[Side]]:
    saved, sides, at = ctx.saved_tensors, [], ctx.n_inputs
    for form, n in ctx.forms:
        sides.append(Side(saved[at], saved[at + 1], saved[at + 2], saved[at + 3], form, saved[at + 4 : at + 4 + n]))
        at += 4 + n
    return saved[: ctx.n_inputs], sides


class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix (:mod:`selhn.functional`)."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
    ) -> Tensor:
        ctx.lean = not torch.compiler.is_compiling()
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        ctx.layout = SQUARE
        losses, sides = _forward([work], SQUARE, 0, mask, Options(mode, margin, epsilon, fallback, ctx.lean, False))
        _save(ctx, sides, [work])
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (scores,), sides = _load(ctx)
        return _score_grad(grad.contiguous(), sides, scores, ctx.lean), None, None, None, None, None


class EmbeddingLoss(torch.autograd.Function):
    """Per-anchor losses (2, L) of this rank's images and captions against every rank's (``ranks``;
    None: this process's batch, one square matrix); the scores are kept only for a ``full`` side."""

    @staticmethod
    def forward(
        ctx: Any, img: Tensor, txt: Tensor, excluded: Tensor | None, margin: float, epsilon: float, mode: Mode,
        fallback: Fallback, ranks: Ranks | None,
    ) -> Tensor:  # fmt: skip
        ctx.lean, ctx.ranks = not torch.compiler.is_compiling(), ranks
        if ranks is None:
            img_all, txt_all, offset, layout, matrices = img, txt, 0, SQUARE, [img @ txt.t()]
        else:
            (img_all, txt_all), offset, layout = ranks.gather(img, txt), ranks.offset, RECTANGLES
            matrices = [img @ txt_all.t(), txt @ img_all.t()]
        losses, sides = _forward(
            matrices, layout, offset, excluded, Options(mode, margin, epsilon, fallback, ctx.lean, True)
        )
        ctx.layout, ctx.offset = layout, offset
        _save(ctx, sides, matrices, img, txt, *((None, None) if ranks is None else (img_all, txt_all)))
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (img, txt, img_all, txt_all, *matrices), sides = _load(ctx)
        everyone = (img, txt) if ctx.ranks is None else (img_all, txt_all)
        d_img, d_txt = _embedding_grads(
            grad.contiguous(), sides, ctx.layout, matrices, ctx.offset, (img, txt), everyone, ctx.lean
        )
        if ctx.ranks is not None:
            d_img, d_txt = ctx.ranks.scatter(d_img, d_txt)
        return d_img if ctx.needs_input_grad[0] else None, d_txt if ctx.needs_input_grad[1] else None, *[None] * 6


# --------------------------------------------------------------------------- the internal API
# (what selhn.functional, selhn.losses, selhn.distributed and selhn.diagnostics call)
def score_losses(
    scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback = "mean"
) -> Tensor:
    """Per-anchor losses (2, B) of a score matrix, computed in float32 or wider."""
    scores = scores.to(sel.compute_dtype(scores.dtype))
    losses: Tensor = ScoreLoss.apply(scores, mask, margin, epsilon, mode, fallback)  # type: ignore[no-untyped-call]
    return losses


def embedding_losses(
    img: Tensor, txt: Tensor, excluded: Tensor | None, margin: float, epsilon: float, mode: Mode,
    fallback: Fallback = "mean", ranks: Ranks | None = None,
) -> Tensor:  # fmt: skip
    """Per-anchor losses (2, L) of ``img`` and ``txt`` against the batch (every rank's with
    ``ranks``), scored in float32 or wider outside autocast, with the lean backward."""
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    with torch.autocast(device_type=img.device.type, enabled=False):
        losses: Tensor = EmbeddingLoss.apply(  # type: ignore[no-untyped-call]
            img.to(dtype), txt.to(dtype), excluded, margin, epsilon, mode, fallback, ranks
        )
    return losses


def embedding_gradients(
    img: Tensor, txt: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the summed per-anchor losses (the diagnostic's): with respect to the images
    and captions, then each anchor's through its own loss only (image anchors, caption anchors)."""
    img, txt = img.detach(), txt.detach()  # (the diagnostic upcasts them)
    with torch.no_grad():
        matrices = [img @ txt.t()]
        _, sides = _forward(matrices, SQUARE, 0, mask, Options(mode, margin, epsilon, fallback, True, True))
        alone = torch.eye(2, dtype=img.dtype, device=img.device).unsqueeze(2).expand(2, 2, img.shape[0])
        own = [_embedding_grads(g, sides, SQUARE, matrices, 0, (img, txt), (img, txt), True) for g in alone]
    (img_anchor, txt_from_images), (img_from_captions, txt_anchor) = own  # side s alone: its anchors' own
    return img_anchor + img_from_captions, txt_from_images + txt_anchor, img_anchor, txt_anchor


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """Reduce (2, B) per-anchor losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    return per_anchor.mean() if reduction == "mean" else per_anchor.sum() if reduction == "sum" else per_anchor
