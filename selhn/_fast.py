"""The one core of the three triplet losses: per-anchor losses over anchors x candidates.

A *side* is one direction's anchors: the rows (``along=1``) or columns (``along=0``) of a score
matrix, each with one positive candidate. The square batch is the rows and columns of one S;
the distributed loss a rank's images against every rank's captions and its captions against
every rank's images, two rectangles. :func:`_forward` computes both sides' losses, stacked (2, L),
with the semantics of :mod:`selhn._selection` (the tests' loop references judge it), and a form per side.
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
import torch.nn.functional as F
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import Mode
from selhn.types import Fallback

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
    thresholds): the sum of its hinges ``relu(s - threshold)``, how many are active (as a float)."""
    out = []
    for along in alongs:
        t = threshold.unsqueeze(along)
        out.append((torch.relu(scores - t).sum(dim=along), (scores > t).sum(dim=along, dtype=scores.dtype)))
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


# --------------------------------------------------------------------------- both sides
class State(NamedTuple):
    """What backward needs of both sides (row 0: the image anchors, row 1: the caption anchors);
    ``forms[s]`` says what ``data[s]`` holds (module docs)."""

    hard_index: Tensor | None  # (2, L) hardest negative's candidate, where hard terms exist
    hard_coef: Tensor | None  # (2, L) 1 where the hard hinge is used and active
    dense_coef: Tensor | None  # (2, L) weight of each active hinge of a dense anchor, else 0
    positive_coef: Tensor  # (2, L) what each anchor puts on its positive, negated
    forms: tuple[Form, ...]
    data: tuple[tuple[Tensor, ...], ...]  # full: (threshold,); rows: (subset, active); low_rank / sparse: (pairs,)


class Options(NamedTuple):
    """One call's choices; ``lean``: eager (data-dependent forms), ``embeddings``: the lean forms."""

    mode: Mode
    margin: float
    epsilon: float
    fallback: Fallback
    lean: bool
    embeddings: bool


#: (score matrix, along) of each side: the square batch shares one matrix, the ranks have two.
SQUARE = ((0, 1), (0, 0))
RECTANGLES = ((0, 1), (1, 1))


def _forward(
    matrices: list[Tensor], layout: tuple[tuple[int, int], ...], offset: int, excluded: Tensor | None, opt: Options
) -> tuple[Tensor, State]:
    """Losses (2, L) of both sides; overwrites the matrices' non-negatives with ``-inf``. Side
    ``s``'s anchors lie along dimension ``1 - along`` of ``matrices[k]``, ``(k, along) =
    layout[s]``; anchor ``a``'s positive is candidate ``offset + a``. The per-anchor work runs
    on both sides at once, the dense terms' form is chosen per side."""
    n_anchors, dtype = matrices[0].shape[1 - layout[0][1]], matrices[0].dtype
    n_candidates = matrices[0].shape[layout[0][1]]  # (every side has the same)
    device = matrices[0].device
    on_matrix = {}  # per matrix, its diagonal from column ``offset`` (the square one's sides share it)
    for k, along in dict(layout).items():  # (traced: a gather, which Inductor cannot alias with the fill)
        diagonal = matrices[k].diagonal(offset)
        at = None if opt.lean else torch.arange(offset, offset + n_anchors, device=device).unsqueeze(along)
        on_matrix[k] = diagonal.clone() if at is None else matrices[k].gather(along, at).squeeze(along)
        if excluded is not None:
            matrices[k].masked_fill_(excluded, float("-inf"))
        diagonal.fill_(float("-inf"))
    positives = torch.stack([on_matrix[k] for k, _ in layout])
    hard_index = hard_coef = None
    none: tuple[Form, ...] = ("none", "none")
    if opt.mode == "sum":
        dense = torch.ones(2, n_anchors, dtype=torch.bool, device=device)
        hard_loss = positives.new_zeros(2, n_anchors)
    else:
        maxima = [sel.max_along(matrices[k], along) for k, along in layout]
        hardest, hard_index = torch.stack([m for m, _ in maxima]), torch.stack([i for _, i in maxima])
        hard_loss = sel.hinge(positives, hardest, opt.margin)
        hard_coef = (hard_loss > 0).to(dtype)
        if opt.mode == "hn":
            return hard_loss, State(hard_index, hard_coef, None, hard_coef, none, ((), ()))
        dense = sel.vanishing(sel.gap(positives, hardest), opt.epsilon)
        hard_coef.masked_fill_(dense, 0.0)
    n_dense = dense.sum(1).tolist() if (opt.lean and opt.mode == "selhn") else [n_anchors] * 2  # eager SelHN: one read
    if not any(n_dense):  # (an empty batch of the sum of hinges has no coefficient: zeros)
        positive_coef = hard_loss if hard_coef is None else hard_coef
        return hard_loss, State(hard_index, hard_coef, None, positive_coef, none, ((), ()))
    if opt.lean and sum(n_dense) == 2 * n_anchors:
        hard_index = hard_coef = None  # every anchor falls back (a cold start)
    threshold = positives - opt.margin  # hinge(s) = relu(s - threshold)
    thresholds, zeros, fused = threshold.unbind(), positives.new_zeros(n_anchors), {}  # fused: per matrix, one pass
    per_side: list[tuple[Tensor, Tensor, Form, tuple[Tensor, ...]]] = []  # hinge sums, active counts, form, data
    form: Form
    kept: tuple[Tensor, ...]
    for s, (k, along) in enumerate(layout):
        scores, form, kept = matrices[k], "full", (thresholds[s],)
        if n_dense[s] == 0:
            form, kept, sum_s, count_s = "none", (), zeros, zeros
        elif opt.embeddings and opt.lean and 2 * n_dense[s] <= n_anchors:  # only the fallback anchors' hinges
            subset = dense[s].nonzero().squeeze(1)
            arg = (scores if along == 1 else scores.t()).index_select(0, subset)  # their hinges' arguments:
            active = arg.sub_(thresholds[s].index_select(0, subset).unsqueeze(1)) > 0  # one buffer per side
            sum_s = zeros.index_copy(0, subset, arg.clamp_(min=0).sum(dim=1))
            count_s = zeros.index_copy(0, subset, active.sum(dim=1, dtype=dtype))
            form, kept = "rows", (subset, active)
        else:
            if k not in fused:  # (a matrix's sides share one threshold)
                alongs = tuple(a for m, a in layout if m == k)
                kernel = _kernel("hinge_sums", _hinge_sums, n_anchors, opt.lean)
                fused[k] = dict(zip(alongs, kernel(scores, thresholds[s], alongs), strict=True))
            sum_s, count_s = fused[k][along]
        per_side.append((sum_s, count_s, form, kept))
    sums, counts, forms, data = (list(values) for values in zip(*per_side, strict=True))
    count = torch.stack(counts)
    if opt.embeddings and opt.lean and "full" in forms:  # one read: each side's dense anchors' active hinges
        n_on = (count.sum(1) if sum(n_dense) == 2 * n_anchors else (count * dense).sum(1)).tolist()
        for s, (k, along) in enumerate(layout):
            inactive = n_dense[s] * (n_candidates - 1) - n_on[s]  # (excluded pairs count inactive)
            low_rank = _low_rank_or_sparse(inactive, n_on[s], n_anchors * n_candidates, device)
            if low_rank is None or forms[s] != "full":
                continue
            pairs = torch.empty(2, 0, dtype=torch.long, device=device)
            if inactive if low_rank else n_on[s]:  # low rank: the inactive pairs
                t = thresholds[s].unsqueeze(along)
                chosen = torch.le(matrices[k], t) if low_rank else torch.gt(matrices[k], t)
                if low_rank:  # excluded pairs are inactive hinges, the positive is not a hinge
                    chosen.diagonal(offset).fill_(False)
                pairs = chosen.logical_and_(dense[s].unsqueeze(along)).nonzero().t()  # (row, column) of scores
                del chosen  # (before the other side's: one B x B mask at a time)
            forms[s], data[s] = ("low_rank" if low_rank else "sparse"), (pairs if along == 1 else pairs.flip(0),)
    # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded cells:
    # its hinge sum is +inf when it has negatives (each hinge is), else 0
    total = torch.stack(sums)  # (only where a fused pass ran: the rows form reads embeddings' finite scores)
    total = torch.where(torch.isneginf(threshold), torch.where(count > 0, math.inf, 0.0), total) if fused else total
    scale: Tensor | float = 1.0  # the dense terms': 1/|N_a| for SelHN's mean fallback, N_a the
    if opt.mode == "selhn" and opt.fallback == "mean":  # candidates but the positive and the excluded
        scale = 1.0 / max(n_candidates - 1, 1)
        if excluded is not None:
            n = n_candidates - 1 - torch.stack([excluded.sum(a) for _, a in layout]) + excluded.diagonal(offset).long()
            scale = 1.0 / n.clamp(min=1).to(dtype)
    dense_coef = dense.to(dtype) * scale
    positive_coef = count * dense_coef if hard_coef is None else torch.addcmul(hard_coef, count, dense_coef)
    loss = torch.where(dense, total * scale, hard_loss)
    return loss, State(hard_index, hard_coef, dense_coef, positive_coef, tuple(forms), tuple(data))


def _entries(grad: Tensor, coef: Tensor | None, state: State, anchor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse entries (i, j, w) of the gradient over the global (image, caption) pairs:
    the positives (pair ``anchor[a]`` for both sides' anchor ``a``, its global index), then both
    sides' hard terms and each side's low-rank / sparse pairs (``coef``: grad x dense_coef). Side 0: images."""
    positive = (grad * state.positive_coef).sum(dim=0).neg_()
    rows, cols, weights = [anchor], [anchor], [positive]
    if state.hard_index is not None and state.hard_coef is not None:
        rows, cols = [anchor, anchor, state.hard_index[1]], [anchor, state.hard_index[0], anchor]
        weights.append((grad * state.hard_coef).view(-1))  # side 0's, then side 1's
    for s, (form, data) in enumerate(zip(state.forms, state.data, strict=True)):
        if form in ("low_rank", "sparse") and coef is not None:
            (pairs,) = data
            k = coef[s]
            if form == "low_rank":  # its rank-one terms count the positive too
                positive.sub_(k)
            k, a = k.index_select(0, pairs[0]), anchor.index_select(0, pairs[0])
            rows.append(a if s == 0 else pairs[1])
            cols.append(pairs[1] if s == 0 else a)
            weights.append(k.neg() if form == "low_rank" else k)
    return torch.cat(rows), torch.cat(cols), torch.cat(weights)


def _full_blocks(
    coef: Tensor | None, state: State, layout: tuple[tuple[int, int], ...], matrix: int, scores: Tensor, lean: bool
) -> Tensor | None:
    """The coefficient matrix of the ``full`` sides on ``matrices[matrix]``, or None."""
    full = [
        s for s, (form, (k, _)) in enumerate(zip(state.forms, layout, strict=True)) if (k, form) == (matrix, "full")
    ]
    if not full or coef is None:
        return None
    kernel = _kernel("blocks", _blocks, scores.shape[0], lean)
    return kernel(scores, [state.data[s][0] for s in full], [coef[s] for s in full], [layout[s][1] for s in full])  # type: ignore[no-any-return]


def _sparse_rows(out_rows: Tensor, in_rows: Tensor, weights: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """``out[out_rows[k]] += weights[k] * source[in_rows[k]]`` into a fresh (B, D), ``rows`` =
    ``arange(B)``: one weighted gather-and-sum (``embedding_bag``), with no B x D scratch buffer
    (on a CPU each fresh one costs page faults comparable to the arithmetic)."""
    order = torch.argsort(out_rows, stable=True)
    starts = torch.searchsorted(out_rows.index_select(0, order), rows)  # where each row's entries start
    in_rows, weights = in_rows.index_select(0, order), weights.index_select(0, order)
    return F.embedding_bag(in_rows, source, starts, mode="sum", per_sample_weights=weights)


def _embedding_grads(
    grad: Tensor, state: State, layout: tuple[tuple[int, int], ...], matrices: Sequence[Tensor | None],
    offset: int, local: tuple[Tensor, Tensor], everyone: tuple[Tensor, Tensor], lean: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """dL/d(global images), dL/d(global captions), (G, D), from the (2, L) cotangent ``grad``."""
    (img, txt), (img_all, txt_all) = local, everyone
    coef = None if state.dense_coef is None else grad * state.dense_coef  # (before the parallel kernels)
    if layout == SQUARE and matrices[0] is not None and "full" in state.forms:  # dL/dS anyway
        d_scores = _score_grad(grad, coef, state, matrices[0], lean)
        d_img, d_txt = d_scores @ txt, d_scores.t() @ img
    else:  # the sparse entries as one weighted gather per set, then the rectangles' full blocks
        every_row = torch.arange(img_all.shape[0], device=img.device)
        i, j, w = _entries(grad, coef, state, every_row.narrow(0, offset, img.shape[0]))
        d_img, d_txt = _sparse_rows(i, j, w, txt_all, every_row), _sparse_rows(j, i, w, img_all, every_row)
    roles = ((img, txt_all, d_img, d_txt), (txt, img_all, d_txt, d_img))  # own, other, d_own, d_other
    for m, scores in enumerate(matrices if layout != SQUARE else []):  # matrix m's rows: side m's anchors
        if scores is not None and (full := _full_blocks(coef, state, layout, m, scores, lean)) is not None:
            own, other, d_own, d_other = roles[m]
            d_own.narrow(0, offset, own.shape[0]).addmm_(full, other)
            d_other.addmm_(full.t(), own)
    if coef is None or not any(form in ("rows", "low_rank") for form in state.forms):
        return d_img, d_txt
    for s, (form, data, (own, other, d_own, d_other)) in enumerate(zip(state.forms, state.data, roles, strict=True)):
        if form == "rows":
            subset, active = data
            block = torch.where(active, coef[s].index_select(0, subset).unsqueeze(1), 0.0)
            d_own.index_add_(0, subset + offset if offset else subset, block @ other)
            d_other.addmm_(block.t(), own.index_select(0, subset))
    if "low_rank" not in (forms := state.forms):
        return d_img, d_txt
    size = img_all.shape[0]  # (pad: 0 off this rank's rows)
    pad, ones = (offset, size - offset - img.shape[0]), img_all.new_ones(size)
    k = [(F.pad(coef[s], pad) if any(pad) else coef[s]) if form == "low_rank" else None for s, form in enumerate(forms)]
    for s, (d, other) in enumerate(((d_img, txt_all), (d_txt, img_all))):  # every pair counted active: set s
        terms = [(c, r) for c, r in ((k[s], ones), (ones, k[1 - s])) if c is not None and r is not None]
        if terms:  # gets k_a sum_c other_c from its own side, sum_c k'_c other_c from the other one
            d.addmm_(torch.stack([c for c, _ in terms], dim=1), torch.stack([r for _, r in terms]) @ other)
    return d_img, d_txt


def _score_grad(grad: Tensor, coef: Tensor | None, state: State, scores: Tensor | None, lean: bool) -> Tensor:
    """dL/dS (B, B) of a square matrix's two sides: their full blocks, plus the sparse entries."""
    size = grad.shape[1]
    if scores is None or (out := _full_blocks(coef, state, SQUARE, 0, scores, lean)) is None:
        out = grad.new_zeros(size, size)
    i, j, w = _entries(grad, coef, state, torch.arange(size, device=grad.device))
    if lean:  # in place on the fresh coefficient matrix: no second B x B buffer
        out.view(-1).index_put_((i * size + j,), w.to(out.dtype), accumulate=True)
        return out
    # traced into the caller's graph: one out-of-place scatter-add, alike on every backend
    return out.reshape(-1).scatter_add(0, i * size + j, w.to(out.dtype)).view(size, size)


# --------------------------------------------------------------------------- Functions
def _save(ctx: Any, state: State, matrices: list[Tensor], *tensors: Tensor | None) -> None:
    """Save ``tensors``, the matrices a ``full`` side reads (None for the others), the state."""
    full = {k for form, (k, _) in zip(state.forms, ctx.layout, strict=True) if form == "full"}
    tensors += tuple(m if k in full else None for k, m in enumerate(matrices))
    ctx.forms, ctx.sizes, ctx.n_inputs = state.forms, [len(d) for d in state.data], len(tensors)
    ctx.save_for_backward(*tensors, *state[:4], *(t for d in state.data for t in d))


def _load(ctx: Any) -> tuple[tuple[Tensor, ...], State]:
    saved, n, sizes = ctx.saved_tensors, ctx.n_inputs, ctx.sizes
    data = tuple(saved[n + 4 + sum(sizes[:s]) :][: sizes[s]] for s in range(len(sizes)))  # each side's data
    return saved[:n], State._make((*saved[n : n + 4], ctx.forms, data))


class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix (:mod:`selhn.functional`)."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
    ) -> Tensor:
        ctx.lean = not torch.compiler.is_compiling()
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        ctx.layout = SQUARE
        losses, state = _forward([work], SQUARE, 0, mask, Options(mode, margin, epsilon, fallback, ctx.lean, False))
        _save(ctx, state, [work])
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (scores,), state = _load(ctx)
        grad = grad.contiguous()
        coef = None if state.dense_coef is None else grad * state.dense_coef
        return _score_grad(grad, coef, state, scores, ctx.lean), None, None, None, None, None


class EmbeddingLoss(torch.autograd.Function):
    """Per-anchor losses (2, L) of this rank's images and captions against every rank's (``ranks``;
    None: this process's batch, one square matrix); the scores are kept only for a ``full`` side."""

    @staticmethod
    def forward(
        ctx: Any, img: Tensor, txt: Tensor, excluded: Tensor | None, margin: float, epsilon: float, mode: Mode,
        fallback: Fallback, ranks: Ranks | None, observe: Callable[[Tensor], None] | None = None,
    ) -> Tensor:  # fmt: skip
        ctx.lean, ctx.ranks = not torch.compiler.is_compiling(), ranks
        if ranks is None:
            img_all, txt_all, offset, layout, matrices = img, txt, 0, SQUARE, [img @ txt.t()]
            if observe is not None:  # (before the non-negatives are overwritten)
                observe(matrices[0])
        else:
            (img_all, txt_all), offset, layout = ranks.gather(img, txt), ranks.offset, RECTANGLES
            matrices = [img @ txt_all.t(), txt @ img_all.t()]
        losses, state = _forward(
            matrices, layout, offset, excluded, Options(mode, margin, epsilon, fallback, ctx.lean, True)
        )
        ctx.layout, ctx.offset = layout, offset
        _save(ctx, state, matrices, img, txt, *((None, None) if ranks is None else (img_all, txt_all)))
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (img, txt, img_all, txt_all, *matrices), state = _load(ctx)
        everyone = (img, txt) if ctx.ranks is None else (img_all, txt_all)
        d_img, d_txt = _embedding_grads(
            grad.contiguous(), state, ctx.layout, matrices, ctx.offset, (img, txt), everyone, ctx.lean
        )
        if ctx.ranks is not None:
            d_img, d_txt = ctx.ranks.scatter(d_img, d_txt)
        return d_img if ctx.needs_input_grad[0] else None, d_txt if ctx.needs_input_grad[1] else None, *[None] * 7


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
    fallback: Fallback = "mean", ranks: Ranks | None = None, observe: Callable[[Tensor], None] | None = None,
) -> Tensor:  # fmt: skip
    """Per-anchor losses (2, L) of ``img`` and ``txt`` against the batch (every rank's with
    ``ranks``), scored in float32 or wider outside autocast, with the lean backward.
    ``observe`` (the square batch only) is handed the score matrix before it is used."""
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    with torch.autocast(device_type=img.device.type, enabled=False):
        losses: Tensor = EmbeddingLoss.apply(  # type: ignore[no-untyped-call]
            img.to(dtype), txt.to(dtype), excluded, margin, epsilon, mode, fallback, ranks, observe
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
        _, state = _forward(matrices, SQUARE, 0, mask, Options(mode, margin, epsilon, fallback, True, True))
        alone = torch.eye(2, dtype=img.dtype, device=img.device).unsqueeze(2).expand(2, 2, img.shape[0])
        own = [_embedding_grads(g, state, SQUARE, matrices, 0, (img, txt), (img, txt), True) for g in alone]
    (img_anchor, txt_from_images), (img_from_captions, txt_anchor) = own  # side s alone: its anchors' own
    return img_anchor + img_from_captions, txt_from_images + txt_anchor, img_anchor, txt_anchor


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """Reduce (2, B) per-anchor losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    if reduction == "none":
        return per_anchor
    raise ValueError(f"reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")
