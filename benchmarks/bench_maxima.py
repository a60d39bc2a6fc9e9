"""Row and column maxima of a score matrix: ``max`` against the two-level maxima, side by side.

Each hardest negative is a maximum with its index: image anchors take a row's, caption anchors
a column's. On a CPU ``Tensor.max(dim)``, which tracks the index, runs several times slower
than ``amax``, which does not; :func:`selhn._selection._two_level_max` takes each group's
``amax`` first and reads indices only inside the winning group.

The two ways are timed as a training step meets them: before each timing a pass over a buffer
larger than the caches stands for the rest of the step (the encoders, the optimizer), then the
score matrix is formed afresh (``img @ txt.T``, the diagonal set to ``-inf``, as the loss forms
it), then both directions' maxima are taken once. Both ways alternate in one process, each round
in a fresh order, and the script prints per B the median time of both directions together, the
two-level time as a ratio of ``max``'s, and their paired difference per call with its 95%
interval. ``selhn._selection.TWO_LEVEL_MIN_SIZE`` is set where that difference turns negative
on the default threads. With ``--tight-loop`` the maxima are instead called over and over on
one hot matrix, the way that reads two levels as faster from much smaller B (the caches then
hold everything, which a training step's never do).

Run: ``python benchmarks/bench_maxima.py [--sizes 256 512 640 768 1024] [--threads 2]``.
CI runs it at tiny sizes as a smoke test.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import torch
from _timing import device_label, paired_interval

from selhn import _selection

#: The buffer passed over before each timing (MiB): larger than a CPU's last-level cache.
CLEAR_MIB = 64


def both_max(scores: torch.Tensor) -> None:
    """Both directions' maxima with ``max``."""
    scores.max(dim=1)
    scores.max(dim=0)


def both_two_level(scores: torch.Tensor) -> None:
    """Both directions' maxima in two levels."""
    _selection._two_level_max(scores, 1, _selection.ROW_GROUP)
    _selection._two_level_max(scores, 0, _selection.COL_GROUP)


#: The two ways, by name.
WAYS: dict[str, Callable[[torch.Tensor], None]] = {"max": both_max, "two-level": both_two_level}


def interleaved(
    rounds: int, shuffler: random.Random, timed: Callable[[Callable[[torch.Tensor], None]], float]
) -> dict[str, list[float]]:
    """Seconds per call of each way, ``timed(way)`` once per round for each, in a fresh order."""
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    order = list(WAYS)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(timed(WAYS[name]))
    return times


def time_as_in_a_step(size: int, dim: int, rounds: int, shuffler: random.Random) -> dict[str, list[float]]:
    """Seconds per call of each way, each on a fresh score matrix after a pass over a buffer
    larger than the caches."""
    generator = torch.Generator().manual_seed(size)
    unit = torch.nn.functional.normalize
    img = unit(torch.randn(size, dim, generator=generator), dim=1)
    txt = unit(torch.randn(size, dim, generator=generator), dim=1)
    clear = torch.zeros(CLEAR_MIB * 2**20 // 4)

    def timed(way: Callable[[torch.Tensor], None]) -> float:
        clear.add_(1.0)
        scores = img @ txt.t()
        scores.diagonal().fill_(-math.inf)
        start = time.perf_counter()
        way(scores)
        return time.perf_counter() - start

    return interleaved(rounds, shuffler, timed)


def time_in_a_tight_loop(size: int, calls: int, rounds: int, shuffler: random.Random) -> dict[str, list[float]]:
    """Seconds per call of each way, called ``calls`` times in a row on one hot matrix."""
    scores = torch.randn(size, size, generator=torch.Generator().manual_seed(size))

    def timed(way: Callable[[torch.Tensor], None]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            way(scores)
        return (time.perf_counter() - start) / calls

    return interleaved(rounds, shuffler, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320, 512, 640, 768, 896, 1024, 2048])
    parser.add_argument("--dim", type=int, default=1024, help="embedding width of the fresh score matrices")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tight-loop", action="store_true", help="call the maxima over and over on one hot matrix")
    parser.add_argument(
        "--calls", type=int, default=20000, help="with --tight-loop: about this many entries' worth of calls per timing"
    )
    args = parser.parse_args()
    if min(args.sizes) < 2 or args.rounds < 1 or args.calls < 1 or args.dim < 1:
        parser.error("every size must be >= 2, --rounds, --calls and --dim >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = "as in a training step (fresh matrix, cold caches)"
    if args.tight_loop:
        setting = "in a tight loop on one hot matrix"
    print(
        f"torch {torch.__version__}, {device_label('cpu')}, float32, {setting}; groups: rows {_selection.ROW_GROUP}, "
        f"columns {_selection.COL_GROUP}; the losses take two levels from {_selection.TWO_LEVEL_MIN_SIZE} entries"
    )
    shuffler = random.Random(0)
    for size in args.sizes:
        if args.tight_loop:
            times = time_in_a_tight_loop(size, max(3, args.calls // size), args.rounds, shuffler)
        else:
            times = time_as_in_a_step(size, args.dim, args.rounds, shuffler)
        plain, two = statistics.median(times["max"]), statistics.median(times["two-level"])
        difference, low, high = paired_interval([a - b for a, b in zip(times["two-level"], times["max"], strict=True)])
        print(
            f"B = {size:5d}: both directions {plain * 1e6:8.1f} us max, {two * 1e6:8.1f} two-level "
            f"({two / plain:.2f}x); two-level - max {difference * 1e6:+.0f} us [{low * 1e6:+.0f}, {high * 1e6:+.0f}]"
        )


if __name__ == "__main__":
    main()
