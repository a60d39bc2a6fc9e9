"""Every bad argument gets a clear TypeError / ValueError naming it."""

from __future__ import annotations

import pytest
import torch

import selhn
from selhn import functional as F
from tests.capabilities import compile_works

S = torch.rand(3, 3)
FUNCTIONS = [F.selhn_loss, F.max_violation_loss, F.sum_hinge_loss]


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize(
    ("scores", "error", "message"),
    [
        ([[1.0]], TypeError, "scores must be a torch.Tensor, got list"),
        (torch.ones(3, 3, dtype=torch.long), TypeError, "scores must have a floating-point dtype, got torch.int64"),
        (torch.rand(3), ValueError, r"scores must be a 2-D \(B, B\) score matrix, got 1-D"),
        (torch.rand(2, 3, 3), ValueError, "got 3-D"),
        (torch.rand(3, 4), ValueError, r"scores must be square .* got shape \(3, 4\)"),
        (torch.rand(0, 0), ValueError, "scores must hold at least one pair"),
    ],
)
def test_bad_scores(function, scores, error, message):
    with pytest.raises(error, match=message):
        function(scores)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_options(function):
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got -0.1"):
        function(S, margin=-0.1)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got nan"):
        function(S, margin=float("nan"))
    with pytest.raises(TypeError, match="margin must be a real number .*, got str"):
        function(S, margin="0.2")
    with pytest.raises(TypeError, match=r"margin must be a real number .*, got Tensor \(use .item\(\)"):
        function(S, margin=torch.tensor(0.2))
    with pytest.raises(TypeError, match="margin must be a real number .*, got bool"):
        function(S, margin=True)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum'; got 'avg'"):
        function(S, reduction="avg")
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        function(S, mask=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        function(S, mask=[[False] * 3] * 3)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 3\) like scores, got \(2, 2\)"):
        function(S, mask=torch.zeros(2, 2, dtype=torch.bool))


def test_selhn_specific_options():
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got -1.0"):
        F.selhn_loss(S, epsilon=-1.0)
    with pytest.raises(ValueError, match="fallback must be one of 'mean', 'sum'; got 'max'"):
        F.selhn_loss(S, fallback="max")
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        selhn.SelHNLoss(epsilon=-0.5)
    with pytest.raises(ValueError, match="fallback must be one of"):
        selhn.SelHNLoss(fallback="median")


@pytest.mark.parametrize("cls", [selhn.SelHNLoss, selhn.MaxViolationLoss, selhn.SumHingeLoss, selhn.ContrastiveLoss])
def test_module_arguments(cls):
    module = cls()
    with pytest.raises(ValueError, match="img_emb must be 2-D"):
        module(torch.rand(4), torch.rand(4, 2))
    with pytest.raises(ValueError, match="txt_emb must be 2-D"):
        module(torch.rand(4, 2), torch.rand(4, 2, 1))
    with pytest.raises(ValueError, match="same batch size .* got 4 and 3"):
        module(torch.rand(4, 2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="same embedding size, got 2 and 5"):
        module(torch.rand(4, 2), torch.rand(4, 5))
    with pytest.raises(TypeError, match="img_emb must have a floating-point dtype, got torch.int64"):
        module(torch.ones(4, 2, dtype=torch.long), torch.rand(4, 2))
    with pytest.raises(TypeError, match="txt_emb must be a torch.Tensor, got list"):
        module(torch.rand(2, 2), [[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="img_emb must hold at least one row"):
        module(torch.rand(0, 2), torch.rand(0, 2))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\), one id per pair, got \(3,\)"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="ids must hold integers"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=torch.rand(4))
    with pytest.raises(TypeError, match="ids must be a 1-D integer tensor, array or sequence of ints, got str"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids="abcd")
    with pytest.raises(TypeError, match="ids must hold integers .* got str 'a.jpg'; map other ids"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=["a.jpg", "b.jpg", "a.jpg", "c.jpg"])
    with pytest.raises(ValueError, match="ids must fit in int64, got 18446744073709551616"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=[0, 1, 2, 2**64])
    with pytest.raises(TypeError, match="ids must hold integers .* got bool"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=[True, False, True, True])
    with pytest.raises(TypeError, match="ids must hold integers .* got dtype torch.bool"):
        module(torch.rand(4, 2), torch.rand(4, 2), ids=torch.tensor([True, False, True, True]))
    with pytest.raises(ValueError, match="img_emb is a meta tensor"):
        module(torch.rand(4, 2, device="meta"), torch.rand(4, 2))
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        cls(margin=-1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cls(reduction="batchmean")


def test_contrastive_switch_type():
    with pytest.raises(TypeError, match="max_violation must be a bool, got int"):
        selhn.ContrastiveLoss(max_violation=1)


# ------------------------------------------------------------------ scalar types and ids of any kind
np = pytest.importorskip("numpy")
REALS = [0.2, 1, np.float32(0.2), np.float64(0.2), np.float16(0.25), np.int64(1)]


@pytest.mark.parametrize("value", REALS, ids=lambda v: type(v).__name__)
def test_every_real_number_type_is_accepted_by_every_entry_point(value):
    from selhn import diagnostics as D
    from selhn.distributed import global_loss

    img = torch.nn.functional.normalize(torch.rand(4, 3), dim=1)
    txt = torch.nn.functional.normalize(torch.rand(4, 3), dim=1)
    scores, number = img @ txt.T, float(value)
    for function in FUNCTIONS:
        assert torch.equal(function(scores, value), function(scores, number))
    assert torch.equal(F.selhn_loss(scores, 0.2, value), F.selhn_loss(scores, 0.2, number))
    for cls in (selhn.SelHNLoss, selhn.MaxViolationLoss, selhn.SumHingeLoss, selhn.ContrastiveLoss):
        assert cls(margin=value).margin == number
    assert selhn.SelHNLoss(epsilon=value).epsilon == number
    assert torch.equal(global_loss(img, txt, "selhn", value, value), global_loss(img, txt, "selhn", number, number))
    assert D.vanishing_stats(scores, value, value).to_dict() == D.vanishing_stats(scores, number, number).to_dict()
    torch.testing.assert_close(
        D.gradient_norms(img, txt, "selhn", value, value).image,
        D.gradient_norms(img, txt, "selhn", number, number).image,
    )
    assert D.CollapseAlarm(margin=value, tolerance=value).margin == number
    assert D.TrainingMonitor(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), margin=value, epsilon=value).margin == number


def test_integer_options_take_any_integer_type_and_refuse_the_rest_by_name():
    from selhn import diagnostics as D

    assert D.CollapseAlarm(patience=np.int64(2)).patience == 2
    encoders = (torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    assert D.TrainingMonitor(*encoders, log_every=np.int32(5), history=np.uint16(9)).log_every == 5
    with pytest.raises(TypeError, match="patience must be an int >= 1, got float 2.0"):
        D.CollapseAlarm(patience=2.0)
    with pytest.raises(TypeError, match="log_every must be an int >= 1, got bool"):
        D.TrainingMonitor(*encoders, log_every=True)
    with pytest.raises(ValueError, match="history must be an int >= 1, got 0"):
        D.TrainingMonitor(*encoders, history=0)
    with pytest.raises(ValueError, match=r"min_vanishing is a share of anchors, so in \[0, 1\], got 1.5"):
        D.CollapseAlarm(min_vanishing=1.5)


def test_ids_as_numpy_arrays_and_numpy_integers():
    img = torch.nn.functional.normalize(torch.rand(4, 3), dim=1)
    txt = torch.nn.functional.normalize(torch.rand(4, 3), dim=1)
    expected = selhn.SelHNLoss()(img, txt, ids=torch.tensor([7, 7, 3, 4]))
    assert torch.equal(selhn.SelHNLoss()(img, txt, ids=np.array([7, 7, 3, 4])), expected)
    assert torch.equal(selhn.SelHNLoss()(img, txt, ids=[np.int64(7), 7, np.int32(3), 4]), expected)
    with pytest.raises(TypeError, match="ids must hold integers .* got an array of dtype float64"):
        selhn.SelHNLoss()(img, txt, ids=np.array([7.0, 7.0, 3.0, 4.0]))


def test_the_monitor_refuses_a_loss_that_is_not_one_number():
    from selhn import diagnostics as D

    monitor = D.TrainingMonitor(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), log_every=1, alarm=False)
    with pytest.raises(ValueError, match=r"loss must be the scalar training loss .* got shape \(2, 4\)"):
        monitor.step(S, torch.rand(2, 4))
    with pytest.raises(TypeError, match="loss must be a one-element torch.Tensor or None, got float"):
        monitor.step(S, 0.5)
    assert monitor.steps == 0  # a refused step is not counted
    assert monitor.step(S, torch.tensor([0.5]))["loss"] == 0.5


def test_the_testing_helpers_check_their_scalar_arguments_by_name():
    from selhn import testing as T

    assert T.batch_sizes(np.int64(2), np.int64(3)) is not None
    with pytest.raises(TypeError, match="max_size must be an int >= 1, got float"):
        T.batch_sizes(1, 3.0)
    with pytest.raises(ValueError, match="batch sizes need 1 <= min_size <= max_size, got 4 and 3"):
        T.batch_sizes(4, 3)
    with pytest.raises(ValueError, match="max_examples must be an int >= 1, got 0"):
        T.assert_finite_gradients(selhn.SelHNLoss(), max_examples=0)
    with pytest.raises(TypeError, match="min_ratio must be a real number"):
        T.assert_no_vanishing(selhn.SelHNLoss(), min_ratio="0.1")
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        T.assert_selection_rule(F.selhn_loss, epsilon=-1)
    with pytest.raises(ValueError, match="fallback must be one of"):
        T.assert_selection_rule(F.selhn_loss, fallback="max")


def test_hostile_library_arguments_are_refused_by_name():
    """Round two: an integer beyond float's range, meta ids, string ids in a numpy array,
    encoders that are not encoders, a meta loss to the monitor."""
    import numpy as np

    from selhn.diagnostics import TrainingMonitor

    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got an integer too large"):
        selhn.SelHNLoss(margin=10**400)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got an integer too large"):
        F.selhn_loss(S, epsilon=10**400)
    img = torch.nn.functional.normalize(torch.rand(3, 4), dim=1)
    with pytest.raises(ValueError, match="ids is a meta tensor"):
        selhn.SelHNLoss()(img, img, ids=torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match=r"ids must hold integers .* got an array of dtype <U1"):
        selhn.SelHNLoss()(img, img, ids=np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="ids must hold integers .* got an array of dtype float64"):
        selhn.MaxViolationLoss()(img, img, ids=np.array([0.0, 1.0, 2.0]))
    with pytest.raises(
        TypeError, match="image_encoder must be an nn.Module or an iterable of its parameters, got NoneType"
    ):
        TrainingMonitor(None, None)
    encoder = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="text_encoder must be an nn.Module .* got Tensor"):
        TrainingMonitor(encoder, torch.zeros(2))
    with pytest.raises(ValueError, match="loss is a meta tensor"):
        TrainingMonitor(encoder, encoder).step(torch.eye(3), torch.zeros((), device="meta"))


# ------------------------------------------------------------------ settings, rules and helpers under misuse
class _NaNWeights(selhn.rules.SelectionRule):
    def weights(self, anchors):
        return torch.full_like(anchors.scores, float("nan"))

    def __repr__(self) -> str:
        return "NaNWeights()"


@pytest.mark.skipif(not compile_works(), reason="torch.compile is not available on this platform")
@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_rule_under_torch_compile_refuses_nan_weights(fullgraph):
    """Eager raises a ValueError; compiled code raised nothing and returned NaN before."""
    torch._dynamo.reset()
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    compiled = torch.compile(selhn.RuleLoss(_NaNWeights()), fullgraph=fullgraph)
    with pytest.raises(RuntimeError, match=r"NaNWeights\(\).weights returned a NaN or infinite weight"):
        compiled(img, img.flip(0))
    with pytest.raises(ValueError, match=r"NaNWeights\(\).weights returned a NaN"):
        selhn.RuleLoss(_NaNWeights())(img, img.flip(0))


def test_nan_scores_are_named_as_scores_not_blamed_on_the_rule():
    class Tempered(selhn.rules.SelectionRule):
        def weights(self, anchors):
            return torch.exp((anchors.scores - anchors.hardest.unsqueeze(1)) / 0.05)

    scores = torch.rand(4, 4)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"the scores hold 1 NaN value\(s\) \(first at anchor 1, candidate 2"):
        F.rule_loss(scores, Tempered())
    scores = torch.rand(4, 4)
    scores[3, 3] = float("nan")  # a positive
    with pytest.raises(ValueError, match=r"first at the positive of anchor 3"):
        F.rule_loss(scores, Tempered())
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    img[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the embeddings or the score matrix contain NaN"):
        selhn.RuleLoss(Tempered())(img, img.flip(0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: selhn.diagnostics.gradient_norms(x, x, selhn.rules.SelHN(0.05), epsilon=-3), "epsilon applies to"),
        (lambda x: selhn.diagnostics.gradient_norms(x, x, selhn.rules.SelHN(), epsilon=0.05), r"SelHN\(epsilon=0.01"),
        (lambda x: selhn.diagnostics.gradient_norms(x, x, selhn.rules.MaxViolation(), fallback="nonsense"), "fallback"),
        (lambda x: selhn.distributed.global_loss(x, x, selhn.rules.SelHN(), epsilon=0.05), "leave epsilon out"),
        (lambda x: selhn.distributed.global_loss(x, x, selhn.rules.SelHN(), 0.2, 0.1, fallback="sum"), "epsilon and"),
    ],
)
def test_settings_beside_a_rule_are_refused_not_ignored(call, message):
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_loss_names_keep_their_epsilon_and_fallback_defaults():
    x = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    y = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    norms = [vars(selhn.diagnostics.gradient_norms(x, y, "selhn", *settings)) for settings in ((), (0.2, 0.01))]
    torch.testing.assert_close(norms[0], norms[1])
    values = [selhn.distributed.global_loss(x, y, "selhn", *settings) for settings in ((), (0.2, 0.01))]
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], selhn.SelHNLoss()(x, y))
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got -3"):
        selhn.diagnostics.gradient_norms(x, y, "selhn", epsilon=-3)


@pytest.mark.parametrize(
    ("attribute", "value", "error", "message"),
    [
        ("epsilon", -1, ValueError, "epsilon must be a finite number >= 0, got -1"),
        ("epsilon", float("nan"), ValueError, "epsilon must be a finite number >= 0, got nan"),
        ("epsilon", "0.1", TypeError, "epsilon must be a real number"),
        ("fallback", "max", ValueError, "fallback must be one of 'mean', 'sum'; got 'max'"),
        ("margin", -0.2, ValueError, "margin must be a finite number >= 0"),
        ("reduction", "avg", ValueError, "reduction must be one of"),
    ],
)
def test_module_settings_are_checked_on_assignment(attribute, value, error, message):
    criterion = selhn.SelHNLoss(epsilon=0.05)
    with pytest.raises(error, match=message):
        setattr(criterion, attribute, value)
    assert criterion.epsilon == 0.05 and criterion.fallback == "mean"  # unchanged
    criterion.epsilon = 0.1  # a valid value is taken, as a float
    assert criterion.epsilon == 0.1 and isinstance(criterion.epsilon, float)


def test_switches_and_rules_refuse_bad_assignments():
    switchable = selhn.ContrastiveLoss()
    with pytest.raises(TypeError, match="max_violation must be a bool"):
        switchable.max_violation = 1
    switchable.max_violation_on()
    assert switchable.max_violation is True
    rule = selhn.rules.SelHN(0.05)
    for attribute, value in (("epsilon", -1), ("fallback", "max")):
        with pytest.raises(AttributeError, match=f"cannot assign to field '{attribute}'"):
            setattr(rule, attribute, value)
    assert rule == selhn.rules.SelHN(0.05) and rule != selhn.rules.SelHN(0.1)  # compared by their settings


def test_the_monitor_refuses_an_alarm_that_is_not_one():
    encoder = torch.nn.Linear(2, 2)
    for alarm in (1, "yes", None):
        with pytest.raises(TypeError, match="alarm must be a CollapseAlarm, True .* or False"):
            selhn.diagnostics.TrainingMonitor(encoder, encoder, alarm=alarm)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.tensor([0.0, 1.0]), None), TypeError, "positive_column must hold integer columns"),
        ((torch.tensor([0, 5]), None), ValueError, r"columns in \[0, 3\), got values from 0 to 5"),
        ((torch.tensor([0]), None), ValueError, r"positive_column must have shape \(2,\)"),
        ((torch.tensor([0, 1]), torch.zeros(2, 3)), TypeError, "excluded must be None or a torch.bool tensor"),
        ((torch.tensor([0, 1]), torch.zeros(3, 3, dtype=torch.bool)), ValueError, r"excluded must have shape \(2, 3\)"),
    ],
)
def test_side_losses_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        selhn.rules.side_losses(torch.rand(2, 3), *args, selhn.rules.SumOfHinges(), 0.2)


def test_side_losses_refuses_a_bad_rule_margin_or_weights():
    scores, columns = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="rule must be a selhn.rules.SelectionRule"):
        selhn.rules.side_losses(scores, columns, None, None, 0.2)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        selhn.rules.side_losses(scores, columns, None, selhn.rules.SumOfHinges(), -1)

    class Returns(selhn.rules.SelectionRule):
        def __init__(self, make):
            self.make = make

        def weights(self, anchors):
            return self.make(anchors)

    with pytest.raises(TypeError, match="must return real .* weights, got dtype torch.complex64"):
        selhn.rules.side_losses(scores, columns, None, Returns(lambda a: torch.ones(2, 3, dtype=torch.complex64)), 0.2)
    with pytest.raises(ValueError, match="weights on the scores' device cpu, got meta"):
        selhn.rules.side_losses(scores, columns, None, Returns(lambda a: torch.ones(2, 3, device="meta")), 0.2)
    counts = selhn.rules.side_losses(scores, columns, None, Returns(lambda a: a.negatives), 0.2)  # bool weights
    torch.testing.assert_close(counts, selhn.rules.side_losses(scores, columns, None, selhn.rules.SumOfHinges(), 0.2))


def test_the_testing_helpers_refuse_misuse_with_their_own_words():
    from hypothesis import given
    from hypothesis import strategies as st

    from selhn import testing

    for kwargs, message in (({}, r"batch_size must be an int >= 1, got -2"), ({"max_distinct": 0}, "max_distinct")):
        size = kwargs.pop("size", -2 if not kwargs else 4)
        with pytest.raises(ValueError, match=message):
            given(testing.duplicate_ids(size, **kwargs))(lambda ids: None)()
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype .* got torch.int64"):
        given(testing.score_matrices(dtype=torch.int64))(lambda s: None)()
    with pytest.raises(ValueError, match="the batch_size strategy must draw integers >= 1, it drew 0"):
        given(testing.embedding_pairs(st.just(0)))(lambda p: None)()
    with pytest.raises(AssertionError, match="the loss must return a torch.Tensor, got float"):
        testing.assert_finite_gradients(lambda s: float(s.detach().sum()), over="scores", max_examples=2)
    with pytest.raises(AssertionError, match="the loss must return a torch.Tensor, got list"):
        testing.assert_finite_gradients(lambda i, t: [i.sum()], max_examples=2)
    with pytest.raises(AssertionError, match="no gradient to its inputs: it ignores them"):
        testing.assert_finite_gradients(lambda i, t: torch.tensor(1.0), max_examples=2)
    with pytest.raises(AssertionError, match="no gradient to its inputs"):
        testing.assert_no_vanishing(lambda i, t: torch.zeros(()), max_examples=2)
    with pytest.raises(AssertionError, match="no gradient to its inputs"):
        testing.assert_selection_rule(lambda s: torch.zeros(2, s.shape[0]), max_examples=2)
