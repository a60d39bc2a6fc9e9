"""Lean custom-autograd implementations of the three triplet losses.

``ScoreLoss`` (over a score matrix) and ``EmbeddingLoss`` (over embeddings) return the
per-anchor losses of both directions, shape (2, B); ``RowLoss`` returns those of one
direction's anchors against a rectangular set of candidates (the distributed loss's local
anchors against the global batch). They compute exactly the semantics of
:mod:`selhn._selection` (the tests' loop references judge them) but keep almost nothing of
size B x B alive for backward:

* a hard anchor's gradient touches one positive and one negative, so the backward of the
  hard terms is a sparse (at most 3B entries) times dense product: one weighted gather of
  embedding rows per side (O(B D)), not two B x B x D matmuls; only the indices of the
  hardest negatives and a flag per anchor are saved;
* fallback anchors (SelHN's vanishing regime) and the sum of hinges need dense coefficients.
  In the modules over embeddings, when nearly every such hinge is active (collapsed
  embeddings, early training) the coefficient matrix is two rank-one terms minus a few
  inactive pairs, and only those pairs' indices are saved (the low-rank form); when few are
  active (late training) only the active pairs' indices are saved (the sparse form); when
  few anchors take the fallback, only their rows and columns are formed and a boolean mask
  of their active hinges is saved. Otherwise the score matrix, with its non-negatives already
  set to ``-inf``, is saved once and the coefficient matrix is formed in one fused pass in
  backward, then multiplied.

The dense passes run as small ``torch.compile``-d kernels when the batch is large enough to
pay for them (B >= ``COMPILE_MIN_BATCH``); they fall back to eager PyTorch when compiling is
switched off (``SELHN_COMPILE=0``), fails, or when the caller is itself being compiled (then
Dynamo fuses the eager code into the caller's graph). Choosing between these backward forms
reads from the device in eager mode: how many anchors fall back (one read), then either the
positions of the fallback anchors when only some do (``nonzero``, one read per direction) or
how many of their hinges are active and inactive (one read). Under ``torch.compile`` the
dense path is always taken, with no data-dependent branch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._validation import FALLBACKS, Fallback

logger = logging.getLogger(__name__)

#: Smallest batch for which the compiled dense kernels are used (compiling costs seconds once).
COMPILE_MIN_BATCH = 256

#: The modules' dense terms take the low-rank form when the inactive hinges of dense anchors
#: (the user's excluded pairs included), both directions counted, number at most this fraction
#: of the B**2 pairs: one weighted row gather per inactive pair against two B x B x D matmuls.
#: 0 switches the low-rank form off. This is the CPU's threshold; see ``GPU_LOW_RANK_FRACTION``.
LOW_RANK_FRACTION = 1 / 32

#: Otherwise they take the sparse form when the active hinges of dense anchors, both directions
#: counted, number at most this fraction of the B**2 pairs (late in training most hinges are
#: inactive): one weighted row gather per active pair. 0 switches the sparse form off.
#: Both thresholds are set from ``benchmarks/bench_forms.py`` (2-core CPU, D = 1024, the sum of
#: hinges against the dense form): with 1.5% of each direction's hinges inactive (active),
#: about 1/32 of B**2, the low-rank (sparse) form takes 0.79 / 0.78 / 0.82 (0.74 / 0.73 / 0.77)
#: of the dense form's time at B = 512 / 2048 / 4096; both break even between 2.5% and 3%.
SPARSE_FRACTION = 1 / 32

#: The same two thresholds on every other device (a GPU). There the dense form's matmuls are
#: far cheaper against a gather than on a CPU: on an H200 (``bench_forms.py --device cuda``,
#: D = 1024) both forms break even at 0.3% - 0.7% of each direction's hinges, and at 1/512 of
#: B**2 (about 0.1% per direction) the low-rank form takes 0.87 / 0.60 and the sparse form
#: 0.76 / 0.56 of the dense form's time at B = 4096 / 16384.
GPU_LOW_RANK_FRACTION = 1 / 512
GPU_SPARSE_FRACTION = 1 / 512

#: The losses, one vocabulary inside and out (the diagnostics' and the distributed loss's
#: ``loss=`` names): max violation, SelHN, the sum of hinges.
Mode = Literal["hn", "selhn", "sum"]
HARD: Final[Mode] = "hn"
SELHN: Final[Mode] = "selhn"
SUM: Final[Mode] = "sum"
MODES: tuple[Mode, ...] = (SELHN, HARD, SUM)
# SelHN's fallback (selhn._validation.Fallback): the other losses have no fallback and ignore it.


def as_mode(name: str) -> Mode:
    """``name`` as a :data:`Mode` (callers check it against :data:`MODES` with a clear message first)."""
    if name not in MODES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, MODES))}; got {name!r}")
    return name


def as_fallback(name: str) -> Fallback:
    """``name`` as a :data:`Fallback` (callers check it against ``FALLBACKS`` with a clear message first)."""
    if name not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(map(repr, FALLBACKS))}; got {name!r}")
    return name


# --------------------------------------------------------------------------- kernels
def _hinge_sums(scores: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row and per column: sum of hinges ``relu(s - threshold)`` and active count."""
    row_t = threshold.unsqueeze(1)
    col_t = threshold.unsqueeze(0)
    return (
        torch.relu(scores - row_t).sum(dim=1),
        (scores > row_t).sum(dim=1),
        torch.relu(scores - col_t).sum(dim=0),
        (scores > col_t).sum(dim=0),
    )


def _dense_grad(scores: Tensor, threshold: Tensor, k_row: Tensor, k_col: Tensor) -> Tensor:
    """Off-diagonal gradient of the dense terms: ``k_row[i] [s_ij > t_i] + k_col[j] [s_ij > t_j]``."""
    zero = scores.new_zeros(())
    return torch.where(scores > threshold.unsqueeze(1), k_row.unsqueeze(1), zero) + torch.where(
        scores > threshold.unsqueeze(0), k_col.unsqueeze(0), zero
    )


_compiled: dict[str, Callable[..., Any]] = {}
#: The kernels whose compiled twin failed where the eager one worked (each is logged once).
_compile_failed: set[str] = set()


def _kernel(name: str, eager: Callable[..., Any], batch: int) -> Callable[..., Any]:
    """The compiled twin of ``eager`` when it pays off and works, else ``eager`` itself.

    Eager also while autograd records (a backward called with ``create_graph=True``): a
    compiled kernel's own backward cannot be differentiated again. A failure counts as the
    compiler's, and switches that kernel (only) to eager for the process, only when the eager
    kernel then succeeds on the same arguments; an out-of-memory error is never one.
    """
    if (
        name in _compile_failed
        or batch < COMPILE_MIN_BATCH
        or os.environ.get("SELHN_COMPILE", "1") == "0"
        or torch.compiler.is_compiling()
        or torch.is_grad_enabled()
    ):
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


# --------------------------------------------------------------------------- forward
class _State:
    """What backward needs: (2, B) coefficients, indices and, for dense terms, the scores."""

    FIELDS = (
        "hard_coef",
        "hard_index",
        "dense_coef",
        "positive_coef",
        "scores",
        "threshold",
        "rows",
        "cols",
        "row_active",
        "col_active",
        "off_row",
        "off_col",
        "on_row",
        "on_col",
    )

    def __init__(self) -> None:
        self.hard_coef: Tensor | None = None  # (2, B): 1 where the hard hinge is used and active
        self.hard_index: Tensor | None = None  # (2, B): hardest negative per anchor
        self.dense_coef: Tensor | None = None  # (2, B): 1/|N_a| (mean) or 1 (sum) where dense, else 0
        self.positive_coef: Tensor | None = None  # (2, B): what each anchor puts on its positive, negated
        # dense terms over the whole matrix:
        self.scores: Tensor | None = None  # (B, B) with -inf on non-negatives
        self.threshold: Tensor | None = None  # (B,): positive - margin, the hinges' threshold
        # restricted dense terms (few fallback anchors), instead of the two above:
        self.rows: Tensor | None = None  # (|F|,) fallback image anchors
        self.cols: Tensor | None = None  # (|F'|,) fallback caption anchors
        self.row_active: Tensor | None = None  # (|F|, B) bool: their active hinges
        self.col_active: Tensor | None = None  # (|F'|, B) bool: the same for columns, transposed
        # low-rank dense terms (nearly every hinge of the dense anchors active), instead:
        self.off_row: Tensor | None = None  # (2, n) [i, j]: inactive hinges of dense image anchors
        self.off_col: Tensor | None = None  # (2, n') [i, j]: inactive hinges of dense caption anchors
        # sparse dense terms (few hinges of the dense anchors active), instead:
        self.on_row: Tensor | None = None  # (2, n) [i, j]: active hinges of dense image anchors
        self.on_col: Tensor | None = None  # (2, n') [i, j]: active hinges of dense caption anchors


def pair_form_fractions(device: torch.device) -> tuple[float, float]:
    """The (low-rank, sparse) thresholds that apply on ``device``."""
    forced = _forced_fractions.get()
    if forced is not None:
        return forced
    if device.type == "cpu":
        return LOW_RANK_FRACTION, SPARSE_FRACTION
    return GPU_LOW_RANK_FRACTION, GPU_SPARSE_FRACTION


#: Thresholds forced by :func:`forced_pair_form_fractions` in this thread / task, if any.
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
    """Which pair form the dense terms take, from their inactive and active hinge counts over
    ``n_pairs`` (B x B, or L x G) on ``device``: True for low rank, False for sparse, None for
    neither."""
    low_rank, sparse = pair_form_fractions(device)
    if low_rank > 0 and inactive <= low_rank * n_pairs:
        return True
    if sparse > 0 and n_active <= sparse * n_pairs:
        return False
    return None


def _pair_form_(state: _State, scores: Tensor, threshold: Tensor, dense: Tensor, active: Tensor) -> bool:
    """Choose a form of the dense terms whose backward needs no B x B buffer, from the pairs.

    The dense coefficient matrix is ``diag(k) A_row + A_col diag(k')`` with ``A`` the active
    hinges. Two extremes have cheap forms (both go through the hard terms' weighted gather):

    * low rank: early in training (collapsed embeddings: SelHN's fallback regime, the sum of
      hinges) nearly every hinge is active, so ``A = J - I - (inactive pairs)`` and the two
      B x B x D matmuls of backward become two rank-one terms and a weighted row gather over
      the diagonal and the few inactive pairs (``state.off_row``/``off_col``), when at most
      ``LOW_RANK_FRACTION * B**2`` pairs are inactive (the user's excluded pairs included;
      ``GPU_LOW_RANK_FRACTION`` on a GPU);
    * sparse: late in training few hinges are active, so ``A`` itself is a list of pairs
      (``state.on_row``/``on_col``), when at most ``SPARSE_FRACTION * B**2`` are active
      (``GPU_SPARSE_FRACTION`` on a GPU).

    Returns whether one was chosen; the two counts are read from the device in one transfer.
    """
    if torch.compiler.is_compiling():
        return False
    batch = scores.shape[0]
    # off-diagonal pairs of dense anchors whose hinge is 0, and those whose hinge is active: sums
    # of small non-negative integers, exact whenever they are small enough to matter
    inactive, n_active = torch.stack([((batch - 1 - active) * dense).sum(), (active * dense).sum()]).tolist()
    low_rank = _low_rank_or_sparse(inactive, n_active, batch * batch, scores.device)
    if low_rank is None:
        return False
    pairs = []
    kept = inactive if low_rank else n_active  # how many pairs the form keeps
    if kept:
        chosen = torch.empty_like(scores, dtype=torch.bool)
        compare = torch.le if low_rank else torch.gt  # excluded pairs are -inf: inactive, never active
        for side, broadcast in ((0, 1), (1, 0)):  # image anchors: rows of S; caption anchors: columns
            compare(scores, threshold.unsqueeze(broadcast), out=chosen)
            if low_rank:
                chosen.diagonal().fill_(False)
            pairs.append(chosen.logical_and_(dense[side].unsqueeze(broadcast)).nonzero().t())
    else:
        pairs = [torch.empty(2, 0, dtype=torch.long, device=scores.device)] * 2
    if low_rank:
        state.off_row, state.off_col = pairs
    else:
        state.on_row, state.on_col = pairs
    return True


def _forward(
    scores: Tensor,
    mask: Tensor | None,
    margin: float,
    epsilon: float,
    mode: Mode,
    fallback: Fallback,
    for_embeddings: bool,
) -> tuple[Tensor, _State]:
    """Per-anchor losses (2, B) from ``scores``, which this function may overwrite."""
    mean = mode == SELHN and fallback == "mean"  # the dense terms' scale: 1/|N_a| or 1
    batch = scores.shape[0]
    if torch.compiler.is_compiling():
        # Traced, the positives are a reduction (exact: one nonzero term), not a copy of the
        # diagonal: Inductor may turn that copy into a view of the score buffer saved for
        # backward and fill the buffer with -inf before backward reads it (seen with torch 2.13
        # on a CPU once the fill below was made out of place: wrong thresholds for SelHN's
        # fallback anchors, hence wrong gradients).
        eye = torch.eye(batch, dtype=torch.bool, device=scores.device)
        positives = torch.where(eye, scores, 0.0).sum(dim=1)
    else:
        positives = scores.diagonal().clone()
    sel.fill_excluded_(scores, mask)
    threshold = positives - margin  # hinge(s) = relu(s - threshold): one threshold per anchor
    state = _State()

    if mode == SUM:
        dense = torch.ones(2, batch, dtype=torch.bool, device=scores.device)
        hard_loss = torch.zeros(2, batch, dtype=scores.dtype, device=scores.device)
    else:
        row_max, row_idx, col_max, col_idx = sel.hardest_negatives(scores)
        hardest = torch.stack([row_max, col_max])
        hard_loss = sel.hinge(positives, hardest, margin)
        state.hard_index = torch.stack([row_idx, col_idx])
        if mode == SELHN:
            dense = sel.vanishing(sel.gap(positives, hardest), epsilon)
            state.hard_coef = (hard_loss > 0).to(scores.dtype).masked_fill_(dense, 0.0)
        else:
            state.hard_coef = state.positive_coef = (hard_loss > 0).to(scores.dtype)
            return hard_loss, state

    # Dense terms. Eager mode looks at how many anchors need them (one device read);
    # under torch.compile every anchor's dense sum is formed and selected by `where`.
    n_dense = batch * 2 if (mode == SUM or torch.compiler.is_compiling()) else int(dense.sum())
    if n_dense == 0:
        state.positive_coef = state.hard_coef
        return hard_loss, state
    if n_dense == 2 * batch and mode == SELHN and not torch.compiler.is_compiling():
        state.hard_coef = state.hard_index = None  # every anchor takes the fallback (cold start)
    if for_embeddings and n_dense < batch:
        # only the fallback anchors' hinges, anchor-major: rows of S for the image anchors,
        # rows of S.T for the caption anchors; the score matrix itself is not kept for
        # backward, only which of these hinges are active
        sums = scores.new_zeros(2, batch)
        active = scores.new_zeros(2, batch)
        state.rows, state.cols = dense[0].nonzero().squeeze(1), dense[1].nonzero().squeeze(1)
        masks = []
        for side, (anchors, anchor_major) in enumerate(((state.rows, scores), (state.cols, scores.t()))):
            if not anchors.numel():  # (a side without fallback anchors costs no operation)
                masks.append(torch.empty(0, batch, dtype=torch.bool, device=scores.device))
                continue
            arg = anchor_major.index_select(0, anchors).sub_(threshold.index_select(0, anchors).unsqueeze(1))
            masks.append(arg > 0)
            sums[side].index_copy_(0, anchors, arg.clamp_(min=0).sum(dim=1))
            active[side].index_copy_(0, anchors, masks[side].sum(dim=1, dtype=scores.dtype))
        state.row_active, state.col_active = masks
    else:
        row_sum, row_active, col_sum, col_active = _kernel("hinge_sums", _hinge_sums, batch)(scores, threshold)
        # a -inf positive makes its threshold -inf, and -inf - (-inf) is NaN at its excluded
        # cells: its hinge sum is +inf when it has negatives (each hinge is), else 0
        stuck = torch.isneginf(threshold)
        row_sum = torch.where(stuck, torch.where(row_active > 0, math.inf, 0.0), row_sum)
        col_sum = torch.where(stuck, torch.where(col_active > 0, math.inf, 0.0), col_sum)
        sums = torch.stack([row_sum, col_sum])
        active = torch.stack([row_active, col_active]).to(scores.dtype)
        if not (for_embeddings and _pair_form_(state, scores, threshold, dense, active)):
            state.scores = scores
            state.threshold = threshold
    scale: Tensor | float = 1.0
    if mean and mask is None:
        scale = 1.0 / max(batch - 1, 1)  # every anchor has B - 1 negatives
    elif mean:
        scale = 1.0 / sel.negative_counts(batch, mask, scores.device).to(scores.dtype).clamp(min=1)
    dense_scale = dense.to(scores.dtype) * scale
    state.dense_coef = dense_scale
    state.positive_coef = active * dense_scale  # k per active hinge
    if state.hard_coef is not None:
        state.positive_coef += state.hard_coef
    return torch.where(dense, sums * scale, hard_loss), state


# --------------------------------------------------------------------------- backward
def _coefficients(grad: Tensor, state: _State) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Hard coefficients (2, B), dense coefficients (2, B) and the positives' coefficient (B).

    ``grad`` is the cotangent of the (2, B) per-anchor losses. A hard anchor contributes
    ``+c`` at its hardest negative and ``-c`` at its positive; a dense anchor contributes
    ``+k`` at each active negative and ``-k * n_active`` at its positive.
    """
    assert state.positive_coef is not None
    hard = None if state.hard_coef is None else grad * state.hard_coef
    dense = None if state.dense_coef is None else grad * state.dense_coef
    return hard, dense, (grad * state.positive_coef).sum(dim=0).neg_()


def _fallback_block(dense: Tensor, side: int, anchors: Tensor, active: Tensor) -> Tensor:
    """Restricted dense coefficients of one direction's fallback anchors, anchor-major (n, B):
    ``dense[side, a]`` at each active hinge of anchor ``a``, else 0."""
    return torch.where(active, dense[side].index_select(0, anchors).unsqueeze(1), 0.0)


def score_grad(grad: Tensor, state: _State, batch: int) -> Tensor:
    """dL/dscores (B, B) of the per-anchor losses for the cotangent ``grad`` (2, B).

    Used for states formed over the whole matrix (never the restricted rows/columns path).
    """
    assert state.rows is None, "score_grad needs a state formed over the whole matrix"
    hard, dense, positive = _coefficients(grad, state)
    if dense is not None and state.scores is not None and state.threshold is not None:
        out: Tensor = _kernel("dense_grad", _dense_grad, batch)(state.scores, state.threshold, dense[0], dense[1])
    else:
        out = grad.new_zeros(batch, batch)
    anchors = torch.arange(batch, device=grad.device)
    rows, cols, values = _sparse_entries(hard, positive, state, anchors)
    flat, weights = torch.cat(rows) * batch + torch.cat(cols), torch.cat(values).to(out.dtype)
    if torch.compiler.is_compiling():
        # traced into the caller's graph: one out-of-place scatter-add (duplicates
        # accumulate), which every backend handles alike
        grad_scores: Tensor = out.reshape(-1).scatter_add(0, flat, weights)
        return grad_scores.view(batch, batch)
    # eager: in place on the fresh coefficient matrix, no second B x B buffer
    out.view(-1).index_put_((flat,), weights, accumulate=True)
    return out


def _sparse_entries(
    hard: Tensor | None, positive: Tensor, state: _State, anchors: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The O(B) sparse entries (i, j, w) of dL/dS, as lists to extend: the positives s_ii; the
    hardest caption r(i) of image anchor i, s_{i r(i)}; the hardest image q(j) of caption
    anchor j, s_{q(j) j}. ``anchors`` is ``arange(B)``."""
    rows, cols, values = [anchors], [anchors], [positive]
    if hard is not None and state.hard_index is not None:
        rows += [anchors, state.hard_index[1]]
        cols += [state.hard_index[0], anchors]
        values += [hard[0], hard[1]]
    return rows, cols, values


def _sparse_rows(out_rows: Tensor, in_rows: Tensor, weights: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """``out[out_rows[k]] += weights[k] * source[in_rows[k]]`` over all k, into a fresh (B, D).

    ``rows`` is ``arange(B)``. A sparse-times-dense product as one weighted gather-and-sum
    (``embedding_bag``): unlike scaled copies and ``index_add_``, it needs no scratch buffer of
    size B x D (on a CPU each fresh buffer of that size costs page faults comparable to the
    arithmetic).
    """
    order = torch.argsort(out_rows, stable=True)
    return torch.nn.functional.embedding_bag(
        in_rows.index_select(0, order),
        source,
        torch.searchsorted(out_rows.index_select(0, order), rows),  # where each row's entries start
        mode="sum",
        per_sample_weights=weights.index_select(0, order),
    )


def embedding_grads(grad: Tensor, state: _State, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    """dL/dimg and dL/dtxt (B, D).

    With dense terms for most anchors, either the low-rank form (nearly every hinge active),
    the sparse form (few hinges active) or the whole coefficient matrix, formed once (the hard
    and positive terms are O(B) entries of it) and multiplied: two matmuls. Otherwise the
    positive and hard terms are one weighted gather of embedding rows per side, and the few
    fallback anchors add their own rows and columns of coefficients.
    """
    batch = img.shape[0]
    if state.scores is not None:
        g = score_grad(grad, state, batch)
        return g @ txt, g.t() @ img
    hard, dense, positive = _coefficients(grad, state)
    anchors = torch.arange(batch, device=img.device)
    rows, cols, values = _sparse_entries(hard, positive, state, anchors)
    low_rank = dense is not None and state.off_row is not None
    if dense is not None:
        if low_rank:
            # below, every off-diagonal pair of a dense anchor counts as an active hinge; take
            # the diagonal and the inactive pairs back out here (k for image anchor i's pairs
            # (i, j), k' for caption anchor j's)
            values[0] = positive - dense[0] - dense[1]
        # the low-rank form's inactive pairs (taken out) or the sparse form's active pairs
        for pair_lists, sign in (((state.off_row, state.off_col), -1.0), ((state.on_row, state.on_col), 1.0)):
            for side, pairs in enumerate(pair_lists):
                if pairs is not None:
                    rows.append(pairs[0])
                    cols.append(pairs[1])
                    values.append(dense[side].index_select(0, pairs[side]).mul_(sign))
    i, j, w = torch.cat(rows), torch.cat(cols), torch.cat(values).to(txt.dtype)
    d_img = _sparse_rows(i, j, w, txt, anchors)  # s_ij = img_i . txt_j: img_i += w txt_j
    d_txt = _sparse_rows(j, i, w, img, anchors)  # txt_j += w img_i
    if low_rank:
        # the rank-one terms: d_img_i += k_i sum_j txt_j + sum_j k'_j txt_j, d_txt alike
        assert dense is not None
        k_row, k_col = dense[0], dense[1]
        ones = torch.ones_like(k_row)
        d_img.addmm_(torch.stack([k_row, ones], dim=1), torch.stack([ones, k_col]) @ txt)
        d_txt.addmm_(torch.stack([ones, k_col], dim=1), torch.stack([k_row, ones]) @ img)
    if dense is not None and state.rows is not None and state.cols is not None:
        assert state.row_active is not None and state.col_active is not None
        # image anchor i's hinges are s_{i j}: img_i += k txt_j, txt_j += k img_i; a caption
        # anchor's the same with the roles of the two sides swapped
        for side, fallback, active, own, other, d_own, d_other in (
            (0, state.rows, state.row_active, img, txt, d_img, d_txt),
            (1, state.cols, state.col_active, txt, img, d_txt, d_img),
        ):
            if fallback.numel():
                block = _fallback_block(dense, side, fallback, active)
                d_own.index_add_(0, fallback, block @ other)
                d_other.addmm_(block.t(), own.index_select(0, fallback))
    return d_img, d_txt


# --------------------------------------------------------------------------- the internal API
# (what selhn.functional, selhn.losses, selhn.distributed and selhn.diagnostics call)
def forward_state(
    scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback = "mean"
) -> tuple[Tensor, _State]:
    """Per-anchor losses (2, B) and the state backward reads, of a score matrix the call may
    overwrite (the diagnostic's analytic gradients read the state)."""
    return _forward(scores, mask, margin, epsilon, mode, fallback, for_embeddings=False)


def score_losses(
    scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback = "mean"
) -> Tensor:
    """Per-anchor losses (2, B) of a score matrix, computed in float32 or wider."""
    scores = scores.to(sel.compute_dtype(scores.dtype))
    losses: Tensor = ScoreLoss.apply(scores, mask, margin, epsilon, mode, fallback)  # type: ignore[no-untyped-call]
    return losses


def embedding_losses(
    img: Tensor, txt: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode,
    fallback: Fallback = "mean",
) -> Tensor:  # fmt: skip
    """Per-anchor losses (2, B) of ``img @ txt.T``, scored in float32 or wider outside
    autocast, with the lean gather/scatter backward (the modules, the distributed loss)."""
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    with torch.autocast(device_type=img.device.type, enabled=False):
        losses: Tensor = EmbeddingLoss.apply(  # type: ignore[no-untyped-call]
            img.to(dtype), txt.to(dtype), mask, margin, epsilon, mode, fallback
        )
    return losses


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """Reduce (2, B) per-anchor losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


# --------------------------------------------------------------------------- Functions
def _save(ctx: Any, state: _State, *tensors: Tensor) -> None:
    ctx.state_fields = [name for name in _State.FIELDS if getattr(state, name) is not None]
    ctx.save_for_backward(*tensors, *(getattr(state, name) for name in ctx.state_fields))
    ctx.num_inputs = len(tensors)


def _load(ctx: Any) -> tuple[tuple[Tensor, ...], _State]:
    saved = ctx.saved_tensors
    state = _State()
    for name, value in zip(ctx.state_fields, saved[ctx.num_inputs :], strict=True):
        setattr(state, name, value)
    return saved[: ctx.num_inputs], state


class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix; saves indices and flags, and the scores
    only when dense terms exist."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, epsilon: float, mode: Mode, fallback: Fallback
    ) -> Tensor:
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        losses, state = _forward(work, mask, margin, epsilon, mode, fallback, for_embeddings=False)
        _save(ctx, state)
        ctx.batch = scores.shape[0]
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        _, state = _load(ctx)
        return score_grad(grad.contiguous(), state, ctx.batch), None, None, None, None, None


class EmbeddingLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of ``img @ txt.T`` with a weighted-gather backward for the
    hard terms; the score matrix is freed after forward unless dense terms need it."""

    @staticmethod
    def forward(
        ctx: Any,
        img: Tensor,
        txt: Tensor,
        mask: Tensor | None,
        margin: float,
        epsilon: float,
        mode: Mode,
        fallback: Fallback,
    ) -> Tensor:
        scores = img @ txt.t()
        losses, state = _forward(scores, mask, margin, epsilon, mode, fallback, for_embeddings=True)
        _save(ctx, state, img, txt)
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (img, txt), state = _load(ctx)
        d_img, d_txt = embedding_grads(grad.contiguous(), state, img, txt)
        return (
            d_img if ctx.needs_input_grad[0] else None,
            d_txt if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
        )


class RowLoss(torch.autograd.Function):
    """Per-anchor losses (L,) of one direction over a rectangular score matrix: anchor ``a``
    is row ``a`` of ``anchors @ candidates.T`` (L, G), its positive is column ``positive[a]``,
    and ``excluded`` (L, G) marks further non-negatives. These are the distributed loss's local
    anchors against the global batch's candidates.

    Like :class:`EmbeddingLoss`, it saves indices and flags, not scores: the hard terms'
    backward is one weighted gather per side, and the dense rows (SelHN's fallback anchors, or
    every row for the sum of hinges and under ``torch.compile``) keep only a boolean mask of
    their active hinges, whose coefficients are formed and multiplied in backward. When every
    row is dense (a cold start, the sum of hinges), eager mode keeps instead the inactive pairs
    when nearly every hinge is active (low rank: ``LOW_RANK_FRACTION``) or the active pairs when
    hardly any is (sparse: ``SPARSE_FRACTION``), as the modules do.
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchors: Tensor,
        candidates: Tensor,
        positive: Tensor,
        excluded: Tensor | None,
        margin: float,
        epsilon: float,
        mode: Mode,
        fallback: Fallback,
    ) -> Tensor:
        scores = anchors @ candidates.t()
        mean = mode == SELHN and fallback == "mean"  # the dense rows' scale: 1/|N_a| or 1
        n_anchors, n_candidates = scores.shape
        rows = torch.arange(n_anchors, device=scores.device)
        positives = scores[rows, positive]
        if excluded is not None:
            scores.masked_fill_(excluded, float("-inf"))
        scores[rows, positive] = float("-inf")  # every non-negative is -inf, as in the square case
        threshold = positives - margin
        zero = scores.new_zeros(n_anchors)
        hard_index = hard_coef = None
        if mode == SUM:
            dense = torch.ones(n_anchors, dtype=torch.bool, device=scores.device)
            hard_loss = zero
        else:
            hardest, hard_index = sel.max_along(scores, 1)
            hard_loss = sel.hinge(positives, hardest, margin)
            hard_coef = (hard_loss > 0).to(scores.dtype)
            if mode == HARD:
                empty = torch.empty(0, n_candidates, dtype=torch.bool, device=scores.device)
                ctx.low_rank = False
                ctx.save_for_backward(
                    anchors, candidates, positive, hard_index, hard_coef, None, empty, None, hard_coef, None
                )
                return hard_loss
            dense = sel.vanishing(sel.gap(positives, hardest), epsilon)
            hard_coef.masked_fill_(dense, 0.0)
        # Dense rows. Eager SelHN forms only its fallback rows (one device read); the sum of
        # hinges, and SelHN under torch.compile, form every row (a non-dense row's hinges get
        # the coefficient dense_coef = 0 and its sum is not selected).
        subset: Tensor | None = None  # the fallback rows, when only some rows are dense (None: every row)
        if mode == SELHN and not torch.compiler.is_compiling():
            n_dense = int(dense.sum())
            subset = None if n_dense == n_anchors else dense.nonzero().squeeze(1)
        if subset is None:
            arg = scores.sub_(threshold.unsqueeze(1))
            active = arg > 0
            sums = arg.clamp_(min=0).sum(dim=1)
            counts = active.sum(dim=1, dtype=scores.dtype)
        else:
            arg = scores.index_select(0, subset).sub_(threshold.index_select(0, subset).unsqueeze(1))
            active = arg > 0
            sums = zero.index_copy(0, subset, arg.clamp_(min=0).sum(dim=1))
            counts = zero.index_copy(0, subset, active.sum(dim=1, dtype=scores.dtype))
        scale: Tensor | float = 1.0
        if mean and excluded is None:
            scale = 1.0 / max(n_candidates - 1, 1)
        elif mean:
            assert excluded is not None
            others = excluded.sum(dim=1) - excluded[rows, positive].long()  # excluded besides the positive
            scale = 1.0 / (n_candidates - 1 - others).to(scores.dtype).clamp(min=1)
        dense_coef = dense.to(scores.dtype) * scale
        positive_coef = counts * dense_coef
        if hard_coef is not None:
            positive_coef += hard_coef
        pairs, low_rank = None, None
        if subset is None and not torch.compiler.is_compiling():
            # every row dense: nearly all hinges active (cold start) or hardly any (late training)?
            n_active = int(counts.sum())
            low_rank = _low_rank_or_sparse(
                n_anchors * (n_candidates - 1) - n_active, n_active, scores.numel(), scores.device
            )
            if low_rank is not None:  # low rank keeps the inactive pairs, the positives included
                pairs = (active.logical_not_() if low_rank else active).nonzero().t()
                active = active[:0]
        ctx.low_rank = bool(low_rank)
        ctx.save_for_backward(
            anchors, candidates, positive, hard_index, hard_coef, subset, active, dense_coef, positive_coef, pairs
        )
        return torch.where(dense, sums * scale, hard_loss)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        anchors, candidates, positive, hard_index, hard_coef, subset, active, dense_coef, positive_coef, pairs = (
            ctx.saved_tensors
        )
        grad = grad.contiguous()
        rows = torch.arange(anchors.shape[0], device=grad.device)
        # sparse entries (anchor a, candidate c, w) of dL/dS: the positives and the hard terms
        out, into, weights = [rows], [positive], [(grad * positive_coef).neg_()]
        if hard_index is not None:
            out.append(rows)
            into.append(hard_index)
            weights.append(grad * hard_coef)
        k = None if dense_coef is None else grad * dense_coef  # the dense rows' coefficient per hinge
        if pairs is not None and k is not None:  # k_a at each active pair (sparse), or -k_a at each inactive one
            out.append(pairs[0])
            into.append(pairs[1])
            weights.append(k.index_select(0, pairs[0]).mul_(-1.0 if ctx.low_rank else 1.0))
        a, c, w = torch.cat(out), torch.cat(into), torch.cat(weights).to(anchors.dtype)
        d_anchors = _sparse_rows(a, c, w, candidates, rows)
        d_candidates = _sparse_rows(c, a, w, anchors, torch.arange(candidates.shape[0], device=grad.device))
        if ctx.low_rank and k is not None:  # the rank-one term k 1^T: every pair counted active, then taken out
            d_anchors.addmm_(k.unsqueeze(1), candidates.sum(dim=0, keepdim=True))
            d_candidates.addmm_(torch.ones_like(candidates[:, :1]), k.unsqueeze(0) @ anchors)
        if active.numel() and k is not None:  # the dense rows: k_a at each active hinge of anchor a
            if subset is None:
                block = torch.where(active, k.unsqueeze(1), 0.0)
                d_anchors.addmm_(block, candidates)
                d_candidates.addmm_(block.t(), anchors)
            else:
                block = torch.where(active, k.index_select(0, subset).unsqueeze(1), 0.0)
                d_anchors.index_add_(0, subset, block @ candidates)
                d_candidates.addmm_(block.t(), anchors.index_select(0, subset))
        return (
            d_anchors if ctx.needs_input_grad[0] else None,
            d_candidates if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
