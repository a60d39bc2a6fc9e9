"""Evaluation at COCO 5K scale: ranks of 5,000 images x 25,000 captions, in blocks, timed.

Run: ``python benchmarks/eval_scale.py [--images 5000] [--dim 1024] [--device cuda]``; prints
the wall time of the 5K evaluation and of the 5-fold 1K one, and the peak device memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.rvsepp.evaluate import evaluate_embeddings, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator), dim=1)
    noise = 1.2 * torch.randn(5 * args.images, args.dim, generator=generator) / args.dim**0.5
    captions = images.repeat_interleave(5, 0) + noise
    images, captions = images.to(device), torch.nn.functional.normalize(captions, dim=1).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for fold5 in (False, True):
        start = time.perf_counter()
        results = evaluate_embeddings([images], [captions], fold5=fold5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        label = f"{args.images} x {5 * args.images}" + (" (5-fold)" if fold5 else "")
        print(format_table(results, f"{label}: {time.perf_counter() - start:.2f} s on {device}"))
    if device.type == "cuda":
        print(f"peak device memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
