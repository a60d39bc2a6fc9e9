"""The collapse alarm (:class:`CollapseAlarm`): says once, in plain words, when hard-negative
training sits on the collapse plateau, and what to do about it (:func:`advice`, the docs' page
"Which loss, which epsilon?" in one paragraph, with the measurements it rests on)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from selhn._validation import (
    check_nonnegative,
    check_positive_int,
)
from selhn.diagnostics.statistics import VanishingStats
from selhn.rules import SelectionRule, SelHN, SumOfHinges


class CollapseWarning(UserWarning):
    """Hard-negative training sits on the collapse plateau (raised once by :class:`CollapseAlarm`).

    Example:
        >>> import warnings
        >>> from selhn.diagnostics import CollapseWarning
        >>> warnings.simplefilter("error", CollapseWarning)   # make the plateau stop a run
        >>> warnings.resetwarnings()
    """


class CollapseAlarm:
    r"""Detects the collapse plateau of hard-negative training and says so once.

    On the plateau every anchor's hardest negative sits on its positive, so the per-anchor
    max-violation loss is the margin (the summed VSE++ loss reads :math:`2 B m`) and the
    gradients to both encoders vanish. The alarm fires when, for ``patience`` consecutive
    checks, in both directions the mean hardest-negative hinge is within ``tolerance`` (a
    fraction of the margin) of the margin and at least ``min_vanishing`` of the anchors have
    their hardest negative within epsilon of their positive (the hinge alone cannot tell a
    collapse from a separated batch at margin 0). Non-finite statistics never read as the
    plateau. It warns once (a :class:`CollapseWarning`) with the fix, then stays quiet until
    training has left the plateau: once the vanishing fraction falls below ``rearm_below`` in
    both directions it re-arms, so that a second collapse later in the run (the one that
    unfreezing a backbone can cause) is reported too.

    Args:
        margin: the triplet margin.
        tolerance: relative tolerance around the margin.
        patience: consecutive plateau checks before firing.
        min_vanishing: share of anchors in the vanishing regime, per direction, that the
            plateau needs.
        rearm_below: vanishing fraction, in both directions, below which a fired alarm
            re-arms; ``None`` never re-arms (one warning per run).

    Example:
        >>> import torch, warnings
        >>> from selhn.diagnostics import CollapseAlarm, vanishing_stats
        >>> alarm = CollapseAlarm(margin=0.2, patience=2)
        >>> collapsed = vanishing_stats(torch.full((8, 8), 0.3))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     fired = [alarm.check(collapsed) for _ in range(3)]
        >>> fired, len(caught)
        ([False, True, False], 1)
    """

    def __init__(
        self,
        margin: float = 0.2,
        tolerance: float = 0.02,
        patience: int = 3,
        min_vanishing: float = 0.5,
        rearm_below: float | None = 0.1,
    ) -> None:
        self.margin = check_nonnegative(margin, "margin")
        self.tolerance = check_nonnegative(tolerance, "tolerance")
        self.patience = check_positive_int(patience, "patience")
        self.min_vanishing = check_nonnegative(min_vanishing, "min_vanishing")
        if self.min_vanishing > 1:
            raise ValueError(f"min_vanishing is a share of anchors, so in [0, 1], got {min_vanishing}")
        self.rearm_below = None if rearm_below is None else check_nonnegative(rearm_below, "rearm_below")
        if self.rearm_below is not None and self.rearm_below > self.min_vanishing:
            raise ValueError(
                f"rearm_below ({rearm_below}) must not exceed min_vanishing ({min_vanishing}): the alarm re-arms "
                "only once training has left the plateau"
            )
        self.streak = 0
        self.fired = False

    def on_plateau(self, stats: VanishingStats) -> bool:
        """Whether this batch reads as the plateau (one host sync)."""
        limit = self.tolerance * self.margin
        losses = torch.stack([stats.i2t.hard_loss_mean, stats.t2i.hard_loss_mean])
        vanishing = torch.stack([stats.i2t.vanishing_fraction, stats.t2i.vanishing_fraction])
        # NaN compares False: a batch with non-finite scores never reads as the plateau
        return bool(((losses - self.margin).abs() <= limit).all() & (vanishing >= self.min_vanishing).all())

    def left_plateau(self, stats: VanishingStats) -> bool:
        """Whether the vanishing fraction is below ``rearm_below`` in both directions (NaN: no)."""
        vanishing = torch.stack([stats.i2t.vanishing_fraction, stats.t2i.vanishing_fraction])
        return bool((vanishing < (self.rearm_below or 0.0)).all())

    def check(self, stats: VanishingStats, batch_size: int | None = None, rule: SelectionRule | None = None) -> bool:
        """Update with one batch; return ``True`` exactly when the alarm fires. ``rule``, the
        selection rule being trained (when known), decides the advice: a run that already
        trains with SelHN is not told to switch to SelHN."""
        self.streak = self.streak + 1 if self.on_plateau(stats) else 0
        if self.fired and self.rearm_below is not None and self.left_plateau(stats):
            self.fired = False
        if self.fired or self.streak < self.patience:
            return False
        self.fired = True
        vanishing = 50 * float(stats.i2t.vanishing_fraction + stats.t2i.vanishing_fraction)
        scale = f" (summed VSE++ scale: 2*B*margin = {2 * batch_size * self.margin:g})" if batch_size else ""
        message = (
            f"selhn: training looks stuck on the collapse plateau. For {self.streak} checks in a row the "
            f"hardest-negative loss per anchor has been the margin, {self.margin:g}{scale}, and "
            f"{vanishing:.0f}% of anchors have their hardest negative within epsilon of their positive: the "
            "hard-negative gradients to both encoders vanish here and recall stays at chance. " + advice(rule)
        )
        warnings.warn(message, CollapseWarning, stacklevel=2)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Where the alarm stands (the checks in a row on the plateau, and whether it has fired),
        as plain data for a checkpoint: a resumed run given it back warns no second time.

        Example:
            >>> from selhn.diagnostics import CollapseAlarm
            >>> alarm = CollapseAlarm()
            >>> alarm.streak, alarm.fired = 2, True
            >>> resumed = CollapseAlarm()
            >>> resumed.load_state_dict(alarm.state_dict())
            >>> resumed.streak, resumed.fired
            (2, True)
        """
        return {"streak": self.streak, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`state_dict`; an entry of the wrong kind is refused by name."""
        streak, fired = _state_entries(state, "CollapseAlarm", ("streak", "fired"))
        if not isinstance(streak, int) or isinstance(streak, bool) or streak < 0:
            raise ValueError(f"CollapseAlarm state: 'streak' must be an int >= 0, got {streak!r}")
        if not isinstance(fired, bool):
            raise ValueError(f"CollapseAlarm state: 'fired' must be a bool, got {fired!r}")
        self.streak, self.fired = streak, fired


def _epsilon_of(rule: SelectionRule | None, otherwise: float = 0.01) -> float:
    """The epsilon a monitor measures the vanishing fraction at: SelHN's own, else ``otherwise``."""
    return rule.epsilon if isinstance(rule, SelHN) else otherwise


def _state_entries(state: Any, owner: str, names: tuple[str, ...]) -> list[Any]:
    """The entries ``names`` of a state dict, in order; a state that is no mapping or lacks one is refused."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner} state must be a mapping (from state_dict()), got {type(state).__name__}")
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"{owner} state lacks {', '.join(map(repr, missing))} (it holds {sorted(state)})")
    return [state[name] for name in names]


#: The epsilon the docs advise for SelHN when training starts from scratch (cosine scores):
#: measured on the docs' calibrated benchmark, where the authors' 0.01 leaves the plateau late.
ADVISED_EPSILON = 0.05

_WHERE = "the docs' page 'Which loss, which epsilon?'"


def advice(rule: SelectionRule | None) -> str:
    """What the collapse alarm suggests, for the rule being trained (None: not known).

    The advice is the docs' page "Which loss, which epsilon?" in one paragraph: with hard
    negatives, switch to SelHN at epsilon 0.05 or warm up with the sum of hinges; a run that
    already trains with SelHN below 0.05 is told to raise epsilon to 0.05, not to switch to
    SelHN; with the sum of hinges the plateau ends by itself.
    """
    if isinstance(rule, SelHN):
        text = (
            f"This run trains with SelHN (epsilon {rule.epsilon:g}), which takes its fallback, the "
            f"{rule.fallback} over all negatives, for exactly these anchors, so their gradients do not vanish; "
        )
        if rule.epsilon < ADVISED_EPSILON:
            return text + (
                f"at this epsilon it leaves the plateau late. Pass epsilon={ADVISED_EPSILON:g} (scaled with the scores "
                "if they are not cosine similarities): on the docs' benchmark, from a cold start, it ended not worse "
                "than a sum-of-hinges warm-up (though it reached useful recall later), and after a backbone was "
                "unfrozen at ten times the learning rate it recovered without a schedule. Or, from a cold start, warm "
                "up with the sum of hinges for "
                f"one epoch (selhn.ContrastiveLoss with max_violation_off(), then max_violation_on()); see {_WHERE}."
            )
        return text + (
            "on the docs' benchmark it left the plateau within a few hundred steps, at a cold start and after a "
            "backbone was unfrozen at ten times the learning rate. If it does not: at a cold start, warm up with "
            "the sum of hinges for one epoch (selhn.ContrastiveLoss with max_violation_off(), then "
            "max_violation_on()); after a backbone was unfrozen, check the backbone's learning rate first (the "
            "benchmark's stall came at ten times the learning rate, none at VSE-infinity's 0.01 or VSE++'s 1), or use "
            "VSE-infinity's whole schedule (the backbone unfrozen block by block, the loss ramped), not the warm-up "
            f"alone, which went back to the plateau at ten times the rate; see {_WHERE}."
        )
    if isinstance(rule, SumOfHinges):
        return (
            "This run trains with the sum of hinges, whose gradients do not vanish here: the plateau should end "
            "by itself; if it does not, check the learning rate and the features' scale."
        )
    return (
        f"Fix: train with selhn.SelHNLoss(epsilon={ADVISED_EPSILON:g}) (it falls back to all negatives for exactly "
        "these anchors), or warm up with the sum of hinges for one epoch (selhn.ContrastiveLoss with "
        "max_violation_off(), then max_violation_on()). If it started when a backbone was unfrozen: on the docs' "
        "benchmark that happened with the backbone at ten times the learning rate, not at VSE-infinity's 0.01 "
        "or VSE++'s 1 (the rate of the rest), "
        "so check the backbone's learning rate first; at ten times it, the same "
        f"selhn.SelHNLoss(epsilon={ADVISED_EPSILON:g}) recovered without a schedule, and so did unfreezing the "
        f"backbone block by block with the loss ramped, as VSE-infinity's whole schedule does; see {_WHERE}."
    )
