"""One rank's share of the distributed loss: the lean ``EmbeddingLoss`` against plain autograd.

In ``selhn.distributed.global_loss`` each rank scores its L local images and captions against
the G captions and images of the global batch (two L x G rectangles). This script times that
problem for one rank in one process (the other ranks' rows are fixed tensors, and the
collectives are left out), forward + backward, D = 1024 by default, for

* ``bare``: the two rectangles' ``(img @ all_txt.T).sum() + (txt @ all_img.T).sum()``, the
  cost every loss sits on;
* ``EmbeddingLoss`` (``selhn._core.embedding_losses`` with a simulated rank, what
  ``global_loss`` calls) and ``autograd``, a plain autograd implementation of the same
  per-anchor definitions written here (dense L x G hinge temporaries), for SelHN on a random
  batch (steady state: hard branch), SelHN on a near-collapsed batch (cold start: every
  anchor falls back, every hinge active), max violation and the sum of hinges on a random
  batch.

Each case's value is checked against ``autograd`` once before timing. Timings are interleaved
in a seeded random order per round; the medians are reported as ratios to ``bare`` measured in
the same rounds. On a GPU the extra peak memory beyond ``bare`` is read from the CUDA allocator,
in units of one L x G float32 buffer (on a CPU see ``bench_losses.py`` for the method; this
script reports time only there).

Run: ``python benchmarks/bench_distributed.py [--local 512] [--candidates 2048] [--rounds 20]
[--device cuda]``. CI runs a tiny size as a smoke test.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from functools import partial

import torch
from _timing import cuda_peak_bytes, device_label, time_rounds

from selhn import _core
from selhn.rules import resolve_rule

Case = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Rank:
    """Rank 1 of a simulated group: its L rows sit after the first L of the global batch."""

    def __init__(self, everyone: tuple[torch.Tensor, torch.Tensor], local: int) -> None:
        self.everyone, self.offset, self.local = everyone, local, local

    def gather(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_all, txt_all = (self.place(full, own) for full, own in zip(self.everyone, (img, txt), strict=True))
        return img_all, txt_all

    def place(self, full: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[: self.offset], own, full[self.offset + self.local :]])

    def scatter(self, d_img: torch.Tensor, d_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(self.offset, self.offset + self.local)
        return d_img[rows], d_txt[rows]


def autograd_rows(
    anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, mode: str, margin: float, epsilon: float
) -> torch.Tensor:
    """Per-anchor losses of one direction, straight from the definitions, through autograd."""
    scores = anchors @ candidates.t()
    rows = torch.arange(scores.shape[0], device=scores.device)
    positives = scores[rows, positive].unsqueeze(1)
    is_positive = torch.zeros_like(scores, dtype=torch.bool)
    is_positive[rows, positive] = True
    hinges = (margin + scores - positives).clamp(min=0).masked_fill(is_positive, 0)
    if mode == "sum":
        return hinges.sum(dim=1)
    hard = hinges.max(dim=1).values
    if mode == "hn":
        return hard
    gap = (positives.squeeze(1) - scores.masked_fill(is_positive, float("-inf")).max(dim=1).values).detach()
    return torch.where(gap.abs() < epsilon, hinges.sum(dim=1) / (scores.shape[1] - 1), hard)


def batches(local: int, total: int, dim: int, device: str) -> dict[str, Rank]:
    """Random and near-collapsed global batches, as seen from rank 1 (rows L to 2 L)."""
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(1, dim, generator=generator)
    out = {}
    for kind, spread, shift in (("random", 1.0, 0.0), ("collapsed", 1e-3, 1.0)):
        pair = [shift * centre + spread * torch.randn(total, dim, generator=generator) for _ in range(2)]
        img, txt = (torch.nn.functional.normalize(x, dim=1).to(device) for x in pair)
        out[kind] = Rank((img, txt), local)
    return out


def cases(rank: dict[str, Rank], margin: float, epsilon: float) -> dict[str, tuple[str, Case]]:
    def lean(mode: str, kind: str) -> Case:  # SelHN with the authors' fallback, the mean
        rule = resolve_rule(mode, epsilon, "mean")
        return lambda i, t: _core.embedding_losses(i, t, None, margin, rule, rank[kind]).sum()

    def plain(mode: str, kind: str) -> Case:
        def both(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            img_all, txt_all = rank[kind].gather(i, t)
            positive = torch.arange(rank[kind].offset, rank[kind].offset + i.shape[0], device=i.device)
            rows = autograd_rows(i, txt_all, positive, mode, margin, epsilon)
            return rows.sum() + autograd_rows(t, img_all, positive, mode, margin, epsilon).sum()

        return both

    def bare(kind: str) -> Case:
        def both(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            img_all, txt_all = rank[kind].gather(i, t)
            return (i @ txt_all.t()).sum() + (t @ img_all.t()).sum()

        return both

    table: dict[str, tuple[str, Case]] = {
        "bare": ("random", bare("random")),
        "bare collapsed": ("collapsed", bare("collapsed")),
    }
    for name, kind, mode in (
        ("SelHN random", "random", "selhn"),
        ("SelHN collapsed", "collapsed", "selhn"),
        ("max violation", "random", "hn"),
        ("sum of hinges", "random", "sum"),
    ):
        table[f"{name}: EmbeddingLoss"] = (kind, lean(mode, kind))
        table[f"{name}: autograd"] = (kind, plain(mode, kind))
    return table


def run_once(fn: Case, rank: Rank) -> torch.Tensor:
    img, txt = (x[rank.offset : rank.offset + rank.local].detach().requires_grad_() for x in rank.everyone)
    value = fn(img, txt)
    value.backward()
    return value.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=512, help="L: this rank's anchors")
    parser.add_argument("--candidates", type=int, default=2048, help="G: the global batch (>= 2 L)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.rounds < 1 or args.local < 1 or args.candidates < 2 * args.local:
        parser.error("--rounds and --local must be >= 1 and --candidates >= 2 * --local")
    shape = f"L = {args.local}, G = {args.candidates}, D = {args.dim}"
    print(f"torch {torch.__version__}, {device_label(args.device)}, {shape}, fp32")
    data = batches(args.local, args.candidates, args.dim, args.device)
    todo = cases(data, margin=0.2, epsilon=0.01)
    for name, (kind, fn) in todo.items():  # warm-up, and the lean value against plain autograd
        value = run_once(fn, data[kind])
        run_once(fn, data[kind])
        if name.endswith("EmbeddingLoss"):
            reference = run_once(todo[name.replace("EmbeddingLoss", "autograd")][1], data[kind])
            torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-4, msg=f"{name} differs from autograd")
    thunks = {name: partial(run_once, fn, data[kind]) for name, (kind, fn) in todo.items()}
    times, _ = time_rounds(thunks, args.device, random.Random(0), args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    cuda = args.device.startswith("cuda")
    peak: dict[str, float] = {}
    if cuda:
        buffer = 4 * args.local * args.candidates  # one rectangle
        for name, step in thunks.items():
            peak[name] = cuda_peak_bytes(step) / buffer
    print(f"bare forward + backward {1000 * median['bare']:.2f} ms (median of {args.rounds} rounds)")
    header = f"  {'case':34s} {'x bare':>8s}" + (f" {'extra peak (L x G fp32)':>24s}" if cuda else "")
    print(header)
    for name, (kind, _) in todo.items():
        bare = "bare collapsed" if kind == "collapsed" else "bare"
        line = f"  {name:34s} {median[name] / median[bare]:7.2f}x"
        if cuda:
            line += f" {peak[name] - peak[bare]:+24.2f}"
        print(line)


if __name__ == "__main__":
    main()
