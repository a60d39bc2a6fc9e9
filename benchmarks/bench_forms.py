"""Where the low-rank and sparse forms of the dense terms pay: their time against the dense form.

``SumHingeLoss`` forward + backward, D = 1024 by default, on batches whose fraction of
inactive hinges (low-rank form) or active hinges (sparse form) is set by the margin:

* low rank: a random batch (all scores near 0), with the margin chosen so that the given
  fraction of each direction's hinges is inactive;
* sparse: a batch of matching pairs (positives near 0.8, negatives near 0), with the margin
  chosen so that the given fraction of each direction's hinges is active.

For each size and fraction the script prints the median time of the form divided by that of
the dense form (both thresholds 0), measured in interleaved rounds: below 1 the form pays.
``selhn._forms.CPU_THRESHOLDS`` and ``GPU_THRESHOLDS`` (which count pairs of both directions
against B**2, i.e. twice the fractions here) are set from these figures. Run:
``python benchmarks/bench_forms.py [--sizes 512 2048] [--fractions 0.005 0.01 0.02 0.03 0.05]
[--rounds 5] [--device cuda]``. On a GPU
every timed run is synchronised.
"""

from __future__ import annotations

import argparse
import random
import statistics
from functools import partial

import torch
from _timing import device_label, time_rounds

import selhn
from selhn import _forms

FORMS = {"dense": (0.0, 0.0), "low rank": (1.0, 0.0), "sparse": (0.0, 1.0)}


def batch(size: int, dim: int, matched: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    img = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    other = torch.randn(size, dim, generator=generator)
    txt = img + 0.8 * other / dim**0.5 if matched else other
    return img.to(device), torch.nn.functional.normalize(txt, dim=1).to(device)


def hinge_fraction(scores: torch.Tensor, margin: float, active: bool) -> float:
    """Mean over both directions of the fraction of active (or inactive) hinges."""
    positives = scores.diagonal()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    negatives = scores.masked_fill(eye, float("-inf"))
    n_pairs = scores.shape[0] * (scores.shape[0] - 1)
    counts = [int((negatives - positives.unsqueeze(d) + margin > 0).sum()) for d in (1, 0)]
    on = sum(counts) / (2 * n_pairs)
    return on if active else 1.0 - on


def margin_for(scores: torch.Tensor, fraction: float, active: bool) -> float:
    """The margin giving ``fraction`` active (or inactive) hinges, by bisection."""
    low, high = 0.0, 2.0
    for _ in range(30):
        middle = (low + high) / 2
        share = hinge_fraction(scores, middle, active)
        too_low = share < fraction if active else share > fraction  # active hinges grow with the margin
        low, high = (middle, high) if too_low else (low, middle)
    return (low + high) / 2


def run(img: torch.Tensor, txt: torch.Tensor, margin: float, form: str) -> None:
    with _forms.forced_pair_form_fractions(*FORMS[form]):
        a, b = img.detach().requires_grad_(), txt.detach().requires_grad_()
        selhn.SumHingeLoss(margin=margin)(a, b).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="e.g. cuda: where the thresholds should hold too")
    args = parser.parse_args()
    if args.rounds < 1 or not all(0 < f < 1 for f in args.fractions):
        parser.error("--rounds must be >= 1 and every fraction in (0, 1)")
    print(f"torch {torch.__version__}, {device_label(args.device)}, D = {args.dim}, rounds {args.rounds}")
    print("time of the form / time of the dense form (below 1: the form pays)")
    shuffler = random.Random(0)
    for size in args.sizes:
        for form, matched, active in (("low rank", False, False), ("sparse", True, True)):
            img, txt = batch(size, args.dim, matched, args.device)
            scores = img @ txt.t()
            for fraction in args.fractions:
                margin = margin_for(scores, fraction, active)
                measured = hinge_fraction(scores, margin, active)
                for name in (form, "dense"):  # warm-up (compiles the dense kernels once)
                    run(img, txt, margin, name)
                thunks = {name: partial(run, img, txt, margin, name) for name in (form, "dense")}
                times, _ = time_rounds(thunks, args.device, shuffler, args.rounds)
                ratio = statistics.median(times[form]) / statistics.median(times["dense"])
                state = "active" if active else "inactive"
                print(f"  B = {size:5d}  {form:8s}  {100 * measured:5.2f}% of hinges {state:8s}  {ratio:5.2f}x")


if __name__ == "__main__":
    main()
