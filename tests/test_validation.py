"""Every bad argument gets a clear TypeError / ValueError naming it."""

from __future__ import annotations

import pytest
import torch

import selhn
from selhn import functional as F

S = torch.rand(3, 3)
FUNCTIONS = [F.selhn_loss, F.max_violation_loss, F.sum_hinge_loss]


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize(
    ("scores", "error", "message"),
    [
        ([[1.0]], TypeError, "scores must be a torch.Tensor, got list"),
        (torch.ones(3, 3, dtype=torch.long), TypeError, "scores must have a floating-point dtype, got torch.int64"),
        (torch.rand(3), ValueError, r"scores must be a 2-D \(B, B\) score matrix, got 1-D"),
        (torch.rand(2, 3, 3), ValueError, "got 3-D"),
        (torch.rand(3, 4), ValueError, r"scores must be square .* got shape \(3, 4\)"),
        (torch.rand(0, 0), ValueError, "scores must hold at least one pair"),
    ],
)
def test_bad_scores(function, scores, error, message):
    with pytest.raises(error, match=message):
        function(scores)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_options(function):
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got -0.1"):
        function(S, margin=-0.1)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got nan"):
        function(S, margin=float("nan"))
    with pytest.raises(TypeError, match="margin must be a float, got str"):
        function(S, margin="0.2")
    with pytest.raises(TypeError, match="margin must be a float, got Tensor"):
        function(S, margin=torch.tensor(0.2))
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum'; got 'avg'"):
        function(S, reduction="avg")
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        function(S, mask=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        function(S, mask=[[False] * 3] * 3)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 3\) like scores, got \(2, 2\)"):
        function(S, mask=torch.zeros(2, 2, dtype=torch.bool))


def test_selhn_specific_options():
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got -1.0"):
        F.selhn_loss(S, epsilon=-1.0)
    with pytest.raises(ValueError, match="fallback must be one of 'mean', 'sum'; got 'max'"):
        F.selhn_loss(S, fallback="max")
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        selhn.SelHNLoss(epsilon=-0.5)
    with pytest.raises(ValueError, match="fallback must be one of"):
        selhn.SelHNLoss(fallback="median")


@pytest.mark.parametrize("cls", [selhn.SelHNLoss, selhn.MaxViolationLoss, selhn.SumHingeLoss, selhn.ContrastiveLoss])
def test_module_arguments(cls):
    module = cls()
    with pytest.raises(ValueError, match="img_emb must be 2-D"):
        module(torch.rand(4), torch.rand(4, 2))
    with pytest.raises(ValueError, match="txt_emb must be 2-D"):
        module(torch.rand(4, 2), torch.rand(4, 2, 1))
    with pytest.raises(ValueError, match="same batch size .* got 4 and 3"):
        module(torch.rand(4, 2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="same embedding size, got 2 and 5"):
        module(torch.rand(4, 2), torch.rand(4, 5))
    with pytest.raises(TypeError, match="img_emb must have a floating-point dtype, got torch.int64"):
        module(torch.ones(4, 2, dtype=torch.long), torch.rand(4, 2))
    with pytest.raises(TypeError, match="txt_emb must be a torch.Tensor, got list"):
        module(torch.rand(2, 2), [[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="img_emb must hold at least one row"):
        module(torch.rand(0, 2), torch.rand(0, 2))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\), one id per pair, got \(3,\)"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="ids must hold integers"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=torch.rand(4))
    with pytest.raises(TypeError, match="ids must be a 1-D integer tensor or a sequence of ints, got str"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids="abcd")
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        cls(margin=-1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cls(reduction="batchmean")


def test_contrastive_switch_type():
    with pytest.raises(TypeError, match="max_violation must be a bool, got int"):
        selhn.ContrastiveLoss(max_violation=1)
