"""The exact gradient norms a loss sends to each embedding (:func:`gradient_norms`), also with
respect to the features before the L2 normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selhn import _core
from selhn import _selection as sel
from selhn._validation import (
    check_embeddings,
    check_mask,
    check_nonnegative,
)
from selhn.rules import SelectionRule, resolve_rule
from selhn.types import Fallback, LossName


@dataclass(frozen=True)
class GradientNorms:
    """Gradient norms per embedding, shape (B,) each.

    Attributes:
        image: norm of the gradient of the summed per-anchor losses (``reduction="sum"``)
            with respect to image embedding ``i`` (or its pre-normalisation features).
        text: the same for caption embedding ``j``.
        image_anchor: norm of the gradient that image anchor ``i``'s own loss term sends to
            its own embedding: ``|t_hat - t_i|`` for an active hard hinge.
        text_anchor: the same for caption anchor ``j``: ``|v_hat - v_j|``.

    Example:
        >>> import torch
        >>> from selhn.diagnostics import gradient_norms
        >>> norms = gradient_norms(torch.eye(2), torch.eye(2), "hn", margin=2.0)
        >>> norms.image_anchor            # |t_hat - t_i| = sqrt(2), the hinge being active
        tensor([1.4142, 1.4142])
    """

    image: Tensor
    text: Tensor
    image_anchor: Tensor
    text_anchor: Tensor


def _through_normalisation(grad: Tensor, unit: Tensor, norms: Tensor | None) -> Tensor:
    """Gradient with respect to ``u`` where ``unit = u / |u|``: ``(I - v v^T) g / |u|``."""
    if norms is None:
        return grad
    radial = (grad * unit).sum(dim=1, keepdim=True)
    return (grad - radial * unit) / norms.reshape(-1, 1)


def gradient_norms(
    img_emb: Tensor,
    txt_emb: Tensor,
    loss: LossName | SelectionRule = "selhn",
    margin: float = 0.2,
    epsilon: float | None = None,
    *,
    fallback: Fallback | None = None,
    mask: Tensor | None = None,
    img_norms: Tensor | None = None,
    txt_norms: Tensor | None = None,
) -> GradientNorms:
    r"""Exact per-embedding gradient norms of a loss, through its own backward (the model untouched).

    For an image anchor :math:`i` with an active hard hinge, its own term sends
    :math:`\hat t - t_i` to :math:`v_i`; in SelHN's fallback it sends
    :math:`\frac{1}{|N_i|}\sum_{n\ \text{active}} (t_n - t_i)`. With ``img_norms`` /
    ``txt_norms`` (the norms :math:`|u|` of the features before L2 normalisation,
    :math:`v = u / |u|`), every gradient is taken with respect to :math:`u` instead:
    :math:`(I - v v^\top) g / |u|`.

    Args:
        img_emb: (B, D) L2-normalised image embeddings.
        txt_emb: (B, D) L2-normalised caption embeddings.
        loss: ``"selhn"``, ``"hn"`` (max violation) or ``"sum"`` (sum of hinges), or any
            :class:`selhn.rules.SelectionRule` (by autograd through the rule's loss: the lean
            backward for a rule with a sparse form, the plain path for a dense one).
        margin: triplet margin.
        epsilon: SelHN's gap threshold for ``loss="selhn"`` (None: 0.01); refused beside a
            rule, which carries its own.
        fallback: SelHN's fallback for ``loss="selhn"``, ``"mean"`` (None) or ``"sum"``;
            refused beside a rule.
        mask: optional boolean (B, B), ``True`` = not a negative.
        img_norms: optional (B,) norms of the image features before normalisation.
        txt_norms: optional (B,) norms of the caption features before normalisation.

    Returns:
        A :class:`GradientNorms` of (B,) tensors.

    Example:
        >>> import torch
        >>> from selhn.diagnostics import gradient_norms
        >>> img = torch.eye(3)
        >>> txt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> # caption 1 duplicates caption 0: it is image 1's hardest negative's twin
        >>> gradient_norms(img, txt, "hn").image_anchor
        tensor([0., 0., 0.])
        >>> gradient_norms(img, txt, "selhn").image_anchor   # image 1 averages in caption 2
        tensor([0.0000, 0.7071, 0.0000])
    """
    check_embeddings(img_emb, txt_emb)
    rule = resolve_rule(loss, epsilon, fallback)
    margin = check_nonnegative(margin, "margin")
    batch = img_emb.shape[0]
    mask = check_mask(mask, batch, img_emb.device)
    for name, norms in (("img_norms", img_norms), ("txt_norms", txt_norms)):
        if norms is not None and (not isinstance(norms, Tensor) or norms.shape != (batch,)):
            raise ValueError(f"{name} must be a ({batch},) tensor of feature norms, got {norms!r}")
    dtype = sel.embedding_compute_dtype(img_emb, txt_emb)
    img = img_emb.detach().to(dtype)
    txt = txt_emb.detach().to(dtype)
    d_img, d_txt, anchor_img, anchor_txt = _rule_gradients(img, txt, mask, rule, margin)
    return GradientNorms(
        image=_through_normalisation(d_img, img, img_norms).norm(dim=1),
        text=_through_normalisation(d_txt, txt, txt_norms).norm(dim=1),
        image_anchor=_through_normalisation(anchor_img, img, img_norms).norm(dim=1),
        text_anchor=_through_normalisation(anchor_txt, txt, txt_norms).norm(dim=1),
    )


def _rule_gradients(
    img: Tensor, txt: Tensor, mask: Tensor | None, rule: SelectionRule, margin: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients :func:`gradient_norms` reads, for any rule, by autograd through the loss
    (the lean backward for a rule with a sparse form). Image anchor ``i``'s loss depends on
    image ``i`` alone among the images (row ``i`` of the scores), so the image anchors' summed
    losses differentiated by the images give each anchor's gradient through its own loss;
    likewise for the caption anchors and the captions."""
    with torch.enable_grad():
        img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
        per_anchor = _core.embedding_losses(img, txt, mask, margin, rule)
        anchor_img, txt_from_images = torch.autograd.grad(per_anchor[0].sum(), (img, txt), retain_graph=True)
        img_from_captions, anchor_txt = torch.autograd.grad(per_anchor[1].sum(), (img, txt))
    return anchor_img + img_from_captions, txt_from_images + anchor_txt, anchor_img, anchor_txt
