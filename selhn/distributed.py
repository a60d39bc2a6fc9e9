r"""Negatives across GPUs: the triplet losses over the global batch, with torch.distributed.

With DistributedDataParallel every ITM code base mines negatives inside each rank's local
batch. :func:`global_loss` mines them in the global batch instead: each rank gathers the other
ranks' embeddings (an autograd-aware all-gather), scores its *local* anchors against the
*global* candidates (local images x global captions for image anchors, local captions x
global images for caption anchors, each positive at its global offset), so the memory per
rank grows with :math:`B_\text{local} \times B_\text{global}`, not :math:`B_\text{global}^2`.
The two rectangular score matrices go through ``selhn._fast.RowLoss``, with the lean
backward of the modules: the scores are freed after the forward pass and only indices, flags
and the fallback anchors' active-hinge masks are kept.

Equivalence: the value returned on every rank is exactly the loss a single process computes
on the concatenated global batch (same reduction). Its gradient is :math:`W` times the
gradient of this rank's share of that loss (:math:`W` = world size): the all-gather's
backward sums every rank's contribution into the owner's embeddings, and DDP then averages
the parameter gradients over the :math:`W` ranks, so after ``backward()`` the parameters hold
exactly the single-process gradient. Ranks may hold different batch sizes (a last, smaller
batch): sizes are exchanged first and the gather pads and unpads.

Without an initialised process group (or with world size 1) :func:`global_loss` is the
plain single-process loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from selhn import _fast
from selhn._validation import (
    FALLBACKS,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_nonnegative,
    ids_to_mask,
)

__all__ = ["gather", "global_loss", "is_distributed"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised.

    Example:
        >>> from selhn.distributed import is_distributed
        >>> is_distributed()      # a plain process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sizes(local: int, device: torch.device) -> list[int]:
    size = torch.tensor([local], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather(tensor: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``tensor`` (B_r, ...) from every rank, with gradient; also return this
    rank's row offset in the result. Ranks may have different B_r.

    Example:
        >>> import torch
        >>> from selhn.distributed import gather
        >>> gather(torch.ones(2, 3))[0].shape   # no process group: the tensor itself
        torch.Size([2, 3])
    """
    if not is_distributed():
        return tensor, 0
    sizes = _sizes(tensor.shape[0], tensor.device)
    largest = max(sizes)
    padded = (
        torch.cat([tensor, tensor.new_zeros(largest - tensor.shape[0], *tensor.shape[1:])])
        if tensor.shape[0] < largest
        else tensor
    )
    parts = _GatherRows.apply(padded).split(largest)  # type: ignore[no-untyped-call]
    rank = dist.get_rank()
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


# torch 2.13 renamed the single-tensor collectives and deprecated the old names; torch < 2.13 has the old ones only
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """Every rank's (R, ...) tensor, stacked along dim 0 in rank order, with gradient.

    Written on the public collectives (``torch.distributed.nn.functional.all_gather`` is
    deprecated from torch 2.13 on), under their torch 2.13 names where they exist.
    Backward: each rank's loss sends a gradient to every rank's rows, so this rank's rows
    get the sum over ranks of the gradient at its slice: a reduce-scatter on NCCL, an
    all-reduce and a slice on backends without one (gloo). Second derivatives are refused:
    autograd cannot record the collectives.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # create_graph=True: the collectives below are not recorded
            raise RuntimeError(
                "selhn.distributed: second derivatives across ranks are not supported (backward was called "
                "with create_graph=True, e.g. for a gradient penalty). Use the loss modules or selhn.functional "
                "on the local batch for a penalty term: they are twice differentiable."
            )
        grad = grad.contiguous()
        rows = grad.shape[0] // dist.get_world_size()
        if dist.get_backend() == dist.Backend.NCCL:
            local = grad.new_empty((rows, *grad.shape[1:]))
            _reduce_scatter_single(local, grad)
            return local
        total = grad.clone()
        dist.all_reduce(total)
        start = dist.get_rank() * rows
        return total[start : start + rows]


def _gather_ids(ids: Tensor) -> Tensor:
    sizes = _sizes(ids.shape[0], ids.device)
    largest = max(sizes)
    padded = torch.cat([ids, ids.new_zeros(largest - ids.shape[0])])
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def global_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    loss: str = "selhn",
    margin: float = 0.2,
    epsilon: float = 0.01,
    *,
    fallback: str = "mean",
    ids: Any = None,
    reduction: str = "mean",
) -> Tensor:
    r"""A triplet loss over the global batch of all ranks, for this rank's anchors.

    Returns, on every rank, the value a single process computes on the concatenated batch;
    see the module docs for the gradient scaling that makes DDP's averaged gradients equal
    the single-process ones. With ``ids``, pairs sharing an id are not negatives of each
    other, across ranks too.

    Args:
        img_emb: (B_r, D) this rank's L2-normalised image embeddings.
        txt_emb: (B_r, D) this rank's L2-normalised caption embeddings.
        loss: ``"selhn"``, ``"hn"`` (max violation) or ``"sum"`` (sum of hinges).
        margin: triplet margin.
        epsilon: SelHN's gap threshold.
        fallback: SelHN's fallback, ``"mean"`` or ``"sum"``.
        ids: optional (B_r,) integer ids (e.g. image ids).
        reduction: ``"mean"`` or ``"sum"`` over the 2 B_global anchors (``"none"`` is not
            available: the per-anchor losses live on different ranks).

    Returns:
        A scalar.

    Shape:
        - img_emb, txt_emb: :math:`(B_r, D)`
        - ids: :math:`(B_r,)`
        - output: :math:`()`

    Example:
        >>> import torch
        >>> import selhn
        >>> from selhn.distributed import global_loss
        >>> img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> torch.allclose(global_loss(img, txt, "hn"), selhn.MaxViolationLoss()(img, txt))
        True
    """
    check_embeddings(img_emb, txt_emb)
    check_choice(loss, "loss", tuple(_fast.MODES))
    check_choice(fallback, "fallback", FALLBACKS)
    check_choice(reduction, "reduction", tuple(r for r in REDUCTIONS if r != "none"))
    margin = check_nonnegative(margin, "margin")
    epsilon = check_nonnegative(epsilon, "epsilon")
    fallback_ = _fast.as_fallback(fallback)
    local = img_emb.shape[0]
    mask = ids_to_mask(ids, local, img_emb.device)  # validates ids
    if not is_distributed():  # the plain single-process loss, through the modules' own path
        per_anchor = _fast.embedding_losses(img_emb, txt_emb, mask, margin, epsilon, _fast.as_mode(loss), fallback_)
        return _fast.reduce(per_anchor, reduction)

    dtype = torch.promote_types(torch.promote_types(img_emb.dtype, txt_emb.dtype), torch.float32)
    img, txt = img_emb.to(dtype), txt_emb.to(dtype)
    all_img, offset = gather(img)
    all_txt, _ = gather(txt)
    total = all_img.shape[0]
    positive = torch.arange(offset, offset + local, device=img.device)
    excluded = None
    if ids is not None:
        local_ids = torch.as_tensor(ids, device=img.device)
        all_ids = _gather_ids(local_ids)
        excluded = local_ids.unsqueeze(1) == all_ids.unsqueeze(0)
    mode = _fast.as_mode(loss)

    def anchor_losses(anchors: Tensor, candidates: Tensor) -> Tensor:
        """Local anchors against the global candidates, with the lean backward of selhn._fast;
        scored in float32 or wider under autocast too, as the modules score."""
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            losses: Tensor = _fast.RowLoss.apply(  # type: ignore[no-untyped-call]
                anchors, candidates, positive, excluded, margin, epsilon, mode, fallback_
            )
        return losses

    share = anchor_losses(img, all_txt).sum() + anchor_losses(txt, all_img).sum()
    if reduction == "mean":
        share = share / (2 * total)
    value = share.detach().clone()
    dist.all_reduce(value)
    world = dist.get_world_size()
    # the value of the global loss, with the gradient of W x this rank's share (see module docs)
    return world * share + (value - world * share).detach()
