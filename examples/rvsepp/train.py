"""Train RVSE++ (the SelHN paper's model) and evaluate it.

Defaults are the paper's recipe: AdamW at 5e-4 (PyTorch's default weight decay), x0.1 once
at epoch 15, 30 epochs, batch 128 (train drops the last partial batch), gradient-norm
clipping at 2.0, margin 0.2, epsilon 0.01, embedding 1024, word dim 300; validation on dev
every epoch, keeping the best checkpoint by dev rsum.

Losses (``--loss``): ``selhn`` (the paper), ``hn`` (VSE++ max violation), ``sum`` (VSE0)
and ``warmup`` (VSE-infinity's schedule: sum of hinges in epoch 0, hard negatives after).
Each uses the loss scale of its code base unless ``--reduction`` says otherwise: the authors'
mean for SelHN, VSE++'s sum for the others. A loss is a *criterion factory* (:data:`CRITERIA`:
a function from the run's arguments to a loss module); ``parse_args`` and ``train`` take
another table, so a study trains its own rules through this loop unchanged (see
``examples/selection_study``, whose candidate rules are :class:`selhn.RuleLoss` modules).

Data: ``--name synthetic`` (the default) generates the embedded synthetic data set under
``--root`` on first use; ``--name f30k`` / ``coco`` read the standard precomputed
bottom-up-attention features (``<root>/<name>_precomp``, see the README).

Backbone fine-tuning (off by default, so the paper's recipe is unchanged): ``--backbone`` puts
an image backbone in front of the image encoder (blocks pretrained to pass the region
features through, see ``model.py``) and fine-tunes it on VSE-infinity's schedule: frozen for
``--embedding-warmup-epochs``, then unfrozen from the top one block per
``--backbone-warmup-epochs`` (0: all at once), at ``--backbone-lr-factor`` times the learning
rate, with the loss scaled by a ramp from 0 to 1 over the first epoch it trains
(``--backbone-ramp``). VSE-infinity's own defaults are the flags' defaults.

Checkpoints (``<out>/last.pth`` every epoch and on Ctrl-C / SIGTERM, ``<out>/best.pth`` by
dev rsum) are plain data, loaded with ``weights_only=True``, and written atomically. A new
run refuses an ``--out`` that holds a run (``--overwrite`` replaces it); ``--resume``
continues exactly where a run stopped, and refuses arguments that would make it another run.
A non-finite loss stops the run with the last good checkpoint left in place. The docs'
"Robustness" section lists everything that is validated.

Multi-GPU: ``torchrun --nproc_per_node N -m examples.rvsepp.train ...`` (DDP; the batch is
the global batch). ``--global-negatives`` mines negatives across all ranks' batches.

Run: ``python -m examples.rvsepp.train --preset cpu`` (the README's main job).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import selhn
from examples.rvsepp import cli, synthetic
from examples.rvsepp.cli import integer_at_least, number_at_least
from examples.rvsepp.data import DataError, EpochSampler, PrecompDataset, collate, read_captions
from examples.rvsepp.evaluate import encode, evaluate_embeddings, format_table, load_checkpoint
from examples.rvsepp.model import RVSEPP
from examples.rvsepp.vocab import Vocabulary
from selhn.diagnostics import TrainingMonitor
from selhn.rules import SelectionRule


@dataclass(frozen=True)
class Preset:
    """A set of defaults for ``--preset``: what it is for, and the flags' values it sets."""

    description: str
    values: dict[str, Any]


#: The CPU-sized model of the synthetic presets (the paper's sizes are the flags' defaults).
CPU_MODEL: dict[str, Any] = {"embed_size": 256, "word_dim": 128, "synthetic_regions": 12, "synthetic_dim": 256}
PRESETS: dict[str, Preset] = {
    "paper": Preset("the paper's recipe on real precomputed features (the defaults shown above; a GPU)", {}),
    "cpu": Preset(
        "the README's main job: a small synthetic set and a narrower model, minutes on 2 CPU cores",
        {
            **CPU_MODEL,
            "epochs": 12,
            "lr_decay_epoch": 8,
            "synthetic_train": 3000,
            "synthetic_dev": 500,
            "synthetic_test": 500,
        },
    ),
    "smoke": Preset(
        "seconds: a test of the whole pipeline",
        {
            "epochs": 1,
            "batch_size": 16,
            "embed_size": 32,
            "word_dim": 16,
            "synthetic_train": 60,
            "synthetic_dev": 20,
            "synthetic_test": 20,
            "synthetic_regions": 6,
            "synthetic_dim": 32,
        },
    ),
}


class Criterion(Protocol):
    """What the training loop needs of its loss: the package's modules (and :class:`selhn.RuleLoss`
    of any rule) are criteria."""

    margin: float
    reduction: str
    keep_scores: bool
    last_scores: torch.Tensor | None
    last_mask: torch.Tensor | None

    @property
    def rule(self) -> SelectionRule: ...

    def __call__(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, ids: Any = None) -> torch.Tensor: ...
    def max_violation_on(self) -> None: ...
    def max_violation_off(self) -> None: ...


#: A criterion factory: the loss module of a run, built from its arguments.
CriterionFactory = Callable[[argparse.Namespace], Criterion]


def reduction_of(args: argparse.Namespace, default: str) -> str:
    """``--reduction``, or the loss's own code base's scale for ``auto``."""
    return str(args.reduction) if args.reduction != "auto" else default


#: ``--loss``: the paper's loss and its baselines, built as the README tells users to build them,
#: each at its code base's scale unless ``--reduction`` says otherwise (the authors' mean for
#: SelHN, VSE++'s sum for the others). ``warmup`` is VSE-infinity's switchable ContrastiveLoss,
#: flipped by :func:`set_epoch`.
CRITERIA: dict[str, CriterionFactory] = {
    "selhn": lambda args: selhn.SelHNLoss(args.margin, args.epsilon, reduction=reduction_of(args, "mean")),
    "hn": lambda args: selhn.MaxViolationLoss(args.margin, reduction=reduction_of(args, "sum")),
    "sum": lambda args: selhn.SumHingeLoss(args.margin, reduction=reduction_of(args, "sum")),
    "warmup": lambda args: selhn.ContrastiveLoss(args.margin, max_violation=False, reduction=reduction_of(args, "sum")),
}


SYNTHETIC_HELP = {
    "train": "images in the train split (5 captions each)",
    "dev": "images in the dev split",
    "test": "images in the test split",
    "regions": "regions per image",
    "dim": "region feature size",
    "shared": "scale of the component that every region shares (bottom-up-like features)",
    "noise": "scale of the per-region noise",
    "twins": "share of images made a confusable twin of another",
    "seed": "seed of the generated data",
    "specific": "share of captions that describe the whole scene",
    "variants": "near-duplicates made of each twinned scene",
}


def preset_help(presets: dict[str, Preset]) -> str:
    """The presets' list for ``--help``."""
    width = max(len(name) for name in presets) + 2
    lines = []
    for name, preset in presets.items():
        lines.append(f"  {name:<{width}}{preset.description}")
        values = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in preset.values.items())
        lines += textwrap.wrap(
            values or "(the flags' defaults)",
            100,
            initial_indent=" " * (width + 4),
            subsequent_indent=" " * (width + 4),
        )
    return "presets (--preset; every flag given on the command line overrides the preset's value):\n" + "\n".join(lines)


def parse_args(
    argv: list[str] | None = None,
    presets: dict[str, Preset] = PRESETS,
    criteria: dict[str, CriterionFactory] = CRITERIA,
) -> argparse.Namespace:
    """The run's arguments. ``presets`` and ``criteria`` are what ``--preset`` and ``--loss``
    choose from (a study adds its own: see ``examples/selection_study``)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.rvsepp.train",
        description=__doc__.split("\n\n")[0],
        epilog=preset_help(presets),
        formatter_class=cli.HelpFormatter,
        allow_abbrev=False,  # an abbreviated flag would not count as given, and the preset would win
    )
    add = parser.add_argument
    add("--preset", choices=list(presets), default="paper", help="a set of defaults (see the list below)")
    add("--root", default="data", help="folder holding <name>_precomp")
    add("--name", default="synthetic", help="data set: synthetic (generated), f30k, coco, ...")
    add("--test-split", default=None, help="evaluation split (when not given: test, and testall for coco)")
    add("--out", default="runs/rvsepp", help="run folder: checkpoints, TensorBoard logs, CSV")
    add(
        "--loss",
        choices=list(criteria),
        default="selhn",
        help="the loss (hn: max violation, sum: sum of hinges, warmup: VSE-infinity's schedule, the sum of hinges "
        "for --warmup-epochs, then max violation)",
    )
    add("--reduction", choices=["auto", "mean", "sum"], default="auto", help="auto: mean for selhn, sum otherwise")
    add("--margin", type=number_at_least(0.0), default=0.2, help="triplet margin")
    add(
        "--epsilon",
        type=number_at_least(0.0),
        default=0.01,
        help="SelHN's gap threshold (the paper's 0.01; for training from scratch the docs advise 0.05)",
    )
    add("--warmup-epochs", type=integer_at_least(0), default=1, help="epochs of sum of hinges for --loss warmup")
    add("--backbone", action="store_true", help="fine-tune an image backbone in front of the image encoder")
    add("--backbone-blocks", type=integer_at_least(1), default=4, help="blocks of the backbone (with --backbone)")
    add(
        "--embedding-warmup-epochs",
        type=integer_at_least(0),
        default=2,
        help="epochs with the backbone frozen (with --backbone; VSE-infinity's embedding_warmup_epochs)",
    )
    add(
        "--backbone-warmup-epochs",
        type=integer_at_least(0),
        default=5,
        help="then one more backbone block unfrozen every this many epochs, from the top (0: all at once)",
    )
    add(
        "--backbone-lr-factor",
        type=number_at_least(0.0),
        default=0.01,
        help="the backbone's learning rate as a multiple of --lr",
    )
    add(
        "--backbone-ramp",
        choices=["on", "off"],
        default="on",
        help="scale the loss from 0 to 1 over the first epoch the backbone trains (VSE-infinity's warmup_alpha)",
    )
    add("--mask-duplicates", action="store_true", help="captions of one image are not negatives of each other")
    add("--global-negatives", action="store_true", help="with DDP: mine negatives across all ranks")
    add("--epochs", type=integer_at_least(1), default=30, help="epochs in all")
    add("--max-steps", type=integer_at_least(0), default=0, help="stop after this many steps in all (0: no limit)")
    add("--batch-size", type=integer_at_least(2), default=128, help="pairs per step (2 at least: one negative)")
    add("--lr", type=number_at_least(0.0, strict=True), default=5e-4, help="AdamW learning rate")
    add("--lr-decay-epoch", type=integer_at_least(0), default=15, help="the epoch at which the lr is multiplied by 0.1")
    add("--grad-clip", type=number_at_least(0.0, strict=True), default=2.0, help="gradient-norm clipping")
    add("--embed-size", type=integer_at_least(1), default=1024, help="joint embedding size")
    add("--word-dim", type=integer_at_least(1), default=300, help="word embedding size")
    add("--workers", type=integer_at_least(0), default=0, help="data loader worker processes")
    add("--seed", type=cli.seed, default=0, help="seed of the run (0 to 2**32 - 1)")
    add("--device", type=cli.device, default="auto", help="auto: cuda if available, else cpu")
    add("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on with CUDA)")
    add("--log-every", type=integer_at_least(1), default=10, help="record the monitor's values every this many steps")
    add("--eval-steps", type=integer_at_least(0), default=0, help="also evaluate dev every this many steps (0: never)")
    add("--resume", action="store_true", help="continue the run in --out from its last.pth (same arguments)")
    add(
        "--overwrite",
        action="store_true",
        help="replace the run that --out holds (without it, a new run refuses); the old run is kept in "
        ".previous-run/ until the new one's first checkpoint, and put back if the new one fails before",
    )
    add("--no-eval-test", action="store_true", help="skip the final test evaluation")
    add(
        "--tensorboard",
        choices=["auto", "on", "off"],
        default="auto",
        help="TensorBoard logs in <out>/tensorboard (auto: when the tensorboard package is installed)",
    )
    for field, value in asdict(synthetic.Config()).items():
        add(f"--synthetic-{field}", type=type(value), default=value, help=f"synthetic data: {SYNTHETIC_HELP[field]}")
    # the preset's values become the defaults, so that every flag given on the command line wins
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**presets[preset].values)
    args = parser.parse_args(argv)
    if args.test_split is None:
        args.test_split = cli.default_test_split(args.name)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: choose one")
    if args.tensorboard == "on" and not cli.tensorboard_available():
        parser.error("--tensorboard on needs the tensorboard package: pip install tensorboard (or the examples extra)")
    try:
        config = synthetic_config(args)
    except ValueError as error:
        parser.error(str(error).replace("synthetic ", "--synthetic-", 1))
    check_backbone_flags(parser, args)
    if args.name == "synthetic":
        for split in ["dev"] + ([] if args.no_eval_test else ["test"]):
            if getattr(config, split) < 1:
                parser.error(
                    f"--synthetic-{split} 0: the {split} split would be empty, and every "
                    f"{'epoch' if split == 'dev' else 'run'} evaluates it (at least 1 image)"
                )
    return args


#: The flags of the backbone stage: they apply only with --backbone.
BACKBONE_FLAGS = ("backbone_blocks", "embedding_warmup_epochs", "backbone_warmup_epochs", "backbone_lr_factor")


def check_backbone_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse backbone settings that cannot apply, any without --backbone (a run would train
    without them, silently); say so when no epoch reaches the unfreezing (a frozen backbone)."""
    if not args.backbone:
        changed = [
            name for name in (*BACKBONE_FLAGS, "backbone_ramp") if getattr(args, name) != parser.get_default(name)
        ]
        if changed:
            flags = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in changed)
            parser.error(f"{flags}: the backbone's settings apply only with --backbone")
        return
    if args.embedding_warmup_epochs >= args.epochs:  # legitimate (a frozen backbone), but never silent
        print(
            f"note: --embedding-warmup-epochs {args.embedding_warmup_epochs} with --epochs {args.epochs}: the backbone "
            "stays frozen for the whole run (it unfreezes after the embedding warm-up)",
            file=sys.stderr,
            flush=True,
        )


def synthetic_config(args: argparse.Namespace) -> synthetic.Config:
    return synthetic.Config(**{k: getattr(args, f"synthetic_{k}") for k in asdict(synthetic.Config())})


# --------------------------------------------------------------------------- plumbing
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.
    A failed write (a full disk) removes the temporary file and leaves ``path`` as it was."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; then rename it over ``path``. On any
    failure the temporary file is removed and ``path`` is untouched; an OSError (a full disk,
    a read-only folder) becomes a RunError that says so. The temporary name is this process's
    own, so two processes writing one file never write into each other's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise RunError(f"could not write {path}: {error.strerror or error}; {kept}") from error
        raise


class StopSignal(Exception):  # noqa: N818 (a signal, not an error)
    """Ctrl-C / SIGTERM during an evaluation (where the training loop's flag is not read)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Stop:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint and exits at the next step.
    Inside :meth:`interruptible` (evaluations) a signal raises :class:`StopSignal` at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.immediate = False
        self.previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if self.immediate:
            raise StopSignal(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch (an evaluation) that a signal ends at once."""
        if self.signal is not None:
            raise StopSignal(self.signal)
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def restore(self) -> None:
        """Put back the handlers that were there before (training may run inside a larger program)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunError(Exception):
    """A user mistake about the run (its folder, arguments or data): reported without a traceback."""


def loss_for_step(args: argparse.Namespace, epoch: int) -> str:
    """The name of this epoch's loss, for the progress bar (``warmup``: ``sum``, then ``hn``)."""
    if args.loss == "warmup":
        return "sum" if epoch < args.warmup_epochs else "hn"
    return str(args.loss)


def make_criterion(args: argparse.Namespace, criteria: dict[str, CriterionFactory] = CRITERIA) -> Criterion:
    """The loss module of ``--loss``, from its factory; a factory that returns anything but a
    selhn loss module (which the loop switches, monitors and hands to DDP) is refused by name."""
    criterion = criteria[args.loss](args)
    needed = ("rule", "margin", "reduction", "max_violation_on", "max_violation_off", "keep_scores")
    if not isinstance(criterion, torch.nn.Module) or not all(hasattr(criterion, name) for name in needed):
        raise RunError(
            f"the criterion factory of --loss {args.loss} returned a {type(criterion).__name__}, not a selhn loss "
            "module (selhn.SelHNLoss, selhn.RuleLoss, ...): the training loop switches it (max_violation_on/off), "
            "reads its rule, margin and reduction, and its scores for the monitor"
        )
    return criterion


def set_epoch(criterion: Criterion, args: argparse.Namespace, epoch: int) -> None:
    """VSE-infinity's loop: hard negatives from epoch ``--warmup-epochs`` on (a no-op for every
    loss but the switchable one)."""
    if epoch >= args.warmup_epochs:
        criterion.max_violation_on()
    else:
        criterion.max_violation_off()


def backbone_blocks_trained(args: argparse.Namespace, epoch: int) -> int:
    """VSE-infinity's unfreezing schedule: how many backbone blocks, counted from the top, train
    in ``epoch``. None for --embedding-warmup-epochs; then one, and one more every
    --backbone-warmup-epochs epochs (every block at once when it is 0)."""
    if not args.backbone or epoch < args.embedding_warmup_epochs:
        return 0
    if args.backbone_warmup_epochs == 0:
        return int(args.backbone_blocks)
    unfrozen = 1 + (epoch - args.embedding_warmup_epochs) // args.backbone_warmup_epochs
    return int(min(args.backbone_blocks, unfrozen))


def loss_scale(args: argparse.Namespace, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """VSE-infinity's ramp (``warmup_alpha``): over the first epoch in which the backbone trains,
    the loss is scaled by ``step / steps_per_epoch``, from 0 at its first step towards 1; 1
    everywhere else, and always without --backbone or with --backbone-ramp off."""
    ramping = args.backbone and args.backbone_ramp == "on" and epoch == args.embedding_warmup_epochs
    return step_in_epoch / steps_per_epoch if ramping else 1.0


def parameter_groups(model: RVSEPP, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the backbone (when there is one) at --backbone-lr-factor
    times the learning rate, everything else at --lr."""
    backbone = model.image.backbone
    if backbone is None:
        return [{"params": list(model.parameters()), "lr": args.lr}]
    inside = {id(parameter) for parameter in backbone.parameters()}
    rest = [parameter for parameter in model.parameters() if id(parameter) not in inside]
    return [
        {"params": rest, "lr": args.lr},
        {"params": list(backbone.parameters()), "lr": args.lr * args.backbone_lr_factor},
    ]


def args_use_global(args: argparse.Namespace) -> bool:
    """Whether the loss mines negatives across DDP ranks (--global-negatives under DDP)."""
    return bool(args.global_negatives and dist.is_available() and dist.is_initialized())


def compute_loss(
    criterion: Criterion, args: argparse.Namespace, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The training loss of a batch: the module over the embeddings (the one-line swap), or with
    ``--global-negatives`` under DDP the same rule over the global batch."""
    ids_or_none = ids if args.mask_duplicates else None
    if args_use_global(args):
        return selhn.distributed.global_loss(
            img, txt, criterion.rule, criterion.margin, ids=ids_or_none, reduction=criterion.reduction
        )
    return criterion(img, txt, ids=ids_or_none)


def load_data(args: argparse.Namespace) -> tuple[Vocabulary, PrecompDataset, PrecompDataset, PrecompDataset]:
    if args.name == "synthetic":
        config = synthetic_config(args)
        if is_main():
            synthetic.ensure(args.root, "synthetic", config)
        barrier()
    folder = Path(args.root) / f"{args.name}_precomp"
    vocab_path = folder / "vocab.json"
    if not vocab_path.is_file() and is_main():
        captions = []
        for split in ("train", "dev"):
            path = folder / f"{split}_caps.txt"
            if not path.is_file():
                raise FileNotFoundError(f"missing split file {path}")
            captions += read_captions(path)
        Vocabulary.build(captions).save(vocab_path)
    barrier()
    vocab = Vocabulary.load(vocab_path)
    train = PrecompDataset(args.root, args.name, "train", vocab, train=True, seed=args.seed)
    dev = PrecompDataset(args.root, args.name, "dev", vocab)
    test = PrecompDataset(args.root, args.name, args.test_split, vocab)
    return vocab, train, dev, test


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup_distributed(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return device, rank, world
    if args.device not in ("auto", "cuda", "cpu"):
        return torch.device(args.device), 0, 1
    return torch.device("cuda" if use_cuda else "cpu"), 0, 1


# --------------------------------------------------------------------------- the run folder
#: what a run writes into --out; a new run refuses a folder holding any of them
RUN_FILES = ("last.pth", "best.pth", "dev.jsonl", "steps.csv", "results.json", "tensorboard")
#: held (flock) by the run that uses the folder
LOCK_FILE = ".lock"
#: arguments a resumed run must share with the run it continues; the others (--epochs,
#: --max-steps, --device, --workers, --eval-steps, --log-every, ...) may change
SAME_RUN = (
    "name",
    "loss",
    "reduction",
    "margin",
    "epsilon",
    "warmup_epochs",
    "backbone",
    "backbone_blocks",
    "embedding_warmup_epochs",
    "backbone_warmup_epochs",
    "backbone_lr_factor",
    "backbone_ramp",
    "mask_duplicates",
    "global_negatives",
    "batch_size",
    "lr",
    "lr_decay_epoch",
    "grad_clip",
    "embed_size",
    "word_dim",
    "seed",
)


@contextlib.contextmanager
def locked_run_folder(out: Path) -> Iterator[None]:
    """Create ``out`` if needed and hold an exclusive lock on it while the run lives: a second
    run into the same folder is refused at once instead of mixing its records and checkpoints
    with the first one's. The lock file goes when the run ends, removed while still held; a run
    that locked a file removed meanwhile locks the new one instead. (The main process only; on
    systems without ``fcntl`` no lock is taken.)"""
    if int(os.environ.get("RANK", "0")) != 0:  # a DDP rank other than the main one writes nothing
        yield
        return
    if out.is_symlink() and not out.is_dir():
        raise RunError(f"--out {out} is a symbolic link that leads to no folder (a loop, or a missing target)")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder: choose a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot use --out {out} as the run folder: {error.strerror or error}") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = out / LOCK_FILE
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 (held open for the run's whole life)
        except OSError as error:
            raise RunError(f"cannot use --out {out} as the run folder: {error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunError(
                f"{out} is in use by another run ({owner}): wait for it to finish, or choose another --out"
            ) from None
        try:  # the file may have been removed by the run that held it before: then lock the new one
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:  # removed while still held: a finished run leaves no .lock behind
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def existing_run(out: Path) -> list[str]:
    """The files of a run that --out holds (none for an empty or new folder)."""
    return sorted(name for name in RUN_FILES if (out / name).exists())


def check_run_folder(args: argparse.Namespace, out: Path) -> None:
    """Refuse to mix two runs in one folder: a new run needs an empty --out (or --overwrite)."""
    if args.resume:
        if not (out / "last.pth").is_file():
            raise RunError(f"--resume: no checkpoint at {out / 'last.pth'} (start a new run without --resume)")
        return
    existing = existing_run(out)
    if existing and not args.overwrite:
        raise RunError(
            f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )


#: Where --overwrite keeps the old run until the new one has written its first checkpoint.
PREVIOUS_RUN = ".previous-run"


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def set_aside_previous_run(out: Path) -> None:
    """--overwrite: move the old run into ``out/.previous-run`` (a rename: no copy), once the new
    run has passed every check. It is deleted when the new run writes its first checkpoint
    (:func:`drop_previous_run`) and put back if the new run fails before that
    (:func:`restore_previous_run`): a run that fails in its first steps (bad data in a batch)
    leaves the old run as it was. A ``.previous-run`` left by a process that was killed already
    holds the last run that had a checkpoint: what stands beside it was never trained, and goes."""
    aside = out / PREVIOUS_RUN
    if aside.exists():
        for name in existing_run(out):
            _remove(out / name)
        return
    existing = existing_run(out)
    if existing:
        aside.mkdir()
        for name in existing:
            (out / name).rename(aside / name)


def drop_previous_run(out: Path) -> None:
    """The new run has a checkpoint: the old one set aside by --overwrite goes."""
    aside = out / PREVIOUS_RUN
    if aside.exists():
        shutil.rmtree(aside)


def restore_previous_run(out: Path) -> None:
    """The new run failed before its first checkpoint: its files go, the old run comes back."""
    aside = out / PREVIOUS_RUN
    if not aside.exists():
        return
    for name in existing_run(out):
        _remove(out / name)
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()


def read_resumable(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint --resume continues, checked against these arguments before anything
    else is touched (a refused resume must not regenerate or rewrite the data first)."""
    try:
        checkpoint = load_checkpoint(path, resumable=True)
    except ValueError as error:
        raise RunError(f"--resume: {error}") from error
    check_same_run(checkpoint["args"], args, path)
    return checkpoint


def build_model(args: argparse.Namespace, vocab_size: int, feature_dim: int, device: torch.device) -> RVSEPP:
    """RVSE++ on ``device``; a model that cannot be made there (too large, a device that fails)
    is a RunError that names the sizes."""
    try:
        blocks = args.backbone_blocks if args.backbone else 0
        return RVSEPP(vocab_size, feature_dim, args.embed_size, args.word_dim, backbone_blocks=blocks).to(device)
    except (RuntimeError, MemoryError) as error:
        raise RunError(
            f"cannot build the model on {device} (--embed-size {args.embed_size}, --word-dim {args.word_dim}, "
            f"{vocab_size} words, {feature_dim}-d regions): {str(error).splitlines()[0]}"
        ) from None


def stored_arguments(stored: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's arguments, with every flag it lacks at the flag's default: a run trained
    before a flag existed (the backbone's, say) ran as that default does."""
    return {**vars(parse_args([])), **stored}


def check_same_run(stored: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """A resumed run continues the stored one: refuse, by flag, what would make it another run."""
    keys = list(SAME_RUN)
    if args.name == "synthetic":
        keys += [f"synthetic_{k}" for k in asdict(synthetic.Config())]
    stored = stored_arguments(stored)
    for key in keys:
        before, now = stored.get(key), getattr(args, key)
        if before != now:
            raise RunError(
                f"--resume: {path} belongs to a run with --{key.replace('_', '-')} {before!r}, not {now!r}. A resumed "
                "run must continue the same run (only --epochs, --max-steps and settings of the machine may change); "
                "start a new run in another --out to change it"
            )


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's generator states as tensors and plain values
    (a checkpoint loads with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


def _damaged(path: Path, where: str, what: str) -> RunError:
    """A run's record that cannot be read: one line naming the file, the place and the fault."""
    return RunError(f"{path}{where}: {what}; the run's records are damaged: start a new run in another --out")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _damaged(path, "", f"not UTF-8 text (byte {error.start})") from None


def records_until(out: Path, step: int, pending_eval: bool) -> list[dict[str, str]]:
    """On resume: the rows of steps.csv up to the checkpoint's step, and dev.jsonl cut back
    the same way (rows written after the checkpoint would be written again). A damaged record
    stops the resume with one line naming the file and the line."""
    rows: list[dict[str, str]] = []
    steps_path = out / "steps.csv"
    if steps_path.is_file():
        reader = csv.DictReader(io.StringIO(_read_text(steps_path), newline=""))
        if reader.fieldnames is not None and "step" not in reader.fieldnames:
            raise _damaged(steps_path, "", f"no 'step' column (columns: {', '.join(reader.fieldnames[:5])}, ...)")
        for row in reader:
            try:
                row_step = float(row["step"])
            except (TypeError, ValueError):
                raise _damaged(steps_path, f", line {reader.line_num}", f"step {row['step']!r} is no number") from None
            if row_step <= step:
                rows.append(row)
    dev_path = out / "dev.jsonl"
    if dev_path.is_file():
        kept = []
        lines = _read_text(dev_path).splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # cut off by a crash while it was written: redone with its evaluation
                    print(f"{dev_path}: dropped its incomplete last line", flush=True)
                    break
                raise _damaged(dev_path, f", line {number}", "not a JSON record") from None
            record_step = record.get("global_step") if isinstance(record, dict) else None
            if not isinstance(record_step, int) or isinstance(record_step, bool) or record_step < 0:
                what = "not a record (an object)" if not isinstance(record, dict) else "no step number >= 0"
                raise _damaged(dev_path, f", line {number}", f"{what}: global_step is {record_step!r}")
            redone = record_step > step or (record_step == step and pending_eval and record.get("kind") == "epoch")
            if not redone:
                kept.append(line + "\n")
        write_atomic(dev_path, "".join(kept))
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, then rename: never a half-written file (see :func:`atomic_save`)."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as handle:  # the text's own line ends
        handle.write(text)


def write_steps(path: Path, earlier: list[dict[str, str]], monitor: TrainingMonitor) -> None:
    """steps.csv: the rows from before a resume, then this process's monitor history."""
    history = monitor.history()
    columns = monitor.columns or (list(earlier[0]) if earlier else [])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")  # csv's default, as TrainingMonitor.to_csv writes
    writer.writerow(columns)
    writer.writerows([row.get(c, "") for c in columns] for row in earlier)
    if monitor.columns:  # (a resumed run that has not stepped yet has no rows of its own)
        writer.writerows(zip(*(history[c] for c in columns), strict=True))
    write_atomic(path, text.getvalue())


def check_data(args: argparse.Namespace, train: PrecompDataset, dev: PrecompDataset, test: PrecompDataset) -> None:
    """Refuse, before any step, data on which the run would train or evaluate nothing."""
    if len(train) < args.batch_size:
        raise RunError(
            f"the train split of {args.name} has {len(train)} captions, fewer than --batch-size {args.batch_size}: "
            "training drops the last partial batch, so not one step would run"
        )
    splits = [("dev", dev)] + ([] if args.no_eval_test else [(args.test_split, test)])
    for split, dataset in splits:
        if len(dataset) == 0:
            raise RunError(f"the {split} split of {args.name} is empty: there is nothing to evaluate")
        if dataset.feature_dim != train.feature_dim:
            raise RunError(
                f"the {split} split of {args.name} has {dataset.feature_dim}-d region features, the train split "
                f"{train.feature_dim}-d"
            )


def finite_or_none(results: dict[str, Any]) -> dict[str, Any]:
    """results.json is strict JSON: NaN / inf become null (text stays as it is)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}


# --------------------------------------------------------------------------- the run
class Run:
    """One training run: set-up (data, model, resume), the step, the epoch's end, the test."""

    def __init__(self, args: argparse.Namespace, stop: Stop, criteria: dict[str, CriterionFactory] = CRITERIA) -> None:
        """Everything that can fail before the first step happens here, in this order: the
        folder's checks, the resumed checkpoint against these arguments (before the data are
        touched), the data, the model on its device, the loader. Only then does --overwrite
        delete the previous run, so a run that fails to start leaves it intact."""
        self.args, self.stop = args, stop
        self.device, self.rank, self.world = setup_distributed(args)
        if args.backbone and self.world > 1:
            raise RunError(
                "--backbone is not supported with more than one process: DDP cannot follow parameters that the "
                "unfreezing schedule switches on during the run; fine-tune the backbone on one device"
            )
        seed_everything(args.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.amp = args.amp == "on" or (args.amp == "auto" and self.device.type == "cuda")
        self.out = Path(args.out)
        self.last_path, self.best_path = self.out / "last.pth", self.out / "best.pth"
        if is_main():
            check_run_folder(args, self.out)
        stored = read_resumable(self.last_path, args) if args.resume else None
        try:
            self.vocab, self.train_set, self.dev_set, self.test_set = load_data(args)
        except (FileNotFoundError, ValueError) as error:
            raise RunError(str(error)) from error
        check_data(args, self.train_set, self.dev_set, self.test_set)
        self.model = build_model(args, len(self.vocab), self.train_set.feature_dim, self.device)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, args), lr=args.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=[args.lr_decay_epoch], gamma=0.1
        )
        self.state: dict[str, Any] = {
            "epoch": 0,
            "step_in_epoch": 0,
            "global_step": 0,
            "best_rsum": -1.0,
            "pending_eval": False,
            "eval_epoch": 0,
            "started": cli.utc_timestamp(),  # the run's first start; kept by checkpoints across resumes
        }
        self.monitor = TrainingMonitor(
            self.model.image, self.model.text, margin=args.margin, epsilon=args.epsilon, log_every=args.log_every
        )
        self.earlier_steps: list[dict[str, str]] = []
        if stored is not None:
            self.resume(stored)
        self.ddp_model: torch.nn.Module = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.sampler = EpochSampler(
            len(self.train_set), args.batch_size, seed=args.seed, rank=self.rank, world_size=self.world
        )
        self.loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=args.workers
        )
        if stored is not None:
            check_position(self.state, self.sampler.batches_per_epoch, self.last_path)
        self.criterion = make_criterion(args, criteria)
        self.criterion.keep_scores = True  # the monitor reads the loss's own scores and mask
        if is_main() and args.overwrite:  # only now, and aside: a run that fails early leaves the old one intact
            set_aside_previous_run(self.out)
        barrier()
        self.writer = make_writer(args, self.out)
        self.step_times: list[float] = []
        self.device_step = torch.tensor(float(self.state["global_step"]), device=self.device)
        self.first_bad = torch.full((2,), math.nan, device=self.device)  # (step, loss) of the first non-finite loss

    def resume(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint, self.vocab, self.model, self.last_path)
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise RunError(f"--resume: {self.last_path} holds state this run cannot load: {error}") from error
        self.state = dict(checkpoint["state"])
        if "monitor" in self.state:  # the alarm's streak and whether it fired: a resumed run warns no second time
            try:
                self.monitor.load_state_dict(self.state["monitor"])
            except (TypeError, ValueError) as error:
                raise RunError(f"--resume: {self.last_path}: {error}") from error
        else:  # a checkpoint from before the monitor's state was kept: where the alarm fired, at least
            self.monitor.alarm_steps = [int(step) for step in self.state.get("alarm_steps", [])]
        self.monitor.steps = self.state["global_step"]  # step numbers go on
        if is_main():
            self.earlier_steps = records_until(self.out, self.state["global_step"], self.state["pending_eval"])
            print(
                f"resumed from {self.last_path}: epoch {self.state['epoch']}, step {self.state['step_in_epoch']} "
                "of the epoch",
                flush=True,
            )

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": dict(self.state),
            "args": vars(self.args),
            "vocab": self.vocab.signature(),
            "model_config": self.model.config,
            "rng": rng_state(),
        }

    def monitored_scores(
        self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The score matrix and mask the monitor reads: the criterion's own (kept by its forward,
        the same mask, ids included), or with --global-negatives this rank's local batch."""
        if self.criterion.last_scores is not None and not args_use_global(self.args):
            return self.criterion.last_scores, self.criterion.last_mask
        mask = ids.unsqueeze(1) == ids.unsqueeze(0) if self.args.mask_duplicates else None
        return img.detach() @ txt.detach().t(), mask

    def check_finite(self) -> None:
        """Stop at a non-finite loss, before any checkpoint holds what followed it."""
        step, value = self.first_bad.tolist()
        if not math.isnan(step):
            last = self.last_path if self.last_path.exists() else "not written yet"
            raise SystemExit(
                f"non-finite loss ({value}) at training step {int(step)} (epoch {self.state['epoch']}): stopping. "
                f"The last good checkpoint is {last}."
            )

    def save_last(self) -> None:
        self.check_finite()
        if is_main():
            atomic_save(self.checkpoint(), self.last_path)
            write_steps(self.out / "steps.csv", self.earlier_steps, self.monitor)
            drop_previous_run(self.out)  # (--overwrite's old run, once this one has a checkpoint)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """One optimisation step; the monitor's values on its logging steps."""
        args, device = self.args, self.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            img, txt = self.ddp_model(
                batch["regions"].to(device),
                batch["region_lengths"].to(device),
                batch["tokens"].to(device),
                batch["token_lengths"].to(device),
            )
        img, txt = img.float(), txt.float()
        ids = batch["image_id"].to(device)
        loss = compute_loss(self.criterion, args, img, txt, ids)
        # the whole epoch's batches: after a resume inside the ramp epoch, len(sampler) counts only those left
        scale = loss_scale(args, self.state["epoch"], self.state["step_in_epoch"], self.sampler.batches_per_epoch)
        # the first non-finite loss, kept on the device (no sync per step); read on logging steps
        # and before every checkpoint, so that a non-finite loss never reaches one
        self.device_step += 1
        fresh = ~torch.isfinite(loss.detach()) & torch.isnan(self.first_bad[0])
        self.first_bad = torch.where(fresh, torch.stack([self.device_step, loss.detach().float()]), self.first_bad)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * scale if scale != 1.0 else loss).backward()  # the monitor records the loss itself, unscaled
        scores, mask = self.monitored_scores(img, txt, ids)
        logged = self.monitor.step(scores, loss, mask=mask)
        if logged is not None:
            self.check_finite()
            self.state["monitor"] = self.monitor.state_dict()  # kept by checkpoints: the alarm's state, its steps
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.state["step_in_epoch"] += 1
        self.state["global_step"] += 1
        return logged

    def evaluate_dev(self, epoch: int, kind: str) -> dict[str, float]:
        with self.stop.interruptible():
            dev = evaluate_split(self.model, self.dev_set, self.device, self.amp)
        if is_main():
            record_dev(self.out, epoch, self.state["global_step"], dev, self.writer, kind)
        return dev

    def end_of_epoch(self) -> None:
        """Evaluate dev, keep the best checkpoint. The checkpoint written before the evaluation
        says it is pending, so a run killed during it redoes the evaluation alone."""
        epoch = self.state["eval_epoch"]
        dev = self.evaluate_dev(epoch, "epoch")
        self.state["pending_eval"] = False
        if is_main():
            print(
                f"epoch {epoch}: dev rsum {dev['rsum']:.1f} (i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f})",
                flush=True,
            )
            if dev["rsum"] > self.state["best_rsum"]:
                self.state["best_rsum"] = dev["rsum"]
                self.check_finite()
                atomic_save(self.checkpoint(), self.best_path)
        self.save_last()
        barrier()

    def train(self) -> None:
        args, state = self.args, self.state
        if state["pending_eval"]:  # killed during the last epoch's evaluation
            self.end_of_epoch()
        finished = bool(args.max_steps and state["global_step"] >= args.max_steps)
        while state["epoch"] < args.epochs and not finished:
            epoch = state["epoch"]
            self.train_set.epoch = epoch
            self.sampler.set_epoch(epoch, start=state["step_in_epoch"])
            name = loss_for_step(args, epoch)
            set_epoch(self.criterion, args, epoch)
            self.monitor.rule = self.criterion.rule  # the alarm's advice follows the loss being trained
            self.set_backbone(epoch)
            self.ddp_model.train()
            progress = progress_bar(self.loader, f"epoch {epoch} ({name})", disable=not is_main())
            for batch in progress:
                start = time.perf_counter()
                logged = self.step(batch)
                self.step_times.append(time.perf_counter() - start)
                if logged is not None:
                    self.log(logged, progress)
                if self.stop.signal is not None:
                    self.save_last()
                    print(
                        f"\nstopped by signal {self.stop.signal}: saved {self.last_path}; continue with --resume",
                        flush=True,
                    )
                    raise SystemExit(128 + self.stop.signal)
                if args.eval_steps and state["global_step"] % args.eval_steps == 0 and is_main():
                    try:
                        self.evaluate_dev(epoch, "steps")
                    except StopSignal:
                        self.save_last()
                        raise
                if args.max_steps and state["global_step"] >= args.max_steps:
                    finished = True
                    break
            if not finished:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                self.scheduler.step()
            state["pending_eval"], state["eval_epoch"] = True, epoch
            self.save_last()
            self.end_of_epoch()

    def set_backbone(self, epoch: int) -> None:
        """Freeze and unfreeze the backbone's blocks for ``epoch`` (see :func:`backbone_blocks_trained`)."""
        backbone = self.model.image.backbone
        if backbone is None:
            return
        before, now = backbone.trained_blocks(), backbone_blocks_trained(self.args, epoch)
        backbone.train_top(now)
        if is_main() and (now != before or epoch == self.state["epoch"] == 0):
            ramp = " (loss ramped from 0 over this epoch)" if loss_scale(self.args, epoch, 0, 1) == 0 else ""
            print(f"epoch {epoch}: backbone trains {now} of {len(backbone.blocks)} blocks{ramp}", flush=True)

    def log(self, logged: dict[str, float], progress: Any) -> None:
        if self.writer is not None:
            for key, value in logged.items():
                self.writer.add_scalar(f"train/{key}", value, self.state["global_step"])
            self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.state["global_step"])
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(
                loss=f"{logged['loss']:.4f}", vanishing=f"{logged.get('i2t/vanishing_fraction', 0):.2f}"
            )

    def kept_results(self, results: dict[str, float]) -> dict[str, Any]:
        """What a resumed run keeps of the results.json it finds, since this process did not
        measure it again: when it trained no step, the step time and what trained the run (commit,
        machine, start); when it does not evaluate the test split and the best checkpoint they were
        measured on is still the best one, the test metrics (and, with no step either, the time
        the run finished: nothing about it changed)."""
        if not self.args.resume:
            return {}
        previous = _previous_results(self.out / "results.json")
        trained = bool(self.step_times)
        kept: dict[str, Any] = {}
        number = {k: (math.nan if v is None else v) for k, v in previous.items()}  # (JSON's null is a NaN figure)
        if not trained:
            if "step_seconds" in previous:
                kept["step_seconds"] = number["step_seconds"]
            kept.update({k: previous[k] for k in ("commit", "machine", "started") if k in previous})
        if self.args.no_eval_test and previous.get("best_dev_rsum") == results["best_dev_rsum"]:
            kept.update({k: v for k, v in number.items() if k.startswith("test_")})
            if not trained and "finished" in previous:
                kept["finished"] = previous["finished"]
        return kept

    def finish(self) -> dict[str, float]:
        """The test evaluation of the best dev checkpoint; results.json."""
        args = self.args
        results: dict[str, float] = {
            "best_dev_rsum": self.state["best_rsum"],
            "step_seconds": float(np.median(self.step_times)) if self.step_times else math.nan,
        }
        kept = self.kept_results(results) if is_main() else {}
        results.update({k: v for k, v in kept.items() if k == "step_seconds" or k.startswith("test_")})
        if not args.no_eval_test and is_main():
            if self.best_path.exists():
                try:
                    best = load_checkpoint(self.best_path)["model"]
                except ValueError as error:
                    raise RunError(
                        f"the final test cannot read {self.best_path} ({error}); {self.last_path} holds the run"
                    ) from None
                self.model.load_state_dict(best)
            fold5 = args.name == "coco" and args.test_split == "testall"
            with self.stop.interruptible():
                test = evaluate_split(self.model, self.test_set, self.device, self.amp, fold5=fold5)
            print(format_table(test, f"{args.name} {args.test_split}, {args.loss}, best dev checkpoint"), flush=True)
            results.update({f"test_{k}": v for k, v in test.items()})
        if is_main():
            recorded: dict[str, Any] = {
                "commit": cli.code_version(),
                "machine": cli.machine_description(self.device),
                "started": self.state.get("started"),  # (None for a run begun before runs recorded it)
                "finished": cli.utc_timestamp(),
                **{k: v for k, v in kept.items() if k in ("commit", "machine", "started", "finished")},
                "alarm_steps": list(self.monitor.alarm_steps),  # where the collapse alarm fired
            }
            text = json.dumps(finite_or_none({**results, **recorded}), indent=1, allow_nan=False)
            write_atomic(self.out / "results.json", text)
        if self.writer is not None:
            self.writer.close()
        if self.world > 1:
            dist.barrier()  # no rank tears its group down while another is still in a collective
            dist.destroy_process_group()
        return results


def _previous_results(path: Path) -> dict[str, Any]:
    """A results.json written before, its values as written (an int stays an int); empty when
    there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, list, type(None)))}


def _train(args: argparse.Namespace, stop: Stop, criteria: dict[str, CriterionFactory]) -> dict[str, float]:
    with locked_run_folder(Path(args.out)):
        try:
            with stop.interruptible():  # set-up (data generation can take minutes): nothing to save yet
                run = Run(args, stop, criteria)
            run.train()
        except BaseException:
            if is_main():  # (no-op unless --overwrite set an old run aside and no checkpoint was written since)
                restore_previous_run(Path(args.out))
            raise
        return run.finish()


def record_dev(out: Path, epoch: int, step: int, dev: dict[str, float], writer: Any, kind: str = "epoch") -> None:
    """Append a dev evaluation to <out>/dev.jsonl (and TensorBoard, by step); ``kind`` says
    whether it is the epoch's end or an --eval-steps one."""
    if writer is not None:
        for key, value in dev.items():
            writer.add_scalar(f"dev/{key}", value, step)
    path = out / "dev.jsonl"
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps({"epoch": epoch, "global_step": step, "kind": kind, **dev}) + "\n")
    except OSError as error:  # a full disk: the checkpoint written before the evaluation holds the run
        raise RunError(
            f"could not append the evaluation to {path}: {error.strerror or error}; the last checkpoint is intact "
            "and --resume redoes this evaluation"
        ) from error


def train(args: argparse.Namespace, criteria: dict[str, CriterionFactory] = CRITERIA) -> dict[str, float]:
    """Train and evaluate; Ctrl-C / SIGTERM save a checkpoint (during an evaluation: the one
    written before it), and the previous signal handlers are restored on the way out.
    ``criteria`` is what ``--loss`` names (the one ``parse_args`` was given)."""
    stop = Stop()
    try:
        return _train(args, stop, criteria)
    except StopSignal as stopped:
        last = Path(args.out) / "last.pth"
        where = f"{last} holds the run; continue with --resume" if last.is_file() else "nothing was trained yet"
        print(f"\nstopped by signal {stopped.signum} outside a training step: {where}", flush=True)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        stop.restore()


def evaluate_split(
    model: RVSEPP, dataset: PrecompDataset, device: torch.device, amp: bool, fold5: bool = False
) -> dict[str, float]:
    """Recall of ``model`` on ``dataset``; the model's train / eval mode is left as it was."""
    was_training = model.training
    images, captions = encode(model, dataset, device, amp=amp)
    model.train(was_training)
    results = evaluate_embeddings([images], [captions], fold5=fold5)
    if fold5:  # COCO: also the 5K numbers
        results.update({f"5k_{k}": v for k, v in evaluate_embeddings([images], [captions]).items()})
    return results


def check_position(state: dict[str, Any], batches_per_epoch: int, path: Path) -> None:
    """A resumed run's place in training must be one this run can be at: whole numbers, no
    negative step (it dropped every earlier record) and a step inside its epoch."""
    for key in ("epoch", "global_step", "step_in_epoch"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RunError(f"--resume: {path}: state entry '{key}' must be an int >= 0, got {value!r}")
    if state["step_in_epoch"] > batches_per_epoch:
        raise RunError(
            f"--resume: {path}: state entry 'step_in_epoch' is {state['step_in_epoch']}, but an epoch of this run has "
            f"{batches_per_epoch} steps"
        )


def check_compatible(checkpoint: dict[str, Any], vocab: Vocabulary, model: RVSEPP, path: Path) -> None:
    if checkpoint.get("vocab") != vocab.signature():
        raise RunError(
            f"{path} was trained with another vocabulary "
            f"({len(checkpoint.get('vocab', []))} words, this data has {len(vocab)})"
        )
    if checkpoint.get("model_config") != model.config:
        raise RunError(f"{path} holds a model of another shape: {checkpoint.get('model_config')} vs {model.config}")


def make_writer(args: argparse.Namespace, out: Path) -> Any:
    """A TensorBoard writer, or None (``--tensorboard off``, another rank, or ``auto`` without
    the package; ``on`` without it was refused with the arguments)."""
    if args.tensorboard == "off" or not is_main() or not cli.tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def progress_bar(iterable: Any, description: str, disable: bool) -> Any:
    """A progress bar over an epoch's steps (steps/s and the time left) where a person watches a
    terminal; nothing in a log (output that is no terminal) or on other ranks. Its size is the
    terminal's, or 100 x 24 where the terminal reports none (some consoles report 0 x 0, where a
    bar sized to it, or hidden below its last row, draws nothing at all)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    size = shutil.get_terminal_size((100, 24))
    return tqdm(
        iterable,
        desc=description,
        disable=disable or None,
        leave=False,
        ncols=size.columns,
        nrows=size.lines,
        unit="step",
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (RunError, DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
