"""The losses on a CUDA device (skipped where there is none; run on the lent GPU machine)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import selhn
from selhn import _forms, _selection
from selhn import functional as F
from selhn.testing import batch_sizes, embedding_pairs, half_dtypes, score_matrices
from tests.profiles import examples
from tests.reference import reference_loss
from tests.simulated_rank import rank_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUNCTIONS = {"selhn": F.selhn_loss, "hn": F.max_violation_loss, "sum": F.sum_hinge_loss}
MODULES = {"selhn": selhn.SelHNLoss, "hn": selhn.MaxViolationLoss, "sum": selhn.SumHingeLoss}


@pytest.mark.parametrize("loss", sorted(FUNCTIONS))
@examples(20)
@given(scores=score_matrices(batch_sizes(1, 12), levels=4))
def test_functional_on_cuda_matches_cpu_reference(loss, scores):
    expected = reference_loss(scores.clone().requires_grad_(), loss, "none")
    on_gpu = scores.cuda().requires_grad_()
    got = FUNCTIONS[loss](on_gpu, reduction="none")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected.detach())
    got.sum().backward()
    cpu = scores.clone().requires_grad_()
    reference_loss(cpu, loss, "none").sum().backward()
    torch.testing.assert_close(on_gpu.grad.cpu(), cpu.grad)


# (low-rank, sparse) thresholds on both devices: every dense state low-rank / sparse / neither
@pytest.mark.parametrize("fractions", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("loss", sorted(MODULES))
@examples(20)
@given(pair=embedding_pairs(batch_sizes(1, 12)))
def test_modules_on_cuda_match_cpu(loss, fractions, pair):
    results = []
    for device in ("cpu", "cuda"):
        img, txt = (x.detach().clone().to(device).requires_grad_() for x in pair)
        with _forms.forced_pair_form_fractions(*fractions):
            value = MODULES[loss](reduction="sum")(img, txt, ids=torch.arange(img.shape[0]) // 2)
        value.backward()
        results.append((value.cpu(), img.grad.cpu(), txt.grad.cpu()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@examples(10)
@given(dtype=half_dtypes(), pair=embedding_pairs(batch_sizes(2, 12), dtype=torch.float32))
def test_half_precision_and_autocast_on_cuda(dtype, pair):
    img, txt = (x.cuda().to(dtype) for x in pair)
    with torch.autocast("cuda", dtype=dtype):
        got = selhn.SelHNLoss(reduction="none")(img, txt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, selhn.SelHNLoss(reduction="none")(img.float(), txt.float()))


@pytest.mark.parametrize("size", [1024, 2048])
def test_large_batches_with_compiled_kernels_match_eager_math(size):
    generator = torch.Generator().manual_seed(size)
    centre = torch.randn(1, 64, generator=generator)
    img = torch.nn.functional.normalize(centre + 0.05 * torch.randn(size, 64, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(img + 0.05 * torch.randn(size, 64, generator=generator), dim=1)
    scores = (img @ txt.T).double()
    for loss in ("selhn", "sum", "hn"):
        expected = FUNCTIONS[loss](scores, reduction="none")  # float64 on the CPU, eager kernels
        got = MODULES[loss](reduction="none")(img.cuda(), txt.cuda())
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [1024, 1030])
def test_hardest_negatives_on_cuda_match_max(size):
    """Large matrices take two-level column maxima on a GPU: ties to the lowest index."""
    generator = torch.Generator().manual_seed(size)
    scores = torch.randint(0, 50, (size, size), generator=generator).float()  # many ties
    _selection.fill_excluded_(scores, torch.rand(size, size, generator=generator) < 0.1)
    scores[:, 7] = float("-inf")
    scores[-1, 9] = 99.0  # a maximum in the remainder
    got = _selection.hardest_negatives(scores.cuda())
    rows, cols = scores.max(dim=1), scores.max(dim=0)
    for a, b in zip(got, (rows.values, rows.indices, cols.values, cols.indices), strict=True):
        assert torch.equal(a.cpu(), b)


def test_torch_compile_on_cuda():
    """Values and gradients, on a batch where SelHN mixes branches (an exact tie)."""
    generator = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(img + 0.2 * torch.randn(12, 8, generator=generator), dim=1)
    txt[3] = txt[4]
    for loss in sorted(MODULES):
        module = MODULES[loss]()
        results = []
        for fn in (module, torch.compile(module, fullgraph=True)):
            a, b = img.cuda().requires_grad_(), txt.cuda().requires_grad_()
            value = fn(a, b)
            value.backward()
            results.append((value, a.grad, b.grad))
        for eager, compiled in zip(*results, strict=True):
            torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("fractions", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])  # low rank / sparse / mask
@pytest.mark.parametrize("loss", sorted(MODULES))
@examples(10)
@given(pair=embedding_pairs(batch_sizes(2, 12)))
def test_rank_rectangles_on_cuda_match_cpu(loss, fractions, pair):
    """The distributed loss's rectangles: rank rows 1.. against the whole batch, in both directions."""
    img, txt = pair
    local = img.shape[0] - 1
    excluded = torch.zeros(local, img.shape[0], dtype=torch.bool)
    excluded[0, -1] = True
    results = []
    for device in ("cpu", "cuda"):
        a, b = img.clone().to(device).requires_grad_(), txt.clone().to(device).requires_grad_()
        with _forms.forced_pair_form_fractions(*fractions):  # epsilon 10: every SelHN anchor falls back
            value, rank = rank_losses(a, b, 1, local, excluded.to(device), 10.0, loss, "mean")
        (value * torch.arange(2 * local, device=device).view(2, local)).sum().backward()
        results.append((value.cpu(), a.grad.cpu(), b.grad.cpu(), *(g.cpu() for g in rank.grads)))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y)
