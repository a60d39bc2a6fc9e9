"""The nn.Module twins: module == function, ids, the VSE-infinity switch, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import selhn
from selhn import functional as F
from selhn.rules import SelectionRule
from selhn.testing import batch_sizes, duplicate_ids, embedding_pairs, half_dtypes

REDUCTIONS = ["none", "mean", "sum"]


def modules_and_functions(reduction: str):
    return [
        (selhn.SelHNLoss(0.2, 0.05, reduction=reduction), lambda s, **k: F.selhn_loss(s, 0.2, 0.05, **k)),
        (
            selhn.SelHNLoss(0.1, 0.3, fallback="sum", reduction=reduction),
            lambda s, **k: F.selhn_loss(s, 0.1, 0.3, fallback="sum", **k),
        ),
        (selhn.MaxViolationLoss(0.2, reduction=reduction), lambda s, **k: F.max_violation_loss(s, 0.2, **k)),
        (selhn.SumHingeLoss(0.2, reduction=reduction), lambda s, **k: F.sum_hinge_loss(s, 0.2, **k)),
    ]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(pair=embedding_pairs(), use_ids=st.booleans(), data=st.data())
def test_module_equals_function_in_values_and_gradients(reduction, pair, use_ids, data):
    img, txt = pair
    ids = data.draw(duplicate_ids(img.shape[0])) if use_ids else None
    mask = None if ids is None else ids[:, None] == ids[None, :]
    for module, function in modules_and_functions(reduction):
        a_img, a_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        b_img, b_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        got = module(a_img, a_txt, ids=ids)
        expected = function(b_img @ b_txt.T, mask=mask, reduction=reduction)
        torch.testing.assert_close(got, expected)
        got.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(a_img.grad, b_img.grad)
        torch.testing.assert_close(a_txt.grad, b_txt.grad)


def test_ids_mask_captions_of_the_same_image():
    # captions 0 and 1 describe image 0 (rows 0 and 1 are the same image): with ids they are
    # not negatives of each other, without ids the duplicate is the hardest negative
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = selhn.MaxViolationLoss(reduction="none")
    assert loss(img, txt).sum() > 0
    assert loss(img, txt, ids=[7, 7, 3]).sum() == 0
    assert loss(img, txt, ids=torch.tensor([7, 7, 3])).sum() == 0


def vse_contrastive(im, s, margin, max_violation):
    """VSE++ / VSE-infinity ContrastiveLoss.forward, transcribed from its definition."""
    return vse_contrastive_scores(im @ s.t(), margin, max_violation)


def vse_contrastive_scores(scores, margin, max_violation):
    """The same, from the score matrix on."""
    diagonal = scores.diag().view(scores.size(0), 1)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


@given(pair=embedding_pairs(batch_sizes(1, 10)))
def test_contrastive_loss_matches_vse_and_switches_like_it(pair):
    img, txt = pair
    criterion = selhn.ContrastiveLoss(margin=0.2)  # VSE-infinity's warm-up starts with max_violation off
    torch.testing.assert_close(criterion(img, txt), vse_contrastive(img, txt, 0.2, False))
    torch.testing.assert_close(criterion(img, txt), selhn.SumHingeLoss(reduction="sum")(img, txt))
    criterion.max_violation_on()
    assert criterion.max_violation
    torch.testing.assert_close(criterion(img, txt), vse_contrastive(img, txt, 0.2, True))
    torch.testing.assert_close(criterion(img, txt), selhn.MaxViolationLoss(reduction="sum")(img, txt))
    criterion.max_violation_off()
    torch.testing.assert_close(criterion(img, txt), vse_contrastive(img, txt, 0.2, False))


def test_float32_cost_ties_go_to_the_higher_raw_score_where_vse_takes_the_first_index():
    # image anchor 0: negatives 1 and 2 score 1e-3 and 1e-3 + 1e-9, different in float32, but
    # their costs 0.2 + 0.9 + s round to the same float32 value (the documented convention)
    scores = torch.full((3, 3), -0.5)
    scores.fill_diagonal_(0.9)
    scores[0, 0], scores[0, 1], scores[0, 2] = -0.9, 1e-3, 1e-3 + 1e-9
    assert scores[0, 1] < scores[0, 2]
    assert 0.2 + scores[0, 1] - scores[0, 0] == 0.2 + scores[0, 2] - scores[0, 0]  # VSE++'s cost, tied
    ours = scores.clone().requires_grad_()
    theirs = scores.clone().requires_grad_()
    value = selhn.functional.max_violation_loss(ours, 0.2, reduction="sum")
    reference = vse_contrastive_scores(theirs, 0.2, True)
    torch.testing.assert_close(value, reference)  # the same loss value (up to the order of the sum)
    value.backward()
    reference.backward()
    assert ours.grad[0, 2] == 1 and ours.grad[0, 1] == 0  # selhn: the higher raw score
    assert theirs.grad[0, 1] == 1 and theirs.grad[0, 2] == 0  # VSE++: the first index among equal costs
    # everywhere else the gradients agree
    ours.grad[0, 1:], theirs.grad[0, 1:] = 0, 0
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_full_collapse_reads_the_documented_scales():
    size = 128
    img = torch.nn.functional.normalize(torch.ones(size, 8), dim=1)
    txt = img.clone()
    assert selhn.MaxViolationLoss(reduction="sum")(img, txt).item() == pytest.approx(2 * size * 0.2, rel=1e-5)
    assert selhn.SelHNLoss()(img, txt).item() == pytest.approx(0.2, rel=1e-5)


def test_switch_methods_are_no_ops_on_fixed_losses():
    img, txt = torch.eye(3), torch.ones(3, 3) / 3**0.5
    for cls in (selhn.SelHNLoss, selhn.MaxViolationLoss, selhn.SumHingeLoss):
        module = cls()
        before = module(img, txt)
        module.max_violation_on()
        assert torch.equal(module(img, txt), before)
        module.max_violation_off()
        assert torch.equal(module(img, txt), before)


@given(dtype=half_dtypes(), pair=embedding_pairs(dtype=torch.float32))
def test_half_precision_embeddings_give_float32_scores_and_loss(dtype, pair):
    img, txt = (x.to(dtype) for x in pair)
    got = selhn.SelHNLoss(reduction="none")(img, txt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, selhn.SelHNLoss(reduction="none")(img.float(), txt.float()))


@given(pair=embedding_pairs(dtype=torch.float32))
def test_autocast_does_not_lower_the_score_precision(pair):
    img, txt = pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selhn.SelHNLoss(reduction="none")(img, txt)
    torch.testing.assert_close(got, selhn.SelHNLoss(reduction="none")(img, txt))


def test_repr_and_attributes():
    module = selhn.SelHNLoss(0.3, 0.02, fallback="sum", reduction="sum")
    assert "epsilon=0.02" in repr(module) and "fallback='sum'" in repr(module)
    assert "max_violation=True" in repr(selhn.ContrastiveLoss(max_violation=True))


@pytest.mark.parametrize("make", [lambda: selhn.SelHNLoss(), lambda: selhn.RuleLoss(_Everything())])
def test_a_module_keeps_the_scores_and_mask_it_used_for_a_monitor(make):
    """keep_scores: the last batch's score matrix (before any exclusion) and its mask, so a
    monitor needs no second matmul; off by default (nothing kept)."""
    generator = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=generator), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3])
    criterion = make()
    criterion(img, txt, ids=ids)
    assert criterion.last_scores is None
    criterion.keep_scores = True
    criterion(img, txt, ids=ids)
    torch.testing.assert_close(criterion.last_scores, img @ txt.T)
    assert torch.equal(criterion.last_mask, ids[:, None] == ids[None, :])


class _Everything(SelectionRule):
    def weights(self, anchors):
        return anchors.negatives.float()
