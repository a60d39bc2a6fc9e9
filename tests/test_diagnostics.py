"""selhn.diagnostics, and the propositions of the "Why training stalls" page, property-tested."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import selhn
from selhn import diagnostics as D
from selhn.testing import (
    assert_finite_gradients,
    assert_no_vanishing,
    assert_selection_rule,
    batch_sizes,
    duplicate_ids,
    embedding_pairs,
    hardest_collapsed_pairs,
    score_matrices,
)
from tests.reference import reference_fallback_flags, reference_per_anchor

unit = torch.nn.functional.normalize


# ------------------------------------------------------------------ statistics
@given(scores=score_matrices(levels=6), epsilon=st.sampled_from([0.0, 0.01, 0.2, 1.0]), data=st.data())
def test_stats_match_brute_force(scores, epsilon, data):
    size = scores.shape[0]
    mask = None
    if data.draw(st.booleans()):
        ids = data.draw(duplicate_ids(size))
        mask = ids[:, None] == ids[None, :]
    stats = D.vanishing_stats(scores, 0.2, epsilon, mask)
    for direction, part in enumerate((stats.i2t, stats.t2i)):
        gaps, hinges, positives, hardests = [], [], [], []
        for a in range(size):
            negs = [
                (scores[a, n] if direction == 0 else scores[n, a]).item()
                for n in range(size)
                if n != a and not (mask is not None and (mask[a, n] if direction == 0 else mask[n, a]))
            ]
            if negs:
                gaps.append(scores[a, a].item() - max(negs))
                hinges.append(max(0.0, 0.2 - scores[a, a].item() + max(negs)))
                positives.append(scores[a, a].item())
                hardests.append(max(negs))
        if not gaps:  # a mean over no anchors
            assert math.isnan(part.vanishing_fraction) and math.isnan(part.gap_mean)
            continue
        n = len(gaps)
        assert part.vanishing_fraction.item() == pytest.approx(sum(abs(g) < epsilon for g in gaps) / n)
        assert part.gap_mean.item() == pytest.approx(sum(gaps) / n)
        assert part.active_fraction.item() == pytest.approx(sum(h > 0 for h in hinges) / n)
        assert part.hard_loss_mean.item() == pytest.approx(sum(hinges) / n)
        assert part.positive_mean.item() == pytest.approx(sum(positives) / n)
        assert part.hardest_mean.item() == pytest.approx(sum(hardests) / n)
        expected_q = torch.quantile(
            torch.tensor(gaps, dtype=torch.float64), torch.tensor(D.GAP_QUANTILES, dtype=torch.float64)
        )
        torch.testing.assert_close(part.gap_quantiles, expected_q)


@given(
    scores=score_matrices(levels=8),
    epsilon=st.sampled_from([0.0, 0.01, 0.125, 0.5]),
    use_mask=st.booleans(),
    data=st.data(),
)
def test_vanishing_fraction_is_exactly_the_share_of_fallback_anchors(scores, epsilon, use_mask, data):
    """Proposition 5: the diagnostic and SelHN agree on every anchor, ties included."""
    mask = None
    if use_mask:
        ids = data.draw(duplicate_ids(scores.shape[0]))
        mask = ids[:, None] == ids[None, :]
    flags = reference_fallback_flags(scores, epsilon, mask)
    stats = D.vanishing_stats(scores, epsilon=epsilon, mask=mask)
    assert stats.i2t.vanishing.tolist() == flags[0]
    assert stats.t2i.vanishing.tolist() == flags[1]
    # and the package's SelHN takes the fallback on exactly those anchors, the hard hinge elsewhere
    per = selhn.functional.selhn_loss(scores, epsilon=epsilon, mask=mask, reduction="none")
    fallback = reference_per_anchor(scores, "selhn", epsilon=math.inf, mask=mask)
    hard = reference_per_anchor(scores, "hn", mask=mask)
    for direction in (0, 1):
        for a, flag in enumerate(flags[direction]):
            expected = (fallback if flag else hard)[direction][a]
            torch.testing.assert_close(per[direction, a], expected.to(per.dtype))


def test_stats_to_dict_and_edge_cases():
    stats = D.vanishing_stats(torch.tensor([[0.5]]))  # no negatives at all
    flat = stats.to_dict()
    assert math.isnan(flat["i2t/vanishing_fraction"]) and math.isnan(flat["i2t/gap_q50"])
    assert set(flat) >= {"i2t/vanishing_fraction", "t2i/gap_mean", "i2t/gap_q10", "offdiag_mean"}
    collapsed = D.vanishing_stats(torch.full((5, 5), 0.7, dtype=torch.bfloat16))
    assert collapsed.offdiag_mean.dtype == torch.float32 and collapsed.i2t.hard_loss_mean.item() == pytest.approx(0.2)


# ------------------------------------------------------------------ analytic gradient norms
LOSSES = ["selhn", "hn", "sum"]


def autograd_norms(img, txt, loss, epsilon, mask, img_feat=None, txt_feat=None, margin=0.2):
    """Gradient norms by autograd through the literal reference."""
    leaves = [
        (img_feat if img_feat is not None else img).clone().requires_grad_(),
        (txt_feat if txt_feat is not None else txt).clone().requires_grad_(),
    ]
    v = unit(leaves[0], dim=1) if img_feat is not None else leaves[0]
    t = unit(leaves[1], dim=1) if txt_feat is not None else leaves[1]
    candidates = (v.detach(), t.detach())
    per = reference_per_anchor(v @ t.T, loss, margin=margin, epsilon=epsilon, mask=mask, candidates=candidates)
    total = sum(per[0]) + sum(per[1])
    full = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
    anchors = [[], []]
    for direction in (0, 1):
        for a, term in enumerate(per[direction]):
            g = torch.autograd.grad(term, leaves[direction], retain_graph=True, allow_unused=True)[0]
            anchors[direction].append(0.0 if g is None else g[a].norm().item())
    return [g.norm(dim=1) for g in full], anchors


@pytest.mark.parametrize("loss", LOSSES)
@given(
    pair=embedding_pairs(batch_sizes(1, 7)), epsilon=st.sampled_from([0.01, 0.3]), data=st.data(), prenorm=st.booleans()
)
def test_analytic_gradient_norms_equal_autograd(loss, pair, epsilon, data, prenorm):
    """Proposition (diagnostic): analytic norms equal autograd, in float64, on arbitrary batches."""
    img, txt = pair
    size = img.shape[0]
    mask = None
    if data.draw(st.booleans()):
        ids = data.draw(duplicate_ids(size))
        mask = ids[:, None] == ids[None, :]
    feats = None
    if prenorm:
        scale = torch.linspace(0.5, 3.0, size, dtype=torch.float64).unsqueeze(1)
        feats = (img * scale, txt * scale.flip(0))
    margin = data.draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    got = D.gradient_norms(
        img,
        txt,
        loss,
        margin,
        epsilon=epsilon,
        mask=mask,
        img_norms=None if feats is None else feats[0].norm(dim=1),
        txt_norms=None if feats is None else feats[1].norm(dim=1),
    )
    (img_full, txt_full), anchors = autograd_norms(
        img, txt, loss, epsilon, mask, *(feats if feats is not None else (None, None)), margin=margin
    )
    torch.testing.assert_close(got.image, img_full)
    torch.testing.assert_close(got.text, txt_full)
    torch.testing.assert_close(got.image_anchor, torch.tensor(anchors[0], dtype=torch.float64))
    torch.testing.assert_close(got.text_anchor, torch.tensor(anchors[1], dtype=torch.float64))


# ------------------------------------------------------------------ the propositions
@given(pair=embedding_pairs(batch_sizes(2, 8)))
def test_proposition_1_2_hard_negative_gradient_is_bounded_by_the_distance(pair):
    """Propositions 1 and 2: |d l_i / d v_i| = |t_hat - t_i| (active hinge), and through the
    normalisation its squared norm is (|t_hat - t_i|^2 - gap^2) / |u|^2 <= |t_hat - t_i|^2 / |u|^2."""
    img, txt = pair
    scores = img @ txt.T
    off = scores.masked_fill(torch.eye(img.shape[0], dtype=torch.bool), -math.inf)
    hardest = off.max(dim=1)
    distance = (txt[hardest.indices] - txt).norm(dim=1)
    gap = scores.diagonal() - hardest.values
    active = (0.2 - gap) > 0
    norms = torch.linspace(0.5, 2.0, img.shape[0], dtype=torch.float64)
    unit_case = D.gradient_norms(img, txt, "hn").image_anchor
    pre = D.gradient_norms(img, txt, "hn", img_norms=norms).image_anchor
    torch.testing.assert_close(unit_case, torch.where(active, distance, 0))
    expected = torch.sqrt((distance**2 - gap**2).clamp(min=0)) / norms
    torch.testing.assert_close(pre, torch.where(active, expected, 0), atol=1e-7, rtol=1e-6)
    assert torch.all(pre <= distance / norms + 1e-12)
    # the gap is a cheap proxy: |gap| <= |t_hat - t_i| (necessary, not sufficient, for collapse)
    assert torch.all(gap.abs() <= distance + 1e-12)


@given(pair=hardest_collapsed_pairs(distance=st.just(1e-2)))
def test_proposition_1_hard_negative_gradient_vanishes_with_the_distance(pair):
    """Move every caption's duplicate towards it (t_hat -> t): the max-violation gradient to
    the image features stays below |t_hat - t| / |u| and goes to zero with it."""
    features, txt = pair
    img = unit(features, dim=1)
    norms = features.norm(dim=1)
    largest = []
    for shrink in (1.0, 1e-1, 1e-2, 1e-3):
        moved = txt.clone()
        moved[1::2] = unit(txt[0::2] + shrink * (txt[1::2] - txt[0::2]), dim=1)
        hn = D.gradient_norms(img, moved, "hn", img_norms=norms).image_anchor
        distance = (moved[0::2] - moved[1::2]).norm(dim=1).repeat_interleave(2)
        assert torch.all(hn <= distance / norms + 1e-15)
        largest.append(hn.max().item())
    assert largest[-1] <= 2e-3 * largest[0] + 1e-15


@pytest.mark.parametrize("delta", [1e-1, 1e-2, 1e-3, 1e-4])
def test_proposition_3_text_encoder_gradient_vanishes_through_a_shared_encoder(delta):
    """Proposition 3: the image anchor's term reaches a shared text encoder as
    J(y_hat)^T v - J(y)^T v, which vanishes as the hardest negative's input y_hat -> y."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()
    y = torch.randn(1, 6, dtype=torch.float64)
    y_hat = y + delta * torch.randn(1, 6, dtype=torch.float64)
    img = unit(torch.randn(2, 5, dtype=torch.float64), dim=1)  # image 0's only negative is caption 1
    txt = unit(encoder(torch.cat([y, y_hat])), dim=1)
    per_anchor = selhn.MaxViolationLoss(0.2, reduction="none")(img, txt)
    assert per_anchor[0, 0] > 0  # the hinge is active: 0.2 + O(delta)
    grads = torch.autograd.grad(per_anchor[0, 0], list(encoder.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    # Lipschitz: |grad| <= C * |y_hat - y| with C bounded independent of delta
    assert norm <= 10 * (y_hat - y).norm()
    assert norm > 0


@given(pair=hardest_collapsed_pairs())
def test_proposition_4_selhn_keeps_a_gradient_where_hard_negatives_vanish(pair):
    """Proposition 4: in the fallback, anchor i sends (n_act / |N_i|) (t_bar_act - t_i) to v_i,
    where t_bar_act is the mean of its active negatives. It stays away from zero exactly when
    the active negatives' mean stays away from t_i (assumption), whatever the hardest does."""
    features, txt = pair
    img = unit(features, dim=1)
    size = img.shape[0]
    scores = img @ txt.T
    eye = torch.eye(size, dtype=torch.bool)
    active = ((0.2 - scores.diagonal().unsqueeze(1) + scores) > 0) & ~eye
    n_act = active.sum(dim=1, keepdim=True).to(txt.dtype)
    mean_active = (active.to(txt.dtype) @ txt) / n_act.clamp(min=1)
    expected = (n_act.squeeze(1) / (size - 1)) * (mean_active - txt).norm(dim=1)
    selhn_norms = D.gradient_norms(img, txt, "selhn").image_anchor
    hn_norms = D.gradient_norms(img, txt, "hn").image_anchor
    stats = D.vanishing_stats(scores)
    assert bool(stats.i2t.vanishing.all())  # every image anchor is in the fallback
    torch.testing.assert_close(selhn_norms, expected)
    distance = (txt - txt.view(-1, 2, txt.shape[1]).flip(1).reshape_as(txt)).norm(dim=1)
    assert torch.all(hn_norms <= distance + 1e-12)  # ~ the drawn distance, at most 1e-4
    # The bound holds under the proposition's assumption, |t_bar_active - t_i| >= delta: test
    # it on exactly the anchors that satisfy it (most do here; an anchor whose only active
    # negative is its duplicate does not, and its fallback vanishes too, as stated).
    delta = 0.05
    assumed = (mean_active - txt).norm(dim=1) >= delta
    assume(bool(assumed.any()))
    assert torch.all(selhn_norms[assumed] >= delta * n_act.squeeze(1)[assumed] / (size - 1))
    assert torch.all(selhn_norms[assumed] > 100 * hn_norms[assumed])


def test_proposition_4_needs_its_assumption():
    """Without other active negatives, the fallback vanishes too: the only active negative is
    the duplicate, so the averaged gradient is (t_hat - t_i) / (B - 1)."""
    txt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-6, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    txt = unit(txt, dim=1)
    img = torch.eye(3, dtype=torch.float64)
    norms = D.gradient_norms(img, txt, "selhn").image_anchor
    assert norms[0] < 1e-6


# ------------------------------------------------------------------ the user-facing helpers
def test_property_helpers_pass_and_fail_as_documented():
    assert_finite_gradients(selhn.SelHNLoss(), max_examples=10)
    assert_finite_gradients(selhn.functional.sum_hinge_loss, over="scores", max_examples=10)
    assert_no_vanishing(selhn.SelHNLoss(reduction="sum"), max_examples=5)
    assert_no_vanishing(selhn.SumHingeLoss(), max_examples=5)
    with pytest.raises(AssertionError, match="the gradient vanishes where the hardest negatives collapse"):
        assert_no_vanishing(selhn.MaxViolationLoss(), max_examples=5)
    assert_selection_rule(lambda s: selhn.functional.selhn_loss(s, reduction="none"), max_examples=20)
    assert_selection_rule(
        lambda s: selhn.functional.selhn_loss(s, epsilon=0.05, fallback="sum", reduction="none"),
        epsilon=0.05,
        fallback="sum",
        max_examples=20,
    )
    with pytest.raises(AssertionError, match="should take the"):
        assert_selection_rule(lambda s: selhn.functional.max_violation_loss(s, reduction="none"), epsilon=0.3)

    def nan_loss(scores):
        return (scores / (scores.shape[0] - 1)).sum()  # B = 1 divides by zero

    with pytest.raises(AssertionError, match="not finite"):
        assert_finite_gradients(nan_loss, over="scores")
    with pytest.raises(ValueError, match="over must be"):
        assert_finite_gradients(nan_loss, over="images")


# ------------------------------------------------------------------ the alarm
def test_alarm_fires_once_on_the_plateau_and_not_on_healthy_batches():
    alarm = D.CollapseAlarm(margin=0.2, patience=3)
    collapsed = D.vanishing_stats(torch.full((16, 16), 0.4))
    healthy = D.vanishing_stats(torch.eye(16) * 0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [alarm.check(collapsed) for _ in range(2)] == [False, False]
        assert alarm.check(healthy) is False  # the streak resets
        fired = [alarm.check(collapsed, batch_size=16) for _ in range(5)]
    assert fired == [False, False, True, False, False]
    messages = [str(w.message) for w in caught if issubclass(w.category, D.CollapseWarning)]
    assert len(messages) == 1
    assert "2*B*margin = 6.4" in messages[0] and "selhn.SelHNLoss" in messages[0]
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        D.CollapseAlarm(patience=0)


def test_alarm_re_arms_once_training_has_left_the_plateau():
    """A second collapse (a backbone unfrozen mid-training) is reported again, but only after
    the run has left the plateau: not while it lingers near it."""
    collapsed = D.vanishing_stats(torch.full((16, 16), 0.4))
    healthy = D.vanishing_stats(torch.eye(16) * 0.9)
    half = torch.eye(16) * 0.9
    half[:4, :4] = 0.4  # a quarter of the anchors still on the plateau: between 10% and 50%
    lingering = D.vanishing_stats(half)
    assert 0.1 < float(lingering.i2t.vanishing_fraction) < 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alarm = D.CollapseAlarm(margin=0.2, patience=2)
        first = [alarm.check(collapsed) for _ in range(3)]
        alarm.check(lingering)  # not off the plateau yet: stays quiet
        lingered = [alarm.check(collapsed) for _ in range(3)]
        alarm.check(healthy)  # left it: re-arms
        second = [alarm.check(collapsed) for _ in range(3)]
        once = D.CollapseAlarm(margin=0.2, patience=2, rearm_below=None)
        never_again = [once.check(stats) for stats in (collapsed, collapsed, healthy, collapsed, collapsed)]
    assert first == [False, True, False] and lingered == [False, False, False] and second == [False, True, False]
    assert never_again == [False, True, False, False, False]
    assert sum(issubclass(w.category, D.CollapseWarning) for w in caught) == 3
    with pytest.raises(ValueError, match="rearm_below .* must not exceed min_vanishing"):
        D.CollapseAlarm(min_vanishing=0.3, rearm_below=0.4)


def test_the_monitor_records_the_steps_at_which_the_alarm_fired():
    torch.manual_seed(0)
    img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    monitor = D.TrainingMonitor(img_enc, txt_enc, log_every=1, alarm=D.CollapseAlarm(patience=2))
    collapsed, healthy = torch.full((16, 16), 0.4), torch.eye(16) * 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", D.CollapseWarning)
        for scores in [collapsed] * 3 + [healthy] + [collapsed] * 2:
            monitor.step(scores)
    assert monitor.alarm_steps == [2, 6]


# ------------------------------------------------------------------ the monitor
def small_step(monitor, img_enc, txt_enc, collapse=False):
    x = torch.rand(8, 4) + (5.0 if collapse else 0.0)
    y = torch.rand(8, 5) + (5.0 if collapse else 0.0)
    img, txt = unit(img_enc(x), dim=1), unit(txt_enc(y), dim=1)
    scores = img @ txt.T
    loss = selhn.functional.max_violation_loss(scores)
    img_enc.zero_grad()
    txt_enc.zero_grad()
    loss.backward()
    return monitor.step(scores, loss)


def test_monitor_records_logs_exports_and_bounds_its_history(tmp_path):
    torch.manual_seed(0)
    img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    monitor = D.TrainingMonitor(img_enc, txt_enc, history=5, log_every=3, alarm=False)
    logged = [small_step(monitor, img_enc, txt_enc) for _ in range(7)]
    assert [entry is not None for entry in logged] == [False, False, True, False, False, True, False]
    history = monitor.history()
    assert history["step"] == [3.0, 4.0, 5.0, 6.0, 7.0]  # bounded
    expected_img = torch.sqrt(sum((p.grad**2).sum() for p in img_enc.parameters()))
    assert history["image_grad_norm"][-1] == pytest.approx(expected_img.item(), rel=1e-5)
    assert monitor.scalars()["i2t/vanishing_fraction"] == logged[5]["i2t/vanishing_fraction"]
    monitor.to_csv(tmp_path / "run.csv")
    with open(tmp_path / "run.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and float(rows[-1]["step"]) == 7.0
    with pytest.raises(ValueError, match="the same way every time"):
        monitor.step(None, torch.tensor(1.0))


def test_monitor_raises_the_alarm_on_a_collapsed_model():
    torch.manual_seed(0)
    img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    with torch.no_grad():  # every input maps to one direction: the collapsed start
        for enc in (img_enc, txt_enc):
            enc.weight.mul_(1e-4)
            enc.bias.fill_(1.0)
    monitor = D.TrainingMonitor(img_enc, txt_enc, log_every=1, alarm=D.CollapseAlarm(patience=2))
    with pytest.warns(D.CollapseWarning, match="collapse plateau"):
        for _ in range(3):
            small_step(monitor, img_enc, txt_enc, collapse=True)


def test_plot_histories_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    runs = {}
    for label in ("HN", "SelHN"):
        monitor = D.TrainingMonitor(img_enc, txt_enc, log_every=2, alarm=False)
        for _ in range(4):
            small_step(monitor, img_enc, txt_enc)
        runs[label] = monitor
    runs["HN"].plot(tmp_path / "one.png")
    D.plot_histories(tmp_path / "two.png", {"HN": runs["HN"], "SelHN": runs["SelHN"].history()})
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "one.png").stat().st_size > 1000


def test_validation():
    with pytest.raises(ValueError, match="loss must be one of"):
        D.gradient_norms(torch.eye(2), torch.eye(2), "triplet")
    with pytest.raises(ValueError, match=r"img_norms must be a \(2,\) tensor"):
        D.gradient_norms(torch.eye(2), torch.eye(2), img_norms=torch.ones(3))
    with pytest.raises(ValueError, match="scores must be square"):
        D.vanishing_stats(torch.ones(2, 3))
    with pytest.raises(ValueError, match="log_every must be an int >= 1"):
        D.TrainingMonitor(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), log_every=0)
    with pytest.raises(TypeError, match="image_encoder must be an nn.Module or an iterable of its parameters"):
        D.TrainingMonitor([1, 2], torch.nn.Linear(1, 1))


# ------------------------------------------------------------------ margin 0 and non-finite scores
def test_the_alarm_at_margin_zero_tells_a_separated_batch_from_a_collapse():
    separated = D.vanishing_stats(torch.eye(4), margin=0)
    assert float(separated.i2t.hard_loss_mean) == 0  # the hinge alone reads like the plateau here
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.CollapseWarning)
        assert not D.CollapseAlarm(margin=0, patience=1).check(separated)
    with pytest.warns(D.CollapseWarning, match="100% of anchors"):
        assert D.CollapseAlarm(margin=0, patience=1).check(D.vanishing_stats(torch.full((4, 4), 0.5), margin=0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_never_read_as_healthy(bad):
    everywhere = D.vanishing_stats(torch.full((4, 4), bad)).to_dict()
    assert all(math.isnan(v) for k, v in everywhere.items() if "fraction" in k or "mean" in k or "gap_q" in k), (
        everywhere
    )
    scores = torch.eye(4) * 0.9
    scores[1, 2] = bad  # image anchor 1 and caption anchor 2
    stats = D.vanishing_stats(scores)
    for part in (stats.i2t, stats.t2i):
        assert math.isnan(float(part.vanishing_fraction)) and math.isnan(float(part.hard_loss_mean))
        assert torch.isnan(part.gap_quantiles).all()
    assert math.isnan(float(stats.offdiag_mean))
    assert not D.CollapseAlarm(patience=1).on_plateau(stats)
    # masked-out pairs are not scores: an anchor without negatives is still simply left out
    healthy = D.vanishing_stats(torch.eye(3), mask=torch.ones(3, 3, dtype=torch.bool).triu())
    assert math.isfinite(float(healthy.i2t.vanishing_fraction))


def _one_direction(image_loss, caption_loss):
    """A per-anchor loss that takes ``image_loss``'s rule for image anchors and
    ``caption_loss``'s for caption anchors."""

    def loss(img, txt):
        scores = img @ txt.T
        return torch.stack([image_loss(scores, reduction="none")[0], caption_loss(scores, reduction="none")[1]])

    return loss


def test_no_vanishing_checks_each_direction_of_a_per_anchor_loss():
    """Hard negatives for one direction fail the check, whichever direction it is, even though
    the other direction's fallback keeps a gradient on both encoders."""
    hard, selective = selhn.functional.max_violation_loss, selhn.functional.selhn_loss
    assert_no_vanishing(selhn.SelHNLoss(reduction="none"), max_examples=5)
    assert_no_vanishing(selhn.SumHingeLoss(reduction="none"), max_examples=5)
    with pytest.raises(AssertionError, match="for the image anchors' losses"):
        assert_no_vanishing(_one_direction(hard, selective), max_examples=5)
    with pytest.raises(AssertionError, match="for the caption anchors' losses"):
        assert_no_vanishing(_one_direction(selective, hard), max_examples=5)
    # a scalar loss is checked as a whole
    assert_no_vanishing(selhn.SelHNLoss(), max_examples=5)
    with pytest.raises(AssertionError, match="for the whole loss, with the image anchors' hardest negatives"):
        assert_no_vanishing(selhn.MaxViolationLoss(), max_examples=5)


def test_statistics_over_no_anchors_are_nan():
    """A 1 x 1 batch (or every negative masked) has no anchor with a negative: its averages
    are NaN, not 0.0 (which read as 'no vanishing anchor, gap 0')."""
    for stats in (D.vanishing_stats(torch.ones(1, 1)), D.vanishing_stats(torch.eye(3), mask=torch.ones(3, 3) > 0)):
        values = stats.to_dict()
        assert all(math.isnan(v) for k, v in values.items()), values
    assert D.vanishing_stats(torch.eye(3)).i2t.gap_mean == 1


def test_monitor_csv_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing (a full disk) leaves the previous CSV intact, and no temporary file."""
    encoder = torch.nn.Linear(2, 2)
    monitor = D.TrainingMonitor(encoder, encoder, log_every=1)
    monitor.step(torch.eye(3), torch.tensor(0.5))
    path = tmp_path / "steps.csv"
    monitor.to_csv(path)
    before = path.read_text()
    monitor.step(torch.eye(3), torch.tensor(0.25))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv, "writer", disk_full)  # (the monitor's module writes with it)
    with pytest.raises(OSError, match="No space left"):
        monitor.to_csv(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.csv"]
    monkeypatch.undo()
    monitor.to_csv(path)
    assert len(path.read_text().splitlines()) == 3


def test_two_writers_to_one_csv_never_lose_a_call_or_mix_their_rows(tmp_path):
    """Each call writes through a temporary file of its own: with one fixed '<path>.tmp' shared by
    both writers, a call raised when the other had moved its file away, or the rows mixed."""
    import threading

    encoder = torch.nn.Linear(2, 2)
    monitors = []
    for steps in (3, 40):
        monitor = D.TrainingMonitor(encoder, encoder, log_every=1)
        for _ in range(steps):
            monitor.step(torch.eye(3), torch.tensor(0.5))
        monitors.append(monitor)
    path = tmp_path / "steps.csv"
    errors: list[BaseException] = []

    def write(monitor):
        for _ in range(60):
            try:
                monitor.to_csv(path)
            except BaseException as error:  # recorded for the assertion below
                errors.append(error)

    threads = [threading.Thread(target=write, args=(monitor,)) for monitor in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert len(path.read_text().splitlines()) in (4, 41)  # one writer's whole file, never a mixture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.csv"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_csv_write_names_the_file_asked_for(tmp_path):
    encoder = torch.nn.Linear(2, 2)
    monitor = D.TrainingMonitor(encoder, encoder, log_every=1)
    monitor.step(torch.eye(3), torch.tensor(0.5))
    with pytest.raises(OSError, match=r"could not write the history to .*missing[/\\]steps.csv"):
        monitor.to_csv(tmp_path / "missing" / "steps.csv")


def test_the_alarm_advises_for_the_rule_being_trained():
    """A run on the plateau with SelHN is not told to switch to SelHN; without a rule, or with
    hard negatives, the advice stays to use SelHN or a warm-up."""
    from selhn.rules import MaxViolation, SelHN

    collapsed = D.vanishing_stats(torch.full((8, 8), 0.3))
    messages = {}
    for name, rule in (("none", None), ("hn", MaxViolation()), ("selhn", SelHN(0.01))):
        alarm = D.CollapseAlarm(margin=0.2, patience=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alarm.check(collapsed, rule=rule)
        messages[name] = str(caught[0].message)
    for name in ("none", "hn"):  # the docs' one answer: SelHN at 0.05, or the warm-up; a schedule at an unfreeze
        assert "Fix: train with selhn.SelHNLoss(epsilon=0.05)" in messages[name]
        assert "warm up with the sum of hinges" in messages[name] and "backbone was unfrozen" in messages[name]
    assert "Fix: train with selhn.SelHNLoss" not in messages["selhn"]
    assert "This run trains with SelHN (epsilon 0.01)" in messages["selhn"] and "warm up" in messages["selhn"]
    assert "Pass epsilon=0.05" in messages["selhn"]  # below the advised epsilon: raise it
    assert D.ADVISED_EPSILON == 0.05
    alarm = D.CollapseAlarm(margin=0.2, patience=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alarm.check(collapsed, rule=SelHN(0.05))
    at_advised = str(caught[0].message)
    assert "This run trains with SelHN (epsilon 0.05)" in at_advised and "Pass epsilon" not in at_advised
    for message in messages.values():
        assert "Which loss, which epsilon?" in message or "sum of hinges, whose gradients" in message
    encoder = torch.nn.Linear(2, 2)
    monitor = D.TrainingMonitor(encoder, encoder, log_every=1, alarm=D.CollapseAlarm(patience=1), rule=SelHN())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.step(torch.full((8, 8), 0.3), torch.tensor(0.2))
    assert "This run trains with SelHN" in str(caught[0].message)
    with pytest.raises(TypeError, match="rule must be a SelectionRule instance"):
        D.TrainingMonitor(encoder, encoder, rule=SelHN)


def test_a_restored_alarm_warns_no_second_time_for_the_same_collapse():
    """A resumed run used to report its collapse again (alarm steps [6, 26] for [6]): the alarm's
    streak and whether it fired now travel with the monitor's state."""
    collapsed = D.vanishing_stats(torch.full((8, 8), 0.3))
    encoder = torch.nn.Linear(2, 2)
    monitor = D.TrainingMonitor(encoder, encoder, log_every=1, alarm=D.CollapseAlarm(patience=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            monitor.step(torch.full((8, 8), 0.3), torch.tensor(51.2))
    assert monitor.alarm_steps == [2] and len(caught) == 1
    state = monitor.state_dict()
    assert state == {"steps": 3, "alarm_steps": [2], "alarm": {"streak": 3, "fired": True}}
    for restored in (True, False):
        resumed = D.TrainingMonitor(encoder, encoder, log_every=1, alarm=D.CollapseAlarm(patience=2))
        if restored:
            resumed.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                resumed.step(torch.full((8, 8), 0.3), torch.tensor(51.2))
        assert len(caught) == (0 if restored else 1), restored
    assert resumed.alarm is not None and D.CollapseAlarm().check(collapsed) is False  # (one check: no streak yet)
    for bad, message in (
        ([], "must be a mapping"),
        ({"steps": 1}, "lacks 'alarm_steps', 'alarm'"),
        ({"steps": -1, "alarm_steps": [], "alarm": None}, "'steps' must be an int >= 0"),
        ({"steps": 1, "alarm_steps": [1.5], "alarm": None}, "'alarm_steps' must be a list of ints"),
        ({"steps": 1, "alarm_steps": [], "alarm": {"streak": 1, "fired": 1}}, "'fired' must be a bool"),
    ):
        with pytest.raises((TypeError, ValueError), match=message):
            D.TrainingMonitor(encoder, encoder).load_state_dict(bad)


def test_a_monitor_for_a_loss_measures_and_advises_for_that_loss():
    """A SelHNLoss(epsilon=0.05) run stuck on the plateau was told 'Fix: train with
    selhn.SelHNLoss(epsilon=0.05)', and its vanishing fraction was measured at 0.01."""
    import selhn

    encoder = torch.nn.Linear(2, 2)
    criterion = selhn.SelHNLoss(epsilon=0.05)
    monitor = D.TrainingMonitor.for_loss(criterion, encoder, encoder, log_every=1, alarm=D.CollapseAlarm(patience=1))
    assert (monitor.margin, monitor.epsilon) == (0.2, 0.05)
    scores = torch.full((8, 8), 0.3) + 0.03 * torch.eye(8)  # every gap 0.03: vanishing at 0.05, not at 0.01
    logged = monitor.step(scores, torch.tensor(0.17))
    assert logged is not None and logged["i2t/vanishing_fraction"] == 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.step(torch.full((8, 8), 0.3), torch.tensor(0.2))  # the plateau: the alarm fires
    message = str(caught[0].message)
    assert "This run trains with SelHN (epsilon 0.05)" in message and "Fix: train with" not in message
    assert "after a backbone was unfrozen, check the backbone's learning rate first" in message
    assert "or use VSE-infinity's whole schedule" in message
    switchable = selhn.ContrastiveLoss(max_violation=False)
    follower = D.TrainingMonitor.for_loss(switchable, encoder, encoder, log_every=1)
    follower.step(scores, torch.tensor(0.2))
    assert isinstance(follower.rule, selhn.rules.SumOfHinges) and follower.epsilon == 0.01
    switchable.max_violation_on()
    follower.step(scores, torch.tensor(0.2))
    assert isinstance(follower.rule, selhn.rules.MaxViolation)
    with pytest.raises(TypeError, match="loss must be a selhn loss module"):
        D.TrainingMonitor.for_loss(torch.nn.MSELoss(), encoder, encoder)
    with pytest.raises(TypeError, match=r"unknown option\(s\): \['epsilon'\]"):
        D.TrainingMonitor.for_loss(criterion, encoder, encoder, epsilon=0.01)
