"""The confirmation of epsilon on fresh seeds: the decision rule, written before the runs.

``benchmarks/confirm_epsilon.sh`` trains, on seeds never used before, the sum of hinges, the
one-epoch warm-up and SelHN at epsilon 0.01, 0.05 and 0.1 on the ``calibrated`` and
``calibrated-stall`` presets. This module turns the two ``runs.csv`` files into the verdict, by
a rule fixed in ``docs/_results/confirmation/PROTOCOL.txt`` before any of those runs:

* the measure is the test R@1 (mean of i2t and t2i) of the best dev checkpoint, compared per
  seed (paired), with the 95% Student-t interval of the differences
  (:mod:`examples.selection_study.intervals`);
* a difference *beats* when its interval lies above 0, is *worse* when it lies below 0, is
  *not worse* when its lower end is above -:data:`NON_INFERIORITY` (one R@1 point), and is
  *undecided* otherwise;
* SelHN at an epsilon is advised over the warm-up schedule when it is not worse than the
  warm-up on both presets (among several, the one with the larger mean difference over the
  two presets); with none, the warm-up schedule stays the advice for a cold start;
* users are told to pass an epsilon instead of the authors' 0.01 when it beats SelHN at 0.01
  on one preset and is not worse on the other; ``SelHNLoss``'s default stays 0.01 whatever
  the verdict;
* a preset with fewer than :data:`SEEDS_NEEDED` complete seeds (all five variants finished)
  gives no verdict: its table is reported as incomplete and no advice changes on its basis.

Run: ``python -m examples.selection_study.confirm runs/confirmation`` (writes ``verdict.md``
and ``verdict.csv`` there, from ``<folder>/<preset>/runs.csv``).

The unfreeze comparison (``docs/_results/unfreeze/PROTOCOL.txt``, fixed before its runs) is
decided here too, by the same grades: SelHN at each epsilon, with no schedule, against
VSE-infinity's full schedule (``vse-infinity-full``) on the ``calibrated-unfreeze`` preset; it
*matches* the schedule when it is not worse by the rule above, and a verdict needs
:data:`UNFREEZE_SEEDS_NEEDED` seeds on which both ran. Run:
``python -m examples.selection_study.confirm --unfreeze runs/unfreeze`` (reads that folder's
``runs.csv``).

The swap's configuration (``docs/_results/swap/PROTOCOL.txt``, fixed before its runs): SelHN
at epsilon 0.05 against the warm-up, both at VSE++'s summed loss scale with gradient clipping at
2.0 (what the swap guides' patches install), on ``calibrated`` and ``calibrated-stall``; graded
by the same rule, :data:`SEEDS_NEEDED` complete pairs per preset or no verdict, each grade given
with its leave-one-seed-out stability and the seeds "beats" would need at the observed spread.
Run: ``python -m examples.selection_study.confirm --swap runs/swap`` (reads
``<folder>/<preset>/runs.csv``).

The unfreeze at the settings users run (``docs/_results/unfreeze_settings/PROTOCOL.txt``, fixed
before its runs): on ``calibrated-unfreeze`` at backbone factor 0.01 (VSE-infinity's) and 1
(VSE++'s finetuning), summed and clipped at 2.0, SelHN at 0.05 with no schedule against
``vse-infinity-full`` and the warm-up at the same factor (5 seeds each); at the preset's factor
10, against ``vse-infinity-full`` on 8 fresh seeds. Same grades, with the stability; a part
without all its seeds is a pilot. Run: ``python -m examples.selection_study.confirm --settings
runs/unfreeze_settings`` (reads ``<folder>/<part>/runs.csv``).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from examples.rvsepp import cli
from examples.rvsepp import train as train_module
from examples.selection_study.compare import TableError, back_on_plateau, label, r1_by_label, read_runs_csv
from examples.selection_study.intervals import (
    PairedInterval,
    leave_one_out,
    paired_interval,
    seeds_to_exclude_zero,
)

PRESETS = ("calibrated", "calibrated-stall")
EPSILONS = (0.01, 0.05, 0.1)
#: every variant a seed needs before it counts (the labels compare gives them)
VARIANTS = ("sum", "warmup", *(label("selhn", epsilon) for epsilon in EPSILONS))
#: complete seeds a preset needs for a verdict
SEEDS_NEEDED = 8
#: how far below the reference (R@1 points) a lower interval end may lie for "not worse"
NON_INFERIORITY = 1.0
#: the unfreeze comparison: its reference, and the seeds a verdict needs
UNFREEZE_REFERENCE = "vse-infinity-full"
UNFREEZE_SEEDS_NEEDED = 5
#: SelHN variants of the unfreeze comparison that run a schedule (compare's SCHEDULES), and how
#: the verdict names it; SelHN at an epsilon ("selhn eps=...") runs with no schedule
UNFREEZE_SELHN_SCHEDULES = {"selhn-staged": "with VSE-infinity's backbone staging and ramp"}


def grade(difference: PairedInterval) -> str:
    """beats / worse / not worse / undecided, by where the interval lies (see the module's rules)."""
    if difference.n < 2:
        return "undecided"
    if difference.low > 0:
        return "beats"
    if difference.high < 0:
        return "worse"
    if difference.low > -NON_INFERIORITY:
        return "not worse"
    return "undecided"


def r1_by_variant(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per variant label, per seed: test R@1 (mean of i2t and t2i), kept only for the seeds on
    which every variant finished (complete pairs)."""
    values = r1_by_label(rows)
    complete = set.intersection(*(set(values.get(name, {})) for name in VARIANTS))
    return {name: {s: v for s, v in values.get(name, {}).items() if s in complete} for name in VARIANTS}


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every SelHN epsilon against the warm-up, the sum of hinges and SelHN at 0.01, graded."""
    values = r1_by_variant(rows)
    lines = []
    for epsilon in EPSILONS:
        name = label("selhn", epsilon)
        for reference in ("warmup", "sum", label("selhn", 0.01)):
            if reference == name:
                continue
            difference = paired_interval(values[name], values[reference])
            lines.append(
                {"variant": name, "reference": reference, "difference": difference, "grade": grade(difference)}
            )
    return lines


def verdict(rows_by_preset: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The protocol's verdict: its sentences, and the graded comparisons of every preset."""
    table: list[dict[str, Any]] = []
    complete: dict[str, int] = {}
    for preset in PRESETS:
        rows = rows_by_preset.get(preset, [])
        values = r1_by_variant(rows) if rows else {name: {} for name in VARIANTS}
        complete[preset] = len(values["warmup"])
        table += [{"preset": preset, **line} for line in comparisons(rows)] if rows else []
    missing = [
        f"{preset} ({complete[preset]} of {SEEDS_NEEDED})" for preset in PRESETS if complete[preset] < SEEDS_NEEDED
    ]
    if missing:
        sentence = (
            f"No verdict: too few complete seeds on {', '.join(missing)}. The tables are reported as incomplete, "
            "and no advice changes on their basis."
        )
        return [sentence], table

    def graded(variant: str, reference: str) -> dict[str, dict[str, Any]]:
        return {line["preset"]: line for line in table if line["variant"] == variant and line["reference"] == reference}

    sentences = []
    candidates = []
    for epsilon in EPSILONS:
        name = label("selhn", epsilon)
        against_warmup = graded(name, "warmup")
        if all(against_warmup[p]["grade"] in ("beats", "not worse") for p in PRESETS):
            mean = sum(against_warmup[p]["difference"].mean for p in PRESETS) / len(PRESETS)
            candidates.append((mean, epsilon))
    if candidates:
        best = max(candidates)[1]
        sentences.append(f"Cold start: SelHN at epsilon {best:g} is not worse than the warm-up on both presets.")
    else:
        sentences.append("Cold start: no epsilon is not worse than the warm-up on both presets: the warm-up stays.")
    advised = []
    for epsilon in EPSILONS[1:]:
        against_default = graded(label("selhn", epsilon), label("selhn", 0.01))
        grades = sorted(against_default[p]["grade"] for p in PRESETS)
        if grades in (["beats", "beats"], ["beats", "not worse"]):
            advised.append(epsilon)
    if advised:
        sentences.append(
            "Epsilon: pass " + " or ".join(f"{e:g}" for e in advised) + " instead of the authors' 0.01 "
            "(it beats 0.01 on one preset and is not worse on the other); the default stays 0.01."
        )
    else:
        sentences.append("Epsilon: no other value beats 0.01 by the rule; the default 0.01 stays the advice.")
    return sentences, table


def unfreeze_verdict(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The unfreeze comparison's verdict: per SelHN epsilon in ``rows`` (a ``runs.csv`` of
    ``compare --preset calibrated-unfreeze``), its paired difference to the full schedule, graded
    (``not worse`` reads "matches"), and one sentence each; with fewer than
    :data:`UNFREEZE_SEEDS_NEEDED` pairs the sentence says the runs are a pilot, with no verdict."""
    values = r1_by_label(rows)
    if UNFREEZE_REFERENCE not in values:
        raise TableError(f"the unfreeze comparison needs {UNFREEZE_REFERENCE} runs; runs.csv has {sorted(values)}")
    words = {"beats": "beats", "not worse": "matches", "worse": "is worse than", "undecided": "is undecided against"}
    sentences: list[str] = []
    table: list[dict[str, Any]] = []
    graded_names = sorted(v for v in values if v.startswith("selhn eps=")) + [
        v for v in UNFREEZE_SELHN_SCHEDULES if v in values
    ]
    for name in graded_names:
        schedule = UNFREEZE_SELHN_SCHEDULES.get(name, "with no schedule")
        difference = paired_interval(values[name], values[UNFREEZE_REFERENCE])
        graded = grade(difference)
        table.append(
            {
                "variant": name,
                "reference": UNFREEZE_REFERENCE,
                "difference": difference,
                "grade": "matches" if graded == "not worse" else graded,
            }
        )
        if difference.n < UNFREEZE_SEEDS_NEEDED:
            sentences.append(
                f"{name}: a pilot ({difference.n} of {UNFREEZE_SEEDS_NEEDED} seeds), no verdict; "
                f"minus {UNFREEZE_REFERENCE}: {difference}."
            )
        else:
            sentences.append(
                f"{name}, {schedule}, {words[graded]} {UNFREEZE_REFERENCE} ({difference}, {difference.n} seeds)."
            )
    return sentences, table


#: the swap's configuration: SelHN's epsilon there, and its reference (both at the summed scale)
SWAP_EPSILON = 0.05
SWAP_REFERENCE = "warmup"


def stability(a: dict[int, float], b: dict[int, float]) -> str:
    """A verdict's leave-one-seed-out stability (the grade with each seed left out, counted) and
    how many seeds an interval on one side of 0 would need at the observed mean and spread."""
    grades = [grade(rest) for rest in leave_one_out(a, b).values()]
    counted = ", ".join(f"{name} {grades.count(name)}" for name in ("beats", "not worse", "undecided", "worse"))
    difference = paired_interval(a, b)
    needed = seeds_to_exclude_zero(difference)
    side = "beats" if difference.mean > 0 else "worse"
    planning = f'"{side}" would need about {needed} seeds' if needed else "no number of seeds gives a side"
    return f"with one seed left out: {counted} of {len(grades)}; at this mean and spread {planning}"


def swap_verdict(rows_by_preset: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The swap configuration's verdict: per preset, SelHN at :data:`SWAP_EPSILON` minus the
    warm-up (both summed, clipped at 2.0), graded, with its stability; no verdict on a preset
    with fewer than :data:`SEEDS_NEEDED` complete pairs."""
    name = label("selhn", SWAP_EPSILON)
    sentences: list[str] = []
    table: list[dict[str, Any]] = []
    for preset in PRESETS:
        values = r1_by_label(rows_by_preset.get(preset, []))
        selhn_values, reference = values.get(name, {}), values.get(SWAP_REFERENCE, {})
        difference = paired_interval(selhn_values, reference)
        complete = difference.n >= SEEDS_NEEDED
        graded = grade(difference)
        table.append(
            {
                "preset": preset,
                "variant": name,
                "reference": SWAP_REFERENCE,
                "difference": difference,
                "grade": graded if complete else "no verdict",
            }
        )
        if not complete:
            sentences.append(f"{preset}: no verdict ({difference.n} of {SEEDS_NEEDED} complete pairs): {difference}.")
            continue
        sentences.append(
            f"{preset}: SelHN at {SWAP_EPSILON:g} minus the warm-up, both summed and clipped at 2.0: {difference}, "
            f"{graded} ({stability(selhn_values, reference)})."
        )
    grades = [line["grade"] for line in table]
    if "no verdict" in grades:
        sentences.append("No verdict on the swap's configuration: the patches and the advice stay as they are.")
    elif all(g in ("beats", "not worse") for g in grades):
        sentences.append(
            f"In the swap's configuration SelHN at {SWAP_EPSILON:g} is not worse than the warm-up on both presets: "
            "the patches keep it."
        )
    elif "worse" in grades:
        sentences.append(
            f"In the swap's configuration SelHN at {SWAP_EPSILON:g} is worse than the warm-up on a preset: the patches "
            "and the advice follow this measurement, not the mean scale's."
        )
    else:
        sentences.append(
            f"In the swap's configuration SelHN at {SWAP_EPSILON:g} is undecided against the warm-up on a preset: "
            "the advice says so beside the patches."
        )
    return sentences, table


def write_swap_verdict(folder: Path) -> str:
    """verdict.md and verdict.csv in ``folder``, from ``folder/<preset>/runs.csv`` (the swap's configuration)."""
    sentences, table = swap_verdict(preset_runs(folder))
    return write_tables(folder, sentences, table)


#: The unfreeze at the settings users run (docs/_results/unfreeze_settings/PROTOCOL.txt): per part,
#: how it ran, the seeds a verdict needs, and what SelHN at 0.05 is graded against.
SETTINGS_PARTS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "factor-0.01": (
        "backbone factor 0.01 (VSE-infinity's), summed, clipped at 2.0",
        5,
        ("vse-infinity-full", "warmup"),
    ),
    "factor-1": ("backbone factor 1 (VSE++'s finetuning), summed, clipped at 2.0", 5, ("vse-infinity-full", "warmup")),
    "factor-10": ("backbone factor 10 (the preset's), fresh seeds 40-47", 8, ("vse-infinity-full",)),
}


def settings_verdict(rows_by_part: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The unfreeze at the settings users run: per part, SelHN at 0.05 (no schedule) minus each
    reference at the same factor, graded by the unfreeze comparison's rule ("matches" for not
    worse), with its stability; a part without all its seeds is a pilot, with no verdict. Each
    part's sentence also says on how many seeds the warm-up went back to the plateau."""
    name = label("selhn", SWAP_EPSILON)
    words = {"beats": "beats", "not worse": "matches", "worse": "is worse than", "undecided": "is undecided against"}
    sentences: list[str] = []
    table: list[dict[str, Any]] = []
    for part, (conditions, needed, references) in SETTINGS_PARTS.items():
        rows = rows_by_part.get(part)
        if rows is None:
            sentences.append(f"{part} ({conditions}): not run.")
            continue
        values = r1_by_label(rows)
        warm = [r for r in rows if r["loss"] == "warmup"]
        if warm:
            stalled = sorted(int(r["seed"]) for r in warm if back_on_plateau(r))
            sentences.append(
                f"{part} ({conditions}): the warm-up went back to the plateau after the unfreeze on "
                f"{len(stalled)} of {len(warm)} seeds ({', '.join(map(str, stalled)) or 'none'})."
            )
        for reference in references:
            difference = paired_interval(values.get(name, {}), values.get(reference, {}))
            complete = difference.n >= needed
            graded = grade(difference)
            table.append(
                {
                    "preset": f"calibrated-unfreeze, {part}",
                    "variant": name,
                    "reference": reference,
                    "difference": difference,
                    "grade": ("matches" if graded == "not worse" else graded) if complete else "no verdict",
                }
            )
            if not complete:
                sentences.append(
                    f"{part}: {name} minus {reference}: a pilot ({difference.n} of {needed} seeds), no verdict: "
                    f"{difference}."
                )
                continue
            sentences.append(
                f"{part} ({conditions}): {name}, with no schedule, {words[graded]} {reference} ({difference}, "
                f"{difference.n} seeds; {stability(values[name], values[reference])})."
            )
    return sentences, table


def write_settings_verdict(folder: Path) -> str:
    """verdict.md and verdict.csv in ``folder``, from ``folder/<part>/runs.csv`` (or
    ``<part>_runs.csv``) of each part of the unfreeze at the settings users run."""
    rows = runs_by_name(folder, SETTINGS_PARTS)
    if not rows:
        raise TableError(f"{folder}: no <part>/runs.csv for any of {', '.join(SETTINGS_PARTS)}")
    sentences, table = settings_verdict(rows)
    return write_tables(folder, sentences, table)


def preset_runs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each preset's rows (:func:`runs_by_name`)."""
    return runs_by_name(folder, PRESETS)


def runs_by_name(folder: Path, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each of ``names`` (presets, or parts) found in ``folder``, from
    ``<folder>/<name>/runs.csv`` (what the run scripts write) or ``<folder>/<name>_runs.csv``
    (the layout committed under docs/_results); a name with neither is left out."""
    rows = {}
    for name in names:
        for path in (folder / name / "runs.csv", folder / f"{name}_runs.csv"):
            if path.is_file():
                rows[name] = read_runs_csv(path)
                break
    return rows


def check_not_poorer(folder: Path, table: list[dict[str, Any]]) -> None:
    """Refuse to replace a verdict.csv with one on fewer pairs: a grading command never
    overwrites a verdict with a less complete one (the committed verdicts among them)."""
    path = folder / "verdict.csv"
    if not path.is_file():
        return
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            before = {(r["preset"], r["SelHN"], r["minus"]): int(r["pairs"]) for r in csv.DictReader(handle)}
    except (KeyError, ValueError, UnicodeDecodeError) as error:
        raise TableError(f"{path}: not a verdict this command wrote ({error}); move it away to grade here") from None
    now = {(line["preset"], line["variant"], line["reference"]): line["difference"].n for line in table}
    poorer = [key for key, pairs in before.items() if now.get(key, 0) < pairs]
    if poorer:
        preset, variant, reference = poorer[0]
        raise TableError(
            f"{path} holds a verdict on more pairs than these runs give ({variant} - {reference} on {preset}: "
            f"{before[poorer[0]]} pairs there, {now.get(poorer[0], 0)} here): not overwritten. Grade another folder, "
            "or move the verdict away"
        )


def write_tables(folder: Path, sentences: list[str], table: list[dict[str, Any]]) -> str:
    """verdict.md and verdict.csv in ``folder``: the sentences, then one line per graded comparison
    (never over a verdict on more pairs: :func:`check_not_poorer`)."""
    check_not_poorer(folder, table)
    lines = [
        "| preset | SelHN | minus | mean [95% interval] | pairs | grade |",
        "|---|---|---|---|---|---|",
    ]
    for line in table:
        difference = line["difference"]
        lines.append(
            f"| {line['preset']} | {line['variant']} | {line['reference']} | {difference} | {difference.n} "
            f"| {line['grade']} |"
        )
    text = "\n".join(sentences) + "\n\n" + "\n".join(lines) + "\n"
    train_module.write_atomic(folder / "verdict.md", text)
    with train_module.replacing(folder / "verdict.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "SelHN", "minus", "mean", "low", "high", "pairs", "grade"])
        for line in table:
            d = line["difference"]
            row = [line["preset"], line["variant"], line["reference"], f"{d.mean:.2f}", f"{d.low:.2f}", f"{d.high:.2f}"]
            writer.writerow([*row, d.n, line["grade"]])
    return text


def write_unfreeze_verdict(folder: Path) -> str:
    """verdict.md and verdict.csv in ``folder``, from ``folder/runs.csv`` (the unfreeze comparison)."""
    sentences, table = unfreeze_verdict(read_runs_csv(folder / "runs.csv"))
    return write_tables(folder, sentences, [{"preset": "calibrated-unfreeze", **line} for line in table])


def write_verdict(folder: Path) -> str:
    """verdict.md and verdict.csv in ``folder``, from ``folder/<preset>/runs.csv``."""
    sentences, table = verdict(preset_runs(folder))
    return write_tables(folder, sentences, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes verdict.md and verdict.csv into FOLDER (never over a verdict on more pairs). Grades: beats "
        "(the paired 95% interval of the difference lies above 0), worse (below 0), not worse (its lower end above "
        "-1 R@1 point; 'matches' for the unfreeze comparison), undecided (otherwise). The folders come from "
        "benchmarks/confirm_epsilon.sh, compare --preset calibrated-unfreeze and benchmarks/swap_config.sh; the "
        "committed ones are under docs/_results.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "folder",
        help="the comparison's folder: <preset>/runs.csv or <preset>_runs.csv per preset (runs.csv for --unfreeze)",
    )
    parser.add_argument(
        "--unfreeze",
        action="store_true",
        help="the folder is the unfreeze comparison's (holding runs.csv): grade SelHN against vse-infinity-full",
    )
    parser.add_argument(
        "--swap",
        action="store_true",
        help="the folder is the swap configuration's (holding <preset>/runs.csv): grade SelHN 0.05 against the "
        "warm-up, both summed and clipped at 2.0",
    )
    parser.add_argument(
        "--settings",
        action="store_true",
        help="the folder is the unfreeze at the settings users run (holding <part>/runs.csv for factor-0.01, "
        "factor-1, factor-10, from benchmarks/unfreeze_settings.sh): grade SelHN 0.05 against vse-infinity-full "
        "and the warm-up at each backbone factor",
    )
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.unfreeze + args.swap + args.settings > 1:
        parser.error("--unfreeze, --swap and --settings grade different comparisons: give one")
    if not folder.is_dir():
        parser.error(f"{folder}: no such folder (the comparison's --out)")
    try:
        if args.swap:
            print(write_swap_verdict(folder))
        elif args.settings:
            print(write_settings_verdict(folder))
        else:
            print(write_unfreeze_verdict(folder) if args.unfreeze else write_verdict(folder))
    except (TableError, train_module.RunError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
