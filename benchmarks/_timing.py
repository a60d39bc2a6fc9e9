"""Side-by-side timing shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_label(device: str) -> str:
    """The GPU's name, or the CPU's thread count."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU threads {torch.get_num_threads()}"


def cuda_peak_bytes(step: Callable[[], object]) -> int:
    """Bytes the CUDA caching allocator held at its peak during ``step()`` beyond what it held
    before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_rounds(
    cases: dict[str, Callable[[], object]],
    device: str,
    shuffler: random.Random,
    rounds: int,
    min_seconds: float = 0.0,
) -> tuple[dict[str, list[float]], int]:
    """Seconds per call of each case, interleaved: each round calls every case once, in a
    fresh order drawn from ``shuffler`` (on a CPU a case's time depends on what ran just before
    it). At least ``rounds`` rounds, and more until the timed calls add up to ``min_seconds``.
    Returns the times per case and the number of rounds."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    done, spent = 0, 0.0
    while done < rounds or spent < min_seconds:
        done += 1
        shuffler.shuffle(order)
        for name in order:
            sync(device)
            start = time.perf_counter()
            cases[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
    return times, done


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """The median of paired differences (one per round) and its 95% interval, from the order
    statistics a sign test gives (no assumption on the differences' distribution)."""
    ordered = sorted(differences)
    n = len(ordered)
    half_width = 1.96 * math.sqrt(n) / 2
    low = ordered[max(0, math.floor(n / 2 - half_width))]
    high = ordered[min(n - 1, math.ceil(n / 2 + half_width))]
    return statistics.median(ordered), low, high
