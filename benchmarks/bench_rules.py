"""What a rule of your own costs: the plain autograd path against the lean core, side by side.

A rule written on :mod:`selhn.rules` is computed by plain autograd over its weighted hinges
(several B x B tensors in forward and backward); the built-in rules also have the lean core.
This script times the three built-in rules both ways (the plain path forced by wrapping each
rule in a user rule with the same weights), forward + backward through ``selhn.RuleLoss`` on
L2-normalised embeddings, interleaved in a shuffled order per round, as ratios to the bare
similarity ``(img @ txt.T).sum()`` of the same rounds.

Run: ``python benchmarks/bench_rules.py [--sizes 512 2048] [--rounds 12] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from _timing import device_label, time_rounds

import selhn
from selhn.rules import Anchors, MaxViolation, SelectionRule, SelHN, SumOfHinges


class Plain(SelectionRule):
    """A built-in rule's weights as a user rule: the plain autograd path."""

    def __init__(self, inner: SelectionRule) -> None:
        self.inner = inner

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return self.inner.weights(anchors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=12, help="rounds at the first size (a quarter at larger ones)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {device_label(args.device)}, D = {args.dim}, fp32")
    generator = torch.Generator().manual_seed(0)
    for index, size in enumerate(args.sizes):
        rounds = max(args.rounds if index == 0 else args.rounds // 4, 2)
        time_size(size, args.dim, args.device, rounds, generator)


def time_size(size: int, dim: int, device: str, rounds: int, generator: torch.Generator) -> None:
    """Print every case's median time at batch ``size`` as a ratio to the bare similarity."""
    img = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    img.requires_grad_()
    txt.requires_grad_()
    modules = {}
    for name, rule in (("MaxViolation", MaxViolation()), ("SelHN", SelHN()), ("SumOfHinges", SumOfHinges())):
        modules[f"{name}, lean"] = selhn.RuleLoss(rule)
        modules[f"{name}, plain"] = selhn.RuleLoss(Plain(rule))

    def step(module: torch.nn.Module) -> None:
        module(img, txt).backward()

    cases = {name: (lambda m=module: step(m)) for name, module in modules.items()}
    cases["bare"] = lambda: (img @ txt.T).sum().backward()
    for case in cases.values():  # warm-up (and any one-time compilation)
        case()
    times, done = time_rounds(cases, device, random.Random(size), rounds)
    bare = statistics.median(times["bare"])
    print(f"B = {size} (median of {done} rounds, x bare):")
    for name in modules:
        print(f"  {name:<20} {statistics.median(times[name]) / bare:5.2f}x")


if __name__ == "__main__":
    main()
