"""The one core of the three triplet losses: per-anchor losses over anchors x candidates.

A *side* is one direction's anchors: the rows (``along=1``) or the columns (``along=0``) of a
score matrix, each with one positive candidate. The square batch is the rows and the columns
of one S; the distributed loss is this rank's images against every rank's captions and its
captions against every rank's images, two rectangles. :func:`_side` computes one side's
losses with the semantics of :mod:`selhn._selection` (the tests' loop references judge it) and
what backward needs; :func:`_entries` and :func:`_embedding_grads` turn that into gradients.
Two autograd Functions use it: :class:`ScoreLoss` over a score matrix (:mod:`selhn.functional`)
and :class:`EmbeddingLoss` over embeddings (the modules, the distributed loss, whose gather
runs inside it, and the diagnostic).

Backward forms. A hard anchor's gradient touches one positive and one negative: O(B) entries,
one weighted gather of embedding rows per side. A side's dense anchors (SelHN's fallback, the
sum of hinges) keep one of four forms, chosen in eager forward with one or two device reads:
``full`` (the threshold: backward forms the coefficient matrix from the saved scores in one
pass, a ``torch.compile``-d kernel from B = ``COMPILE_MIN_BATCH``, and multiplies it); ``rows``
(at most half the anchors fall back: their subset and a mask of their active hinges);
``low_rank`` (nearly every hinge active, a cold start: the inactive pairs, with two rank-one
products for the matmuls); ``sparse`` (hardly any active, late training: the active pairs).
``benchmarks/bench_forms.py`` shows the last two save 20-25% of ``full``'s time on a CPU
below about 1.5% of a side's hinges, and pay on a GPU only below 0.3% - 0.7%. Under
``torch.compile`` only ``full`` is taken, with no data-dependent branch.
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
    """The (low-rank, sparse) thresholds that apply on ``device``."""
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
    """Use these (low-rank, sparse) thresholds on every device inside the block: 1.0 forces a
    form wherever it is allowed, 0.0 switches it off (the tests and benchmarks force forms).
    A context variable, not module state: other threads and tasks keep their thresholds."""
    token = _forced_fractions.set((float(low_rank), float(sparse)))
    try:
        yield
    finally:
        _forced_fractions.reset(token)


def _low_rank_or_sparse(inactive: float, n_active: float, n_pairs: int, device: torch.device) -> bool | None:
    """True (low rank), False (sparse) or None (neither) for a side's dense anchors with these
    inactive and active hinge counts among its ``n_pairs`` (the thresholds count both sides)."""
    low_rank, sparse = pair_form_fractions(device)
    if low_rank > 0 and inactive <= low_rank * n_pairs / 2:
        return True
    if sparse > 0 and n_active <= sparse * n_pairs / 2:
        return False
    return None


# --------------------------------------------------------------------------- kernels
def _hinge_sums(scores: Tensor, threshold: Tensor, along: int) -> tuple[Tensor, Tensor]:
    """Per anchor: the sum of its hinges ``relu(s - threshold)`` and how many are active."""
    arg = scores - threshold.unsqueeze(along)
    return torch.relu(arg).sum(dim=along), (arg > 0).sum(dim=along)


def _blocks(scores: Tensor, thresholds: Sequence[Tensor], coefs: Sequence[Tensor], alongs: Sequence[int]) -> Tensor:
    """The dense sides' coefficient matrix over ``scores``: ``coef[a]`` at each active hinge."""
    out = None
    for threshold, coef, along in zip(thresholds, coefs, alongs, strict=True):
        term = torch.where(scores > threshold.unsqueeze(along), coef.unsqueeze(along), 0.0)
        out = term if out is None else out + term
    assert out is not None
    return out


_compiled: dict[str, Callable[..., Any]] = {}
#: The kernels whose compiled twin failed where the eager one worked (each is logged once).
_compile_failed: set[str] = set()


def _kernel(name: str, eager: Callable[..., Any], size: int, lean: bool) -> Callable[..., Any]:
    """The compiled twin of ``eager`` when it pays off and works, else ``eager``: also under an
    outer ``torch.compile`` (``lean`` False) and while autograd records (``create_graph``). A
    failure switches that kernel (only) to eager, only when eager then succeeds on the same
    arguments; an out-of-memory error is never taken for one."""
    off = os.environ.get("SELHN_COMPILE", "1") == "0" or torch.is_grad_enabled() or name in _compile_failed
    if off or not lean or size < COMPILE_MIN_BATCH:
        return eager
    if name not in _compiled:
        _compiled[name] = torch.compile(eager, dynamic=True)
    compiled = _compiled[name]

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


def _side(
    scores: Tensor, along: int, positives: Tensor, scale: Tensor | float, margin: float, epsilon: float,
    mode: Mode, lean: bool, embeddings: bool,
) -> tuple[Tensor, Side]:  # fmt: skip
    """Losses (L,) of the anchors along dimension ``1 - along`` of ``scores`` (every
    non-negative already ``-inf``), given their positive scores and their dense terms' scale
    (1/|N_a| for SelHN's mean fallback, else 1)."""
    n_anchors, n_candidates = positives.shape[0], scores.shape[along]
    dtype = scores.dtype
    threshold = positives - margin  # hinge(s) = relu(s - threshold)
    hard_index = hard_coef = None
    if mode == "sum":
        dense = torch.ones(n_anchors, dtype=torch.bool, device=scores.device)
        hard_loss = scores.new_zeros(n_anchors)
    else:
        hardest, hard_index = sel.max_along(scores, along)
        hard_loss = sel.hinge(positives, hardest, margin)
        hard_coef = coef = (hard_loss > 0).to(dtype)
        if mode == "hn":
            return hard_loss, Side(hard_index, coef, None, coef, "none", ())
        dense = sel.vanishing(sel.gap(positives, hardest), epsilon)
        coef.masked_fill_(dense, 0.0)
    n_dense = int(dense.sum()) if (lean and mode == "selhn") else n_anchors  # eager SelHN: one read
    if n_dense == 0:  # (an empty side of the sum of hinges has no coefficient: zeros)
        return hard_loss, Side(hard_index, hard_coef, None, hard_loss if hard_coef is None else hard_coef, "none", ())
    if lean and n_dense == n_anchors:
        hard_index = hard_coef = None  # every anchor falls back (a cold start)
    dense_coef = dense.to(dtype) * scale
    form: Form = "full"
    data: tuple[Tensor, ...] = (threshold,)
    if embeddings and lean and 2 * n_dense <= n_anchors:  # only the fallback anchors' hinges
        subset = dense.nonzero().squeeze(1)
        rows = scores.index_select(1 - along, subset)
        arg = (rows if along == 1 else rows.t()) - threshold.index_select(0, subset).unsqueeze(1)
        active = arg > 0
        zero = scores.new_zeros(n_anchors)
        sums = zero.index_copy(0, subset, arg.clamp_(min=0).sum(dim=1))
        counts = zero.index_copy(0, subset, active.sum(dim=1, dtype=dtype))
        form, data = "rows", (subset, active)
    else:
        sums, n_active = _kernel("hinge_sums", _hinge_sums, n_anchors, lean)(scores, threshold, along)
        # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded
        # cells: its hinge sum is +inf when it has negatives (each hinge is), else 0
        sums = torch.where(torch.isneginf(threshold), torch.where(n_active > 0, math.inf, 0.0), sums)
        counts = n_active.to(dtype)
        if embeddings and lean:
            inactive, n_on = torch.stack([((n_candidates - counts) * dense).sum(), (counts * dense).sum()]).tolist()
            low_rank = _low_rank_or_sparse(inactive, n_on, n_anchors * n_candidates, scores.device)
            if low_rank is not None:  # low rank keeps the inactive pairs, positive and excluded ones included
                t = threshold.unsqueeze(along)
                chosen = (scores <= t if low_rank else scores > t).logical_and_(dense.unsqueeze(along))
                pairs = chosen.nonzero().t()  # (row, column) of scores: make it (anchor, candidate)
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
    matrices: list[Tensor], layout: tuple[tuple[int, int], ...], offset: int, excluded: Tensor | None,
    margin: float, epsilon: float, mode: Mode, fallback: Fallback, lean: bool, embeddings: bool,
) -> tuple[Tensor, list[Side]]:  # fmt: skip
    """Losses (2, L) of both sides; overwrites the matrices' non-negatives with ``-inf``."""
    first, along0 = matrices[0], layout[0][1]
    n_anchors = first.shape[1 - along0]
    positive = torch.arange(offset, offset + n_anchors, device=first.device)
    positives = [matrices[k].gather(along, positive.unsqueeze(along)).squeeze(along) for k, along in layout]
    for k, along in dict(layout).items():  # each matrix once (the square one's rows hold the positives)
        if excluded is not None:
            matrices[k].masked_fill_(excluded, float("-inf"))
        matrices[k].scatter_(along, positive.unsqueeze(along), float("-inf"))
    losses, sides = [], []
    for (k, along), pos in zip(layout, positives, strict=True):
        scale: Tensor | float = 1.0  # the dense terms': 1/|N_a| for SelHN's mean fallback
        if mode == "selhn" and fallback == "mean" and excluded is None:
            scale = 1.0 / max(matrices[k].shape[along] - 1, 1)
        elif mode == "selhn" and fallback == "mean":
            assert excluded is not None  # N_a: the candidates but the positive and the excluded ones
            taken = excluded.sum(dim=along) - excluded.gather(along, positive.unsqueeze(along)).squeeze(along).long()
            scale = 1.0 / (matrices[k].shape[along] - 1 - taken).clamp(min=1).to(pos.dtype)
        loss, side = _side(matrices[k], along, pos, scale, margin, epsilon, mode, lean, embeddings)
        losses.append(loss)
        sides.append(side)
    return torch.stack(losses), sides


def _entries(grad: Tensor, sides: list[Side], offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse entries (i, j, w) of the gradient over the global (image, caption) pairs:
    each side's positives, hard terms and low-rank / sparse pairs. Anchor ``a`` of a side is
    global row ``offset + a`` of its own set; side 0's anchors are images, side 1's captions."""
    rows, cols, weights = [], [], []
    for s, (side, g) in enumerate(zip(sides, grad, strict=True)):
        anchor = torch.arange(g.shape[0], device=g.device)
        a, c, w = [anchor], [anchor + offset], [(g * side.positive_coef).neg()]
        if side.hard_index is not None and side.hard_coef is not None:
            a, c, w = [*a, anchor], [*c, side.hard_index], [*w, g * side.hard_coef]
        if side.form in ("low_rank", "sparse") and side.dense_coef is not None:
            (pairs,) = side.data
            k = (g * side.dense_coef).index_select(0, pairs[0])
            a, c, w = [*a, pairs[0]], [*c, pairs[1]], [*w, k.neg() if side.form == "low_rank" else k]
        anchors, candidates = torch.cat(a) + offset, torch.cat(c)
        rows.append(anchors if s == 0 else candidates)
        cols.append(candidates if s == 0 else anchors)
        weights.append(torch.cat(w))
    return torch.cat(rows), torch.cat(cols), torch.cat(weights)


def _full_blocks(
    grad: Tensor, sides: list[Side], layout: tuple[tuple[int, int], ...], matrix: int, scores: Tensor, lean: bool
) -> Tensor | None:
    """The coefficient matrix of the ``full`` sides on ``matrices[matrix]``, or None."""
    full = [(side.data[0], g * side.dense_coef, along) for side, g, (k, along) in zip(sides, grad, layout, strict=True)
            if k == matrix and side.form == "full" and side.dense_coef is not None]  # fmt: skip
    if not full:
        return None
    out: Tensor = _kernel("blocks", _blocks, scores.shape[0], lean)(scores, *zip(*full, strict=True))
    return out


def _sparse_rows(out_rows: Tensor, in_rows: Tensor, weights: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """``out[out_rows[k]] += weights[k] * source[in_rows[k]]`` into a fresh (B, D), ``rows`` =
    ``arange(B)``: one weighted gather-and-sum (``embedding_bag``), with no B x D scratch buffer
    (on a CPU each fresh one costs page faults comparable to the arithmetic)."""
    order = torch.argsort(out_rows, stable=True)
    return torch.nn.functional.embedding_bag(
        in_rows.index_select(0, order),
        source,
        torch.searchsorted(out_rows.index_select(0, order), rows),  # where each row's entries start
        mode="sum",
        per_sample_weights=weights.index_select(0, order),
    )


def _embedding_grads(
    grad: Tensor, sides: list[Side], layout: tuple[tuple[int, int], ...], matrices: Sequence[Tensor | None],
    offset: int, local: tuple[Tensor, Tensor], everyone: tuple[Tensor, Tensor], lean: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """dL/d(global images), dL/d(global captions), (G, D), from the (2, L) cotangent ``grad``."""
    (img, txt), (img_all, txt_all) = local, everyone
    i, j, w = _entries(grad, sides, offset)
    every_row = torch.arange(img_all.shape[0], device=img.device)
    d_img = _sparse_rows(i, j, w.to(img.dtype), txt_all, every_row)
    d_txt = _sparse_rows(j, i, w.to(img.dtype), img_all, every_row)
    roles = ((img, txt_all, d_img, d_txt), (txt, img_all, d_txt, d_img))  # own, other, d_own, d_other
    for side, g, (own, other, d_own, d_other) in zip(sides, grad, roles, strict=True):
        if side.dense_coef is None:
            continue
        k = g * side.dense_coef
        if side.form == "low_rank":  # every pair counted active (the inactive ones were taken out)
            d_own.narrow(0, offset, own.shape[0]).addr_(k.to(own.dtype), other.sum(dim=0))
            d_other.add_((k.to(own.dtype) @ own).unsqueeze(0))
        elif side.form == "rows":
            subset, active = side.data
            block = torch.where(active, k.index_select(0, subset).unsqueeze(1), 0.0).to(own.dtype)
            d_own.index_add_(0, subset + offset, block @ other)
            d_other.addmm_(block.t(), own.index_select(0, subset))
    for m, scores in enumerate(matrices):  # matrix m's rows are side m's anchors
        if scores is not None and (full := _full_blocks(grad, sides, layout, m, scores, lean)) is not None:
            own, other, d_own, d_other = roles[m]
            d_own.narrow(0, offset, own.shape[0]).addmm_(full.to(own.dtype), other)
            d_other.addmm_(full.t().to(own.dtype), own)
    return d_img, d_txt


# --------------------------------------------------------------------------- Functions
def _save(ctx: Any, sides: list[Side], *tensors: Tensor | None) -> None:
    ctx.forms = [(side.form, len(side.data)) for side in sides]
    ctx.n_inputs = len(tensors)
    ctx.save_for_backward(*tensors, *(t for side in sides for t in (*side[:4], *side.data)))


def _load(ctx: Any) -> tuple[tuple[Tensor, ...], list[Side]]:
    saved, sides, at = ctx.saved_tensors, [], ctx.n_inputs
    for form, n in ctx.forms:
        sides.append(Side(saved[at], saved[at + 1], saved[at + 2], saved[at + 3], form, saved[at + 4 : at + 4 + n]))
        at += 4 + n
    return saved[: ctx.n_inputs], sides


def _needs(sides: list[Side], layout: tuple[tuple[int, int], ...], matrices: list[Tensor]) -> list[Tensor | None]:
    """The matrices backward reads: those with a ``full`` side."""
    full = {k for side, (k, _) in zip(sides, layout, strict=True) if side.form == "full"}
    return [m if k in full else None for k, m in enumerate(matrices)]


class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix (:mod:`selhn.functional`); saves indices and
    flags, and the scores only when dense terms exist."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
    ) -> Tensor:
        ctx.lean = not torch.compiler.is_compiling()
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        losses, sides = _forward([work], SQUARE, 0, mask, margin, epsilon, mode, fallback, ctx.lean, False)
        _save(ctx, sides, *_needs(sides, SQUARE, [work]))
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (scores,), sides = _load(ctx)
        grad = grad.contiguous()
        size = grad.shape[1]
        out = None if scores is None else _full_blocks(grad, sides, SQUARE, 0, scores, ctx.lean)
        out = grad.new_zeros(size, size) if out is None else out
        i, j, w = _entries(grad, sides, 0)
        if ctx.lean:  # in place on the fresh coefficient matrix: no second B x B buffer
            out.view(-1).index_put_((i * size + j,), w.to(out.dtype), accumulate=True)
        else:  # traced into the caller's graph: one out-of-place scatter-add, alike on every backend
            out = out.reshape(-1).scatter_add(0, i * size + j, w.to(out.dtype)).view(size, size)
        return out, None, None, None, None, None


class EmbeddingLoss(torch.autograd.Function):
    """Per-anchor losses (2, L) of this rank's images and captions against every rank's
    captions and images (``ranks``; None: this process's batch, one square matrix), with the
    weighted-gather backward; the scores are kept only for a ``full`` side."""

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
        losses, sides = _forward(matrices, layout, offset, excluded, margin, epsilon, mode, fallback, ctx.lean, True)
        ctx.layout, ctx.offset = layout, offset
        everyone = (None, None) if ranks is None else (img_all, txt_all)
        _save(ctx, sides, img, txt, *everyone, *_needs(sides, layout, matrices))
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


def _upcast(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    return img.to(dtype), txt.to(dtype)


def embedding_losses(
    img: Tensor, txt: Tensor, excluded: Tensor | None, margin: float, epsilon: float, mode: Mode,
    fallback: Fallback = "mean", ranks: Ranks | None = None,
) -> Tensor:  # fmt: skip
    """Per-anchor losses (2, L) of ``img`` and ``txt`` against the batch (every rank's with
    ``ranks``), scored in float32 or wider outside autocast, with the lean backward."""
    with torch.autocast(device_type=img.device.type, enabled=False):
        losses: Tensor = EmbeddingLoss.apply(  # type: ignore[no-untyped-call]
            *_upcast(img, txt), excluded, margin, epsilon, mode, fallback, ranks
        )
    return losses


def embedding_gradients(
    img: Tensor, txt: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the summed per-anchor losses (the diagnostic's): with respect to the images
    and captions, then each anchor's through its own loss only (image anchors, caption anchors)."""
    img, txt = _upcast(img.detach(), txt.detach())
    with torch.no_grad():
        matrices = [img @ txt.t()]
        _, sides = _forward(matrices, SQUARE, 0, mask, margin, epsilon, mode, fallback, True, True)
        own = []
        for s in (0, 1):  # side s alone: its anchors' gradients are its own set's
            grad = torch.zeros(2, img.shape[0], dtype=img.dtype, device=img.device)
            grad[s] = 1.0
            own.append(_embedding_grads(grad, sides, SQUARE, matrices, 0, (img, txt), (img, txt), True))
    (img_anchor, txt_from_images), (img_from_captions, txt_anchor) = own
    return img_anchor + img_from_captions, txt_from_images + txt_anchor, img_anchor, txt_anchor


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """Reduce (2, B) per-anchor losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    return per_anchor.mean() if reduction == "mean" else per_anchor.sum() if reduction == "sum" else per_anchor
