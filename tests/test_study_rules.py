"""The rule study's candidates (examples/rvsepp/rules.py) against literal loop references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.rvsepp.rules import RULES, rule_loss


def literal(name: str, scores: torch.Tensor, margin: float, epsilon: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Each rule as its definition reads, anchor by anchor, in both directions (summed)."""
    rule, param = RULES[name]
    size = scores.shape[0]
    total = scores.new_zeros(())
    for matrix, excluded in ((scores, mask), (scores.t(), None if mask is None else mask.t())):
        for i in range(size):
            positive = matrix[i, i]
            negatives = [j for j in range(size) if j != i and not (excluded is not None and bool(excluded[i, j]))]
            if not negatives:
                continue
            hinge = {j: torch.clamp(margin - positive + matrix[i, j], min=0) for j in negatives}
            hardest = negatives[0]
            for j in negatives:
                if matrix[i, j] > matrix[i, hardest]:
                    hardest = j
            if rule == "selhn-sum":
                tied = abs((positive - matrix[i, hardest]).item()) < epsilon
                total = total + (sum(hinge.values()) if tied else hinge[hardest])
            elif rule == "share":
                violating = sum(1 for j in negatives if hinge[j].item() > 0)
                total = total + (sum(hinge.values()) if violating / len(negatives) > param else hinge[hardest])
            elif rule == "tempered":
                top = matrix[i, hardest].item()
                total = total + sum(math.exp((matrix[i, j].item() - top) / param) * hinge[j] for j in negatives)
            else:  # semihard
                below = [j for j in negatives if matrix[i, j].item() < positive.item()]
                if below:
                    chosen = max(below, key=lambda j: matrix[i, j].item())
                else:
                    chosen = min(negatives, key=lambda j: matrix[i, j].item())
                total = total + hinge[chosen]
    return total


@given(
    name=st.sampled_from(sorted(RULES)),
    size=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.005, 0.05, 0.5]),
    margin=st.sampled_from([0.0, 0.2, 0.5]),
    masked=st.booleans(),
)
def test_rules_match_their_literal_definition_in_values_and_gradients(name, size, seed, spread, margin, masked):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=generator, dtype=torch.float64) * spread
    mask = torch.rand(size, size, generator=generator) < 0.3 if masked else None
    scores = base.clone().requires_grad_()
    value = rule_loss(name, scores, margin, 0.01, mask=mask)
    (grad,) = torch.autograd.grad(value, scores)
    reference_scores = base.clone().requires_grad_()
    expected = literal(name, reference_scores, margin, 0.01, mask)
    expected_grad = (
        torch.autograd.grad(expected, reference_scores)[0] if expected.requires_grad else torch.zeros_like(base)
    )
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("name", sorted(RULES))
def test_reductions_and_finiteness(name):
    scores = torch.randn(6, 6, dtype=torch.float64)
    per_anchor = rule_loss(name, scores, reduction="none")
    assert per_anchor.shape == (2, 6)
    torch.testing.assert_close(rule_loss(name, scores, reduction="sum"), per_anchor.sum())
    torch.testing.assert_close(rule_loss(name, scores, reduction="mean"), per_anchor.mean())
    # one anchor whose every pair is masked: no negative, a zero loss and finite gradients
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, :] = True
    mask[:, 0] = True
    scores.requires_grad_()
    value = rule_loss(name, scores, mask=mask, reduction="none")
    assert value[0, 0] == 0 and value[1, 0] == 0
    value.sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", ["share-0.5", "tempered-0.02", "selhn-sum"])
def test_a_collapsed_batch_gets_the_sum_of_hinges(name):
    # every score equal (a full collapse): these rules fall back to the sum of hinges (SelHN's mean would be
    # B - 1 times smaller), which is what keeps them off the plateau
    scores = torch.full((5, 5), 0.3, dtype=torch.float64)
    torch.testing.assert_close(rule_loss(name, scores), torch.tensor(2 * 5 * 4 * 0.2, dtype=torch.float64))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name must be one of"):
        rule_loss("max", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reduction"):
        rule_loss("semihard", torch.zeros(2, 2), reduction="avg")
    with pytest.raises(ValueError, match="square"):
        rule_loss("semihard", torch.zeros(2, 3))
