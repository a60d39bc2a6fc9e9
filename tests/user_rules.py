"""Two user rules in the sparse form, written as the "Write your own rule" page writes them, and
their literal definitions (one anchor and one negative at a time), for the rule tests and the
distributed tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selhn.rules import Anchors, Selection, SelectionRule


@dataclass(frozen=True)
class TopKAveraged(SelectionRule):
    """The k hardest negatives' hinges, averaged (over fewer where an anchor has fewer)."""

    k: int

    def select(self, anchors: Anchors) -> Selection:
        index, chosen = anchors.top_k(self.k)
        return Selection(index, chosen / chosen.sum(dim=1, keepdim=True).clamp(min=1))


@dataclass(frozen=True)
class HardestBelow(SelectionRule):
    """The hardest negative scoring below s_p + m (none: no loss)."""

    def select(self, anchors: Anchors) -> Selection:
        index, chosen = anchors.top_k(1, below=anchors.positive + anchors.margin)
        return Selection(index, chosen.to(anchors.scores.dtype))


@dataclass(frozen=True)
class HardestAndHalfOfAll(SelectionRule):
    """The hardest negative's hinge plus half of every hinge, in the shorthand forms: weights left
    out (1 on the chosen negative) and one coefficient for every anchor (a number)."""

    def select(self, anchors: Anchors) -> Selection:
        return Selection(anchors.hardest_index.unsqueeze(1), every=0.5)


def literal(choose):
    """A literal per-anchor loss: for each anchor, ``choose(scores of its negatives by index,
    positive, margin)`` gives {negative: weight}; the loss is the weighted sum of their hinges."""

    def reference(scores, mask, margin):
        size = scores.shape[0]
        out = []
        for direction in (0, 1):
            s = scores if direction == 0 else scores.T
            m = None if mask is None else (mask if direction == 0 else mask.T)
            row = []
            for a in range(size):
                negatives = {n: s[a, n].item() for n in range(size) if n != a and (m is None or not bool(m[a, n]))}
                total = s[a, a] * 0
                for n, weight in choose(negatives, s[a, a].item(), margin).items():
                    hinge = margin - s[a, a] + s[a, n]
                    total = total + weight * (hinge if hinge.item() > 0 else hinge * 0)
                row.append(total)
            out.append(torch.stack(row))
        return torch.stack(out)

    return reference


def k_hardest(k):
    """The k highest-scoring negatives (ties: the lowest index), each weighted 1 / how many."""

    def choose(negatives, positive, margin):
        ranked = sorted(negatives, key=lambda n: (-negatives[n], n))[:k]
        return {n: 1.0 / len(ranked) for n in ranked}

    return choose


def hardest_below(negatives, positive, margin):
    """The highest-scoring negative below positive + margin (ties: the lowest index), if any."""
    below = [n for n in negatives if negatives[n] < positive + margin]
    if not below:
        return {}
    return {max(below, key=lambda n: (negatives[n], -n)): 1.0}


def hardest_and_half_of_all(negatives, positive, margin):
    """1 on the hardest negative (ties: the lowest index), plus 0.5 on every negative."""
    weights = {n: 0.5 for n in negatives}
    for n in k_hardest(1)(negatives, positive, margin):
        weights[n] += 1.0
    return weights
