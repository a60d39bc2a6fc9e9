"""Command-line argument types shared by train, evaluate and compare.

Each type turns a bad value into argparse's own error (the usage line, then ``error: ...``
naming the flag, exit status 2) before anything runs: no traceback for a typing mistake.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

#: numpy's, Python's and torch's generators all take seeds in this range
SEED_RANGE = (0, 2**32 - 1)


def integer_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high``, when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value

    return parse


def number_at_least(low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= ``low`` (> ``low`` if ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} {low:g}, got {text!r}"
            )
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a seed that every generator of the run accepts."""
    return integer_at_least(*SEED_RANGE)(text)


def device(text: str) -> str:
    """An argparse type: ``auto`` or a device this machine has (``cpu``, ``cuda``, ``cuda:N``, ...).

    Refuses a name torch does not know, a ``meta`` device (shapes without values: nothing
    can be trained or evaluated on it) and a device whose backend this machine lacks.
    """
    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if parsed.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no values, so nothing can run on them: use cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'}): use --device cpu or auto"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None) or getattr(torch.backends, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise argparse.ArgumentTypeError(f"{text!r}: no {parsed.type} device is available here: use cpu or auto")
    return text


def resolve_device(text: str) -> torch.device:
    """The device of a checked ``--device`` value (``auto``: cuda if available, else cpu)."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the tensorboard package)."""
    return importlib.util.find_spec("tensorboard") is not None


def default_test_split(name: str) -> str:
    """The split a data set is tested on: COCO's ``testall`` (5-fold 1K and 5K), else ``test``."""
    return "testall" if name == "coco" else "test"


def utc_timestamp() -> str:
    """Now, in UTC to the second (ISO 8601), as runs record when they started and finished."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def code_version() -> str:
    """The git commit of the code that runs (``+dirty`` when tracked files differ from it), or
    ``unknown`` outside a git checkout: what a run records of the code that produced it."""
    folder = Path(__file__).resolve().parent

    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_description(device: torch.device) -> str:
    """The machine a run trains on, as a results table records it: host, CPU cores and the
    device (a GPU by name)."""
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return f"{platform.node() or 'unknown host'}, {platform.machine()}, {os.cpu_count()} cores, {where}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help text (none for switches and unset values), and the
    presets' list as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return help_text
        return f"{help_text} (default: %(default)s)".strip()
