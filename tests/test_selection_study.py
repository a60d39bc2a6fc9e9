"""The selection study (examples/selection_study): its candidate rules against literal loop
references, through the library's rule API; the comparison and the study's protocol."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.rvsepp.evaluate import evaluate_embeddings
from examples.selection_study.intervals import PairedInterval
from examples.selection_study.rules import RULES, candidate
from selhn.functional import rule_loss as library_rule_loss


def rule_loss(name, scores, margin=0.2, epsilon=0.01, *, mask=None, reduction="sum"):
    """A candidate's loss over a score matrix, at the study's VSE++ scale (summed)."""
    return library_rule_loss(scores, candidate(name, epsilon), margin, mask=mask, reduction=reduction)


def literal(name: str, scores: torch.Tensor, margin: float, epsilon: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Each rule as its definition reads, anchor by anchor, in both directions (summed)."""
    rule, param = RULES[name]
    size = scores.shape[0]
    total = scores.new_zeros(())
    for matrix, excluded in ((scores, mask), (scores.t(), None if mask is None else mask.t())):
        for i in range(size):
            positive = matrix[i, i]
            negatives = [j for j in range(size) if j != i and not (excluded is not None and bool(excluded[i, j]))]
            if not negatives:
                continue
            hinge = {j: torch.clamp(margin - positive + matrix[i, j], min=0) for j in negatives}
            hardest = negatives[0]
            for j in negatives:
                if matrix[i, j] > matrix[i, hardest]:
                    hardest = j
            if rule == "selhn-sum":
                tied = abs((positive - matrix[i, hardest]).item()) < epsilon
                total = total + (sum(hinge.values()) if tied else hinge[hardest])
            elif rule == "share":
                violating = sum(1 for j in negatives if hinge[j].item() > 0)
                total = total + (sum(hinge.values()) if violating / len(negatives) > param else hinge[hardest])
            elif rule == "tempered":
                top = matrix[i, hardest].item()
                total = total + sum(math.exp((matrix[i, j].item() - top) / param) * hinge[j] for j in negatives)
            else:  # semihard
                below = [j for j in negatives if matrix[i, j].item() < positive.item()]
                if below:
                    chosen = max(below, key=lambda j: matrix[i, j].item())
                else:
                    chosen = min(negatives, key=lambda j: matrix[i, j].item())
                total = total + hinge[chosen]
    return total


@given(
    name=st.sampled_from(sorted(RULES)),
    size=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.005, 0.05, 0.5]),
    margin=st.sampled_from([0.0, 0.2, 0.5]),
    masked=st.booleans(),
)
def test_rules_match_their_literal_definition_in_values_and_gradients(name, size, seed, spread, margin, masked):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=generator, dtype=torch.float64) * spread
    mask = torch.rand(size, size, generator=generator) < 0.3 if masked else None
    scores = base.clone().requires_grad_()
    value = rule_loss(name, scores, margin, 0.01, mask=mask)
    (grad,) = torch.autograd.grad(value, scores)
    reference_scores = base.clone().requires_grad_()
    expected = literal(name, reference_scores, margin, 0.01, mask)
    expected_grad = (
        torch.autograd.grad(expected, reference_scores)[0] if expected.requires_grad else torch.zeros_like(base)
    )
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("name", sorted(RULES))
def test_reductions_and_finiteness(name):
    scores = torch.randn(6, 6, dtype=torch.float64)
    per_anchor = rule_loss(name, scores, reduction="none")
    assert per_anchor.shape == (2, 6)
    torch.testing.assert_close(rule_loss(name, scores, reduction="sum"), per_anchor.sum())
    torch.testing.assert_close(rule_loss(name, scores, reduction="mean"), per_anchor.mean())
    # one anchor whose every pair is masked: no negative, a zero loss and finite gradients
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, :] = True
    mask[:, 0] = True
    scores.requires_grad_()
    value = rule_loss(name, scores, mask=mask, reduction="none")
    assert value[0, 0] == 0 and value[1, 0] == 0
    value.sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", ["share-0.5", "tempered-0.02", "selhn-sum"])
def test_a_collapsed_batch_gets_the_sum_of_hinges(name):
    # every score equal (a full collapse): these rules fall back to the sum of hinges (SelHN's mean would be
    # B - 1 times smaller), which is what keeps them off the plateau
    scores = torch.full((5, 5), 0.3, dtype=torch.float64)
    torch.testing.assert_close(rule_loss(name, scores), torch.tensor(2 * 5 * 4 * 0.2, dtype=torch.float64))


def test_the_candidates_train_as_criteria_of_the_pipeline():
    """Each candidate is a criterion factory of the study's table: a RuleLoss of its rule at
    the VSE++ scale, and the pipeline's own losses are there too."""
    from examples.rvsepp import train as train_module
    from examples.selection_study.presets import STUDY_PRESETS
    from examples.selection_study.rules import STUDY_CRITERIA

    args = train_module.parse_args(["--preset", "calibrated", "--loss", "tempered-0.02"], STUDY_PRESETS, STUDY_CRITERIA)
    criterion = train_module.make_criterion(args, STUDY_CRITERIA)
    assert repr(criterion.rule) == "Tempered(0.02)" and criterion.reduction == "sum"
    assert args.synthetic_twins == 0.75 and args.epochs == 4  # the calibrated preset
    assert set(train_module.CRITERIA) < set(STUDY_CRITERIA)
    with pytest.raises(SystemExit):  # the pipeline alone knows neither
        train_module.parse_args(["--preset", "calibrated"])


# ------------------------------------------------------------------ the comparison and the protocol
def test_compare_smoke(data_root, tmp_path, capsys):
    from examples.selection_study import compare

    compare.main(
        [
            "--out",
            str(tmp_path),
            "--root",
            str(data_root),
            "--preset",
            "smoke",
            "--seeds",
            "0",
            "--losses",
            "hn",
            "selhn",
            "--epsilons",
            "0.05",
            "--steps",
            "4",
            "--eval-steps",
            "2",
            "--log-every",
            "1",
        ]
    )
    for name in (
        "comparison.md",
        "comparison.csv",
        "comparison.png",
        "steps.csv",
        "dev.csv",
        "per_seed.csv",
        "facts.md",
    ):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "comparison.md").read_text()
    assert "| hn |" in table and "| selhn eps=0.01 |" in table and "| selhn eps=0.05 |" in table
    assert "steps until dev rsum > 10x chance" in capsys.readouterr().out
    assert "after the unfreeze" not in (tmp_path / "per_seed.csv").read_text()  # no backbone: no such column
    # hn and SelHN alone: no fact can be checked, and facts.csv is its header with no rows
    assert (tmp_path / "facts.csv").read_text().splitlines() == ["fact,criterion,per seed,mean,95% interval,holds"]
    with open(tmp_path / "steps.csv") as handle:
        steps = list(csv.DictReader(handle))
    # the variant's name is not overwritten by the per-step loss value
    assert {row["loss"] for row in steps} == {"hn", "selhn"}
    assert {row["epsilon"] for row in steps if row["loss"] == "selhn"} == {"0.01", "0.05"}
    assert all(math.isfinite(float(row["loss_value"])) for row in steps)
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    required = [
        "loss",
        "epsilon",
        "seed",
        "steps_to_leave_plateau",
        "steps_to_10x_chance",
        "best_dev_rsum",
        "test_rsum",
        "test_i2t_r1",
        "test_t2i_r1",
    ]
    assert list(rows[0])[: len(required)] == required
    assert sorted((r["loss"], r["epsilon"], r["seed"]) for r in rows) == [
        ("hn", "nan", "0"),
        ("selhn", "0.01", "0"),
        ("selhn", "0.05", "0"),
    ]
    for row in rows:
        # every column a number but the text ones: loss, alarm steps, and what trained the run (commit, machine)
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", row["commit"]) and "cores" in row["machine"]
        assert row["started"] <= row["finished"] and row["finished"].endswith("+00:00")  # UTC, ISO 8601
        values = {key: float(value) for key, value in row.items() if key not in compare.TEXT_COLUMNS}
        assert values["steps_to_10x_chance"] in (2.0, 4.0, math.inf)
        assert values["test_rsum"] == pytest.approx(
            sum(values[f"test_{d}_{k}"] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))
        )
    per_seed = (tmp_path / "per_seed.csv").read_text().splitlines()
    assert per_seed[0].startswith("loss,seed,leaves plateau at step") and len(per_seed) == 4
    assert [line.split(",")[0] for line in per_seed[1:]] == ["hn", "selhn eps=0.01", "selhn eps=0.05"]
    # a finished run is reused, an unfinished one is trained again from its start
    finished = tmp_path / "runs" / "hn_seed0" / "results.json"
    stamp = finished.stat().st_mtime_ns
    unfinished = tmp_path / "runs" / "selhn_eps=0.05_seed0"
    (unfinished / "results.json").unlink()
    (unfinished / "dev.jsonl").write_text("not json\n")
    compare.main(
        [
            "--out",
            str(tmp_path),
            "--root",
            str(data_root),
            "--preset",
            "smoke",
            "--seeds",
            "0",
            "--losses",
            "hn",
            "selhn",
            "--epsilons",
            "0.05",
            "--steps",
            "4",
            "--eval-steps",
            "2",
            "--log-every",
            "1",
            "--plot-epsilons",
            "0.01",
            "0.05",
            "0.3",
        ]
    )
    assert finished.stat().st_mtime_ns == stamp and (unfinished / "results.json").is_file()
    # both epsilons drawn, each under its own name; an epsilon without runs is named, not drawn
    assert "comparison.png: no SelHN runs at epsilon 0.3 to draw" in capsys.readouterr().out
    runs = {
        (name, 0.01 if name != "selhn" else eps, 0): compare.read_run(tmp_path / "runs" / folder)
        for name, eps, folder in (
            ("hn", 0.01, "hn_seed0"),
            ("selhn", 0.01, "selhn_eps=0.01_seed0"),
            ("selhn", 0.05, "selhn_eps=0.05_seed0"),
        )
    }
    drawn = compare.plot(tmp_path, runs, 10.0, "test", epsilons=(0.01, 0.05))
    assert drawn == ["hn", "selhn eps=0.01", "selhn eps=0.05"]
    assert compare.plot(tmp_path, runs, 10.0, "test") == ["hn", "selhn"]


def fact_row(loss: str, seed: int, r1: float, rsum: float, at_switch: float = math.nan, low: float = math.nan):
    return {
        "loss": loss,
        "seed": seed,
        "test_mean_r1": r1,
        "test_rsum": rsum,
        "dev_rsum_at_switch": at_switch,
        "min_dev_rsum_after_switch": low,
    }


def test_compare_checks_the_three_facts_by_their_criteria():
    from examples.selection_study.compare import facts

    rows = [fact_row("sum", s, 70.0, 500.0) for s in range(3)]
    rows += [fact_row("warmup", s, 72.5, 480.0, 300.0, 290.0) for s in range(3)]
    rows += [fact_row("hn", s, 1.0, 100.0) for s in range(3)]
    table = facts(rows)
    assert "| F1 | warmup R@1 - sum R@1 >= 2" in table and "| 2.5 | [2.5, 2.5] | yes |" in table
    assert "| F3 |" in table and "| 96.0 | [96.0, 96.0] | yes |" in table
    assert "| F2 |" in table and "| 20.0 | [20.0, 20.0] | yes |" in table
    # a collapse after the switch fails F3 whatever the final rsum; a 1.9-point gain fails F1
    rows[3] = fact_row("warmup", 0, 71.9 - 5.0, 480.0, 300.0, 149.0)
    table = facts(rows)
    assert "collapsed: [0]" in table and "| F3 |" in table and table.count("| no |") == 2
    assert "No fact can be checked" in facts([fact_row("hn", 0, 1.0, 10.0)])


def test_compare_metrics():
    from examples.selection_study.compare import chance_rsum, first_exceeding, first_recovery

    assert chance_rsum(1) == pytest.approx(600.0)  # one image: every ranking is right
    generator = torch.Generator().manual_seed(0)
    n = 10
    hits = 0.0
    for _ in range(300):  # Monte Carlo check of the chance level
        sims = torch.rand(n, 5 * n, generator=generator, dtype=torch.float64)
        hits += evaluate_embeddings([torch.eye(n, dtype=torch.float64)], [sims.t().contiguous()])["rsum"]
    assert hits / 300 == pytest.approx(chance_rsum(n), rel=0.05)
    steps = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert first_recovery(steps, [0.05, 0.2, 0.05, 0.1, 0.1]) == 0.0  # never on the plateau
    assert first_recovery(steps, [0.0, 0.9, 1.0, 0.3, 0.05]) == 5.0
    assert first_recovery(steps, [0.0, 0.9, 1.0, 0.9, 0.9]) == math.inf
    assert first_exceeding(steps, [1, 2, 3, 4, 5], 3.5) == 4.0


def test_compare_trains_in_parallel_workers_like_one_by_one(data_root, tmp_path):
    # --jobs 2: the same runs, trained in spawned worker processes, give the same records as in-process ones
    from examples.selection_study import compare

    common = [
        "--root",
        str(data_root),
        "--preset",
        "smoke",
        "--seeds",
        "0",
        "--losses",
        "sum",
        "tempered-0.02",
        "--epsilons",
        "--steps",
        "3",
        "--eval-steps",
        "3",
        "--log-every",
        "1",
    ]
    compare.main(["--out", str(tmp_path / "serial"), *common])
    threads = str(torch.get_num_threads())  # the same intra-op threads: the same float sums on a CPU
    compare.main(["--out", str(tmp_path / "pool"), "--jobs", "2", "--threads", threads, *common])
    for name in ("sum_seed0", "tempered-0.02_seed0"):
        serial, pool = (
            json.loads((tmp_path / kind / "runs" / name / "results.json").read_text()) for kind in ("serial", "pool")
        )
        assert serial.pop("step_seconds") > 0 and pool.pop("step_seconds") > 0
        for key in ("started", "finished"):  # when each ran: not part of what it learned
            assert serial.pop(key) <= pool.pop(key)
        assert serial == pool
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path / "bad"), "--jobs", "0", *common])


def test_compare_reports_failed_runs_by_name_and_goes_on(data_root, tmp_path, monkeypatch):
    from examples.selection_study import compare

    def broken(args, criteria):
        if args.loss == "hn":
            raise SystemExit("non-finite loss (nan) at epoch 0, step 1: stopping.")
        return real(args, criteria)

    real = compare.train_module.train
    monkeypatch.setattr(compare.train_module, "train", broken)
    with pytest.raises(SystemExit, match=r"hn_seed0: non-finite loss") as error:
        compare.main(
            [
                "--out",
                str(tmp_path),
                "--root",
                str(data_root),
                "--preset",
                "smoke",
                "--seeds",
                "0",
                "--losses",
                "hn",
                "sum",
                "--steps",
                "2",
                "--eval-steps",
                "2",
            ]
        )
    assert "sum_seed0" not in str(error.value) and (tmp_path / "runs" / "sum_seed0" / "results.json").is_file()


def study_row(loss: str, seed: int, r1: float, step: float, epsilon: float = math.nan) -> dict:
    return {"loss": loss, "seed": float(seed), "epsilon": epsilon, "test_mean_r1": r1, "steps_to_10x_chance": step}


def test_study_choice_and_verdict_follow_the_protocol():
    from examples.selection_study import study

    def rows(values: dict[str, tuple[float, float]]) -> list[dict]:
        return [
            study_row(loss, s, r1, step, 0.01 if loss == "selhn" else math.nan)
            for loss, (r1, step) in values.items()
            for s in range(2)
        ]

    base = {"sum": (78.0, 30.0), "warmup": (81.0, 30.0), "selhn": (75.0, 200.0)}
    calibrated = rows({**base, "a": (80.5, 30.0), "b": (83.0, 30.0), "c": (90.0, 30.0)})
    stall = rows({**base, "a": (0, 40.0), "b": (0, 45.0), "c": (0, 50.0)})
    stall[-1]["steps_to_10x_chance"] = math.inf  # c never gets there on one seed: W1 fails for c
    choice = study.choose(calibrated, stall, ["a", "b", "c"])
    assert choice["chosen"] == "b" and "W1 and W2" in choice["why"]  # a: W2 holds (80.5 >= 80) but b's R@1 is higher
    table = {c["loss"]: c for c in choice["candidates"]}
    assert table["c"]["W1"] is False and table["c"]["W2"] is True and table["a"]["W2"] is True
    # no candidate meets W2: the best R@1 among those meeting W1; none meets W1: the earliest on stall
    calibrated = rows({**base, "a": (70.0, 30.0), "b": (60.0, 30.0)})
    assert study.choose(calibrated, rows({**base, "a": (0, 40.0), "b": (0, 40.0)}), ["a", "b"])["chosen"] == "a"
    late = rows({**base, "a": (0, 300.0), "b": (0, 250.0)})
    choice = study.choose(calibrated, late, ["a", "b"])
    assert choice["chosen"] == "b" and "no candidate met W1" in choice["why"]
    # the verdict needs W1 and W2 on the held-out seeds and the step criterion on the stall-only setting
    held_calibrated, held_stall = rows({**base, "b": (83.0, 30.0)}), rows({**base, "b": (0, 40.0)})
    assert study.verdict("b", held_calibrated, held_stall, rows({**base, "b": (0, 40.0)}))["wins"] is True
    assert study.verdict("b", held_calibrated, held_stall, rows({**base, "b": (0, 46.0)}))["wins"] is False
    assert study.verdict("b", rows({**base, "b": (79.0, 30.0)}), held_stall, held_stall)["wins"] is False


def test_the_study_trains_one_run_from_its_own_command_line(data_root, tmp_path):
    from examples.selection_study.train import main

    main(
        [
            "--preset",
            "smoke",
            "--root",
            str(data_root),
            "--out",
            str(tmp_path),
            "--loss",
            "semihard",
            "--max-steps",
            "1",
            "--tensorboard",
            "off",
            "--no-eval-test",
        ]
    )
    assert (tmp_path / "last.pth").is_file()


# ------------------------------------------------------------------ paired intervals
def test_paired_intervals_by_the_textbook():
    from examples.selection_study.intervals import interval, paired_interval, t_quantile

    assert t_quantile(1) == 12.706 and t_quantile(4) == 2.776 and t_quantile(35) == 2.042 and t_quantile(500) == 1.98
    # d = 1, 2, 3: mean 2, sd 1, half width t(2) / sqrt(3) = 4.303 / 1.732
    got = paired_interval({0: 3.0, 1: 5.0, 2: 7.0, 9: 1.0}, {0: 2.0, 1: 3.0, 2: 4.0})  # seed 9: no pair
    assert got.n == 3 and got.mean == pytest.approx(2.0)
    assert (got.low, got.high) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5))
    assert not got.excludes_zero() and str(got) == "+2.00 [-0.48, +4.48]"  # t(2) is wide: 0 is inside
    assert interval([2.0, 2.1, 1.9, 2.05]).excludes_zero()
    assert not interval([1.0, -1.0, 0.5]).excludes_zero()
    assert interval([1.5]).n == 1 and "no interval" in str(interval([1.5]))
    assert math.isnan(interval([]).mean)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)


def test_the_interval_covers_the_mean_95_percent_of_the_time_at_five_seeds():
    """Student's t, not the normal quantile (which covers about 88% at n = 5)."""
    from examples.selection_study.intervals import interval

    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 5, generator=generator, dtype=torch.float64) + 1.5
    covered = sum(interval(row.tolist()).low <= 1.5 <= interval(row.tolist()).high for row in draws)
    assert 0.935 <= covered / 4000 <= 0.965


def test_facts_carry_intervals_and_the_tables_come_from_a_runs_csv(tmp_path):
    from examples.selection_study import compare

    rows = [fact_row("sum", s, 80.0 + s, 500.0) for s in range(3)]
    rows += [fact_row("warmup", s, 82.0 + s + 0.1 * s * s, 505.0, at_switch=400.0, low=450.0) for s in range(3)]
    rows += [fact_row("hn", s, 10.0, 50.0 + s) for s in range(3)]
    with open(tmp_path / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    compare.main(["--out", str(tmp_path / "tables"), "--from-runs", str(tmp_path / "runs.csv")])
    text = (tmp_path / "tables" / "facts.md").read_text()
    assert "| F1 | warmup R@1 - sum R@1 >= 2" in text and "95% interval" in text
    f1 = next(line for line in text.splitlines() if line.startswith("| F1"))
    assert "[" in f1.split("|")[5]  # the interval of the per-seed gains 2.0, 2.1, 2.4
    assert "| warmup | - | +2.17 [" in text  # warmup - sum, paired by seed
    with open(tmp_path / "tables" / "paired.csv") as handle:
        assert next(csv.reader(handle))[0] == "loss"


# ------------------------------------------------------------------ the epsilon confirmation's verdict
def write_rows(path, rows):
    """A runs.csv of these rows, as compare writes one."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def confirmation_rows(offsets: dict[str, list[float]], seeds: int = 8) -> list[dict]:
    """runs.csv rows: each variant's test R@1 = 80 + its per-seed offsets (cycled)."""
    rows = []
    for name, values in offsets.items():
        loss, epsilon = ("selhn", float(name.split("=")[1])) if name.startswith("selhn eps=") else (name, math.nan)
        for seed in range(20, 20 + seeds):
            r1 = 80.0 + values[(seed - 20) % len(values)]
            rows.append({"loss": loss, "epsilon": epsilon, "seed": float(seed), "test_mean_r1": r1})
    return rows


def test_the_confirmation_verdict_follows_its_fixed_rule(tmp_path):
    from examples.selection_study import confirm

    assert confirm.grade(PairedInterval(1.0, 0.2, 1.8, 8)) == "beats"
    assert confirm.grade(PairedInterval(-1.0, -1.8, -0.2, 8)) == "worse"
    assert confirm.grade(PairedInterval(0.1, -0.9, 1.1, 8)) == "not worse"
    assert confirm.grade(PairedInterval(0.1, -1.1, 1.3, 8)) == "undecided"
    assert confirm.grade(PairedInterval(5.0, 5.0, 5.0, 1)) == "undecided"  # one pair: no interval
    noise = [0.0, 0.3, -0.2, 0.1, -0.1, 0.2, -0.3, 0.0]
    good = {
        "sum": [x - 3 for x in noise],
        "warmup": noise,
        "selhn eps=0.01": [x - 2 + 0.4 * (i % 2) for i, x in enumerate(noise)],
        "selhn eps=0.05": [x + 0.5 + 0.2 * (i % 3) for i, x in enumerate(noise)],
        "selhn eps=0.1": [x - 0.2 + 0.3 * (i % 2) for i, x in enumerate(noise)],
    }
    sentences, table = confirm.verdict({p: confirmation_rows(good) for p in confirm.PRESETS})
    assert sentences[0].startswith("Cold start: SelHN at epsilon 0.05")  # 0.1 qualifies too, with a lower mean
    assert "pass 0.05 or 0.1 instead" in sentences[1]
    assert len(table) == 2 * 8  # per preset: three epsilons x (warmup, sum) + two against 0.01
    bad = {
        **good,
        "selhn eps=0.05": [x - 4 for x in noise],
        "selhn eps=0.1": [x - 4 + 0.1 * i for i, x in enumerate(noise)],
    }
    sentences, _ = confirm.verdict({"calibrated": confirmation_rows(good), "calibrated-stall": confirmation_rows(bad)})
    assert "the warm-up stays" in sentences[0] and "the default 0.01 stays" in sentences[1]
    # a seed counts only once every variant finished on it; too few complete seeds: no verdict
    partial = confirmation_rows(good) + [
        r for r in confirmation_rows(good, 9) if r["seed"] == 28 and r["loss"] != "sum"
    ]
    sentences, _ = confirm.verdict({"calibrated": partial, "calibrated-stall": confirmation_rows(good, 5)})
    assert sentences[0].startswith("No verdict") and "calibrated-stall (5 of 8)" in sentences[0]
    assert "calibrated (" not in sentences[0]
    # from the runs.csv files compare writes
    for preset in confirm.PRESETS:
        (tmp_path / preset).mkdir()
        write_rows(tmp_path / preset / "runs.csv", confirmation_rows(good))
    confirm.main([str(tmp_path)])
    assert "| calibrated | selhn eps=0.05 | warmup |" in (tmp_path / "verdict.md").read_text()
    assert (tmp_path / "verdict.csv").read_text().startswith("preset,SelHN,minus,mean,low,high,pairs,grade")


def test_compare_can_leave_the_default_epsilon_out():
    from examples.selection_study import compare

    args = compare.parse_args(["--losses", "warmup", "selhn", "--epsilons", "0.05", "--seeds", "30", "31"])
    every = [(loss, 0.01, seed) for loss in ("warmup", "selhn") for seed in (30, 31)]
    assert sorted(compare.plan(args)) == sorted([*every, ("selhn", 0.05, 30), ("selhn", 0.05, 31)])
    args = compare.parse_args(
        ["--losses", "warmup", "selhn", "--epsilons", "0.05", "--seeds", "30", "--no-default-epsilon"]
    )
    assert sorted(compare.plan(args)) == [("selhn", 0.05, 30), ("warmup", 0.01, 30)]


def test_leave_one_out_and_the_seeds_a_side_would_need():
    from examples.selection_study.intervals import interval, leave_one_out, seeds_to_exclude_zero

    a = {s: 80.0 + d for s, d in enumerate([1.0, 2.0, 0.0, 3.0, 1.0])}
    b = {s: 80.0 for s in range(6)}  # seed 5 has no pair: left out
    rests = leave_one_out(a, b)
    assert sorted(rests) == [0, 1, 2, 3, 4]
    assert rests[3] == interval([1.0, 2.0, 0.0, 1.0])  # seed 3's +3 left out
    # mean 1, sample sd 1.155: t(6) * 1.155 / sqrt(7) = 1.07 > 1, t(7) * 1.155 / sqrt(8) = 0.97 < 1
    assert seeds_to_exclude_zero(interval([0.0, 2.0, 0.0, 2.0])) == 8
    assert seeds_to_exclude_zero(interval([1.0, 1.1, 0.9, 1.0, 1.0])) == 2  # already clear: any two pairs
    assert seeds_to_exclude_zero(interval([1.0, -1.0])) is None  # a mean of 0
    assert seeds_to_exclude_zero(interval([1.0])) is None


def test_the_swap_verdict_grades_each_preset_with_its_stability(tmp_path):
    from examples.selection_study import confirm

    noise = [0.0, 0.3, -0.2, 0.1, -0.1, 0.2, -0.3, 0.0]
    spread = [0.5, -0.4, 0.3, -0.2, 0.1, -0.3, 0.4, -0.2]  # mean +0.03: inside one point either way
    close = {"warmup": noise, "selhn eps=0.05": [x + d for x, d in zip(noise, spread, strict=True)]}
    behind = {"warmup": noise, "selhn eps=0.05": [x - 3 for x in noise]}
    sentences, table = confirm.swap_verdict({p: confirmation_rows(close) for p in confirm.PRESETS})
    assert [line["grade"] for line in table] == ["not worse", "not worse"]
    assert "with one seed left out: beats 0, not worse 8, undecided 0, worse 0 of 8" in sentences[0]
    assert sentences[-1].endswith("not worse than the warm-up on both presets: the patches keep it.")
    sentences, table = confirm.swap_verdict(
        {"calibrated": confirmation_rows(close), "calibrated-stall": confirmation_rows(behind)}
    )
    assert table[1]["grade"] == "worse" and "follow this measurement" in sentences[-1]
    sentences, table = confirm.swap_verdict({"calibrated": confirmation_rows(close, seeds=7)})
    assert sentences[0].startswith("calibrated: no verdict (7 of 8 complete pairs)")
    assert [line["grade"] for line in table] == ["no verdict", "no verdict"] and "stay as they are" in sentences[-1]
    for preset in confirm.PRESETS:  # from the runs.csv files compare writes
        (tmp_path / preset).mkdir()
        write_rows(tmp_path / preset / "runs.csv", confirmation_rows(close))
    confirm.main(["--swap", str(tmp_path)])
    assert "| calibrated-stall | selhn eps=0.05 | warmup |" in (tmp_path / "verdict.md").read_text()
    with pytest.raises(SystemExit):
        confirm.main(["--swap", "--unfreeze", str(tmp_path)])


def test_the_unfreeze_verdict_grades_selhn_against_the_full_schedule(tmp_path):
    from examples.selection_study import confirm

    noise = [0.0, 0.3, -0.2, 0.1, -0.1]
    offsets = {
        "vse-infinity-full": noise,
        "warmup": [x - 20 for x in noise],
        "selhn eps=0.01": [x - 5 + i for i, x in enumerate(noise)],  # -5 .. -1: worse
        "selhn eps=0.05": [x + 0.2 * (i % 2) for i, x in enumerate(noise)],  # within 1 point: matches
        "selhn-staged": [x + 2 for x in noise],  # a schedule that runs SelHN: graded, and named by its schedule
    }
    rows = [{**row, "seed": row["seed"] - 20} for row in confirmation_rows(offsets, seeds=5)]
    sentences, table = confirm.unfreeze_verdict(rows)
    grades = {line["variant"]: line["grade"] for line in table}
    assert grades == {"selhn eps=0.01": "worse", "selhn eps=0.05": "matches", "selhn-staged": "beats"}
    assert sentences[1].startswith("selhn eps=0.05, with no schedule, matches vse-infinity-full (+0.")
    assert sentences[2].startswith(
        "selhn-staged, with VSE-infinity's backbone staging and ramp, beats vse-infinity-full (+2.00"
    )
    # fewer than five seeds: a pilot, no verdict
    sentences, _ = confirm.unfreeze_verdict([row for row in rows if row["seed"] < 3])
    assert all("a pilot (3 of 5 seeds), no verdict" in sentence for sentence in sentences)
    with pytest.raises(ValueError, match="vse-infinity-full"):
        confirm.unfreeze_verdict([row for row in rows if row["loss"] != "vse-infinity-full"])
    with open(tmp_path / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    confirm.main(["--unfreeze", str(tmp_path)])
    text = (tmp_path / "verdict.md").read_text()
    assert "| calibrated-unfreeze | selhn eps=0.05 | vse-infinity-full |" in text and "| matches |" in text


# ------------------------------------------------------------------ the mid-training stall (F4)
def test_longest_stall_counts_consecutive_plateau_steps_after_the_unfreeze():
    from examples.selection_study.compare import longest_stall

    steps = [5.0 * i for i in range(1, 13)]  # 5, 10, ..., 60
    vanishing = [0.9, 0.9, 0.1, 0.1, 0.6, 0.7, 0.8, 0.2, 0.9, 0.9, 0.9, 0.9]
    # before step 10 nothing counts; 25-35 is three logged steps (15 steps since 20), 45-60 four (20 since 40)
    assert longest_stall(steps, vanishing, after=10.0) == (20.0, 40.0, 60.0)
    assert longest_stall(steps, [0.0] * 12, after=10.0)[0] == 0.0
    assert longest_stall(steps, [0.9] * 12, after=30.0) == (30.0, 30.0, 60.0)


def stall_row(loss: str, seed: int, stalled: float, share: float = 0.95) -> dict:
    return {
        **fact_row(loss, seed, 70.0, 500.0),
        "unfreeze_step": 156.0,
        "stalled_steps_after_unfreeze": stalled,
        "stall_loss_share": share if stalled else math.nan,
    }


def test_f4_holds_when_the_abrupt_unfreeze_stalls_on_most_seeds_and_the_full_schedule_does_not():
    from examples.selection_study.compare import facts

    rows = [stall_row("warmup", s, stalled) for s, stalled in enumerate([40.0, 25.0, 0.0])]
    rows += [stall_row("vse-infinity-full", s, stalled) for s, stalled in enumerate([0.0, 30.0, 5.0])]
    f4 = next(line for line in facts(rows).splitlines() if line.startswith("| F4"))
    assert "(on it: [0, 1])" in f4 and "vse-infinity-full on fewer than half (on it: [1])" in f4
    assert "0: 40.0, 1: 25.0, 2: 0.0" in f4 and f4.endswith("| yes |")
    # a stall whose loss is not the plateau's (hard negatives still learning) does not count
    rows[1] = stall_row("warmup", 1, 25.0, share=0.5)
    assert next(line for line in facts(rows).splitlines() if line.startswith("| F4")).endswith("| no |")
    # the full schedule stalling on half the seeds or more fails it too
    rows[1] = stall_row("warmup", 1, 25.0)
    rows[5] = stall_row("vse-infinity-full", 2, 20.0)
    assert next(line for line in facts(rows).splitlines() if line.startswith("| F4")).endswith("| no |")


def test_the_unfreeze_comparison_runs_vse_infinitys_schedule_and_records_the_stall(data_root, tmp_path):
    """compare with a backbone: vse-infinity-full trains the warm-up with staging and the ramp,
    the abrupt warm-up the preset's schedule; runs.csv carries the unfreeze step, the stall,
    the alarm's steps, the commit and the machine."""
    from examples.selection_study import compare

    backbone = ["--backbone", "--backbone-blocks", "2", "--embedding-warmup-epochs", "1"]
    backbone += ["--backbone-warmup-epochs", "0", "--backbone-ramp", "off", "--epochs", "2"]
    args = compare.parse_args(["--preset", "smoke", "--root", str(data_root), "--", *backbone])
    full = compare.parse_train(compare.train_argv(tmp_path / "x", "vse-infinity-full", 0, 0.01, args))
    assert (full.loss, full.backbone_warmup_epochs, full.backbone_ramp, full.backbone) == ("warmup", 1, "on", True)
    abrupt = compare.parse_train(compare.train_argv(tmp_path / "x", "warmup", 0, 0.01, args))
    assert (abrupt.loss, abrupt.backbone_warmup_epochs, abrupt.backbone_ramp) == ("warmup", 0, "off")
    common = ["--out", str(tmp_path), "--root", str(data_root), "--preset", "smoke", "--seeds", "0"]
    common += ["--eval-steps", "6", "--log-every", "1", "--losses", "warmup", "vse-infinity-full"]
    compare.main([*common, "--", *backbone])
    rows = compare.read_runs_csv(tmp_path / "runs.csv")
    assert sorted(row["loss"] for row in rows) == ["vse-infinity-full", "warmup"]
    for row in rows:
        assert row["unfreeze_step"] == 18.0  # one epoch of 300 captions in batches of 16
        assert row["stalled_steps_after_unfreeze"] >= 0 and isinstance(row["alarm_steps"], str)
    assert "| F4 |" in (tmp_path / "facts.md").read_text()
    header = (tmp_path / "per_seed.csv").read_text().splitlines()[0]
    assert "last dev rsum" in header and "vanishing > 50% after the unfreeze" in header
    assert "- vse-infinity-full" in (tmp_path / "paired.csv").read_text().splitlines()[0]
    assert all(math.isfinite(row["final_dev_rsum"]) for row in rows)


def test_run_row_says_whether_the_alarm_fired_during_the_stall():
    from examples.selection_study.compare import run_row

    steps = [
        {"step": str(s), "loss": "50.0", "i2t/vanishing_fraction": v, "t2i/vanishing_fraction": v}
        for s, v in [(10, "0.0"), (20, "0.0"), (30, "0.9"), (40, "0.9"), (50, "0.9"), (60, "0.0")]
    ]
    run = {"steps": steps, "dev": [{"global_step": 60, "rsum": 100.0}], "results": {"alarm_steps": [40, 5]}}
    row = run_row("warmup", math.nan, 0, run, 3.0, 10.0, unfreeze_step=15.0, plateau_loss=51.2)
    assert row["stalled_steps_after_unfreeze"] == 30.0 and row["stall_loss_share"] == pytest.approx(50 / 51.2)
    assert row["alarm_steps"] == "40 5" and row["alarm_in_stall"] == 1.0
    run["results"]["alarm_steps"] = [5]
    assert run_row("warmup", math.nan, 0, run, 3.0, 10.0, 15.0, 51.2)["alarm_in_stall"] == 0.0
    assert math.isnan(run_row("warmup", math.nan, 0, run, 3.0, 10.0)["stalled_steps_after_unfreeze"])


# ------------------------------------------------------------------ the study's commands under misuse
SMOKE_COMPARE = ["--preset", "smoke", "--seeds", "0", "--steps", "2", "--eval-steps", "2", "--log-every", "1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--losses", "hn", "--", "--loss", "sum"],
            r"--loss after --: the comparison sets it for every run; use --losses",
        ),
        (["--losses", "selhn", "--epsilons", "0.1", "--", "--epsilon", "0.05"], r"--epsilon after --: .* --epsilons"),
        (["--", "--out=elsewhere"], r"--out after --"),
        (["--losses", "selhn", "--epsilons", "0.05", "0.050000001"], r"selhn eps=0.05 given twice"),
        (["--losses", "vse-infinity-full"], r"a backbone schedule needs a preset with a backbone .* warm-up under"),
    ],
)
def test_compare_refuses_what_would_report_one_run_as_another(extra, message, capsys):
    from examples.selection_study import compare

    with pytest.raises(SystemExit):
        compare.parse_args(["--preset", "smoke", *extra])
    assert re.search(message, capsys.readouterr().err)


def test_compare_refuses_to_start_without_matplotlib(monkeypatch, capsys):
    """comparison.png failed after every run had trained; now the command refuses at its start."""
    import sys

    from examples.selection_study import compare

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        compare.parse_args(["--preset", "smoke"])
    assert "comparison.png needs matplotlib" in capsys.readouterr().err
    compare.parse_args(["--preset", "smoke", "--from-runs", "runs.csv"])  # no plot: no need


def test_damaged_or_duplicated_runs_tables_are_refused_with_one_line(tmp_path):
    """A duplicated row flipped a verdict (the last one won); a bad cell or a missing file was a
    traceback. Each is one line naming the file and the line."""
    from examples.selection_study import compare, confirm

    rows = confirmation_rows({"warmup": [0.0], "selhn eps=0.05": [0.5, -0.2, 0.3]})
    cases = {
        "duplicate": ([*rows, rows[0]], r"runs.csv, lines 2 and 18: two rows of warmup on seed 20"),
        "bad cell": (
            [{**rows[0], "test_mean_r1": "n/a"}, *rows[1:]],
            r"runs.csv, line 2: column test_mean_r1 holds 'n/a'",
        ),
        "no column": ([{k: v for k, v in r.items() if k != "test_mean_r1"} for r in rows], r"no column test_mean_r1"),
    }
    for name, (table, message) in cases.items():
        folder = tmp_path / name
        (folder / "calibrated").mkdir(parents=True)
        write_rows(folder / "calibrated" / "runs.csv", table)
        for command in (
            lambda f=folder: confirm.main(["--swap", str(f)]),
            lambda f=folder: compare.main(["--out", str(f / "t"), "--from-runs", str(f / "calibrated" / "runs.csv")]),
        ):
            with pytest.raises(SystemExit, match=message) as raised:
                command()
            assert str(raised.value.code).startswith("error: ") and "\n" not in str(raised.value.code)
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "runs.csv").write_bytes(b"loss,seed,test_mean_r1\nw\xe4rmup,1,2\n")
    with pytest.raises(SystemExit, match=r"runs.csv: not UTF-8 text \(byte 24\)"):
        confirm.main(["--unfreeze", str(tmp_path / "latin")])
    with pytest.raises(SystemExit, match=r"missing.csv: no such file"):
        compare.main(["--out", str(tmp_path / "t"), "--from-runs", str(tmp_path / "missing.csv")])
    write_rows(tmp_path / "latin" / "runs.csv", rows)
    with pytest.raises(SystemExit, match=r"error: the unfreeze comparison needs vse-infinity-full runs"):
        confirm.main(["--unfreeze", str(tmp_path / "latin")])
    with pytest.raises(SystemExit):
        confirm.main([str(tmp_path / "no such folder")])
    with pytest.raises(compare.TableError, match="two runs of warmup on seed 20"):
        compare.r1_by_label([*rows, rows[0]])


def test_a_finished_run_with_damaged_records_is_named(tmp_path):
    from examples.selection_study import compare

    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.csv").write_text("step,loss\n1,0.5\n")
    (run / "dev.jsonl").write_text('{"global_step": 1}\n{"global_step": "x"}\n')
    (run / "results.json").write_text("{}")
    with pytest.raises(compare.TableError, match=r"dev.jsonl, line 2: not a record with an integer global_step"):
        compare.read_run(run)
    (run / "dev.jsonl").write_text('{"global_step": 1}\n')
    (run / "steps.csv").write_text("step,loss\n1,\n")
    with pytest.raises(compare.TableError, match=r"steps.csv, line 2: no step and loss numbers"):
        compare.read_run(run)
    (run / "results.json").unlink()
    (run / "steps.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(compare.TableError, match=r"results.json: missing from a finished run"):
        compare.read_run(run)


def test_runs_without_test_metrics_give_tables_not_a_crash():
    """--no-eval-test leaves test R@1 NaN: the tables say so instead of crashing after every run."""
    from examples.selection_study import compare
    from examples.selection_study.intervals import interval

    assert str(interval([math.nan, 1.0])) == "no value (a run without test metrics)"
    rows = [fact_row(loss, s, math.nan, math.nan) for loss in ("sum", "warmup", "hn") for s in range(2)]
    assert "| F1 |" in compare.facts(rows)


def test_study_refuses_impossible_numbers(capsys):
    from examples.selection_study import study

    for flags in (["--jobs", "-3"], ["--threads", "0"], ["--select-seeds", "-1"]):
        with pytest.raises(SystemExit):
            study.parse_args(flags)
        assert flags[0] in capsys.readouterr().err


def test_a_refused_compare_touches_no_data_and_reads_a_root_as_a_path(data_root, tmp_path):
    """Reuse is checked before the data are prepared, and data_c and data_c/ are one root."""
    from examples.selection_study import compare

    out = tmp_path / "out"
    compare.main(["--out", str(out), "--root", str(data_root), *SMOKE_COMPARE, "--losses", "sum"])
    compare.main(["--out", str(out), "--root", str(data_root) + "/", *SMOKE_COMPARE, "--losses", "sum"])  # reused
    fresh = tmp_path / "fresh-root"
    with pytest.raises(SystemExit, match=r"other arguments than this comparison asks for"):
        compare.main(["--out", str(out), "--root", str(fresh), *SMOKE_COMPARE, "--losses", "sum"])
    assert not fresh.exists()


def test_a_second_compare_never_deletes_a_run_another_one_is_training(data_root, tmp_path):
    """Two compares into one --out: the second deleted the first's unfinished run (an rmtree that
    ignored the run's lock). Now the pipeline's lock refuses it and the records stay."""
    import fcntl

    from examples.rvsepp import train as train_module
    from examples.selection_study import compare

    out = tmp_path / "out"
    run = out / "runs" / "sum_seed0"
    run.mkdir(parents=True)
    (run / "steps.csv").write_text("step,loss\n1,0.5\n")
    with open(run / train_module.LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=r"sum_seed0: .*in use by another run"):
            compare.main(["--out", str(out), "--root", str(data_root), *SMOKE_COMPARE, "--losses", "sum"])
    assert (run / "steps.csv").read_text() == "step,loss\n1,0.5\n"
    compare.main(["--out", str(out), "--root", str(data_root), *SMOKE_COMPARE, "--losses", "sum"])  # free: retrained
    assert (run / "results.json").is_file()


@pytest.mark.slow
def test_sigterm_stops_compares_workers_and_starts_no_queued_run(data_root, tmp_path):
    """With --jobs 2, SIGTERM left the workers training on, and queued runs started after Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "examples.selection_study.compare", "--out", str(out), "--root", str(data_root)]
    command += ["--preset", "smoke", "--seeds", "0", "1", "2", "--losses", "sum", "--jobs", "2", "--steps", "400"]
    command += ["--", "--epochs", "30"]  # (the smoke preset trains one epoch: the runs must outlast the signal)
    log = tmp_path / "compare.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=root, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    runs = [out / "runs" / f"sum_seed{seed}" for seed in (0, 1)]
    while not all((run / "steps.csv").exists() or (run / ".lock").exists() for run in runs):  # both training
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(3)
    assert not (out / "runs" / "sum_seed2").exists(), "a run ended early: " + log.read_text()[-3000:]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    time.sleep(1)
    workers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not workers, workers
    assert not (out / "runs" / "sum_seed2").exists(), log.read_text()[-3000:]  # the queued run never started


def test_a_full_disk_never_leaves_a_table_cut_mid_row(tmp_path, monkeypatch):
    """compare wrote its tables in place: a full disk cut steps.csv mid-row. Each table is now
    written whole or not at all, with one line naming it."""
    from examples.rvsepp.train import RunError
    from examples.selection_study import compare

    path = tmp_path / "runs.csv"
    rows = [{name: 1.0 for name in compare.RUN_COLUMNS} | {"loss": "sum", "commit": "c", "machine": "m"}]
    compare.write_runs_csv(path, rows)
    before = path.read_bytes()

    class FullDisk:
        def __init__(self, handle, **kwargs):
            self.handle = handle

        def writeheader(self):
            self.handle.write("loss,epsi")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare.csv, "DictWriter", FullDisk)
    with pytest.raises(RunError, match=r"could not write .*runs.csv: No space left on device; the previous runs.csv"):
        compare.write_runs_csv(path, rows)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_confirm_reproduces_the_committed_verdicts_and_never_writes_a_poorer_one(tmp_path):
    """confirm on docs/_results/confirmation replaced its verdict with 'No verdict (0 of 8)':
    the committed layout (<preset>_runs.csv) was not the one it read. It reads both, reproduces
    every committed verdict byte for byte, and refuses to replace a verdict with one on fewer pairs."""
    import shutil
    from pathlib import Path

    from examples.selection_study import confirm

    results = Path(__file__).resolve().parents[1] / "docs" / "_results"
    for name, flags in (("confirmation", []), ("unfreeze", ["--unfreeze"]), ("swap", ["--swap"])):
        copy = shutil.copytree(results / name, tmp_path / name)
        confirm.main([*flags, str(copy)])
        for verdict in ("verdict.md", "verdict.csv"):
            assert (copy / verdict).read_bytes() == (results / name / verdict).read_bytes(), (name, verdict)
    (tmp_path / "confirmation" / "calibrated_runs.csv").unlink()
    before = (tmp_path / "confirmation" / "verdict.md").read_bytes()
    with pytest.raises(SystemExit, match=r"verdict.csv holds a verdict on more pairs .* 8 pairs there, 0 here"):
        confirm.main([str(tmp_path / "confirmation")])
    assert (tmp_path / "confirmation" / "verdict.md").read_bytes() == before


def test_the_settings_verdict_grades_each_factor_against_its_references(tmp_path):
    from examples.selection_study import confirm

    noise = [0.0, 0.3, -0.2, 0.1, -0.1, 0.2, -0.3, 0.0]
    ahead = {
        "warmup": [x - 3 for x in noise],
        "vse-infinity-full": noise,
        "selhn eps=0.05": [x + 2 + 0.1 * (i % 2) for i, x in enumerate(noise)],
    }

    def with_stall(rows, stalled_seeds):
        for row in rows:
            on = row["loss"] == "warmup" and int(row["seed"]) in stalled_seeds
            row.update(stalled_steps_after_unfreeze=50.0 if on else 0.0, stall_loss_share=1.0 if on else math.nan)
        return rows

    parts = {
        "factor-0.01": with_stall(confirmation_rows(ahead, seeds=5), {20, 21, 22}),
        "factor-10": confirmation_rows({k: v for k, v in ahead.items() if k != "warmup"}, seeds=7),
    }
    sentences, table = confirm.settings_verdict(parts)
    grades = {(line["preset"], line["reference"]): line["grade"] for line in table}
    assert grades == {
        ("calibrated-unfreeze, factor-0.01", "vse-infinity-full"): "beats",
        ("calibrated-unfreeze, factor-0.01", "warmup"): "beats",
        ("calibrated-unfreeze, factor-10", "vse-infinity-full"): "no verdict",  # 7 of its 8 seeds
    }
    text = "\n".join(sentences)
    assert "the warm-up went back to the plateau after the unfreeze on 3 of 5 seeds (20, 21, 22)" in text
    assert "factor-1 (backbone factor 1 (VSE++'s finetuning), summed, clipped at 2.0): not run." in text
    assert "factor-10: selhn eps=0.05 minus vse-infinity-full: a pilot (7 of 8 seeds), no verdict" in text
    assert "beats vse-infinity-full (+2.04" in text and "with one seed left out: beats 5" in text
    for part, rows in parts.items():  # from the runs.csv files compare writes
        (tmp_path / part).mkdir()
        write_rows(tmp_path / part / "runs.csv", rows)
    confirm.main(["--settings", str(tmp_path)])
    assert "| calibrated-unfreeze, factor-0.01 | selhn eps=0.05 | warmup |" in (tmp_path / "verdict.md").read_text()
    with pytest.raises(SystemExit):
        confirm.main(["--settings", "--swap", str(tmp_path)])


USER_RULES_MODULE = """
from tests.user_rules import TopKAveraged as TopK  # the rules page's top-k rule


class NotARule:
    pass
"""


def test_compare_trains_a_rule_of_your_own_given_as_module_class_arguments(data_root, tmp_path, monkeypatch):
    from examples.selection_study import compare

    (tmp_path / "my_rules_for_compare.py").write_text(USER_RULES_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "my_rules_for_compare:TopK(k=2)"
    common = ["--root", str(data_root), "--preset", "smoke", "--seeds", "0", "--epsilons", "--steps", "2"]
    common += ["--eval-steps", "2", "--log-every", "1", "--out", str(tmp_path / "out")]
    compare.main([*common, "--losses", "sum", spec])
    rows = compare.read_runs_csv(tmp_path / "out" / "runs.csv")
    assert [row["loss"] for row in rows] == ["sum", spec]
    assert (tmp_path / "out" / "runs" / "my_rules_for_compare-TopK-k=2_seed0" / "results.json").is_file()
    refused = {
        "nonsense": "unknown 'nonsense': choose from",
        "no_such_module_here:TopK(k=2)": "cannot import no_such_module_here",
        "my_rules_for_compare:Missing": "my_rules_for_compare has no Missing",
        "my_rules_for_compare:TopK(k=len)": "the arguments must be Python literals",
        "my_rules_for_compare:TopK(q=2)": "unexpected keyword argument 'q'",
        "my_rules_for_compare:NotARule": "must be a selhn.rules.SelectionRule",
    }
    for name, message in refused.items():
        with pytest.raises(SystemExit):
            compare.parse_args([*common, "--losses", name])
        assert message in capture_error(compare.parse_args, [*common, "--losses", name])
    assert "share one run folder" in capture_error(compare.parse_args, [*common, "--losses", spec, spec])


def capture_error(parse, argv):
    """What argparse printed to stderr when it refused ``argv``."""
    import contextlib
    import io

    stream = io.StringIO()
    with contextlib.redirect_stderr(stream), contextlib.suppress(SystemExit):
        parse(argv)
    return stream.getvalue()


def test_compare_reuses_runs_trained_on_a_byte_identical_copy_of_the_data(data_root, tmp_path):
    """Two streams that each generated the same data into a folder of their own: their runs
    are reused with --data-copies (checked byte for byte), and refused without it or when a
    copy differs."""
    import shutil

    from examples.selection_study import compare

    root, copy = tmp_path / "data", tmp_path / "copy"
    shutil.copytree(data_root, root)
    compare.prepare_data(["--preset", "smoke", "--root", str(root)])  # (the vocabulary too)
    shutil.copytree(root, copy)
    common = ["--preset", "smoke", "--seeds", "0", "--losses", "sum", "--epsilons", "--steps", "2"]
    common += ["--eval-steps", "2", "--log-every", "1", "--out", str(tmp_path / "out")]
    compare.main([*common, "--root", str(copy)])
    results = tmp_path / "out" / "runs" / "sum_seed0" / "results.json"
    before = results.read_bytes(), results.stat().st_mtime_ns
    with pytest.raises(SystemExit, match="trained with other arguments"):
        compare.main([*common, "--root", str(root)])
    compare.main([*common, "--root", str(root), "--data-copies", str(copy)])
    assert (results.read_bytes(), results.stat().st_mtime_ns) == before  # reused, not trained again
    assert "sum" in (tmp_path / "out" / "runs.csv").read_text()
    (copy / "synthetic_precomp" / "train_caps.txt").write_text("another caption\n")
    with pytest.raises(SystemExit, match=r"does not hold --root .* byte for byte \(synthetic_precomp/train_caps.txt\)"):
        compare.main([*common, "--root", str(root), "--data-copies", str(copy)])
