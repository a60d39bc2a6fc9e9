"""Time and peak memory of the losses, as ratios to the bare similarity, side by side.

For each batch size B (D = 1024 by default), forward + backward of

* ``bare``: ``(img @ txt.T).sum()`` (the cost every ITM loss sits on),
* ``literal``: a straightforward implementation of the SelHN authors' formulation (dense B x B
  temporaries, autograd through them), written here from the definition,
* the package's modules: ``MaxViolationLoss``, ``SelHNLoss`` and ``SumHingeLoss`` on a random
  batch (steady state: nearly every SelHN anchor takes the hard branch), and ``SelHNLoss`` on
  a near-collapsed batch (cold start: every anchor takes the fallback). In both batches every
  hinge is active, so the dense terms take their low-rank form; the two ``dense`` cases
  switch it and the sparse form off, showing what they cost when neither nearly all nor very
  few hinges are active.

Timings are interleaved (one run of each case per round) and the median per case is reported
as a ratio to ``bare`` and to ``literal`` measured in the same rounds: absolute times on a
shared machine mean little. Each size runs at least ``--rounds`` rounds and goes on until its
timed rounds have taken ``--min-seconds`` (default 10 s), so that small sizes, whose rounds
are cheap and whose ratios are the noisiest, get many more samples. Each round runs the cases
in a fresh (seeded) random order: on a CPU a case's time depends on what ran just before it
(a predecessor that freed many large buffers leaves the allocator to fault fresh pages in
again), which at B = 512 moved a fixed order's ratios by up to 0.1. Peak memory is read from
the CUDA allocator on a GPU and, on a CPU, from the resident-set high-water mark of a child
process (see ``peak_bytes``), reported as the extra peak beyond ``bare`` in units of one B x B
float32 buffer.

Run: ``python benchmarks/bench_losses.py [--sizes 512 2048 4096] [--rounds 7] [--min-seconds 10]
[--device cpu] [--dtype float32]``. CI runs ``--sizes 48 --dim 16 --rounds 2 --min-seconds 0``
as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import torch
from _timing import cuda_peak_bytes, time_rounds

import selhn
from selhn import _forms


def literal_selhn(img: torch.Tensor, txt: torch.Tensor, margin: float = 0.2, epsilon: float = 0.01) -> torch.Tensor:
    """The authors' formulation, literally: dense hinge matrices for both directions."""
    scores = img @ txt.t()
    size = scores.shape[0]
    diagonal = scores.diag().view(size, 1)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(size, dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    negatives = scores.masked_fill(eye, float("-inf"))
    gap_s = (scores.diag() - negatives.max(1)[0]).detach()
    gap_im = (scores.diag() - negatives.max(0)[0]).detach()
    loss_s = torch.where(gap_s.abs() < epsilon, cost_s.sum(1) / (size - 1), cost_s.max(1)[0])
    loss_im = torch.where(gap_im.abs() < epsilon, cost_im.sum(0) / (size - 1), cost_im.max(0)[0])
    return (loss_s.mean() + loss_im.mean()) / 2


def batches(size: int, dim: int, device: str, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    steady = [torch.randn(size, dim, generator=generator) for _ in range(2)]
    centre = torch.randn(1, dim, generator=generator)
    cold = [centre + 1e-3 * torch.randn(size, dim, generator=generator) for _ in range(2)]

    def prepare(pair: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype) for x in pair)
        return a, b

    return {"steady": prepare(steady), "cold": prepare(cold)}


Case = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dense_form(loss: Case) -> Case:
    """``loss`` with the low-rank and sparse forms of the dense terms switched off (the path
    taken when neither nearly all nor very few hinges are active, e.g. mid-training)."""

    def run(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        with _forms.forced_pair_form_fractions(0.0, 0.0):  # decided in forward, followed in backward
            return loss(img, txt)

    return run


def cases() -> dict[str, tuple[str, Case]]:
    return {
        "bare": ("steady", lambda a, b: (a @ b.t()).sum()),
        "literal SelHN": ("steady", literal_selhn),
        "MaxViolationLoss": ("steady", selhn.MaxViolationLoss()),
        "SelHNLoss steady": ("steady", selhn.SelHNLoss()),
        "SelHNLoss cold": ("cold", selhn.SelHNLoss()),
        "literal SelHN cold": ("cold", literal_selhn),
        "SumHingeLoss": ("steady", selhn.SumHingeLoss()),
        "SelHN cold, dense": ("cold", dense_form(selhn.SelHNLoss())),
        "SumHinge, dense": ("steady", dense_form(selhn.SumHingeLoss())),
        "bare cold": ("cold", lambda a, b: (a @ b.t()).sum()),
    }


def run_once(fn: Case, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img = pair[0].detach().requires_grad_()
    txt = pair[1].detach().requires_grad_()
    fn(img, txt).backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn: Case, pair: tuple[torch.Tensor, torch.Tensor], device: str) -> int:
    """Peak bytes allocated during one forward + backward, beyond what was live before.

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark, reset
    through /proc/self/clear_refs just before the step; main() pins glibc's mmap threshold
    so that every large buffer is its own mapping, returned to the system when freed.
    """
    img = pair[0].detach().requires_grad_()
    txt = pair[1].detach().requires_grad_()
    if device.startswith("cuda"):
        return cuda_peak_bytes(lambda: fn(img, txt).backward())
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _status_kib("VmRSS")
    fn(img, txt).backward()
    return (_status_kib("VmHWM") - base) * 1024


def memory_table(args: argparse.Namespace, dtype: torch.dtype, size: int, names: list[str]) -> dict[str, float]:
    """Extra peak per case in B x B float32 buffers; on a CPU, measured in a child process
    whose glibc mmap threshold is pinned (so every large buffer is its own mapping, returned
    to the system when freed). The pinning slows allocation, so timings never run there."""
    if args.device.startswith("cuda") or not sys.platform.startswith("linux"):
        data = batches(size, args.dim, args.device, dtype)
        table = cases()
        base = {kind: peak_bytes(table["bare"][1], data[kind], args.device) for kind in data}
        for name in names:
            run_once(table[name][1], data[table[name][0]])  # compile / warm up outside the measurement
        return {
            name: (peak_bytes(table[name][1], data[table[name][0]], args.device) - base[table[name][0]])
            / (size * size * 4)
            for name in names
        }
    command = [sys.executable, __file__, "--memory-child", str(size), "--dim", str(args.dim), "--dtype", args.dtype]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    output = subprocess.run([*command, "--cases", *names], env=env, check=True, capture_output=True, text=True)
    return {name: float(value) for name, value in (line.split("\t") for line in output.stdout.splitlines())}


def memory_child(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    args.device = "cpu"
    size = args.memory_child
    data = batches(size, args.dim, "cpu", dtype)
    table = cases()
    for kind in data:  # one-time allocations (thread pools, autograd engine) stay out of the baseline
        run_once(table["bare"][1], data[kind])
    base = {kind: min(peak_bytes(table["bare"][1], data[kind], "cpu") for _ in range(3)) for kind in data}
    for name in args.cases:
        kind, fn = table[name]
        run_once(fn, data[kind])
        extra = (min(peak_bytes(fn, data[kind], "cpu") for _ in range(3)) - base[kind]) / (size * size * 4)
        print(f"{name}\t{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7, help="fewest timed rounds per size")
    parser.add_argument(
        "--min-seconds", type=float, default=10.0, help="go on with more rounds until a size's rounds took this long"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-literal-above", type=int, default=1 << 30, help="skip the literal cases above this B")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    dtype = getattr(torch, args.dtype)
    if args.rounds < 1 or args.min_seconds < 0:
        parser.error("--rounds must be >= 1 and --min-seconds >= 0")
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, D = {args.dim}, "
        f"rounds >= {args.rounds}, >= {args.min_seconds:g} s per size"
    )
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print(f"CPU threads: {torch.get_num_threads()}")
    shuffler = random.Random(0)
    for size in args.sizes:
        data = batches(size, args.dim, args.device, dtype)
        todo = {k: v for k, v in cases().items() if not (k.startswith("literal") and size > args.skip_literal_above)}
        for kind, fn in todo.values():  # warm-up: compiles the kernels, faults pages in
            run_once(fn, data[kind])
            run_once(fn, data[kind])
        times, rounds = time_rounds(  # no case always follows the same one (see the docstring)
            {name: partial(run_once, fn, data[kind]) for name, (kind, fn) in todo.items()},
            args.device,
            shuffler,
            args.rounds,
            args.min_seconds,
        )
        median = {name: statistics.median(values) for name, values in times.items()}
        del data
        memory = memory_table(args, dtype, size, list(todo))
        print(f"\nB = {size}: bare forward + backward {1000 * median['bare']:.1f} ms (median of {rounds} rounds)")
        print(f"  {'case':20s} {'x bare':>8s} {'x literal':>10s} {'extra peak (BxB fp32)':>22s}")
        for name, (kind, _) in todo.items():
            literal = "literal SelHN cold" if kind == "cold" else "literal SelHN"
            bare = "bare cold" if kind == "cold" else "bare"
            vs_literal = f"{median[literal] / median[name]:9.2f}x" if literal in median else f"{'-':>10s}"
            print(f"  {name:20s} {median[name] / median[bare]:7.2f}x {vs_literal} {memory[name]:+21.2f}")
    print("\n'x literal' is how many times faster than the literal formulation (higher is better).")


if __name__ == "__main__":
    main()
