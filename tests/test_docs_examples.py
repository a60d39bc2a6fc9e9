"""The docs' complete user test file runs and passes (so the page can never drift)."""

import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_user_test_file_on_the_docs_page_passes():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "docs" / "examples" / "test_my_loss.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout


def quoted_failure() -> str:
    """The failure message quoted on the testing page, unwrapped to one line."""
    text = (ROOT / "docs" / "testing.rst").read_text()
    block = text[text.index("    AssertionError: ") :].split("\n\n")[0]
    return " ".join(line.strip() for line in block.splitlines())


def test_the_failure_quoted_on_the_testing_page_is_what_the_helper_says():
    import pytest

    import selhn
    from selhn.testing import assert_no_vanishing

    with pytest.raises(AssertionError) as caught:
        assert_no_vanishing(lambda img, txt: selhn.functional.max_violation_loss(img @ txt.T, 0.2), max_examples=10)
    assert f"AssertionError: {caught.value}" == quoted_failure()


def test_the_docs_math_renderer_writes_mathml_and_the_offline_check_catches_what_needs_a_network():
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        import mathml
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    from docutils import nodes
    from sphinx.errors import ExtensionError

    node = nodes.math(text=r"\ell_a = \max_{n} h_n")
    markup = mathml.to_mathml(node.astext(), node, "inline")
    assert markup.startswith("<math ") and "<msub>" in markup and 'alttext="\\ell_a' in markup
    bad = nodes.math(text=r"\frac{1}{")
    bad.source, bad.line = "losses.rst", 12
    import pytest

    with pytest.raises(ExtensionError, match=r"losses.rst:12: cannot convert"):
        mathml.to_mathml(bad.astext(), bad, "inline")
    cdn = '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
    assert mathml.offline_problems(cdn) and mathml.offline_problems('<link rel="stylesheet" href="//x.org/a.css">')
    assert mathml.offline_problems(r"<p>the loss reads \(2 B m\)</p>")  # what MathJax would have typeset
    assert mathml.offline_problems("<p>$$ x $$</p>")
    # a command latex2mathml does not know is copied into the MathML as it is: the page shows "\\arg"
    unknown = nodes.math(r"\hat n = \arg\max_n s_n", r"\hat n = \arg\max_n s_n")
    assert mathml.offline_problems(mathml.to_mathml(unknown.astext(), unknown, "inline"))
    known = nodes.math(r"\mathop{\mathrm{arg\,max}}_n s_n", r"\mathop{\mathrm{arg\,max}}_n s_n")
    assert mathml.offline_problems(mathml.to_mathml(known.astext(), known, "inline")) == []
    assert mathml.offline_problems('<p>R@1 and <a class="reference external" href="mailto:R%4010">R@10</a></p>')
    fine = f'<script src="_static/furo.js"></script><p>{markup}</p><pre>r"\\(x\\)"</pre>'
    assert mathml.offline_problems(fine) == []


def test_the_built_site_is_checked_for_offline_math(tmp_path):
    """A build that would load MathJax from a CDN fails (the extension's check is on)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-q",
            "-b",
            "html",
            "-D",
            "html_math_renderer=mathjax",
            "-D",
            "extensions=sphinx.ext.mathjax,mathml",
            str(ROOT / "docs" / "_ext" / "probe"),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "not self-contained" in result.stderr, result.stderr[-2000:]


def test_the_swap_patches_add_lines_that_run_against_selhn():
    """docs/patches/*.diff (checked by hand against the upstream files they name) add lines
    that must keep working with selhn's API: each is executed with stand-ins for their objects."""
    import types

    import torch

    patches = sorted((ROOT / "docs" / "patches").glob("*.diff"))
    assert [p.name for p in patches] == ["scan_model.diff", "vse_infty_vse.diff", "vsepp_model.diff"]
    for patch in patches:
        added = [
            line[1:] for line in patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")
        ]
        assert any("selhn" in line for line in added), patch.name
        # the epsilon the docs advise (the docs' page "Which loss, which epsilon?"), in each patch
        assert any("epsilon=0.05" in line for line in added), patch.name
        opt = types.SimpleNamespace(margin=0.2)
        holder = types.SimpleNamespace(margin=0.2, criterion=None)
        scope = {"opt": opt, "self": holder, "scores": torch.randn(5, 5)}
        for line in added:
            code = line.strip()
            if code.startswith("return "):
                code = "result = " + code[len("return ") :]
            exec(code, scope)
        criterion = holder.criterion if holder.criterion is not None else None
        if criterion is not None:
            img = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
            assert criterion(img, img).ndim == 0
            assert criterion.epsilon == 0.05 and criterion.reduction == "sum"
        else:
            assert scope["result"].ndim == 0


def test_every_page_that_advises_gives_the_answer_of_the_decision_page():
    """README, the decision page, the swap guides, the stall page, Results and the collapse
    alarm advise the same thing (SelHN at epsilon 0.05, or the warm-up; a schedule or SelHN
    at 0.05 where a backbone unfreezes), and the intervals the decision page quotes are the
    ones its verdicts recorded."""
    import csv

    from selhn.diagnostics import advice
    from selhn.rules import MaxViolation

    pages = {
        name: (ROOT / name).read_text()
        for name in (
            "README.md",
            "docs/choose.rst",
            "docs/swap.rst",
            "docs/stall.rst",
            "docs/results.rst",
            "docs/getting_started.rst",
        )
    }
    pages["the alarm"] = advice(MaxViolation())
    for name, text in pages.items():
        assert "epsilon=0.05" in text, name
    for name in ("README.md", "docs/choose.rst", "docs/swap.rst", "docs/results.rst", "the alarm"):
        assert "warm" in pages[name], name  # the warm-up stays the other answer
    for name in ("README.md", "docs/choose.rst", "docs/stall.rst", "docs/results.rst", "the alarm"):
        assert "backbone" in pages[name], name
    stale = ("measured advice is to keep the warm-up", "try a larger epsilon", "Use it where hard negatives must")
    for name, text in pages.items():
        assert not any(phrase in text for phrase in stale), name
    choose = " ".join(pages["docs/choose.rst"].split())
    for verdicts in ("docs/_results/confirmation/verdict.csv", "docs/_results/unfreeze/verdict.csv"):
        with open(ROOT / verdicts) as handle:
            for row in csv.DictReader(handle):
                if row["SelHN"] == "selhn eps=0.05" and row["minus"] in ("warmup", "vse-infinity-full"):
                    quoted = f"{float(row['mean']):+.2f} R@1 [{float(row['low']):+.2f}, {float(row['high']):+.2f}]"
                    shorter = f"{float(row['mean']):+.2f} [{float(row['low']):+.2f}, {float(row['high']):+.2f}]"
                    assert quoted in choose or shorter in choose, (verdicts, row)


#: What a snippet may assume (its first line: "# assumes: NAME, NAME (...)"), as the test provides it.
ASSUMED = {
    "img_emb": lambda: torch.nn.functional.normalize(torch.randn(6, 8), dim=1).requires_grad_(),
    "cap_emb": lambda: torch.nn.functional.normalize(torch.randn(6, 8), dim=1).requires_grad_(),
    "scores": lambda: torch.randn(6, 6, requires_grad=True),
    "image_ids": lambda: torch.tensor([0, 0, 1, 2, 3, 3]),
    "self": lambda: types.SimpleNamespace(),
    "opt": lambda: types.SimpleNamespace(margin=0.2, max_violation=True, measure="cosine"),
}


def python_blocks(text: str, fence: str) -> list[str]:
    """The Python code blocks of a markdown (```python) or reST (.. code-block:: python) text."""
    if fence == "markdown":
        return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    return [textwrap.dedent(block) for block in blocks]


def test_every_readme_and_docs_snippet_runs_as_written_with_what_it_says_it_assumes(tmp_path, monkeypatch):
    """The README's snippets used img_emb, selhn, scores without saying so; the rules page's
    training block used selhn and Tempered. Each block now runs as written, given exactly the
    names its first line says it assumes (and the pipeline's block from the source tree)."""
    import selhn

    sources = [(ROOT / "README.md", "markdown"), (ROOT / "docs" / "rules.rst", "rest")]
    ran = 0
    for path, fence in sources:
        for block in python_blocks(path.read_text(), fence):
            first = block.strip().splitlines()[0]
            scope: dict[str, object] = {}
            if first.startswith("# assumes:"):
                for name in re.findall(r"\b([A-Za-z_]\w*)\b", first.split(":", 1)[1].split("(")[0]):
                    scope[name] = ASSUMED[name]() if name in ASSUMED else None
                for setup in re.findall(r"`([^`]+)`", first):  # code it says stands elsewhere in the file
                    exec(setup, scope)
            if "Tempered" in scope:
                scope["Tempered"] = lambda temperature: selhn.rules.SelHN(temperature)  # any rule stands in
            code = block
            if "train.train(" in code:  # the pipeline: a tiny run instead of the cpu preset's minutes
                monkeypatch.chdir(ROOT)
                code = code.replace('"--preset", "cpu"', '"--preset", "smoke", "--max-steps", "1", "--no-eval-test"')
                code = code.replace('"runs/tempered"', repr(str(tmp_path / "tempered")))
                code = code.replace('"--loss", "tempered"', f'"--loss", "tempered", "--root", {str(tmp_path / "d")!r}')
            exec(compile(code, str(path), "exec"), scope)
            ran += 1
            if "loss" in scope and isinstance(scope["loss"], torch.Tensor) and scope["loss"].requires_grad:
                assert scope["loss"].ndim == 0
            if "criterion" in getattr(scope.get("self"), "__dict__", {}):
                assert scope["self"].criterion.epsilon == 0.05
    assert ran >= 5


def test_the_unfreeze_prose_numbers_come_from_the_committed_runs_csv():
    """Every range the decision page, the stall page, Results and the README quote about the
    unfreeze comparison is computed here from docs/_results/unfreeze/runs.csv (the prose once
    said 20-40 and 20-50 steps where the CSV gives 10-24 and 39-68)."""
    import csv

    with open(ROOT / "docs/_results/unfreeze/runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    warmup = [r for r in rows if r["loss"] == "warmup"]
    selhn05 = [r for r in rows if r["loss"] == "selhn" and r["epsilon"] == "0.05"]
    total = 468  # 6 epochs of 78 steps: the stall lasts to the end of the run
    begins = [total - float(r["stalled_steps_after_unfreeze"]) for r in warmup]

    def span(values: list[float], digits: int = 0) -> str:
        low, high = min(values), max(values)
        return f"{low:.{digits}f}-{high:.{digits}f}"

    after_unfreeze = span([b - float(r["unfreeze_step"]) for b, r in zip(begins, warmup, strict=True)])
    alarm_after = span([float(r["alarm_steps"]) - b for b, r in zip(begins, warmup, strict=True)])
    stall = span([float(r["stalled_steps_after_unfreeze"]) for r in warmup])
    selhn_stall = span([float(r["stalled_steps_after_unfreeze"]) for r in selhn05])
    selhn_end = span([float(r["final_dev_rsum"]) for r in selhn05], 1)
    assert (after_unfreeze, alarm_after, stall, selhn_stall, selhn_end) == (
        "10-24",
        "39-68",
        "288-302",
        "2-56",
        "576.2-582.1",
    )
    pages = {name: " ".join((ROOT / name).read_text().split()) for name in ("docs/results.rst", "docs/choose.rst")}
    for quoted in (after_unfreeze, alarm_after, stall, selhn_stall, selhn_end):
        assert quoted in pages["docs/results.rst"], quoted
    for quoted in (alarm_after, stall, selhn_stall):
        assert quoted in pages["docs/choose.rst"], quoted
    assert alarm_after in " ".join((ROOT / "docs/stall.rst").read_text().split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    with open(ROOT / "docs/_results/confirmation/verdict.csv") as handle:
        for row in csv.DictReader(handle):
            if row["SelHN"] == "selhn eps=0.05" and row["minus"] == "warmup":
                assert f"{float(row['mean']):+.2f}" in readme and f"{float(row['low']):+.2f}" in readme, row


def test_the_swap_configurations_verdict_is_quoted_as_recorded():
    """The decision page, the swap guide, Results and the README quote the summed-scale verdict
    (docs/_results/swap/verdict.csv) with its intervals, and say it is undecided."""
    import csv

    with open(ROOT / "docs/_results/swap/verdict.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["grade"] for row in rows] == ["undecided", "undecided"]
    for name in ("README.md", "docs/choose.rst", "docs/swap.rst", "docs/results.rst"):
        text = " ".join((ROOT / name).read_text().split())
        assert "undecided" in text, name
        for row in rows:
            interval = f"[{float(row['low']):+.2f}, {float(row['high']):+.2f}]"
            assert f"{float(row['mean']):+.2f}" in text and interval in text, (name, row)


def test_the_stability_quoted_beside_each_verdict_comes_from_the_committed_runs():
    """Each verdict the decision page and the README quote carries its leave-one-seed-out
    stability and the seeds "beats" would need, computed here from the committed runs.csv."""
    from examples.selection_study.compare import r1_by_label, read_runs_csv
    from examples.selection_study.confirm import grade
    from examples.selection_study.intervals import leave_one_out, paired_interval, seeds_to_exclude_zero

    pages = {name: " ".join((ROOT / name).read_text().split()) for name in ("README.md", "docs/choose.rst")}
    results = ROOT / "docs" / "_results"
    verdicts = [  # (runs.csv, SelHN, reference, the grades the pages count, whether they give the seeds needed)
        (results / "confirmation" / "calibrated_runs.csv", "selhn eps=0.05", "warmup", ("not worse",), True),
        (results / "confirmation" / "calibrated-stall_runs.csv", "selhn eps=0.05", "warmup", ("not worse",), True),
        (results / "unfreeze" / "runs.csv", "selhn eps=0.05", "vse-infinity-full", ("beats", "not worse"), False),
        (
            results / "unfreeze_settings" / "factor-10_runs.csv",
            "selhn eps=0.05",
            "vse-infinity-full",
            ("beats", "not worse"),
            False,
        ),
        (
            results / "unfreeze_settings" / "factor-1_runs.csv",
            "selhn eps=0.05",
            "vse-infinity-full",
            ("beats", "not worse"),
            False,
        ),
    ]
    for path, selhn, reference, counted, with_needed in verdicts:
        values = r1_by_label(read_runs_csv(path))
        grades = [grade(rest) for rest in leave_one_out(values[selhn], values[reference]).values()]
        needed = seeds_to_exclude_zero(paired_interval(values[selhn], values[reference]))
        held = sum(grades.count(name) for name in counted)
        for name, text in pages.items():
            assert f"{held} of {len(grades)}" in text, (name, path, grades)
            if with_needed:
                assert f"about {needed}" in text or f"and {needed} seeds" in text, (name, path, needed)


def test_the_settings_verdicts_are_quoted_as_the_committed_runs_give_them():
    """Results, the decision page and the README quote each graded part of the unfreeze at the
    settings users run (docs/_results/unfreeze_settings) with its interval and its grade, as
    confirm --settings computes them from the committed runs.csv; the parts' collapse counts too."""
    from examples.selection_study import confirm
    from examples.selection_study.compare import read_runs_csv

    folder = ROOT / "docs" / "_results" / "unfreeze_settings"
    paths = {part: folder / f"{part}_runs.csv" for part in confirm.SETTINGS_PARTS}
    rows = {part: read_runs_csv(path) for part, path in paths.items() if path.is_file()}
    sentences, table = confirm.settings_verdict(rows)
    pages = {name: " ".join((ROOT / name).read_text().split()) for name in ("README.md", "docs/choose.rst")}
    pages["docs/results.rst"] = " ".join((ROOT / "docs" / "results.rst").read_text().split())
    graded = [line for line in table if line["grade"] != "no verdict"]
    assert graded, "no part of the settings comparison has all its seeds"
    for line in graded:
        d = line["difference"]
        quoted = (f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]", f"{d.mean:+.2f} R@1 [{d.low:+.2f}, {d.high:+.2f}]")
        for name, text in pages.items():
            if line["reference"] == "vse-infinity-full" or name == "docs/results.rst":
                assert any(form in text for form in quoted), (name, line)
                assert line["grade"] in text, (name, line["grade"])
    for sentence in sentences:
        if "went back to the plateau" in sentence:  # "on N of M seeds"
            counted = sentence.split(" on ", 1)[1].split(" seeds")[0]
            assert f"on {counted} seeds" in pages["docs/results.rst"], sentence
