"""Literal, loop-based references of the three losses: the judge for every implementation.

Written from the definitions in ../shared/reference.md, one anchor and one negative at a
time, with scalar tensor arithmetic so that autograd gives the reference gradients too.
Conventions shared with the package (and stated in its docs): a hinge is active when its
argument is > 0; the hardest negative is the first (lowest index) highest-scoring negative;
where the embeddings are given (``candidates``), the hardest negative among candidates with
equal embeddings is the lowest-index one of them that is a negative.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _hinge(x: Tensor) -> Tensor:
    return x if x.item() > 0 else x * 0


def _score(scores: Tensor, direction: int, anchor: int, candidate: int) -> Tensor:
    """Score of (anchor, candidate): image anchors read rows, caption anchors read columns."""
    return scores[anchor, candidate] if direction == 0 else scores[candidate, anchor]


def _excluded(mask: Tensor | None, direction: int, anchor: int, candidate: int) -> bool:
    """The positive is never a negative; neither is a pair the mask marks."""
    if candidate == anchor:
        return True
    if mask is None:
        return False
    return bool(mask[anchor, candidate]) if direction == 0 else bool(mask[candidate, anchor])


def reference_per_anchor(
    scores: Tensor,
    loss: str,
    margin: float = 0.2,
    epsilon: float = 0.01,
    fallback: str = "mean",
    mask: Tensor | None = None,
    candidates: tuple[Tensor, Tensor] | None = None,
) -> list[list[Tensor]]:
    """Per-anchor losses ``[direction][anchor]``; direction 0 = image anchors (rows).

    ``candidates``: the embeddings the scores came from, (images, captions); a caption's
    copies then count as one candidate at the lowest index (and an image's)."""
    size = scores.shape[0]
    out: list[list[Tensor]] = [[], []]
    for direction in (0, 1):
        for a in range(size):

            def score(n: int, a: int = a, direction: int = direction) -> Tensor:
                return _score(scores, direction, a, n)

            positive = scores[a, a]
            negatives = [n for n in range(size) if not _excluded(mask, direction, a, n)]
            if not negatives:
                out[direction].append(scores.sum() * 0)
                continue
            hinges = [_hinge(margin - positive + score(n)) for n in negatives]
            hardest = negatives[0]
            for n in negatives:
                if score(n).item() > score(hardest).item():
                    hardest = n
            if candidates is not None:
                rows = candidates[1] if direction == 0 else candidates[0]  # image anchors' candidates: captions
                for n in negatives:
                    if torch.equal(rows[n], rows[hardest]):
                        hardest = n
                        break
            hard = _hinge(margin - positive + score(hardest))
            total = hinges[0]
            for h in hinges[1:]:
                total = total + h
            averaged = total / len(negatives) if fallback == "mean" else total
            if loss == "hn":
                out[direction].append(hard)
            elif loss == "sum":
                out[direction].append(total)
            elif loss == "selhn":
                gap = positive.item() - score(hardest).item()
                out[direction].append(averaged if abs(gap) < epsilon else hard)
            else:
                raise ValueError(loss)
    return out


def reference_loss(scores: Tensor, loss: str, reduction: str = "mean", **kwargs: object) -> Tensor:
    """The reduced reference loss (``reduction="none"`` stacks to (2, B))."""
    per = reference_per_anchor(scores, loss, **kwargs)  # type: ignore[arg-type]
    if reduction == "none":
        return torch.stack([torch.stack(row) for row in per])
    total = per[0][0]
    for value in per[0][1:] + per[1]:
        total = total + value
    return total / (2 * scores.shape[0]) if reduction == "mean" else total


def reference_fallback_flags(scores: Tensor, epsilon: float, mask: Tensor | None = None) -> list[list[bool]]:
    """Which anchors SelHN sends to its fallback, by the literal rule ``|gap| < epsilon``."""
    size = scores.shape[0]
    flags: list[list[bool]] = [[], []]
    for direction in (0, 1):
        for a in range(size):
            negatives = [n for n in range(size) if not _excluded(mask, direction, a, n)]
            if not negatives:
                flags[direction].append(False)
                continue
            hardest = max(_score(scores, direction, a, n).item() for n in negatives)
            flags[direction].append(abs(scores[a, a].item() - hardest) < epsilon)
    return flags
