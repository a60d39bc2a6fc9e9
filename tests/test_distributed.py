"""selhn.distributed: spawned gloo process groups on CPU equal one process on the global batch."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selhn
from selhn import _core
from selhn import distributed as D
from selhn import functional as F
from selhn.rules import Anchors, SelectionRule, SelHN
from tests.user_rules import HardestBelow, TopKAveraged


class Tempered(SelectionRule):
    """A user's rule (the rule study's tempered weighting): it takes the plain autograd path."""

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return torch.exp((anchors.scores - anchors.hardest.unsqueeze(1)) / 0.1)

    def __repr__(self) -> str:
        return "Tempered(0.1)"


class Fragile(SelectionRule):
    """A user's rule that fails on a batch of two anchors (on one rank only, when the ranks'
    batches differ): by raising, or by returning NaN weights."""

    def __init__(self, how: str) -> None:
        self.how = how

    def weights(self, anchors: Anchors) -> torch.Tensor:
        if anchors.scores.shape[0] == 2 and self.how == "raise":
            raise ValueError("Fragile needs more than two anchors")
        if anchors.scores.shape[0] == 2:
            return torch.full_like(anchors.scores, math.nan)
        return anchors.one_hot(anchors.hardest_index)

    def __repr__(self) -> str:
        return f"Fragile({self.how!r})"


class TopK(SelectionRule):
    """A user's rule whose repr hides its parameter (the default repr: 'TopK()')."""

    def __init__(self, k: int) -> None:
        self.k = k

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return anchors.one_hot(anchors.hardest_index)


#: the user's rules: a dense one (the plain path) and two in the sparse form (the lean core)
USER_RULES = {"tempered": Tempered, "top-2": lambda: TopKAveraged(2), "hardest-below": HardestBelow}
CASES = list(itertools.product(["selhn", "hn", "sum", *USER_RULES], ["mean", "sum"], [False, True]))


def as_loss(name: str) -> str | SelectionRule:
    return USER_RULES[name]() if name in USER_RULES else name


ROOT = Path(__file__).resolve().parents[1]


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img = torch.nn.Linear(6, 5)
        self.txt = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = torch.nn.functional.normalize
        return unit(self.img(x), dim=1), unit(self.txt(y), dim=1)


def make_model(seed: int) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower().double()


def make_batch(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    total = sum(sizes)
    x = torch.randn(total, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(total, 4, generator=generator, dtype=torch.float64)
    ids = torch.arange(total) // 2  # pairs of captions of one image, some split across ranks
    return x, y, ids


def worker(rank: int, world: int, sizes: list[int], init_file: str, out: str) -> None:
    # the suite's filter (setup.cfg) does not reach spawned ranks: a deprecation warning raised
    # from selhn's code fails the run here too. torch attributes some of its own deprecations to
    # its logging wrapper (torch.distributed.c10d_logger), not to the caller: those count too.
    for category in (FutureWarning, DeprecationWarning):
        for module in ("selhn", "torch.distributed"):
            warnings.filterwarnings("error", category=category, module=module)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y, ids = make_batch(sizes)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    results = []
    for loss_name, reduction, use_ids in CASES:
        model = torch.nn.parallel.DistributedDataParallel(make_model(0))
        img, txt = model(x[local], y[local])
        epsilon = None if loss_name in USER_RULES else 0.3  # (a rule carries its own settings)
        value = D.global_loss(
            img, txt, as_loss(loss_name), 0.2, epsilon, ids=ids[local] if use_ids else None, reduction=reduction
        )
        value.backward()  # DDP averages the parameter gradients over the ranks
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    if rank == world - 1:
        torch.save(results, out)
    dist.barrier()  # every rank's collectives are done before any rank tears its group down
    dist.destroy_process_group()
    # Leave without running C++ static destructors: at interpreter shutdown gloo's threads
    # occasionally abort the process ("terminate called without an active exception") after
    # all the work above is done and saved, which spawn would report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def single_process(sizes: list[int]):
    x, y, ids = make_batch(sizes)
    results = []
    for loss_name, reduction, use_ids in CASES:
        model = make_model(0)
        img, txt = model(x, y)
        scores = img @ txt.T
        mask = ids[:, None] == ids[None, :] if use_ids else None
        if loss_name == "selhn":
            value = F.selhn_loss(scores, 0.2, 0.3, mask=mask, reduction=reduction)
        elif loss_name == "hn":
            value = F.max_violation_loss(scores, 0.2, mask=mask, reduction=reduction)
        elif loss_name in USER_RULES:
            value = F.rule_loss(scores, as_loss(loss_name), 0.2, mask=mask, reduction=reduction)
        else:
            value = F.sum_hinge_loss(scores, 0.2, mask=mask, reduction=reduction)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.mark.parametrize("sizes", [[5, 5], [4, 4, 3]], ids=["2 ranks", "3 ranks, unequal"])
def test_global_loss_equals_single_process(tmp_path, sizes):
    out = tmp_path / "results.pt"
    mp.spawn(worker, args=(len(sizes), sizes, str(tmp_path / "init"), str(out)), nprocs=len(sizes), join=True)
    got = torch.load(out)
    expected = single_process(sizes)
    for case, (value, grads), (ref_value, ref_grads) in zip(CASES, got, expected, strict=True):
        torch.testing.assert_close(value, ref_value, msg=lambda m, c=case: f"{c}: {m}")
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, msg=lambda m, c=case: f"{c}: {m}")


#: Rank 0 holds one pair, rank 1 nine: a one-row product rounds differently from the square one.
COPIES_RANKS = (slice(0, 1), slice(1, 10))


def copies_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten pairs whose captions 2 and 8 are exact copies, and images 1 and 7 (a COCO batch holds
    an image twice). Seed 95: image anchor 0's copies round apart in its rank's one-row product."""
    generator = torch.Generator().manual_seed(95)
    img = torch.nn.functional.normalize(torch.randn(10, 15, generator=generator, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(10, 15, generator=generator, dtype=torch.float64), dim=1)
    txt[8] = txt[2]
    img[7] = img[1]
    return img, txt


def copies_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img_all, txt_all = copies_batch()
    local = COPIES_RANKS[rank]
    results = []
    for loss in ("hn", "selhn", SelHN(0.05)):
        img, txt = img_all[local].clone().requires_grad_(), txt_all[local].clone().requires_grad_()
        epsilon = 0.05 if isinstance(loss, str) else None  # (the rule carries its own)
        value = D.global_loss(img, txt, loss, 0.2, epsilon, reduction="sum")
        value.backward()
        results.append((value.detach(), img.grad, txt.grad))
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_global_loss_with_exact_copies_across_ranks_equals_one_process(tmp_path):
    """Copies tie in exact arithmetic only: every rank takes the lowest-index copy, as one process does."""
    out = str(tmp_path / "copies")
    mp.spawn(copies_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    modules = (selhn.MaxViolationLoss(reduction="sum"), selhn.SelHNLoss(0.2, 0.05, reduction="sum"))
    modules += (selhn.RuleLoss(SelHN(0.05), reduction="sum"),)  # the plain path
    for case, module in enumerate(modules):
        img, txt = (x.clone().requires_grad_() for x in copies_batch())
        expected = module(img, txt)
        expected.backward()
        for rank, rows in enumerate(COPIES_RANKS):
            value, d_img, d_txt = torch.load(f"{out}.{rank}")[case]
            torch.testing.assert_close(value, expected.detach())
            torch.testing.assert_close(d_img, 2 * img.grad[rows])  # (the loss is every rank's: W times)
            torch.testing.assert_close(d_txt, 2 * txt.grad[rows])


def test_without_a_process_group_it_is_the_plain_loss():
    generator = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=1)
    assert not D.is_distributed()
    torch.testing.assert_close(D.global_loss(img, txt, "selhn"), selhn.SelHNLoss()(img, txt))
    torch.testing.assert_close(
        D.global_loss(img, txt, "sum", reduction="sum"), selhn.SumHingeLoss(reduction="sum")(img, txt)
    )
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(D.global_loss(img, txt, "hn", ids=ids), selhn.MaxViolationLoss()(img, txt, ids=ids))
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'"):
        D.global_loss(img, txt, reduction="none")
    with pytest.raises(ValueError, match="loss must be one of"):
        D.global_loss(img, txt, "triplet")


def autocast_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """bfloat16 embeddings under CPU autocast, as an AMP training step hands them over."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img_all, txt_all = autocast_batch()
    local = slice(4 * rank, 4 * rank + 4)
    img, txt = img_all[local].clone().requires_grad_(), txt_all[local].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = D.global_loss(img, txt, "selhn", 0.2, 0.3)
    value.backward()
    torch.save((value.detach(), img.grad, txt.grad), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def autocast_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(8, 6, generator=generator), dim=1)
    txt[2] = txt[5]  # a vanishing anchor whose hardest negative lives on the other rank
    return img.to(torch.bfloat16), txt.to(torch.bfloat16)


def test_global_loss_under_autocast_scores_in_float32(tmp_path):
    """Like the modules, the distributed loss scores in float32 under autocast: the value is the
    single-process loss on the global batch, each rank's embedding gradient W times its rows."""
    out = str(tmp_path / "autocast")
    mp.spawn(autocast_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    img, txt = (x.clone().requires_grad_() for x in autocast_batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = selhn.SelHNLoss(0.2, 0.3)(img, txt)
    expected.backward()
    for rank in (0, 1):
        value, d_img, d_txt = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(value, expected.detach())
        rows = slice(4 * rank, 4 * rank + 4)
        # bfloat16 gradients: the ranks' contributions are summed after rounding (bf16 tolerance)
        torch.testing.assert_close(d_img, 2 * img.grad[rows])
        torch.testing.assert_close(d_txt, 2 * txt.grad[rows])


@pytest.mark.slow
def test_pipeline_under_torchrun_with_global_negatives(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "examples.rvsepp.train",
        "--preset",
        "smoke",
        "--root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--global-negatives",
        "--max-steps",
        "3",
        "--tensorboard",
        "off",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "last.pth").is_file()
    assert "rsum" in result.stdout


def test_the_distributed_loss_refuses_second_derivatives_by_name(tmp_path):
    """create_graph=True through the cross-rank gather would drop the other ranks' terms
    silently: it is refused with a message that says what to use instead. (A one-rank group,
    driven through the collectives global_loss uses with more ranks.)"""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        warnings.simplefilter("error", FutureWarning)  # no deprecated collective on the way
        unit = torch.nn.functional.normalize
        img = unit(torch.randn(3, 4, dtype=torch.float64), dim=1).requires_grad_()
        txt = unit(torch.randn(3, 4, dtype=torch.float64), dim=1).requires_grad_()
        ranks = D._Ranks(3, img.device)
        assert (ranks.offset, ranks.sizes) == (0, [3])
        value = _core.embedding_losses(img, txt, None, 0.2, selhn.rules.SelHN(0.5), ranks).sum()
        expected = selhn.SelHNLoss(0.2, 0.5, reduction="sum")(img, txt)
        torch.testing.assert_close(value, expected)
        first = torch.autograd.grad(value, (img, txt), retain_graph=True)  # first order: fine
        for got, want in zip(first, torch.autograd.grad(expected, (img, txt)), strict=True):
            torch.testing.assert_close(got, want)
        with pytest.raises(RuntimeError, match="second derivatives across ranks are not supported"):
            torch.autograd.grad(value, img, create_graph=True)
    finally:
        dist.destroy_process_group()


def _unit(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1).to(
        dtype
    )


#: (name, rank 0's call, rank 1's call, what every rank's error must say); the calls map a
#: rank's (img, txt, ids) to global_loss's arguments
DISAGREEMENTS = [
    ("reduction", {"reduction": "mean"}, {"reduction": "sum"}, "disagree on the reduction"),
    (
        "loss",
        {"loss": "selhn"},
        {"loss": "hn"},
        r"disagree on the loss .*rank 0: SelHN\(epsilon=0.01.*rank 1: MaxViolation\(\)",
    ),
    ("margin", {"margin": 0.2}, {"margin": 0.3}, "disagree on the margin"),
    ("epsilon", {"epsilon": 0.01}, {"epsilon": 0.05}, r"disagree on the loss .*epsilon=0.01.*epsilon=0.05"),
    ("fallback", {"fallback": "mean"}, {"fallback": "sum"}, r"disagree on the loss .*fallback='mean'.*fallback='sum'"),
    ("dim", {}, {"dim": 6}, "disagree on the embedding size"),
    ("dtype", {}, {"dtype": torch.float32}, "disagree on the embedding dtype"),
    ("ids on one rank", {"ids": torch.tensor([0, 1, 2])}, {}, "disagree on the ids given"),
    ("zero rows", {}, {"rows": 0}, r"refused their arguments|at least one row"),
    ("bad margin", {}, {"margin": -1.0}, r"refused their arguments|margin must be"),
    (
        "rule parameter",
        {"loss": TopK(1)},
        {"loss": TopK(5)},
        r"disagree on the loss .*rank 0: TopK\(k=1\).*TopK\(k=5\)",
    ),
    (
        "rule raises on one rank",
        {"loss": Fragile("raise")},
        {"loss": Fragile("raise"), "rows": 2},
        r"Fragile\('raise'\) failed on rank\(s\) \[1\] \(rank 1: ValueError: Fragile needs|^Fragile needs more",
    ),
    (
        "rule returns NaN on one rank",
        {"loss": Fragile("nan")},
        {"loss": Fragile("nan"), "rows": 2},
        r"failed on rank\(s\) \[1\] .*NaN or infinite weight|^Fragile\('nan'\).weights returned a NaN",
    ),
]


def disagreement_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    messages = {}
    for name, first, second, _ in DISAGREEMENTS:
        call = dict(first if rank == 0 else second)
        rows, dim, dtype = call.pop("rows", 3), call.pop("dim", 5), call.pop("dtype", torch.float64)
        img, txt = _unit(rows, dim, rank, dtype), _unit(rows, dim, 10 + rank, dtype)
        try:
            D.global_loss(img, txt, **call)
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    # ids of different integer dtypes on the ranks (int32 with int64, and uint64) mix freely
    img, txt = _unit(3, 5, rank), _unit(3, 5, 10 + rank)
    dtypes = (torch.int32, torch.int64) if rank == 0 else (torch.int64, torch.uint64)
    values = []
    for dtype in dtypes:
        ids = torch.tensor([0, 1, 1] if rank == 0 else [2, 3, 3], dtype=dtype)
        values.append(D.global_loss(img, txt, "hn", ids=ids).detach())
    torch.save((messages, values), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ranks_that_disagree_or_refuse_their_input_stop_every_rank(tmp_path):
    """Each case raises a clear ValueError on every rank (before, most hung until the timeout
    or blended silently); ids of mixed integer dtypes give the single-process loss."""
    out = str(tmp_path / "disagree")
    mp.spawn(disagreement_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        messages, values = torch.load(f"{out}.{rank}")
        for name, _, _, expected in DISAGREEMENTS:
            assert re.search(expected, messages[name]), (rank, name, messages[name])
        img = torch.cat([_unit(3, 5, 0), _unit(3, 5, 1)])
        txt = torch.cat([_unit(3, 5, 10), _unit(3, 5, 11)])
        ids = torch.tensor([0, 1, 1, 2, 3, 3])
        expected_value = selhn.MaxViolationLoss()(img, txt, ids=ids)
        for value in values:
            torch.testing.assert_close(value, expected_value)
