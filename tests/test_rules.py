"""selhn.rules: the rule API, its plain autograd path and the built-in rules on both paths.

The plain path serves any rule; for the built-in rules it is a second implementation beside
the lean core, and both are judged by the literal loop references of tests/reference.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import selhn
from selhn import _forms
from selhn import functional as F
from selhn.rules import Anchors, MaxViolation, Selection, SelectionRule, SelHN, SumOfHinges, side_losses
from selhn.testing import assert_finite_gradients, assert_no_vanishing, duplicate_ids, embedding_pairs, score_matrices
from tests.reference import reference_loss
from tests.user_rules import (
    HardestAndHalfOfAll,
    HardestBelow,
    TopKAveraged,
    hardest_and_half_of_all,
    hardest_below,
    k_hardest,
    literal,
)

BUILT_IN = {"selhn": SelHN(0.05), "selhn-sum": SelHN(0.05, "sum"), "hn": MaxViolation(), "sum": SumOfHinges()}
REFERENCE = {
    "selhn": {"loss": "selhn", "epsilon": 0.05},
    "selhn-sum": {"loss": "selhn", "epsilon": 0.05, "fallback": "sum"},
    "hn": {"loss": "hn"},
    "sum": {"loss": "sum"},
}
FORMS = {"low rank": (1.0, 0.0), "sparse": (0.0, 1.0), "dense": (0.0, 0.0)}


class Plain(SelectionRule):
    """A built-in rule's weights as a user rule: forced onto the plain autograd path."""

    def __init__(self, inner: SelectionRule) -> None:
        self.inner = inner

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return self.inner.weights(anchors)

    def __repr__(self) -> str:
        return f"Plain({self.inner!r})"


class Tempered(SelectionRule):
    """The rule study's tempered rule, as a user writes it: w_n = exp((s_n - s_hardest) / T)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def weights(self, anchors: Anchors) -> torch.Tensor:
        return torch.exp((anchors.scores - anchors.hardest.unsqueeze(1)) / self.temperature)

    def __repr__(self) -> str:
        return f"Tempered({self.temperature})"


def tempered_reference(scores: torch.Tensor, temperature: float, margin: float = 0.2) -> torch.Tensor:
    """Tempered by the letter: one anchor and one negative at a time (per-anchor, (2, B))."""
    size = scores.shape[0]
    rows = []
    for direction in (0, 1):
        row = []
        for a in range(size):
            score = [scores[a, n] if direction == 0 else scores[n, a] for n in range(size)]
            negatives = [n for n in range(size) if n != a]
            total = scores.sum() * 0
            if negatives:
                hardest = max(score[n].item() for n in negatives)
                for n in negatives:
                    weight = math.exp((score[n].item() - hardest) / temperature)
                    total = total + weight * torch.relu(margin - scores[a, a] + score[n])
            row.append(total)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def mask_of(ids: torch.Tensor | None) -> torch.Tensor | None:
    return None if ids is None else ids[:, None] == ids[None, :]


# ------------------------------------------------------------------ both paths against the loop references
@pytest.mark.parametrize("name", sorted(BUILT_IN))
@given(scores=score_matrices(levels=5), data=st.data())
def test_built_in_rules_on_the_plain_path_match_the_reference(name, scores, data):
    ids = data.draw(st.none() | duplicate_ids(scores.shape[0]))
    scores = scores.double()
    for rule in (BUILT_IN[name], Plain(BUILT_IN[name])):  # the lean core, then plain autograd
        leaf = scores.clone().requires_grad_()
        got = F.rule_loss(leaf, rule, mask=mask_of(ids), reduction="none")
        torch.autograd.backward(got.sum())
        expected_leaf = scores.clone().requires_grad_()
        expected = reference_loss(expected_leaf, reduction="none", mask=mask_of(ids), **REFERENCE[name])
        torch.autograd.backward(expected.sum())
        torch.testing.assert_close(got, expected, msg=lambda m, r=rule: f"{r!r}: {m}")
        torch.testing.assert_close(leaf.grad, expected_leaf.grad, msg=lambda m, r=rule: f"{r!r}: {m}")


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(BUILT_IN))
@given(pair=embedding_pairs(), data=st.data())
def test_every_lean_form_equals_the_plain_path(name, form, pair, data):
    """The lean backward's forms (dense, low rank, sparse; rows where few anchors fall back)
    against the plain path of the same rule, over embeddings, in values and gradients."""
    img, txt = (x.double() for x in pair)
    ids = data.draw(st.none() | duplicate_ids(img.shape[0]))
    results = []
    for rule in (BUILT_IN[name], Plain(BUILT_IN[name])):
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
        with _forms.forced_pair_form_fractions(*FORMS[form]):
            value = selhn.RuleLoss(rule, reduction="none")(*leaves, ids=ids)
        torch.autograd.backward(value.sum())
        results.append((value, leaves[0].grad, leaves[1].grad))
    for lean, plain in zip(*results, strict=True):
        torch.testing.assert_close(lean, plain)


def test_built_in_modules_carry_their_rule():
    assert repr(selhn.SelHNLoss(epsilon=0.05, fallback="sum").rule) == "SelHN(epsilon=0.05, fallback='sum')"
    assert isinstance(selhn.MaxViolationLoss().rule, MaxViolation)
    assert isinstance(selhn.SumHingeLoss().rule, SumOfHinges)
    switch = selhn.ContrastiveLoss()
    assert isinstance(switch.rule, SumOfHinges)
    switch.max_violation_on()
    assert isinstance(switch.rule, MaxViolation)


# ------------------------------------------------------------------ a user's rule
@given(scores=score_matrices(levels=4))
def test_a_user_rule_matches_its_literal_definition(scores):
    scores = scores.double()
    leaf = scores.clone().requires_grad_()
    got = F.rule_loss(leaf, Tempered(0.05), reduction="none")
    torch.autograd.backward(got.sum())
    expected_leaf = scores.clone().requires_grad_()
    expected = tempered_reference(expected_leaf, 0.05)
    torch.autograd.backward(expected.sum())
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_equals_function_for_a_user_rule(reduction):
    generator = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(9, 6, generator=generator, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(9, 6, generator=generator, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6])
    module = selhn.RuleLoss(Tempered(0.1), reduction=reduction)(img, txt, ids=ids)
    function = F.rule_loss(img @ txt.T, Tempered(0.1), mask=mask_of(ids), reduction=reduction)
    torch.testing.assert_close(module, function)
    assert "rule=Tempered(0.1)" in repr(selhn.RuleLoss(Tempered(0.1)))


def test_a_user_rule_passes_gradcheck_in_float64():
    """gradcheck holds where the weights are locally constant (a rule whose weights move with the
    scores, such as the tempered one, is differentiated with its weights held fixed, by design,
    which finite differences cannot do)."""
    generator = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.4 * torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1)
    for rule in (Plain(SelHN(0.05)), Plain(MaxViolation()), Plain(SumOfHinges())):
        criterion = selhn.RuleLoss(rule, reduction="sum")
        assert torch.autograd.gradcheck(criterion, (img.clone().requires_grad_(), txt.clone().requires_grad_()))


def test_half_precision_embeddings_are_scored_in_float32_for_a_user_rule():
    generator = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator), dim=1)
    half = selhn.RuleLoss(Tempered(0.1))(img.bfloat16(), txt.bfloat16())
    assert half.dtype == torch.float32
    full = selhn.RuleLoss(Tempered(0.1))(img.bfloat16().float(), txt.bfloat16().float())
    torch.testing.assert_close(half, full)


def test_the_testing_helpers_judge_a_user_rule_by_its_maths():
    """Its own rule, not its name: max violation's weights fail the vanishing check on the
    plain path as on the lean one; SelHN's and a tempered rule's keep a gradient; every rule
    keeps its gradients finite."""
    with pytest.raises(AssertionError, match="the gradient vanishes where the hardest negatives collapse"):
        assert_no_vanishing(selhn.RuleLoss(Plain(MaxViolation()), reduction="none"), max_examples=5)
    assert_no_vanishing(selhn.RuleLoss(Plain(SelHN()), reduction="none"), max_examples=5)
    assert_no_vanishing(selhn.RuleLoss(Tempered(0.1), reduction="none"), max_examples=5)
    assert_finite_gradients(selhn.RuleLoss(Tempered(0.02)), max_examples=10)


def test_gradient_norms_of_a_user_rule_equal_the_analytic_ones_of_its_built_in_twin():
    from selhn.diagnostics import gradient_norms

    generator = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(7, 5, generator=generator, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(7, 5, generator=generator, dtype=torch.float64), dim=1)
    for name, rule in (("selhn", SelHN(0.3)), ("hn", MaxViolation()), ("sum", SumOfHinges())):
        lean, plain = gradient_norms(img, txt, name, epsilon=0.3), gradient_norms(img, txt, Plain(rule))
        for field in ("image", "text", "image_anchor", "text_anchor"):
            torch.testing.assert_close(getattr(plain, field), getattr(lean, field))


def test_side_losses_of_a_rectangle_put_each_positive_at_its_column():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.4, 0.2, 0.7]], dtype=torch.float64)  # anchors 1, 2 of a batch of 3
    losses = side_losses(scores, torch.tensor([1, 2]), None, SumOfHinges(), margin=0.2)
    expected = [max(0, 0.2 - 0.9 + 0.1) + max(0, 0.2 - 0.9 + 0.5), max(0, 0.2 - 0.7 + 0.4) + max(0, 0.2 - 0.7 + 0.2)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------ bad rules
def test_bad_rules_are_refused_by_name():
    class Wrong(SelectionRule):
        def __init__(self, result):
            self.result = result

        def weights(self, anchors):
            return self.result(anchors)

    scores = torch.rand(4, 4)
    with pytest.raises(TypeError, match="rule must be a SelectionRule instance, got the class SelHN: call it"):
        F.rule_loss(scores, SelHN)
    with pytest.raises(TypeError, match=r"rule must be a selhn.rules.SelectionRule \(subclass it\), got function"):
        selhn.RuleLoss(lambda anchors: anchors.negatives)
    with pytest.raises(TypeError, match="weights must return a torch.Tensor, got list"):
        F.rule_loss(scores, Wrong(lambda a: [1.0]))
    with pytest.raises(ValueError, match=r"one weight per \(anchor, candidate\), shape \(4, 4\), got \(4,\)"):
        F.rule_loss(scores, Wrong(lambda a: a.positive))
    with pytest.raises(ValueError, match="returned a NaN or infinite weight for a negative"):
        F.rule_loss(scores, Wrong(lambda a: torch.full_like(a.scores, math.nan)))
    # what a rule returns at the positives and masked pairs is ignored, NaN included
    ignored = Wrong(lambda a: torch.where(a.negatives, 1.0, math.nan))
    torch.testing.assert_close(F.rule_loss(scores, ignored), F.sum_hinge_loss(scores))
    with pytest.raises(TypeError, match="loss must be a selhn.rules.SelectionRule"):
        selhn.distributed.global_loss(scores, scores, loss=3)


def test_rules_benchmark_script_smoke():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rules.py"
    command = [sys.executable, str(script), "--sizes", "32", "--dim", "8", "--rounds", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "SelHN, plain" in result.stdout and "SumOfHinges, lean" in result.stdout


# ------------------------------------------------------------------ a rule against its own literal loop
def test_user_rules_match_their_literal_loops():
    from selhn.testing import assert_rule_matches

    assert_rule_matches(TopKAveraged(2), literal(k_hardest(2)), max_examples=30)
    assert_rule_matches(HardestBelow(), literal(hardest_below), max_examples=30)
    assert_rule_matches(MaxViolation(), literal(k_hardest(1)), max_examples=30)
    assert_rule_matches(HardestAndHalfOfAll(), literal(hardest_and_half_of_all), max_examples=30)
    assert_rule_matches(SumOfHinges(), literal(lambda negatives, positive, margin: dict.fromkeys(negatives, 1.0)))


def test_assert_rule_matches_says_where_a_rule_and_its_loop_differ():
    from selhn.testing import assert_rule_matches

    def last_of_ties(negatives, positive, margin):  # the wrong tie rule: the highest index wins
        return {max(negatives, key=lambda n: (negatives[n], n)): 1.0} if negatives else {}

    with pytest.raises(AssertionError, match=r"the gradients with respect to the scores differ|anchor .* the rule's"):
        assert_rule_matches(MaxViolation(), literal(last_of_ties), max_examples=50)
    with pytest.raises(AssertionError, match=r"reference must return the per-anchor losses \(2, \d+\)"):
        assert_rule_matches(MaxViolation(), lambda scores, mask, margin: scores.sum(), max_examples=5)
    with pytest.raises(TypeError, match="reference must be a function"):
        assert_rule_matches(MaxViolation(), None)


# ------------------------------------------------------------------ the sparse form
def test_sparse_user_rules_take_the_lean_core_and_dense_ones_the_plain_path():
    img = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    for rule, lean in ((TopKAveraged(2), True), (HardestBelow(), True), (SelHN(0.05), True), (Tempered(0.1), False)):
        assert selhn.rules.is_sparse(rule) is lean
        loss = selhn.RuleLoss(rule, reduction="none")(img, txt)
        assert ("EmbeddingLoss" in type(loss.grad_fn).__name__) is lean, rule


class _ShorthandByDirection(SelectionRule):
    """Each direction its own shorthand: the image anchors' hardest negative, weight left out;
    the caption anchors' no candidate and one coefficient for all (``spelled_out``: the same
    choice with every tensor written out, the two halves of one (L, 2) selection)."""

    def __init__(self, spelled_out: bool) -> None:
        self.spelled_out = spelled_out

    def select(self, anchors):
        size = anchors.positive.shape[0]
        if anchors.direction == "i2t":
            hardest = anchors.hardest_index.unsqueeze(1)
            if not self.spelled_out:
                return Selection(hardest)
            return Selection(torch.cat([hardest, hardest], 1), torch.tensor([[1.0, 0.0]]).expand(size, 2))
        if not self.spelled_out:
            return Selection(every=0.25)
        nothing = torch.zeros(size, 0, dtype=torch.long)
        return Selection(nothing, nothing.to(anchors.scores.dtype), torch.full((size,), 0.25, dtype=torch.float64))


class _DenseTwin(_ShorthandByDirection):
    """The same choice on the plain path (its dense view, derived from the selection)."""

    def weights(self, anchors):
        return anchors.dense(self.select(anchors))


def test_the_shorthand_selections_equal_their_spelled_out_tensors_on_every_path():
    """Weights left out, no candidate, one number for every anchor, and one side choosing slots
    where the other chooses none: the same losses and gradients as every tensor written out, on
    score matrices and embeddings, lean and plain."""
    generator = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(7, 5, generator=generator, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(7, 5, generator=generator, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    mask = ids[:, None] == ids[None, :]
    expected = None
    for rule in (_ShorthandByDirection(False), _ShorthandByDirection(True), _DenseTwin(False)):
        assert selhn.rules.is_sparse(rule) is not isinstance(rule, _DenseTwin)
        scores = (img @ txt.T).requires_grad_()
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        on_scores = F.rule_loss(scores, rule, mask=mask, reduction="none")
        on_embeddings = selhn.RuleLoss(rule, reduction="none")(a, b, ids=ids)
        (on_scores.sum() + on_embeddings.sum()).backward()
        got = (on_scores, on_embeddings, scores.grad, a.grad, b.grad)
        if expected is None:
            expected = got
            assert on_scores[1].gt(0).any() and on_scores[0].gt(0).any()  # both forms count
            continue
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


def test_a_built_in_rules_subclass_that_overrides_the_weights_is_dense():
    class Doubled(MaxViolation):
        def weights(self, anchors):
            return 2 * super().weights(anchors)

    scores = torch.rand(5, 5, dtype=torch.float64)
    assert not selhn.rules.is_sparse(Doubled())
    torch.testing.assert_close(F.rule_loss(scores, Doubled()), 2 * F.max_violation_loss(scores, reduction="mean"))


def test_a_built_in_rules_subclass_is_checked_like_any_rule():
    # the built-in rules' own selections are not checked on every call; a subclass's are
    @dataclass(frozen=True)
    class Soft(SelHN):
        def falls_back(self, anchors):
            return (anchors.gap.abs() < self.epsilon).unsqueeze(1)  # (L, 1): one column too many

    scores = torch.rand(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Soft\(epsilon=0.05, fallback='mean'\).select must return candidate"):
        F.rule_loss(scores, Soft(0.05))


def test_a_rule_with_neither_form_is_refused_by_name():
    class Nothing(SelectionRule):
        pass

    with pytest.raises(TypeError, match="Nothing defines neither select\\(\\) .* nor weights\\(\\)"):
        selhn.RuleLoss(Nothing())


def test_bad_selections_are_refused_by_name():
    from selhn.rules import Selection

    class Returns(SelectionRule):
        def __init__(self, make):
            self.make = make

        def select(self, anchors):
            return self.make(anchors)

        def __repr__(self):
            return "Returns()"

    scores = torch.rand(4, 4)
    one = torch.zeros(4, 1, dtype=torch.long)
    cases = [
        (lambda a: (one, torch.ones(4, 1)), TypeError, "select must return a selhn.rules.Selection, got tuple"),
        (lambda a: Selection(one.float(), torch.ones(4, 1)), TypeError, "candidate must hold integer candidates"),
        (lambda a: Selection(one, torch.ones(4, 2)), ValueError, r"index and weight of shape \(4, k\)|shape \(4, k\)"),
        (lambda a: Selection(one[:3], torch.ones(3, 1)), ValueError, r"shape \(4, k\), one row per anchor"),
        (lambda a: Selection(one + 4, torch.ones(4, 1)), ValueError, r"a candidate outside \[0, 4\)"),
        (lambda a: Selection(one, torch.full((4, 1), math.nan)), ValueError, "NaN or infinite weight"),
        (lambda a: Selection(one, torch.ones(4, 1), every=torch.ones(3)), ValueError, r"every must have shape \(4,\)"),
        (lambda a: Selection(one, torch.ones(4, 1), every=[1.0] * 4), TypeError, "every must be a torch.Tensor"),
        # the shorthand forms
        (lambda a: Selection(weight=torch.ones(4, 1)), ValueError, "gave a weight but no candidate"),
        (lambda a: Selection(one, every=math.inf), ValueError, r"every=inf: weights must be finite"),
        (lambda a: Selection(one, every=True), TypeError, "every must be a torch.Tensor or a number, got bool"),
        (lambda a: Selection(one, every="all"), TypeError, "every must be a torch.Tensor or a number, got str"),
        (lambda a: Selection(one[:3]), ValueError, r"shape \(4, k\), one row per anchor, got \(3, 1\)"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            F.rule_loss(scores, Returns(make))
    # an integer coefficient for every anchor is a number like any other
    every_one = Returns(lambda a: Selection(every=1))
    torch.testing.assert_close(F.rule_loss(scores, every_one), F.rule_loss(scores, SumOfHinges()))


def test_a_chosen_candidate_that_is_no_negative_counts_zero():
    from selhn.rules import Selection

    class Positive(SelectionRule):  # chooses each anchor's own positive (column a of row a)
        def select(self, anchors):
            return Selection(torch.arange(anchors.scores.shape[0]).unsqueeze(1), torch.ones(anchors.scores.shape[0], 1))

    scores = torch.rand(5, 5, requires_grad=True)
    loss = F.rule_loss(scores, Positive(), reduction="sum")
    loss.backward()
    assert float(loss.detach()) == 0.0 and not scores.grad.any()


@given(score_matrices(levels=4) | score_matrices(), st.integers(1, 6), st.booleans(), st.data())
def test_top_k_takes_the_highest_negatives_with_ties_to_the_lowest_index(scores, k, bounded, data):
    size = scores.shape[0]
    ids = data.draw(duplicate_ids(size))
    negatives = (ids.unsqueeze(0) != ids.unsqueeze(1)) & ~torch.eye(size, dtype=torch.bool)
    positive = scores.diagonal().clone()
    masked = scores.masked_fill(~negatives, -math.inf)
    below = positive + 0.2 if bounded else None
    for anchors in (
        Anchors(masked, positive, negatives, 0.2),  # rows of a contiguous matrix
        Anchors(masked.t().contiguous().t(), positive, negatives, 0.2),  # columns of one (the caption anchors)
    ):
        index, chosen = anchors.top_k(k, below=below)
        for a in range(size):
            qualifying = [n for n in range(size) if negatives[a, n] and (below is None or scores[a, n] < below[a])]
            expected = sorted(qualifying, key=lambda n: (-scores[a, n].item(), n))[:k]
            got = index[a][chosen[a]].tolist()
            assert got == expected, (a, got, expected)
            assert chosen[a].sum() == len(expected)


def test_top_k_refuses_bad_arguments_by_name():
    anchors = Anchors(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2, dtype=torch.bool), 0.2)
    with pytest.raises(TypeError, match="k must be an int >= 0, got float"):
        anchors.top_k(1.5)
    with pytest.raises(ValueError, match="k must be an int >= 0, got -1"):
        anchors.top_k(-1)
    with pytest.raises(ValueError, match=r"below must have shape \(2,\), one bound per anchor"):
        anchors.top_k(1, below=torch.zeros(3))


def test_the_per_anchor_check_fails_a_batch_statistic_rule_and_passes_the_others():
    from selhn.testing import assert_per_anchor

    class AboveTheBatchMean(SelectionRule):
        def weights(self, anchors):
            mean = anchors.scores[anchors.negatives].mean()
            return (anchors.scores > mean).to(anchors.scores.dtype)

    for rule in (SelHN(0.05), SelHN(0.05, "sum"), MaxViolation(), SumOfHinges(), TopKAveraged(3), HardestBelow()):
        assert_per_anchor(rule, max_examples=20)
    assert_per_anchor(Tempered(0.1), max_examples=20)
    with pytest.raises(AssertionError, match="a rule must choose each anchor's weights from its own row"):
        assert_per_anchor(AboveTheBatchMean(), max_examples=50)


def test_a_rule_knows_which_direction_it_scores_on_every_path():
    from selhn.rules import Selection

    seen = []

    class Sparse(SelectionRule):
        def select(self, anchors):
            seen.append(anchors.direction)
            return Selection(anchors.hardest_index.unsqueeze(1), torch.ones(anchors.scores.shape[0], 1))

    class Dense(SelectionRule):
        def weights(self, anchors):
            seen.append(anchors.direction)
            return anchors.one_hot(anchors.hardest_index)

    scores = torch.rand(4, 4)
    for rule in (Sparse(), Dense()):
        F.rule_loss(scores, rule)
        selhn.RuleLoss(rule)(torch.eye(4), scores)
    assert seen == ["i2t", "t2i"] * 4


@given(score_matrices(levels=4) | score_matrices(), st.booleans())
def test_the_masked_group_maxima_agree_between_the_eager_and_the_compiled_way(scores, columns):
    """Eager, top_k re-reads only the groups whose maximum reaches the bound (or masks every
    score where most do); compiled, it masks every score: all give the same maxima (the
    compiled way run here eagerly)."""
    from unittest import mock

    from selhn import _selection as sel

    dim = 0 if columns else 1
    below = scores.diagonal() + 0.2
    group = 3
    n_groups = -(-scores.shape[dim] // group)
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        compiled_way = sel._group_bests(scores, dim, below, group, n_groups)
    for share in (0.0, 1.0):  # eager: every score masked, or only the groups reaching the bound re-read
        with mock.patch.object(sel, "REREAD_SHARE", share):
            torch.testing.assert_close(sel._group_bests(scores, dim, below, group, n_groups), compiled_way)
