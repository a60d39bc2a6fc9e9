"""selhn.functional against the literal loop references, in values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from selhn import functional as F
from selhn.testing import batch_sizes, duplicate_ids, half_dtypes, score_matrices
from tests.reference import reference_loss

REDUCTIONS = ["none", "mean", "sum"]
LOSSES = ["selhn", "hn", "sum"]


def call(loss: str, scores: torch.Tensor, margin: float = 0.2, epsilon: float = 0.01, **kwargs):
    if loss == "selhn":
        return F.selhn_loss(scores, margin, epsilon, **kwargs)
    if loss == "hn":
        return F.max_violation_loss(scores, margin, **kwargs)
    return F.sum_hinge_loss(scores, margin, **kwargs)


def ids_mask(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, None] == ids[None, :]


@st.composite
def cases(draw, levels=None):
    scores = draw(score_matrices(levels=levels))
    size = scores.shape[0]
    mask = None
    if draw(st.booleans()):
        if draw(st.booleans()):
            mask = ids_mask(draw(duplicate_ids(size)))
        else:  # an arbitrary, possibly asymmetric mask
            flags = draw(st.lists(st.booleans(), min_size=size * size, max_size=size * size))
            mask = torch.tensor(flags).reshape(size, size)
    margin = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    epsilon = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 10.0]))
    fallback = draw(st.sampled_from(["mean", "sum"]))
    return scores, mask, margin, epsilon, fallback


def check_against_reference(loss, reduction, scores, mask, margin, epsilon, fallback):
    kwargs = {"mask": mask, "reduction": reduction}
    ref_kwargs = {"margin": margin, "mask": mask}
    if loss == "selhn":
        kwargs["fallback"] = fallback
        ref_kwargs.update(epsilon=epsilon, fallback=fallback)
    got_in = scores.clone().requires_grad_()
    ref_in = scores.clone().requires_grad_()
    got = call(loss, got_in, margin, epsilon, **kwargs)
    ref = reference_loss(ref_in, loss, reduction, **ref_kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(got)  # a random cotangent checks every entry of "none"
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(got_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@given(case=cases())
def test_matches_reference(loss, reduction, case):
    check_against_reference(loss, reduction, *case)


@pytest.mark.parametrize("loss", LOSSES)
@given(case=cases(levels=4))
def test_matches_reference_with_ties(loss, case):
    """Quantised scores: equal negatives, zero gaps and hinges at the kink are common."""
    check_against_reference(loss, "none", *case)


# Hand-computed 3x3 case (margin 0.2, epsilon 0.01). Image anchors are rows:
# row 0: pos .9, negatives .75 (h .05), .8 (h .1): gap .1 -> hard .1
# row 1: pos .5, negatives .5 (h .2), .3 (h 0): gap 0 -> fallback mean .1
# row 2: pos .8, negatives 0, .1: all hinges 0
# caption anchors are columns:
# col 0: pos .9, negatives .5, 0: 0;  col 1: pos .5, negatives .75 (h .45), .1: gap -.25 -> hard .45
# col 2: pos .8, negatives .8 (h .2), .3 (h 0): gap 0 -> fallback mean .1
KNOWN = torch.tensor([[0.9, 0.75, 0.8], [0.5, 0.5, 0.3], [0.0, 0.1, 0.8]], dtype=torch.float64)


def test_known_values():
    expected = {
        "selhn": [[0.1, 0.1, 0.0], [0.0, 0.45, 0.1]],
        "hn": [[0.1, 0.2, 0.0], [0.0, 0.45, 0.2]],
        "sum": [[0.15, 0.2, 0.0], [0.0, 0.45, 0.2]],
    }
    for loss, values in expected.items():
        torch.testing.assert_close(call(loss, KNOWN, reduction="none"), torch.tensor(values, dtype=torch.float64))
    torch.testing.assert_close(call("hn", KNOWN, reduction="sum"), torch.tensor(0.95, dtype=torch.float64))
    torch.testing.assert_close(call("selhn", KNOWN), torch.tensor(0.75 / 6, dtype=torch.float64))
    # fallback="sum" adds the hinges of the fallback anchors instead of averaging them
    torch.testing.assert_close(
        F.selhn_loss(KNOWN, fallback="sum", reduction="none"),
        torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.45, 0.2]], dtype=torch.float64),
    )
    # masking pair (0, 2) leaves image 0 with caption 1 (h .05) and caption 2 with image 1 (h 0)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = True
    torch.testing.assert_close(
        F.max_violation_loss(KNOWN, mask=mask, reduction="none"),
        torch.tensor([[0.05, 0.2, 0.0], [0.0, 0.45, 0.0]], dtype=torch.float64),
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 6, dtype=torch.float64, generator=generator).requires_grad_()
    # random continuous scores: no ties and no hinge at its kink; epsilon chosen so that
    # some anchors take the fallback and none sits within the finite-difference step of it
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda s, r=reduction: call(loss, s, 0.2, 0.3, reduction=r), (scores,))


@pytest.mark.parametrize("loss", LOSSES)
@given(dtype=half_dtypes(), scores=score_matrices(batch_sizes(1, 8), dtype=torch.float32))
def test_half_precision_is_computed_in_float32(loss, dtype, scores):
    half = scores.to(dtype)
    got = call(loss, half, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, call(loss, half.float(), reduction="none"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_batch_of_one_is_a_zero_that_keeps_the_graph(loss, reduction):
    scores = torch.tensor([[0.3]], requires_grad=True)
    value = call(loss, scores, reduction=reduction)
    assert value.requires_grad
    assert torch.all(value == 0)
    value.sum().backward()
    assert scores.grad is not None and torch.all(scores.grad == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_fully_masked_anchor_has_zero_loss_and_no_nan(loss):
    scores = torch.randn(4, 4, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool)  # nobody has a negative
    value = call(loss, scores, mask=mask, reduction="none")
    assert torch.all(value == 0)
    value.sum().backward()
    assert torch.all(torch.isfinite(scores.grad)) and torch.all(scores.grad == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_scores_far_outside_minus_one_one(loss):
    """No magic sentinel: scores far below -1e9 (or huge) keep their semantics and stay finite."""
    base = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.4, 0.3], [0.8, 0.0, 0.6]], dtype=torch.float64)
    for offset in (-1e12, 1e12):
        scores = base + offset
        ref = reference_loss(scores, loss, "none")
        got = call(loss, scores.requires_grad_(), reduction="none")
        torch.testing.assert_close(got, ref)
        got.sum().backward()
        assert torch.all(torch.isfinite(scores.grad))


@given(scores=score_matrices(batch_sizes(2, 8)))
def test_selhn_is_max_violation_when_every_gap_clears_epsilon(scores):
    # epsilon = 0 makes |gap| < epsilon impossible: every anchor is hard
    torch.testing.assert_close(
        F.selhn_loss(scores, epsilon=0.0, reduction="none"), F.max_violation_loss(scores, reduction="none")
    )


@given(scores=score_matrices(batch_sizes(2, 8)))
def test_selhn_is_the_fallback_when_epsilon_exceeds_every_gap(scores):
    epsilon = float((scores.abs().max() * 2 + 1).item())
    size = scores.shape[0]
    torch.testing.assert_close(
        F.selhn_loss(scores, epsilon=epsilon, reduction="none"),
        F.sum_hinge_loss(scores, reduction="none") / (size - 1),
    )
    torch.testing.assert_close(
        F.selhn_loss(scores, epsilon=epsilon, fallback="sum", reduction="none"),
        F.sum_hinge_loss(scores, reduction="none"),
    )


@given(scores=score_matrices(batch_sizes(2, 8)), epsilon=st.floats(0.0, 2.0))
def test_selhn_mixes_per_anchor(scores, epsilon):
    size = scores.shape[0]
    positives = scores.diagonal()
    off = scores.masked_fill(torch.eye(size, dtype=torch.bool), float("-inf"))
    gaps = torch.stack([positives - off.max(dim=1).values, positives - off.max(dim=0).values])
    expected = torch.where(
        gaps.abs() < epsilon,
        F.sum_hinge_loss(scores, reduction="none") / (size - 1),
        F.max_violation_loss(scores, reduction="none"),
    )
    torch.testing.assert_close(F.selhn_loss(scores, epsilon=epsilon, reduction="none"), expected)


def test_hardest_negative_tie_goes_to_the_lowest_index():
    scores = torch.tensor([[0.5, 0.4, 0.4], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]], requires_grad=True)
    F.max_violation_loss(scores, reduction="none")[0, 0].backward()
    # image anchor 0 has two hardest negatives (columns 1 and 2): the gradient goes to column 1
    assert scores.grad[0, 1] == 1 and scores.grad[0, 2] == 0
