"""The rule study "beyond SelHN": selection on seeds 0-4, then a held-out confirmation.

The protocol (docs/_results/selection/PROTOCOL.txt) was fixed before any run; this module is
its executable form, so that the choice is mechanical:

1. ``select``: both calibrated presets, seeds 0-4, every loss: hn, sum, warmup, SelHN at
   epsilon 0.001 / 0.01 / 0.05 / 0.1, and every candidate of :data:`rules.RULES`. Then
   :func:`choose` picks one candidate from these runs alone and writes ``choice.json``.
2. ``confirm``: seeds 5-9 of both presets (never run before the choice) and the stall-only
   setting of the Results page (its seeds 0-2), for hn, sum, warmup, SelHN at 0.01 and the
   chosen candidate. :func:`verdict` says whether it wins there and writes ``verdict.json``.

The criteria are the issue's: a candidate *wins* on a set of runs when, on the means over its
seeds, (W1) on calibrated-stall it reaches 10x chance no later than 1.5x the sum of hinges'
step and earlier than SelHN's (epsilon 0.01), and (W2) on calibrated its test R@1 (mean of
i2t and t2i) is at least warmup's minus 1 point and above the sum of hinges'. A seed that
never reaches 10x chance makes the mean step infinite.

Run: ``python -m examples.selection_study.study --phase all --out runs/study --jobs 12`` (GPU: about
200 runs of 5 to 30 s each; on a 2-core CPU the same is days, see ``--help`` for fewer seeds).
Every run trains through :mod:`examples.selection_study.compare`, which writes each setting's
``runs.csv``, ``per_seed.csv``, tables and figure under ``<out>/<setting>``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from examples.rvsepp import cli
from examples.selection_study import compare
from examples.selection_study.rules import RULES

SELECT_SEEDS = (0, 1, 2, 3, 4)
CONFIRM_SEEDS = (5, 6, 7, 8, 9)
STALL_ONLY_SEEDS = (0, 1, 2)
BASELINES = ("hn", "sum", "warmup", "selhn")
SWEEP = (0.001, 0.05, 0.1)
#: Every study run: fp32 (as on the CPU; no autocast on a GPU), dev every 10 steps.
COMMON = ("--amp", "off")
EVAL_STEPS, LOG_EVERY = 10, 5


def settings(root: Path) -> dict[str, dict[str, Any]]:
    """The study's three settings: compare.py's preset, data root and extra training flags."""
    return {
        "calibrated": {"preset": "calibrated", "root": root / "calibrated", "steps": 0, "extra": []},
        "calibrated-stall": {"preset": "calibrated-stall", "root": root / "calibrated-stall", "steps": 0, "extra": []},
        # the Results page's stall-only setting (the 0.1.0 synthetic set with a strong shared component)
        "stall-only": {
            "preset": "cpu",
            "root": root / "stall",
            "steps": 400,
            "extra": [
                "--synthetic-shared",
                "3.0",
                "--synthetic-train",
                "1500",
                "--synthetic-dev",
                "200",
                "--synthetic-test",
                "200",
                "--epochs",
                "8",
            ],
        },
    }


def compare_argv(
    setting: dict[str, Any], out: Path, seeds: list[int], losses: list[str], epsilons: list[float], extra: list[str]
) -> list[str]:
    """compare.py's command line for one setting of the study."""
    argv = [
        "--preset",
        setting["preset"],
        "--root",
        str(setting["root"]),
        "--out",
        str(out),
        "--seeds",
        *map(str, seeds),
        "--losses",
        *losses,
        "--epsilons",
        *map(str, epsilons),
        "--eval-steps",
        str(EVAL_STEPS),
        "--log-every",
        str(LOG_EVERY),
    ]
    if setting["steps"]:
        argv += ["--steps", str(setting["steps"])]
    return [*argv, "--", *COMMON, *setting["extra"], *extra]


def tasks_of(argv: list[str]) -> list[tuple[Path, list[str]]]:
    """The (run folder, training argv) pairs that compare.py would train for ``argv``."""
    args = compare.parse_args(argv)
    return [
        (folder, compare.train_argv(folder, loss, seed, epsilon, args))
        for (loss, epsilon, seed), folder in compare.plan(args).items()
    ]


def run_phase(jobs: list[list[str]], workers: int, threads: int) -> None:
    """Train every run of every compare command line in one pool (seed-major order), then
    let compare.py write each setting's tables from the finished runs."""
    tasks = [tasks_of(argv) for argv in jobs]
    for setting_tasks in tasks:
        if setting_tasks:
            compare.prepare_data(setting_tasks[0][1])
    order = sorted((task for setting_tasks in tasks for task in setting_tasks), key=lambda task: seed_of(task[1]))
    failed = compare.train_all(order, workers, threads)
    if failed:
        raise SystemExit("runs that failed:\n" + "\n".join(failed))
    for argv in jobs:
        compare.main(argv)


def seed_of(argv: list[str]) -> int:
    return int(argv[argv.index("--seed") + 1])


def read_rows(path: Path) -> list[dict[str, Any]]:
    return compare.read_runs_csv(path)


def mean_of(rows: list[dict[str, Any]], loss: str, key: str, epsilon: float = 0.01) -> float:
    """Mean of ``key`` over the seeds of ``loss`` (inf if any is inf; nan if there is none)."""
    values = [r[key] for r in rows if r["loss"] == loss and (loss != "selhn" or r["epsilon"] == epsilon)]
    if not values:
        return math.nan
    return math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)


def criteria(loss: str, calibrated: list[dict[str, Any]], stall: list[dict[str, Any]] | None) -> dict[str, Any]:
    """W1 (on ``stall``, if given) and W2 (on ``calibrated``, if not empty) for ``loss``."""
    result: dict[str, Any] = {"loss": loss}
    if stall is not None:
        step = mean_of(stall, loss, "steps_to_10x_chance")
        limit = 1.5 * mean_of(stall, "sum", "steps_to_10x_chance")
        selhn = mean_of(stall, "selhn", "steps_to_10x_chance")
        result.update(step_to_10x=step, sum_limit=limit, selhn_step=selhn, W1=step <= limit and step < selhn)
    if calibrated:
        r1 = mean_of(calibrated, loss, "test_mean_r1")
        warm, total = mean_of(calibrated, "warmup", "test_mean_r1"), mean_of(calibrated, "sum", "test_mean_r1")
        result.update(r1=r1, warmup_r1=warm, sum_r1=total, W2=r1 >= warm - 1 and r1 > total)
    return result


def choose(calibrated: list[dict[str, Any]], stall: list[dict[str, Any]], candidates: list[str]) -> dict[str, Any]:
    """The protocol's choice from the selection runs.

    The candidates meeting W1 and W2, by calibrated test R@1 (then the earlier stall step);
    if none meets both, those meeting W1 by R@1; if none meets W1, all by the earlier stall
    step, then R@1. The first is confirmed, winner or not (a negative result is confirmed too).
    """
    table = [criteria(name, calibrated, stall) for name in candidates]

    def key(c: dict[str, Any]) -> tuple[float, float]:
        return (-c["r1"], c["step_to_10x"])

    both = [c for c in table if c["W1"] and c["W2"]]
    w1 = [c for c in table if c["W1"]]
    if both:
        pool, why = sorted(both, key=key), "meets W1 and W2 on the selection seeds; best calibrated R@1 among those"
    elif w1:
        pool, why = sorted(w1, key=key), "meets W1 only (no candidate met both); best calibrated R@1 among those"
    else:
        pool = sorted(table, key=lambda c: (c["step_to_10x"], -c["r1"]))
        why = "no candidate met W1; earliest on calibrated-stall"
    return {"chosen": pool[0]["loss"], "why": why, "candidates": table}


def verdict(
    chosen: str, calibrated: list[dict[str, Any]], stall: list[dict[str, Any]], stall_only: list[dict[str, Any]]
) -> dict[str, Any]:
    """Whether the chosen candidate wins on the held-out runs: W1 and W2 on seeds 5-9, and W1's
    step criterion on the stall-only setting."""
    held_out = criteria(chosen, calibrated, stall)
    stall_only_result = criteria(chosen, [], stall_only)
    wins = bool(held_out["W1"] and held_out["W2"] and stall_only_result["W1"])
    return {"chosen": chosen, "wins": wins, "held_out": held_out, "stall_only": stall_only_result}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--phase", choices=["select", "confirm", "all"], default="all")
    parser.add_argument("--out", default="runs/study", help="one folder per phase and setting under it")
    parser.add_argument("--data", default="data/study", help="the settings' synthetic data sets under it")
    parser.add_argument(
        "--jobs", type=cli.integer_at_least(1), default=1, help="runs trained at once (worker processes)"
    )
    parser.add_argument("--threads", type=cli.integer_at_least(1), default=1, help="intra-op threads per worker")
    parser.add_argument("--select-seeds", type=cli.seed, nargs="+", default=list(SELECT_SEEDS))
    parser.add_argument("--confirm-seeds", type=cli.seed, nargs="+", default=list(CONFIRM_SEEDS))
    parser.add_argument("--stall-only-seeds", type=cli.seed, nargs="+", default=list(STALL_ONLY_SEEDS))
    parser.add_argument("train_args", nargs="*", help="after --: arguments for every training run (tests only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out, where = Path(args.out), settings(Path(args.data))
    candidates = list(RULES)
    if args.phase in ("select", "all"):
        seeds, losses = args.select_seeds, [*BASELINES, *candidates]
        jobs = [
            compare_argv(where[name], out / "select" / name, seeds, losses, list(SWEEP), args.train_args)
            for name in ("calibrated", "calibrated-stall")
        ]
        run_phase(jobs, args.jobs, args.threads)
        choice = choose(
            read_rows(out / "select" / "calibrated" / "runs.csv"),
            read_rows(out / "select" / "calibrated-stall" / "runs.csv"),
            candidates,
        )
        (out / "choice.json").write_text(json.dumps(choice, indent=1))
        print(f"chosen: {choice['chosen']} ({choice['why']})", flush=True)
    if args.phase in ("confirm", "all"):
        chosen = json.loads((out / "choice.json").read_text())["chosen"]
        losses = [*BASELINES, chosen]
        jobs = [
            compare_argv(where[name], out / "confirm" / name, args.confirm_seeds, losses, [], args.train_args)
            for name in ("calibrated", "calibrated-stall")
        ]
        jobs.append(
            compare_argv(
                where["stall-only"], out / "confirm" / "stall-only", args.stall_only_seeds, losses, [], args.train_args
            )
        )
        run_phase(jobs, args.jobs, args.threads)
        result = verdict(
            chosen,
            *(
                read_rows(out / "confirm" / name / "runs.csv")
                for name in ("calibrated", "calibrated-stall", "stall-only")
            ),
        )
        (out / "verdict.json").write_text(json.dumps(result, indent=1))
        print(f"{chosen}: {'wins' if result['wins'] else 'does not win'} on the held-out runs", flush=True)


if __name__ == "__main__":
    main()
