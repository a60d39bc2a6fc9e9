"""Row and column maxima of a score matrix: ``max`` against the two-level maxima, side by side.

Each hardest negative is a maximum with its index: image anchors take a row's, caption anchors
a column's. On a CPU ``Tensor.max(dim)``, which tracks the index, runs several times slower
than ``amax``, which does not; :func:`selhn._selection._two_level_max` takes each group's
``amax`` first and reads indices only inside the winning group. This script times both ways
interleaved in one process (each round calls every case once, in a fresh order) and prints,
per B, the two-level time as a ratio of ``max``'s for rows, for columns and for both together:
``selhn._selection.TWO_LEVEL_MIN_SIZE`` is set where that ratio stays below 1.

Run: ``python benchmarks/bench_maxima.py [--sizes 192 256 320 384 512 1024] [--threads 2]``.
CI runs it at tiny sizes as a smoke test.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
from collections.abc import Callable

import torch
from _timing import device_label, time_rounds

from selhn import _selection

two_level = _selection._two_level_max


def repeated(reduce: Callable[[], object], calls: int) -> Callable[[], None]:
    """``reduce()`` called ``calls`` times (one timing: a small matrix's maximum takes microseconds)."""

    def run() -> None:
        for _ in range(calls):
            reduce()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 256, 320, 384, 448, 512, 768, 1024])
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20000, help="about this many entries' worth of calls per timing")
    args = parser.parse_args()
    if min(args.sizes) < 2 or args.rounds < 1 or args.calls < 1:
        parser.error("every size must be >= 2, --rounds and --calls >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {device_label('cpu')}, float32; groups: rows {_selection.ROW_GROUP}, "
        f"columns {_selection.COL_GROUP}; the losses take two levels from {_selection.TWO_LEVEL_MIN_SIZE} entries"
    )
    for size in args.sizes:
        scores = torch.randn(size, size, generator=torch.Generator().manual_seed(size))
        calls = max(3, args.calls // size)

        cases = {
            "rows max": repeated(functools.partial(scores.max, dim=1), calls),
            "rows two-level": repeated(functools.partial(two_level, scores, 1, _selection.ROW_GROUP), calls),
            "columns max": repeated(functools.partial(scores.max, dim=0), calls),
            "columns two-level": repeated(functools.partial(two_level, scores, 0, _selection.COL_GROUP), calls),
        }
        times, _ = time_rounds(cases, "cpu", random.Random(0), args.rounds)
        us = {name: statistics.median(values) / calls * 1e6 for name, values in times.items()}
        rows, columns = us["rows two-level"] / us["rows max"], us["columns two-level"] / us["columns max"]
        both = (us["rows two-level"] + us["columns two-level"]) / (us["rows max"] + us["columns max"])
        print(
            f"B = {size:5d}: rows {us['rows max']:8.1f} us max, {us['rows two-level']:8.1f} two-level ({rows:.2f}x); "
            f"columns {us['columns max']:8.1f} / {us['columns two-level']:8.1f} ({columns:.2f}x); both {both:.2f}x"
        )


if __name__ == "__main__":
    main()
