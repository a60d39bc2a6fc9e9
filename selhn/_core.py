"""The lean core's autograd Functions and the package's internal API: per-anchor losses of a
score matrix (:class:`ScoreLoss`) or of embeddings (:class:`EmbeddingLoss`) under any rule in
the sparse form (:class:`selhn.rules.Selection`), with the lean backward; a dense rule
(:meth:`selhn.rules.SelectionRule.weights` alone) takes :mod:`selhn.rules`' plain autograd path:
:func:`score_losses` and :func:`embedding_losses` send each rule its way.

The core reads in parts: :mod:`selhn._forward` (the forward pass in the paper's steps),
:mod:`selhn._forms` (what backward keeps and which form, with the tuned thresholds),
:mod:`selhn._backward` (the gradients) and :mod:`selhn._kernels` (the dense kernels and their
compile cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from selhn import _selection as sel
from selhn._backward import Batch, embedding_grads, score_grad
from selhn._forms import _DATA, Form, SideData, State
from selhn._forward import RECTANGLES, SQUARE, Options, candidate_copies, forward_pass
from selhn.rules import SelectionRule, _side_losses, is_sparse, square_losses


class Ranks(Protocol):
    """This rank's first row in the global batch, the gather of every rank's (images,
    captions) and its adjoint: this rank's rows of the gradients summed over ranks."""

    offset: int

    def gather(self, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]: ...
    def scatter(self, d_img: Tensor, d_txt: Tensor) -> tuple[Tensor, Tensor]: ...


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


# --------------------------------------------------------------------------- Functions
class ScoreLoss(torch.autograd.Function):
    """Per-anchor losses (2, B) of a score matrix (:mod:`selhn.functional`)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, mask: Tensor | None, margin: float, rule: SelectionRule) -> Tensor:
        ctx.lean = not torch.compiler.is_compiling()
        work = scores.clone(memory_format=torch.contiguous_format)  # never overwrite the caller's scores
        options = Options(rule, margin, ctx.lean, embeddings=False)
        losses, state = forward_pass([work], SQUARE, 0, mask, options)
        _save(ctx, state, scores=work if "full" in state.forms else None)
        return losses

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        saved, state = _load(ctx)
        grad = grad.contiguous()
        coef = None if state.dense_coef is None else grad * state.dense_coef
        return score_grad(grad, coef, state, saved["scores"], ctx.lean), None, None, None


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
        losses, state = forward_pass(matrices, layout, offset, excluded, options, (img_all, txt_all))
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
        d_img, d_txt = embedding_grads(grad.contiguous(), state, ctx.layout, matrices, batch, ctx.lean)
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
