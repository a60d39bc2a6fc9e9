"""This checkout's losses against another version's, side by side in one process.

A refactor of ``selhn`` must not slow the losses down. Timing two checkouts in two processes
compares two states of a noisy machine; this script imports the other version's package
under another name (a copy of its ``selhn/`` with its own imports rewritten, in a temporary
folder) and times both versions' modules case by case in one shuffled order per round, so
that both see the same machine. It prints, per case, the median forward + backward time of
each version as a ratio to the bare similarity ``(img @ txt.T).sum()`` of the same rounds,
this version's median time over the other's (below 1: faster now), and the median of the
per-round differences (this minus other, both timed in the same round) with its 95% interval.

Cases (D = 1024 by default): ``MaxViolationLoss``, ``SelHNLoss`` and ``SumHingeLoss`` on a
random batch, ``SelHNLoss`` on a near-collapsed one (cold start), and the sum of hinges with
the low-rank and sparse forms switched off (dense form).

Run: ``python benchmarks/bench_versions.py --other ../old-checkout [--sizes 512 2048]
[--rounds 150]``, e.g. with ``git worktree add ../old-checkout <commit>``. CI runs it against
this checkout itself at a tiny size as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import random
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from _timing import device_label, paired_interval, time_rounds

import selhn

Case = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def import_other(checkout: Path, folder: Path) -> ModuleType:
    """The package in ``checkout/selhn``, imported as ``selhn_other`` from a copy in ``folder``."""
    source = checkout / "selhn"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--other: no selhn package in {checkout}")
    target = folder / "selhn_other"
    shutil.copytree(source, target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) selhn\b", r"\1 selhn_other", text))
    sys.path.insert(0, str(folder))
    return importlib.import_module("selhn_other")


def cases(package: ModuleType) -> dict[str, tuple[str, Case]]:
    """The timed cases of one version: (batch kind, loss)."""

    # the forms' switch lives in selhn._forms (selhn._core before the core was split, selhn._fast
    # before that was renamed): any version runs
    forms = None
    for name in ("_forms", "_core", "_fast"):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(f"{package.__name__}.{name}")
            if hasattr(module, "forced_pair_form_fractions"):
                forms = module
                break
    if forms is None:
        raise SystemExit(f"{package.__name__}: no forced_pair_form_fractions to time the dense form with")

    def dense(loss: Case) -> Case:
        def run(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            with forms.forced_pair_form_fractions(0.0, 0.0):
                return loss(img, txt)

        return run

    return {
        "MaxViolationLoss": ("steady", package.MaxViolationLoss()),
        "SelHNLoss steady": ("steady", package.SelHNLoss()),
        "SelHNLoss cold": ("cold", package.SelHNLoss()),
        "SumHingeLoss": ("steady", package.SumHingeLoss()),
        "SumHinge, dense": ("steady", dense(package.SumHingeLoss())),
    }


def batches(size: int, dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(1, dim, generator=generator)
    unit = torch.nn.functional.normalize
    steady = [unit(torch.randn(size, dim, generator=generator), dim=1) for _ in range(2)]
    cold = [unit(centre + 1e-3 * torch.randn(size, dim, generator=generator), dim=1) for _ in range(2)]
    return {"steady": (steady[0], steady[1]), "cold": (cold[0], cold[1])}


def step(loss: Case, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img, txt = (x.detach().requires_grad_() for x in pair)
    loss(img, txt).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="a checkout of the other version")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=150, help="rounds at the first size (fewer for larger ones)")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.sizes) < 2 or args.dim < 1:
        parser.error("--rounds and --dim must be >= 1 and every size >= 2")
    with tempfile.TemporaryDirectory() as folder:
        other = import_other(args.other.resolve(), Path(folder))
        print(f"torch {torch.__version__}, {device_label('cpu')}, D = {args.dim}, fp32; this: {selhn.__file__}")
        for size in args.sizes:
            data = batches(size, args.dim)
            todo: dict[str, Callable[[], object]] = {}
            for version, package in (("this", selhn), ("other", other)):
                todo[f"bare {version}"] = lambda d=data["steady"]: step(lambda a, b: (a @ b.t()).sum(), d)
                for name, (kind, loss) in cases(package).items():
                    todo[f"{name} {version}"] = lambda f=loss, d=data[kind]: step(f, d)
            for thunk in todo.values():  # warm-up (and the compiled kernels' first call)
                thunk()
            rounds = max(3, args.rounds * min(args.sizes) ** 2 // size**2)
            times, _ = time_rounds(todo, "cpu", random.Random(0), rounds)
            median = {name: statistics.median(values) for name, values in times.items()}
            print(
                f"B = {size} (median of {rounds} rounds; x bare per version, then this / other, and the "
                "difference per call, which a fixed cost keeps the same at every B)"
            )
            for name in cases(selhn):
                this, that = median[f"{name} this"], median[f"{name} other"]
                pairs = zip(times[f"{name} this"], times[f"{name} other"], strict=True)
                paired, low, high = paired_interval([mine - theirs for mine, theirs in pairs])
                print(
                    f"  {name:18s} this {this / median['bare this']:.3f}x  other "
                    f"{that / median['bare other']:.3f}x  this/other {this / that:.3f}  "
                    f"this - other {(this - that) * 1e6:+.0f} us  paired {paired * 1e6:+.0f} us "
                    f"[{low * 1e6:+.0f}, {high * 1e6:+.0f}]"
                )


if __name__ == "__main__":
    main()
