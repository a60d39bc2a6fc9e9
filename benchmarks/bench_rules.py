"""What a rule of your own costs: its sparse form on the lean core, a dense rule on the plain
autograd path, side by side with the built-in rules.

A rule with a sparse form (:meth:`selhn.rules.SelectionRule.select`: a few chosen negatives per
anchor, plus a coefficient on all of its hinges) runs on the lean core, as the built-in rules
do; a dense rule (:meth:`~selhn.rules.SelectionRule.weights`) runs on plain autograd over its
weighted hinges (several B x B tensors in forward and backward). This script times:

* the three built-in rules, lean, and each forced onto the plain path by wrapping it in a
  dense user rule with the same weights;
* two user rules in the sparse form, as the docs write them: the k hardest negatives averaged
  (``TopK(5)``) and the hardest negative below :math:`s_p + m` (``HardestBelow``);

forward + backward through ``selhn.RuleLoss`` on L2-normalised embeddings, interleaved in a
shuffled order per round, as ratios to the bare similarity ``(img @ txt.T).sum()`` of the same
rounds and to the built-in max violation's.

``--memory`` measures instead each case's extra peak memory, in B x B float32 matrices, over
the bare similarity's: every case runs in a fresh process, and its peak resident memory
(Linux's high-water mark, reset before each call: read from outside PyTorch's allocator)
during one call is compared with the bare similarity's. On a GPU use ``--device cuda`` (the caching
allocator's peak instead).

Run: ``python benchmarks/bench_rules.py [--sizes 2048 4096] [--rounds 12] [--device cuda] [--memory]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from _timing import cuda_peak_bytes, device_label, time_rounds

import selhn
from selhn.rules import Anchors, MaxViolation, Selection, SelectionRule, SelHN, SumOfHinges


class Plain(SelectionRule):
    """A built-in rule's weights as a dense user rule: the plain autograd path."""

    def __init__(self, inner: SelectionRule) -> None:
        self.inner = inner

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return self.inner.weights(anchors)


class TopK(SelectionRule):
    """The k hardest negatives' hinges, averaged (over fewer where an anchor has fewer)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def select(self, anchors: Anchors) -> Selection:
        index, chosen = anchors.top_k(self.k)
        return Selection(index, chosen / chosen.sum(dim=1, keepdim=True).clamp(min=1))


class HardestBelow(SelectionRule):
    """The hardest negative scoring below s_p + m (none: no loss)."""

    def select(self, anchors: Anchors) -> Selection:
        index, chosen = anchors.top_k(1, below=anchors.positive + anchors.margin)
        return Selection(index, chosen.to(anchors.scores.dtype))


def rules() -> dict[str, SelectionRule]:
    """Every case's rule, by the name the tables print."""
    cases: dict[str, SelectionRule] = {}
    for name, rule in (("MaxViolation", MaxViolation()), ("SelHN", SelHN()), ("SumOfHinges", SumOfHinges())):
        cases[f"{name}, lean"] = rule
        cases[f"{name}, plain"] = Plain(rule)
    cases["TopK(5), sparse"] = TopK(5)
    cases["HardestBelow, sparse"] = HardestBelow()
    return cases


def embeddings(size: int, dim: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of L2-normalised (images, captions) that require gradients."""
    generator = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    return img.requires_grad_(), txt.requires_grad_()


def step(rule: SelectionRule | None, img: torch.Tensor, txt: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of the rule's loss (None: the bare similarity)."""
    if rule is None:
        return lambda: (img @ txt.T).sum().backward()
    module = selhn.RuleLoss(rule)
    return lambda: module(img, txt).backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=12, help="rounds at the first size (a quarter at larger ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", action="store_true", help="extra peak memory per case instead of time")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # (one case in this process: --memory's child)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(args.probe, args.sizes[0], args.dim, args.device)))
        return
    print(f"torch {torch.__version__}, {device_label(args.device)}, D = {args.dim}, fp32")
    for index, size in enumerate(args.sizes):
        if args.memory:
            memory_size(size, args.dim, args.device)
        else:
            rounds = max(args.rounds if index == 0 else args.rounds // 4, 2)
            time_size(size, args.dim, args.device, rounds)


def time_size(size: int, dim: int, device: str, rounds: int) -> None:
    """Print every case's median time at batch ``size`` as a ratio to the bare similarity and
    to the built-in max violation."""
    img, txt = embeddings(size, dim, device, seed=size)
    cases = {name: step(rule, img, txt) for name, rule in rules().items()}
    cases["bare"] = step(None, img, txt)
    for case in cases.values():  # warm-up (and any one-time compilation)
        case()
    times, done = time_rounds(cases, device, random.Random(size), rounds)
    bare = statistics.median(times["bare"])
    hard = statistics.median(times["MaxViolation, lean"])
    print(f"B = {size} (median of {done} rounds; x bare, x MaxViolation lean):")
    for name in rules():
        median = statistics.median(times[name])
        print(f"  {name:<22} {median / bare:5.2f}x  {median / hard:5.2f}x")


def probe(name: str, size: int, dim: int, device: str) -> float:
    """One case's extra peak memory over the bare similarity's, in B x B float32 matrices (run
    in a process of its own, after a warm-up that compiles what the case compiles)."""
    img, txt = embeddings(size, dim, device, seed=size)
    bare, case = step(None, img, txt), step(rules()[name], img, txt)
    matrix = 4 * size * size
    if device.startswith("cuda"):
        bare(), case()
        return (cuda_peak_bytes(case) - cuda_peak_bytes(bare)) / matrix
    bare(), case()
    return (resident_peak(case) - resident_peak(bare)) / matrix


def resident_peak(call: Callable[[], None]) -> int:
    """The process's peak resident memory (bytes) during ``call()``: Linux's high-water mark
    (VmHWM), reset first (``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    call()
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_size(size: int, dim: int, device: str) -> None:
    """Print every case's extra peak memory at batch ``size``, each from a fresh process (whose
    allocator returns every large block at once, so that resident memory follows what is live)."""
    print(f"B = {size}: extra peak memory over the bare similarity's, in B x B float32 matrices:")
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for name in rules():
        command = [sys.executable, __file__, "--probe", name, "--sizes", str(size), "--dim", str(dim)]
        result = subprocess.run(
            [*command, "--device", device], capture_output=True, text=True, check=True, env=environment
        )
        print(f"  {name:<22} {json.loads(result.stdout.strip().splitlines()[-1]):+5.2f}")


if __name__ == "__main__":
    main()
