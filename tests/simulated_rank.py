"""One rank of a simulated process group, in one process: the distributed loss's rectangles
(this rank's anchors against the global batch) without torch.distributed."""

from __future__ import annotations

import torch

from selhn import _core
from selhn.rules import resolve_rule


class OneRank:
    """Rank ``offset`` of a simulated group, in one process: ``gather`` returns the global
    images and captions with this rank's rows in place; ``scatter`` returns its rows of the
    global gradients (this rank's share's), which it records unless ``record`` is off."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, offset: int, local: int, record: bool = True) -> None:
        self.offset, self.local, self.everyone = offset, local, (img, txt)
        self.grads: list[torch.Tensor] | None = [] if record else None

    def gather(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.offset + self.local
        return tuple(  # type: ignore[return-value]
            torch.cat([full[: self.offset].to(own.dtype), own, full[end:].to(own.dtype)])
            for full, own in zip(self.everyone, (img, txt), strict=True)
        )

    def scatter(self, d_img: torch.Tensor, d_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grads is not None:
            self.grads += [d_img, d_txt]
        rows = slice(self.offset, self.offset + self.local)
        return d_img[rows], d_txt[rows]


def rank_losses(img, txt, offset, local, excluded, epsilon, loss, fallback, record=True):
    """The distributed loss's (2, local) per-anchor losses of one simulated rank, and the rank."""
    ranks = OneRank(img.detach(), txt.detach(), offset, local, record)
    rows = slice(offset, offset + local)
    rule = resolve_rule(loss, epsilon, fallback)
    out = _core.embedding_losses(img[rows], txt[rows], excluded, 0.2, rule, ranks)
    return out, ranks
