"""Does SelHN help? Train RVSE++ with each loss from the same seeds and data order, side by side.

For every seed, the same model initialisation and the same data order are trained with
``--loss hn``, ``sum``, ``warmup`` (VSE-infinity's schedule) and ``selhn``, plus SelHN at each
epsilon of the sweep. Every run records per step the encoders' gradient norms, the vanishing
fraction, the loss, and every ``--eval-steps`` steps the dev rsum. The command writes:

* ``steps.csv``: one row per run and step (the variant in ``loss``, ``epsilon`` and ``seed``, then
  ``loss_value``, gradient norms, vanishing fraction);
* ``dev.csv``: one row per run and dev evaluation;
* ``comparison.png``: gradient norm and vanishing fraction against the step for the four
  losses, dev rsum against the step (means over seeds, shaded min-max);
* ``comparison.md`` (and ``comparison.csv``): the table below, mean +- standard deviation
  over seeds;
* ``runs.csv``: one row per run (the contract scripts rely on; ``inf`` for never, ``nan``
  where a column does not apply): ``loss, epsilon, seed, steps_to_leave_plateau,
  steps_to_10x_chance, best_dev_rsum, test_rsum, test_i2t_r1, test_t2i_r1, test_mean_r1``,
  the other test recalls, ``step_ms``, for ``warmup`` ``switch_step``,
  ``dev_rsum_at_switch`` and ``min_dev_rsum_after_switch``, and the ``commit`` and ``machine``
  that trained the run (``unknown`` for runs older than that record);
* ``per_seed.csv``: the key numbers of every run, one line each (the docs' per-seed tables);
* ``facts.md`` (and ``facts.csv``): whether the facts known from real data (the Results docs page) hold
  in these runs, each with its criterion and its per-seed values: F1-F3, and F4 where a backbone is
  unfrozen (``--losses warmup vse-infinity-full`` on ``calibrated-unfreeze``).

With a backbone (``--backbone``), ``runs.csv`` also gives the step at which it unfreezes, the
longest stretch after it with the vanishing fraction above 50% (``stalled_steps_after_unfreeze``),
the loss there as a share of 2 * B * margin, the steps at which the collapse alarm fired, and
whether it fired during that stretch. ``vse-infinity-full`` (examples/selection_study/presets.py)
is VSE-infinity's whole schedule, run beside the losses.

Table columns: steps until the vanishing fraction (mean of both directions) falls below 10%
after having exceeded 50% (leaving the plateau: "0" if it never entered it, "never" if it
never left it); steps until dev rsum exceeds 10x its chance level; best dev rsum; the test recall
table of the best dev checkpoint; wall time per step.

Finished runs (a ``results.json`` in their folder) are reused when their checkpoint's
arguments are the ones this command asks for (the command refuses, naming the flags that
differ, otherwise); an unfinished one is trained again from its start. ``--jobs N`` trains
N runs at once in worker processes (safe with CUDA; each with ``--threads`` intra-op
threads). A run that fails (a non-finite loss, say) is reported by name once the others have
run, and the command then exits with an error. The
synthetic data live under ``--root`` (default ``data/<preset>``), so presets never overwrite
each other's data.

Run: ``python -m examples.selection_study.compare --preset calibrated --seeds 0 1 2 3 4 --out
runs/calibrated`` (see ``--help``; arguments after ``--`` go to every training run, e.g.
``-- --synthetic-shared 1.0``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from examples.rvsepp import cli
from examples.rvsepp import train as train_module
from examples.rvsepp.evaluate import load_checkpoint
from examples.selection_study.intervals import interval, paired_interval
from examples.selection_study.presets import SCHEDULES, STUDY_PRESETS
from examples.selection_study.rules import RULES, criteria_with, is_user_rule, user_rule

LOSSES = ("hn", "sum", "warmup", "selhn")
SWEEP = (0.001, 0.05, 0.1)  # with the default 0.01 of the selhn run: 0.001, 0.01, 0.05, 0.1


def chance_rsum(n_images: int, per_image: int = 5) -> float:
    """Expected rsum of a random ranking: i2t hits if any of 5 captions is in the top K of 5N,
    t2i if the image is in the top K of N."""
    total = 0.0
    captions = per_image * n_images
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(per_image):
            miss *= max(0.0, (captions - k - j) / (captions - j))
        total += 100 * (1 - miss) + 100 * min(k, n_images) / n_images
    return total


def first_recovery(steps: list[float], vanishing: list[float], enter: float = 0.5, leave: float = 0.1) -> float:
    """First step at which the vanishing fraction falls below ``leave`` after having exceeded
    ``enter`` (the plateau): 0 if it never exceeded ``enter``, inf if it never came back down."""
    entered = False
    for step, value in zip(steps, vanishing, strict=True):
        if value > enter:
            entered = True
        elif entered and value < leave:
            return step
    return math.inf if entered else 0.0


def first_exceeding(steps: list[float], values: list[float], level: float) -> float:
    return next((s for s, v in zip(steps, values, strict=True) if v > level), math.inf)


def train_argv(out: Path, loss: str, seed: int, epsilon: float, args: argparse.Namespace) -> list[str]:
    """The training command line of one run of the comparison. A schedule of
    :data:`~examples.selection_study.presets.SCHEDULES` adds its flags last, so they win."""
    return [
        "--preset",
        args.preset,
        "--root",
        args.root,
        "--out",
        str(out),
        *(["--loss", loss] if loss not in SCHEDULES else []),  # a schedule names its loss
        "--seed",
        str(seed),
        "--epsilon",
        str(epsilon),
        "--eval-steps",
        str(args.eval_steps),
        "--log-every",
        str(args.log_every),
        "--tensorboard",
        "off",
        *(["--max-steps", str(args.steps)] if args.steps else []),
        *args.train_args,
        *SCHEDULES.get(loss, []),
    ]


#: training arguments that do not change what a run computes (where and how it runs)
MACHINE_ONLY = ("out", "resume", "overwrite", "tensorboard", "workers", "device")
#: training arguments that are paths, compared as paths
PATH_ARGUMENTS = ("root",)


def reuse_mismatch(out: Path, argv: list[str], data_copies: tuple[str, ...] = ()) -> str:
    """Why the finished run in ``out`` is not the run ``argv`` asks for ('' when it is): its
    checkpoint's arguments are compared, flag by flag, with ``argv``'s. A run trained on one of
    ``data_copies`` (folders checked to hold --root's data byte for byte) counts as trained on
    --root."""
    wanted = vars(parse_train(argv))
    try:
        stored = train_module.stored_arguments(load_checkpoint(out / "last.pth")["args"])
    except ValueError as error:
        return f"its checkpoint cannot be read ({error})"
    for key in PATH_ARGUMENTS:  # a path as typed or not: data_c and data_c/ are one folder
        for values in (stored, wanted):
            if isinstance(values.get(key), str):
                values[key] = os.path.normpath(values[key])
    if stored.get("root") in {os.path.normpath(copy) for copy in data_copies}:
        stored["root"] = wanted["root"]
    differ = [
        f"--{key.replace('_', '-')} {stored.get(key)!r} (asked: {value!r})"
        for key, value in wanted.items()
        if key not in MACHINE_ONLY and stored.get(key) != value
    ]
    return ", ".join(differ)


def check_reusable(tasks: list[tuple[Path, list[str]]], data_copies: tuple[str, ...] = ()) -> None:
    """Refuse to report finished runs trained with other arguments than this comparison's
    (another margin, preset, data...): their numbers would be reported as this command's."""
    problems = []
    for out, argv in tasks:
        if (out / "results.json").is_file():
            mismatch = reuse_mismatch(out, argv, data_copies)
            if mismatch:
                problems.append(f"  {out}: {mismatch}")
    if problems:
        raise SystemExit(
            "finished runs in --out were trained with other arguments than this comparison asks for:\n"
            + "\n".join(problems)
            + "\nchoose another --out (or delete those runs) to train them with these arguments"
        )


def check_data_copies(root: Path, copies: list[str]) -> tuple[str, ...]:
    """The ``--data-copies`` folders, each checked to hold exactly the files of ``root``, byte
    for byte (two streams that generated the same data each into a folder of its own); a
    folder that differs is refused, naming the first file that does."""

    def files(folder: Path) -> dict[str, str]:
        return {
            str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    if not copies:
        return ()
    if not root.is_dir():
        raise SystemExit(f"--data-copies: --root {root} holds no data to compare them with")
    ours = files(root)
    for copy in copies:
        theirs = files(Path(copy)) if Path(copy).is_dir() else {}
        differ = sorted(set(ours) ^ set(theirs)) or sorted(name for name in ours if ours[name] != theirs[name])
        if differ:
            raise SystemExit(f"--data-copies: {copy} does not hold --root {root}'s data byte for byte ({differ[0]})")
    return tuple(copies)


def parse_train(argv: list[str]) -> argparse.Namespace:
    """A training command line of the study: the pipeline's flags, with the calibrated presets
    and the candidate rules (and a user's rule given as ``--loss module:Class(arguments)``) as
    ``--preset`` and ``--loss`` choices."""
    return train_module.parse_args(argv, STUDY_PRESETS, criteria_of(argv))


def criteria_of(argv: list[str]) -> dict[str, train_module.CriterionFactory]:
    """The study's criteria, with the user's rule that ``argv``'s ``--loss`` names, if any."""
    losses = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--loss"]
    return criteria_with(losses)


def train_if_needed(out: Path, argv: list[str]) -> None:
    """Train one run into ``out`` unless it holds a finished one (a ``results.json``; see
    :func:`check_reusable`). An unfinished one is trained again from its start, through the
    pipeline's ``--overwrite``: its folder lock refuses a run that another process is training
    (a second compare into the same --out), and the old records stay until the new run's first
    checkpoint."""
    if (out / "results.json").is_file():
        return
    if train_module.existing_run(out):  # an unfinished run: its records are partial, so start it again
        argv = [*argv, "--overwrite"]
    start = time.perf_counter()
    train_module.train(parse_train(argv), criteria_of(argv))
    print(f"  {out.name}: {time.perf_counter() - start:.0f} s", flush=True)


#: In a pool worker: set once the command stops (a signal), so that no queued run starts.
_stopping: Any = None


def _train_task(task: tuple[str, list[str]]) -> str:
    """A pool worker's job: one run (errors come back as text, so one bad run stops nothing)."""
    out, argv = task
    if _stopping is not None and _stopping.is_set():  # handed over before the command stopped: not started
        return f"{Path(out).name}: not started (the command was stopped)"
    try:
        train_if_needed(Path(out), argv)
    except SystemExit as error:
        if isinstance(error.code, int) and error.code >= 128:  # stopped by a signal: the whole command stops
            if _stopping is not None:
                _stopping.set()
            raise
        return f"{Path(out).name}: {error}"
    except Exception as error:  # reported by the parent, run by run
        return f"{Path(out).name}: {type(error).__name__}: {error}"
    return ""


def _init_worker(threads: int, stopping: Any) -> None:
    global _stopping
    torch.set_num_threads(threads)
    _stopping = stopping


def train_all(
    tasks: list[tuple[Path, list[str]]], jobs: int = 1, threads: int = 1, data_copies: tuple[str, ...] = ()
) -> list[str]:
    """Train every (out, argv) task not yet finished, ``jobs`` at a time, in the given order.

    With ``jobs`` > 1 the runs go to that many worker processes (``spawn``: safe with CUDA),
    each with ``threads`` intra-op threads. The synthetic data must exist beforehand (see
    :func:`prepare_data`), so that no two workers generate it at once. Returns one message
    per failed run (empty if all finished)."""
    check_reusable(tasks, data_copies)
    todo = [(str(out), argv) for out, argv in tasks if not (out / "results.json").is_file()]
    if jobs <= 1:
        return [message for message in map(_train_task, todo) if message]
    context = multiprocessing.get_context("spawn")
    stopping = context.Event()
    # an executor's workers may start processes of their own (a DataLoader's --workers); a Pool's may not
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads, stopping)) as pool:
        futures = [pool.submit(_train_task, task) for task in todo]
        try:
            return [message for message in (future.result() for future in futures) if message]
        except BaseException:  # Ctrl-C, SIGTERM, a run stopped by a signal: no queued run starts
            stopping.set()  # (the runs already handed to a worker's queue cannot be cancelled: they skip)
            for future in futures:
                future.cancel()
            _stop_workers(pool)
            raise


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to the pool's workers: each saves its run's checkpoint and stops (the pipeline's
    handler), so none trains on after the command has stopped."""
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGTERM)


def prepare_data(argv: list[str]) -> None:
    """Generate (once) the synthetic data and vocabulary a training command line reads."""
    train_module.load_data(parse_train(argv))


def read_run(out: Path) -> dict[str, Any]:
    """A finished run's records: steps, dev evaluations and results. A missing or damaged
    record is refused with the file and line (:class:`TableError`), never read as zeros."""

    def text(name: str) -> str:
        try:
            return (out / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TableError(f"{out / name}: missing from a finished run (delete the run to train it again)") from None
        except UnicodeDecodeError as error:
            raise TableError(f"{out / name}: not UTF-8 text (byte {error.start})") from None

    steps = list(csv.DictReader(text("steps.csv").splitlines()))
    for number, row in enumerate(steps, start=2):
        try:
            float(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            raise TableError(f"{out / 'steps.csv'}, line {number}: no step and loss numbers ({row})") from None
    dev = []
    for number, line in enumerate(text("dev.jsonl").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TableError(f"{out / 'dev.jsonl'}, line {number}: not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("global_step"), int):
            raise TableError(f"{out / 'dev.jsonl'}, line {number}: not a record with an integer global_step")
        dev.append(record)
    try:
        results = json.loads(text("results.json"))
    except json.JSONDecodeError as error:
        raise TableError(f"{out / 'results.json'}: not JSON ({error})") from None
    if not isinstance(results, dict):
        raise TableError(f"{out / 'results.json'}: not a JSON object")
    return {"steps": steps, "dev": dev, "results": results}


#: The facts table's header (facts.md, and facts.csv's first row).
FACTS_HEADER = "| fact | criterion | per seed | mean | 95% interval | holds |"


def label(loss: str, epsilon: float) -> str:
    return f"selhn eps={epsilon:g}" if loss == "selhn" else loss


def run_name(loss: str, epsilon: float, seed: int) -> str:
    """A run's folder name under ``<out>/runs`` (a user's rule ``module:Class(k=5)`` as
    ``module-Class-k=5``)."""
    name = re.sub(r"[^\w.=-]+", "-", label(loss, epsilon).replace(" ", "_")).strip("-")
    return f"{name}_seed{seed}"


def mean_vanishing(rows: list[dict[str, str]]) -> list[float]:
    """Per logged step, the vanishing fraction averaged over the two directions."""
    return [(float(r["i2t/vanishing_fraction"]) + float(r["t2i/vanishing_fraction"])) / 2 for r in rows]


#: the vanishing fraction above which a logged step counts as on the plateau
ON_PLATEAU = 0.5


def longest_stall(steps: list[float], vanishing: list[float], after: float) -> tuple[float, float, float]:
    """The longest stretch of consecutive logged steps after step ``after`` whose vanishing
    fraction exceeds :data:`ON_PLATEAU`: (its length in training steps, first step, last step);
    (0, nan, nan) when there is none. A stretch of one logged step counts the steps since the
    logged step before it."""
    best = (0.0, math.nan, math.nan)
    start: float | None = None
    previous = after
    for step, value in zip(steps, vanishing, strict=True):
        if step <= after:
            previous = step
            continue
        if value > ON_PLATEAU:
            start = previous if start is None else start
            if step - start > best[0]:
                best = (step - start, start, step)
        else:
            start = None
        previous = step
    return best


def run_row(
    loss: str,
    epsilon: float,
    seed: int,
    run: dict[str, Any],
    chance: float,
    switch_step: float,
    unfreeze_step: float = math.nan,
    plateau_loss: float = math.nan,
) -> dict[str, float | str | int]:
    """One run's row of ``runs.csv``. ``unfreeze_step`` is the step at which the backbone starts
    to train (NaN without one); ``plateau_loss`` the loss the plateau reads at this run's scale
    (2 * B * margin for the summed hard negatives; NaN where it is not known)."""
    steps = [float(r["step"]) for r in run["steps"]]
    vanishing = mean_vanishing(run["steps"])
    dev_steps = [float(d["global_step"]) for d in run["dev"]]
    dev_rsum = [float(d["rsum"]) for d in run["dev"]]
    results = run["results"]
    row: dict[str, float | str | int] = {
        "loss": loss,
        "epsilon": epsilon if loss == "selhn" else math.nan,
        "seed": seed,
        "steps_to_leave_plateau": first_recovery(steps, vanishing),
        "steps_to_10x_chance": first_exceeding(dev_steps, dev_rsum, 10 * chance),
        "best_dev_rsum": max(dev_rsum, default=math.nan),
        "final_dev_rsum": dev_rsum[-1] if dev_rsum else math.nan,
        "test_rsum": results.get("test_rsum", math.nan),
    }
    for direction in ("i2t", "t2i"):
        for k in ("r1", "r5", "r10"):
            row[f"test_{direction}_{k}"] = results.get(f"test_{direction}_{k}", math.nan)
    row["test_mean_r1"] = (float(row["test_i2t_r1"]) + float(row["test_t2i_r1"])) / 2
    row["step_ms"] = 1000 * results.get("step_seconds", math.nan)
    at_switch = [r for s, r in zip(dev_steps, dev_rsum, strict=True) if s == switch_step]
    after = [r for s, r in zip(dev_steps, dev_rsum, strict=True) if s > switch_step]
    warm = loss == "warmup" and bool(at_switch)
    row["switch_step"] = switch_step if warm else math.nan
    row["dev_rsum_at_switch"] = at_switch[-1] if warm else math.nan
    row["min_dev_rsum_after_switch"] = min(after) if warm and after else math.nan
    # back on the plateau after the backbone unfreezes: how long, at what loss, and the alarm
    alarms = [float(step) for step in results.get("alarm_steps") or []]
    stalled, first, last = longest_stall(steps, vanishing, unfreeze_step) if math.isfinite(unfreeze_step) else (0, 0, 0)
    losses = [float(r["loss"]) for r, s in zip(run["steps"], steps, strict=True) if stalled and first < s <= last]
    row["unfreeze_step"] = unfreeze_step
    row["stalled_steps_after_unfreeze"] = float(stalled) if math.isfinite(unfreeze_step) else math.nan
    row["stall_loss_share"] = statistics.fmean(losses) / plateau_loss if losses and plateau_loss > 0 else math.nan
    row["alarm_steps"] = " ".join(f"{step:.0f}" for step in alarms)
    row["alarm_in_stall"] = float(any(first < step <= last for step in alarms)) if stalled else math.nan
    row["commit"] = str(results.get("commit") or "unknown")  # runs trained before runs recorded them: unknown
    row["machine"] = str(results.get("machine") or "unknown")
    row["started"] = str(results.get("started") or "unknown")  # UTC; unknown for runs from before they were kept
    row["finished"] = str(results.get("finished") or "unknown")
    return row


RUN_COLUMNS = (
    "loss",
    "epsilon",
    "seed",
    "steps_to_leave_plateau",
    "steps_to_10x_chance",
    "best_dev_rsum",
    "test_rsum",
    "test_i2t_r1",
    "test_t2i_r1",
    "test_mean_r1",
    "final_dev_rsum",
    "test_i2t_r5",
    "test_i2t_r10",
    "test_t2i_r5",
    "test_t2i_r10",
    "step_ms",
    "switch_step",
    "dev_rsum_at_switch",
    "min_dev_rsum_after_switch",
    "unfreeze_step",
    "stalled_steps_after_unfreeze",
    "stall_loss_share",
    "alarm_steps",
    "alarm_in_stall",
    "commit",
    "machine",
    "started",
    "finished",
)
#: the columns of runs.csv that hold text; every other one is a number
TEXT_COLUMNS = ("loss", "alarm_steps", "commit", "machine", "started", "finished")


def write_runs_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with train_module.replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RUN_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, math.nan) for key in RUN_COLUMNS})


PER_SEED = (
    ("loss", "loss"),
    ("seed", "seed"),
    ("steps_to_leave_plateau", "leaves plateau at step"),
    ("steps_to_10x_chance", "dev rsum > 10x chance at step"),
    ("best_dev_rsum", "best dev rsum"),
    ("test_rsum", "test rsum"),
    ("test_i2t_r1", "test i2t R@1"),
    ("test_t2i_r1", "test t2i R@1"),
    ("test_mean_r1", "test mean R@1"),
    ("final_dev_rsum", "last dev rsum"),
    ("stalled_steps_after_unfreeze", "longest run of steps with vanishing > 50% after the unfreeze"),
    ("alarm_steps", "alarm fired at step"),
)
UNFREEZE_COLUMNS = ("stalled_steps_after_unfreeze", "alarm_steps")


def write_per_seed_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Every run's key numbers, one line per run (the docs' per-seed tables): steps as
    integers, "0" for never on the plateau, "never" for never reached."""

    def cell(key: str, row: dict[str, Any]) -> str:
        value = row[key]
        if key == "loss":
            return label(str(value), float(row["epsilon"]) if row["loss"] == "selhn" else 0.01)
        if key in ("seed", "alarm_steps"):
            return str(value) or "-"
        if key == "stalled_steps_after_unfreeze":
            return f"{float(value):.0f}" if math.isfinite(float(value)) else "-"
        if not math.isfinite(float(value)):
            return "never"
        return f"{float(value):.0f}" if key.startswith("steps") else f"{float(value):.1f}"

    # the unfreeze's columns only where a backbone was unfrozen
    unfrozen = any(math.isfinite(float(row.get("unfreeze_step", math.nan))) for row in rows)
    columns = [(key, title) for key, title in PER_SEED if unfrozen or key not in UNFREEZE_COLUMNS]

    order = {loss: i for i, loss in enumerate((*LOSSES, *SCHEDULES, *RULES))}  # then users' rules, by name
    ordered = sorted(
        rows,
        key=lambda r: (
            order.get(r["loss"], len(order)),
            r["loss"],
            float(r["epsilon"]) if r["loss"] == "selhn" else 0,
            r["seed"],
        ),
    )
    with train_module.replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([title for _, title in columns])
        writer.writerows([cell(key, row) for key, _ in columns] for row in ordered)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (loss, epsilon): the table's statistics for every seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["loss"], 0.01 if row["loss"] != "selhn" else row["epsilon"]), []).append(
            {
                "recovery": row["steps_to_leave_plateau"],
                "to_10x": row["steps_to_10x_chance"],
                "best_dev": row["best_dev_rsum"],
                "test": [row[f"test_{d}_{k}"] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")],
                "test_rsum": row["test_rsum"],
                "step_ms": row["step_ms"],
            }
        )
    return [{"loss": loss, "epsilon": epsilon, "seeds": values} for (loss, epsilon), values in groups.items()]


COLLAPSE = 0.5  # warmup "collapses" when a later dev rsum falls below this share of its value at the switch
#: F4: back on the plateau after the unfreeze means this many steps in a row with the vanishing
#: fraction above ON_PLATEAU and the loss at least PLATEAU_LOSS_SHARE of the plateau's 2 * B * margin
STALL_STEPS = 20
PLATEAU_LOSS_SHARE = 0.9


def back_on_plateau(row: dict[str, Any]) -> bool:
    """Whether a run went back to the plateau after its backbone was unfrozen (see STALL_STEPS)."""
    stalled, share = float(row["stalled_steps_after_unfreeze"]), float(row["stall_loss_share"])
    return math.isfinite(stalled) and stalled >= STALL_STEPS and share >= PLATEAU_LOSS_SHARE


def facts(rows: list[dict[str, Any]]) -> str:
    """The facts known from real data (docs: Results), checked on these runs.

    F1 (hard negatives' final accuracy): warmup's test R@1 (mean of i2t and t2i), averaged
    over seeds, exceeds the sum of hinges' by at least 2 points. F2 (the cold-start stall):
    hn's mean test rsum is below a quarter of the sum of hinges'. F3 (the warm-up works):
    warmup's mean test rsum is at least 90% of the sum of hinges', and no seed's dev rsum
    falls after the switch below half its value at the switch. F4 (the mid-training stall,
    where a backbone is fine-tuned): unfreezing the backbone at once, without a ramp, sends
    the warm-up's hard negatives back to the plateau on most seeds (:func:`back_on_plateau`),
    and VSE-infinity's full schedule (``vse-infinity-full``) on fewer than half. Seeds are
    paired by number.
    """

    def by_seed(loss: str) -> dict[int, dict[str, Any]]:
        return {int(r["seed"]): r for r in rows if r["loss"] == loss}

    hn, total, warm = by_seed("hn"), by_seed("sum"), by_seed("warmup")
    lines = [FACTS_HEADER, "|---|---|---|---|---|---|"]

    def line(name: str, criterion: str, values: dict[int, float], mean: float, holds: bool) -> None:
        per_seed = ", ".join(f"{seed}: {value:.1f}" for seed, value in sorted(values.items()))
        spread = interval(list(values.values()))
        bounds = f"[{spread.low:.1f}, {spread.high:.1f}]" if spread.n > 1 else "-"
        lines.append(f"| {name} | {criterion} | {per_seed} | {mean:.1f} | {bounds} | {'yes' if holds else 'no'} |")

    seeds = sorted(set(total) & set(warm))
    if seeds:
        gain = {s: float(warm[s]["test_mean_r1"]) - float(total[s]["test_mean_r1"]) for s in seeds}
        mean = statistics.fmean(gain.values())
        line("F1", "warmup R@1 - sum R@1 >= 2 (mean of i2t, t2i)", gain, mean, mean >= 2.0)
        share, mean_share = percent_of(warm, total, seeds)
        collapsed = [s for s in seeds if collapsed_after_switch(warm[s])]
        line(
            "F3",
            f"warmup rsum >= 90% of sum's (%), no collapse after the switch (collapsed: {collapsed or 'none'})",
            share,
            mean_share,
            mean_share >= 90.0 and not collapsed,
        )
    seeds = sorted(set(total) & set(hn))
    if seeds:
        share, mean_share = percent_of(hn, total, seeds)
        line("F2", "hn rsum < 25% of sum's (%)", share, mean_share, mean_share < 25.0)
    full = by_seed("vse-infinity-full")
    seeds = sorted(set(warm) & set(full))
    if seeds and all(math.isfinite(float(warm[s]["unfreeze_step"])) for s in seeds):
        stalled = {s: float(warm[s]["stalled_steps_after_unfreeze"]) for s in seeds}
        abrupt = [s for s in seeds if back_on_plateau(warm[s])]
        scheduled = [s for s in seeds if back_on_plateau(full[s])]
        line(
            "F4",
            f"after the unfreeze, warmup back on the plateau (vanishing > {ON_PLATEAU:.0%}, loss >= "
            f"{PLATEAU_LOSS_SHARE:.0%} of 2*B*m, >= {STALL_STEPS} steps; per seed: steps) on most seeds "
            f"(on it: {abrupt or 'none'}), vse-infinity-full on fewer than half (on it: {scheduled or 'none'})",
            stalled,
            statistics.fmean(stalled.values()),
            len(abrupt) > len(seeds) / 2 and len(scheduled) < len(seeds) / 2,
        )
    if len(lines) == 2:
        return (
            "No fact can be checked: they need the sum of hinges and hn or warmup (F4: warmup and vse-infinity-full).\n"
        )
    note = (
        "\nThe interval is Student's t over the seeds' values (for F1 the per-seed differences, seeds paired "
        "by number): a fact whose criterion the interval straddles holds on the mean, not beyond doubt.\n"
    )
    return "\n".join(lines) + "\n" + note


def r1_by_label(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per variant label (``selhn eps=...`` for SelHN), per seed: the run's test R@1, mean of
    i2t and t2i."""
    values: dict[str, dict[int, float]] = {}
    for row in rows:
        name = label(str(row["loss"]), float(row.get("epsilon", math.nan)))
        seed = int(row["seed"])
        if seed in values.get(name, {}):
            raise TableError(f"two runs of {name} on seed {seed}: a comparison pairs one run per variant and seed")
        values.setdefault(name, {})[seed] = float(row["test_mean_r1"])
    return values


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Every loss's test R@1 (mean of both directions) against the warm-up's and the sum of
    hinges' (and VSE-infinity's full schedule's, where it ran), as paired differences over the
    seeds both ran, with 95% intervals."""
    runs = r1_by_label(rows)
    references = [name for name in ("warmup", "sum", "vse-infinity-full") if name in runs]
    if not references:
        return ""
    header = "| loss | " + " | ".join(f"- {name}: mean [95% interval] (pairs)" for name in references) + " |"
    lines = ["Paired differences in test R@1 (mean of i2t and t2i), per seed:", "", header]
    lines.append("|---|" + "---|" * len(references))
    for name, values in runs.items():
        cells = []
        for reference in references:
            paired = paired_interval(values, runs[reference])
            cells.append("-" if name == reference else f"{paired} ({paired.n})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def percent_of(
    runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], seeds: list[int]
) -> tuple[dict[int, float], float]:
    """Test rsum as a percentage of the reference's: per seed, and of the means over seeds."""
    per_seed = {s: 100 * float(runs[s]["test_rsum"]) / float(reference[s]["test_rsum"]) for s in seeds}
    means = [statistics.fmean(float(r[s]["test_rsum"]) for s in seeds) for r in (runs, reference)]
    return per_seed, 100 * means[0] / means[1]


def collapsed_after_switch(row: dict[str, Any]) -> bool:
    """Whether a warmup run's dev rsum fell, after the switch, below half its value there."""
    at, low = float(row["dev_rsum_at_switch"]), float(row["min_dev_rsum_after_switch"])
    return math.isfinite(at) and math.isfinite(low) and low < COLLAPSE * at


def fmt(values: list[float], digits: int = 1) -> str:
    finite = [v for v in values if math.isfinite(v)]
    never = len(values) - len(finite)
    if not finite:
        return "never"
    mean = statistics.fmean(finite)
    spread = f" +- {statistics.stdev(finite):.{digits}f}" if len(finite) > 1 else ""
    return f"{mean:.{digits}f}{spread}" + (f" ({never} never)" if never else "")


def markdown(rows: list[dict[str, Any]], chance: float, seeds: list[int], steps: int | None) -> str:
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (mean +- standard deviation over seeds); "
        f"steps per run: {steps or 'all'}; "
        f"dev chance rsum {chance:.1f}, so 10x chance = {10 * chance:.1f}.",
        "",
        "| loss | steps until vanishing < 10% after > 50% | steps until dev rsum > 10x chance | best dev rsum "
        "| test i2t R1 / R5 / R10 | test t2i R1 / R5 / R10 | test rsum | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds_ = row["seeds"]
        test = [fmt([s["test"][i] for s in seeds_]) for i in range(6)]
        lines.append(
            f"| {label(row['loss'], row['epsilon'])} | {fmt([s['recovery'] for s in seeds_], 0)} "
            f"| {fmt([s['to_10x'] for s in seeds_], 0)} | {fmt([s['best_dev'] for s in seeds_])} "
            f"| {' / '.join(test[:3])} | {' / '.join(test[3:])} | {fmt([s['test_rsum'] for s in seeds_])} "
            f"| {fmt([s['step_ms'] for s in seeds_], 0)} |"
        )
    return "\n".join(lines) + "\n"


def write_table_csv(path: Path, table: str) -> None:
    """The markdown table's rows as CSV (for the docs' csv-table)."""
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    with train_module.replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows([cell.strip() for cell in row] for row in rows)


def write_csvs(out: Path, runs: dict[tuple[str, float, int], dict[str, Any]]) -> None:
    with train_module.replacing(out / "steps.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = None
        for (loss, epsilon, seed), run in runs.items():
            for row in run["steps"]:
                # the run's own "loss" column is the loss value; "loss" here names the variant
                values = {("loss_value" if key == "loss" else key): value for key, value in row.items()}
                record = {"loss": loss, "epsilon": epsilon, "seed": seed, **values}
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(record))
                    writer.writeheader()
                writer.writerow(record)
    with train_module.replacing(out / "dev.csv") as tmp, open(tmp, "w", newline="") as handle:
        fields = ["loss", "epsilon", "seed", "global_step", "rsum", "i2t_r1", "t2i_r1"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for (loss, epsilon, seed), run in runs.items():
            for d in run["dev"]:
                writer.writerow({"loss": loss, "epsilon": epsilon, "seed": seed, **{k: d[k] for k in fields[3:]}})


def plot(
    out: Path,
    runs: dict[tuple[str, float, int], dict[str, Any]],
    chance: float,
    title: str,
    epsilons: Sequence[float] = (0.01,),
) -> list[str]:
    """comparison.png: means over seeds (shaded min-max) of every variant, SelHN at ``epsilons``.
    Returns the legend's names of the variants drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # three stacked panels, sized to stay readable at a documentation page's width (~750 px)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig, axes = plt.subplots(3, 1, figsize=(8, 10.5), sharex=True)
        drawn: list[str] = []
        variants: list[tuple[str, float]] = []  # (loss, epsilon): SelHN once per epsilon drawn
        users = sorted({name for name, _, _ in runs if is_user_rule(name)})
        for loss in (*LOSSES, *SCHEDULES, *RULES, *users):
            if loss == "selhn":
                variants += [("selhn", epsilon) for epsilon in epsilons]
            else:
                variants.append((loss, 0.01))
        for loss, wanted in variants:
            seeds = [
                run
                for (name, epsilon, _), run in runs.items()
                if name == loss and (loss != "selhn" or math.isclose(epsilon, wanted))
            ]
            if not seeds:
                continue
            name = label(loss, wanted) if len(epsilons) > 1 else loss
            drawn.append(name)
            length = min(len(run["steps"]) for run in seeds)
            steps = [float(r["step"]) for r in seeds[0]["steps"][:length]]
            for ax, key in ((axes[0], "grad"), (axes[1], "vanishing")):
                series = []
                for run in seeds:
                    rows = run["steps"][:length]
                    if key == "grad":
                        series.append([float(r["image_grad_norm"]) + float(r["text_grad_norm"]) for r in rows])
                    else:
                        series.append(mean_vanishing(rows))
                mean = [statistics.fmean(v) for v in zip(*series, strict=True)]
                (line,) = ax.plot(steps, mean, label=name, lw=1.2)
                low = [min(v) for v in zip(*series, strict=True)]
                high = [max(v) for v in zip(*series, strict=True)]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
            dev_steps = [float(d["global_step"]) for d in seeds[0]["dev"]]
            dev_len = min(len(run["dev"]) for run in seeds)
            rsum = [[float(d["rsum"]) for d in run["dev"][:dev_len]] for run in seeds]
            axes[2].plot(
                dev_steps[:dev_len], [statistics.fmean(v) for v in zip(*rsum, strict=True)], marker=".", label=name
            )
        axes[2].axhline(10 * chance, color="grey", ls=":", lw=1, label="10x chance")
        axes[0].set(yscale="log", ylabel="|grad img enc| + |grad txt enc|", title="encoder gradient norm")
        axes[1].set(
            ylabel="share of anchors",
            title="vanishing fraction (|gap| < epsilon: 0.01, SelHN at its own)",
            ylim=(-0.02, 1.02),
        )
        axes[2].set(xlabel="training step", ylabel="dev rsum", title="dev rsum")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        fig.suptitle(title, fontsize=11, wrap=True)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=100)
        plt.close(fig)
    return drawn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.selection_study.compare",
        description=__doc__.split("\n\n")[0],
        epilog="Writes into --out: runs/<variant>_seed<seed>/ (each run's folder), runs.csv (one row per run), "
        "per_seed.csv, comparison.md and .csv (mean +- sd over seeds), facts.md and .csv (the known facts "
        "checked, with 95% intervals), paired.csv (every variant's paired test R@1 differences), steps.csv and "
        "dev.csv (every run's records), comparison.png. Finished runs are reused when their arguments match.",
        formatter_class=cli.HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", default="runs/compare", help="folder of the runs and the tables")
    parser.add_argument("--root", default=None, help="data folder (default: data/<preset>)")
    parser.add_argument(
        "--preset",
        choices=list(STUDY_PRESETS),
        default="cpu",
        help="the training preset (python -m examples.rvsepp.train --help lists the pipeline's; calibrated, "
        "calibrated-stall and calibrated-unfreeze are the benchmark's, in examples/selection_study/presets.py)",
    )
    parser.add_argument("--seeds", type=cli.seed, nargs="+", default=[0, 1, 2], help="seeds of the runs")
    parser.add_argument(
        "--losses",
        nargs="+",
        default=list(LOSSES),
        metavar="LOSS",
        help="the variants: the losses hn (max violation), sum (sum of hinges), warmup (the sum of hinges for an "
        "epoch, then hn) and selhn (at 0.01 and each --epsilons); the schedules vse-infinity-full and selhn-staged; "
        f"the rule study's candidate rules ({', '.join(RULES)}); and rules of your own, written "
        "module:Class(arguments) with the module on PYTHONPATH and the arguments Python literals "
        "(e.g. my_rules:TopK(k=5))",
    )
    parser.add_argument(
        "--epsilons", type=cli.number_at_least(0.0), nargs="*", default=list(SWEEP), help="extra SelHN epsilons"
    )
    parser.add_argument(
        "--default-epsilon",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with selhn in --losses, also run SelHN at the authors' epsilon 0.01 (--no-default-epsilon: only at "
        "--epsilons)",
    )
    parser.add_argument(
        "--plot-epsilons",
        type=cli.number_at_least(0.0),
        nargs="+",
        default=[0.01],
        help="SelHN epsilons drawn in comparison.png (default: the authors' 0.01 only)",
    )
    parser.add_argument(
        "--sweep-seeds", type=cli.seed, nargs="*", default=None, help="seeds of the sweep (when not given: --seeds)"
    )
    parser.add_argument(
        "--steps", type=cli.integer_at_least(0), default=0, help="steps per run (0: the preset's epochs)"
    )
    parser.add_argument(
        "--eval-steps", type=cli.integer_at_least(1), default=25, help="evaluate dev every this many steps"
    )
    parser.add_argument(
        "--log-every", type=cli.integer_at_least(1), default=5, help="record the monitor every this many steps"
    )
    parser.add_argument(
        "--jobs", type=cli.integer_at_least(1), default=1, help="runs trained at once, in worker processes"
    )
    parser.add_argument(
        "--threads", type=cli.integer_at_least(1), default=1, help="intra-op threads of each worker (with --jobs > 1)"
    )
    parser.add_argument(
        "--from-runs",
        default=None,
        help="write facts.md, facts.csv and paired.csv into --out from this runs.csv, training nothing",
    )
    parser.add_argument(
        "--data-copies",
        nargs="+",
        default=[],
        metavar="DIR",
        help="other folders holding --root's data byte for byte (checked): finished runs trained on them are "
        "reused as if trained on --root (two streams that each generated the same data)",
    )
    parser.add_argument("train_args", nargs="*", help="after --: arguments for every training run")
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = str(Path("data") / args.preset)
    check_train_args(parser, args)
    check_losses(parser, args.losses)
    labels = [label("selhn", epsilon) for epsilon in args.epsilons]
    twins = sorted({name for name in labels if labels.count(name) > 1})
    if twins:
        parser.error(f"--epsilons: {', '.join(twins)} given twice (epsilons that print alike share one run folder)")
    staged = [name for name in args.losses if name in SCHEDULES]
    if staged and args.from_runs is None and not parse_train(["--preset", args.preset, *args.train_args]).backbone:
        parser.error(
            f"--losses {' '.join(staged)}: a backbone schedule needs a preset with a backbone (calibrated-unfreeze) "
            f"or --backbone; on --preset {args.preset} it would train the warm-up under another name"
        )
    if args.from_runs is None:
        check_plotting(parser)
    return args


def check_losses(parser: argparse.ArgumentParser, losses: list[str]) -> None:
    """Every ``--losses`` entry names a loss, a schedule, a candidate rule or a user's rule that
    imports and builds (``module:Class(arguments)``); a duplicate, or two user rules that share a
    run folder, is refused."""
    known = (*LOSSES, *SCHEDULES, *RULES)
    for name in losses:
        if name in known:
            continue
        if not is_user_rule(name):
            parser.error(
                f"--losses: unknown {name!r}: choose from {', '.join(known)}, or give a rule of your own as "
                "module:Class(arguments)"
            )
        try:
            user_rule(name)
        except ValueError as error:
            parser.error(f"--losses: {error}")
    folders = [run_name(name, 0.01, 0) for name in losses]
    twins = sorted({name for name, folder in zip(losses, folders, strict=True) if folders.count(folder) > 1})
    if twins:
        parser.error(f"--losses: {', '.join(twins)} would share one run folder (given twice, or alike once spelled)")


#: The training flags the comparison sets for every run itself: after ``--`` they would override
#: a variant's own (``--losses hn -- --loss sum`` trained the sum and reported it as hn).
PER_RUN_FLAGS = {
    "--loss": "--losses",
    "--epsilon": "--epsilons",
    "--seed": "--seeds",
    "--out": "--out",
    "--root": "--root",
    "--preset": "--preset",
    "--eval-steps": "--eval-steps",
    "--log-every": "--log-every",
    "--max-steps": "--steps",
    "--tensorboard": "(off in every run)",
    "--resume": "(finished runs are reused, unfinished ones trained again)",
    "--overwrite": "(finished runs are reused, unfinished ones trained again)",
}


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, after ``--``, a flag the comparison sets per run. (A named schedule's own flags
    still win over those after ``--`` for its runs: ``--`` sets the other variants' schedule.)"""
    given = {token.split("=", 1)[0] for token in args.train_args if token.startswith("--")}
    for flag in sorted(given & set(PER_RUN_FLAGS)):
        parser.error(f"{flag} after --: the comparison sets it for every run; use {PER_RUN_FLAGS[flag]} instead")


def check_plotting(parser: argparse.ArgumentParser) -> None:
    """comparison.png needs matplotlib: refuse at the start, not after hours of training."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("comparison.png needs matplotlib: pip install matplotlib (or selhn's examples extra)")


def plan(args: argparse.Namespace) -> dict[tuple[str, float, int], Path]:
    """Every run of the comparison: (loss, epsilon, seed) -> its folder, in training order."""
    keys = [
        (loss, 0.01, seed) for seed in args.seeds for loss in args.losses if loss != "selhn" or args.default_epsilon
    ]
    if "selhn" in args.losses:
        keys += [("selhn", eps, seed) for seed in (args.sweep_seeds or args.seeds) for eps in args.epsilons]
    return {key: Path(args.out) / "runs" / run_name(*key) for key in keys}


def write_facts(out: Path, rows: list[dict[str, Any]]) -> str:
    """facts.md (the facts' check, then every loss's paired differences), facts.csv and
    paired.csv; returns facts.md's text. Where no fact can be checked, facts.csv holds its
    header alone."""
    checked, paired = facts(rows), paired_table(rows)
    train_module.write_atomic(out / "facts.md", checked + "\n" + paired)
    write_table_csv(out / "facts.csv", checked if FACTS_HEADER in checked else FACTS_HEADER)
    write_table_csv(out / "paired.csv", paired)
    return checked + "\n" + paired


def unfreeze_and_plateau(run_args: argparse.Namespace, loss: str, steps_per_epoch: int) -> tuple[float, float]:
    """A run's unfreezing step (NaN without --backbone) and the loss its hard negatives read on
    the plateau: 2 * B * margin at VSE++'s summed scale (NaN for the sum of hinges, and at the
    mean scale)."""
    unfreeze = float(run_args.embedding_warmup_epochs * steps_per_epoch) if run_args.backbone else math.nan
    summed = train_module.reduction_of(run_args, "mean" if run_args.loss == "selhn" else "sum") == "sum"
    plateau = 2 * run_args.batch_size * run_args.margin if summed and loss != "sum" else math.nan
    return unfreeze, plateau


class TableError(ValueError):
    """A runs.csv, or a finished run's records, that cannot be read as they are: the message
    names the file (and the line) and what is wrong."""


#: The columns every verdict and table reads from a runs.csv (and ``epsilon`` where SelHN ran).
REQUIRED_COLUMNS = ("loss", "seed", "test_mean_r1")


def read_runs_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a runs.csv that compare wrote (numbers as floats; the loss, commit and
    machine as text). A missing or damaged file, a missing column, a cell that is no number and
    two rows of one variant and seed are refused (:class:`TableError`), never read as zeros or
    collapsed into one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TableError(f"{path}: no such file (compare writes runs.csv into its --out)") from None
    except IsADirectoryError:
        raise TableError(f"{path}: a folder, not a runs.csv") from None
    except UnicodeDecodeError as error:
        raise TableError(f"{path}: not UTF-8 text (byte {error.start})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise TableError(f"{path}: no column {', '.join(missing)} (it has: {', '.join(reader.fieldnames or [])})")
    rows = []
    seen: dict[tuple[str, int], int] = {}
    for row in reader:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if key in TEXT_COLUMNS or key is None:
                parsed[key] = value
                continue
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                raise TableError(
                    f"{path}, line {reader.line_num}: column {key} holds {value!r}, not a number"
                ) from None
        if "epsilon" not in parsed:
            if parsed["loss"] == "selhn":
                raise TableError(f"{path}, line {reader.line_num}: a SelHN run, but the file has no epsilon column")
            parsed["epsilon"] = math.nan
        if not math.isfinite(parsed["seed"]) or parsed["seed"] != int(parsed["seed"]):
            raise TableError(f"{path}, line {reader.line_num}: seed {parsed['seed']!r} is no whole number")
        key_ = (label(str(parsed["loss"]), parsed["epsilon"]), int(parsed["seed"]))
        if key_ in seen:
            raise TableError(
                f"{path}, lines {seen[key_]} and {reader.line_num}: two rows of {key_[0]} on seed {key_[1]}; a verdict "
                "pairs one run per variant and seed"
            )
        seen[key_] = reader.line_num
        rows.append(parsed)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _terminated)  # stop the workers too, not only this process
    try:
        run_comparison(args)
    except (TableError, train_module.RunError) as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_comparison(args: argparse.Namespace) -> None:
    """The command: train what is missing, then write the tables (see the module docs)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_runs is not None:  # the tables of a finished comparison, from its runs.csv alone
        print(write_facts(out, read_runs_csv(Path(args.from_runs))))
        return
    folders = plan(args)
    tasks = [(folder, train_argv(folder, loss, seed, eps, args)) for (loss, eps, seed), folder in folders.items()]
    copies = check_data_copies(Path(args.root), args.data_copies)
    check_reusable(tasks, copies)  # before the data: a refused command changes nothing on disk
    if tasks:  # once, before any worker starts (and for the tables, if every run was trained elsewhere)
        prepare_data(tasks[0][1])
    failed = train_all(tasks, args.jobs, args.threads, copies)
    if failed:
        raise SystemExit("runs that failed:\n" + "\n".join(failed))
    runs = {key: read_run(folder) for key, folder in folders.items()}
    train_args = parse_train(["--preset", args.preset, "--root", args.root, *args.train_args])
    folder = Path(args.root) / f"{train_args.name}_precomp"
    dev_captions = (folder / "dev_caps.txt").read_text().splitlines()
    chance = chance_rsum(min(len(dev_captions), 5000) // 5)
    train_captions = len((folder / "train_caps.txt").read_text().splitlines())
    steps_per_epoch = train_captions // train_args.batch_size
    switch_step = float(train_args.warmup_epochs * steps_per_epoch)
    argvs = dict(zip(folders, (argv for _, argv in tasks), strict=True))
    rows = []
    for key, run in runs.items():
        unfreeze_step, plateau_loss = unfreeze_and_plateau(parse_train(argvs[key]), key[0], steps_per_epoch)
        rows.append(run_row(*key, run, chance, switch_step, unfreeze_step, plateau_loss))
    write_runs_csv(out / "runs.csv", rows)
    write_per_seed_csv(out / "per_seed.csv", rows)
    write_csvs(out, runs)
    table = markdown(summarise(rows), chance, args.seeds, args.steps)
    train_module.write_atomic(out / "comparison.md", table)
    write_table_csv(out / "comparison.csv", table)
    checked = write_facts(out, rows)
    title = f"RVSE++, preset {args.preset} {' '.join(args.train_args)}".strip()
    drawn = plot(out, runs, chance, title, epsilons=args.plot_epsilons)
    if len(args.plot_epsilons) > 1:  # each epsilon under its own name: say which had no runs to draw
        missing = [epsilon for epsilon in args.plot_epsilons if label("selhn", epsilon) not in drawn]
        if missing:
            print(f"comparison.png: no SelHN runs at epsilon {', '.join(f'{e:g}' for e in missing)} to draw")
    print(table)
    print(checked)
    print(
        f"wrote {out / 'runs.csv'}, {out / 'comparison.md'}, {out / 'facts.md'}, {out / 'comparison.png'}, "
        f"{out / 'steps.csv'}, {out / 'dev.csv'}"
    )


if __name__ == "__main__":
    main()
