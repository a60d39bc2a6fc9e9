r"""See gradient vanishing happen: batch statistics, exact gradient norms, a monitor.

* :func:`vanishing_stats` reads a score matrix (the one your loss already has: no second
  matmul) and returns per-direction statistics as tensors, without a host sync;
* :func:`gradient_norms` gives the exact gradient norms that a loss sends to each embedding,
  through the loss's own backward (the lean one for a rule in the sparse form), also with
  respect to the features before the L2 normalisation;
* :class:`TrainingMonitor` records, per step, the gradient norm of each encoder and the batch
  statistics, keeps a bounded history, exports CSV, TensorBoard scalars and a plot;
* :class:`CollapseAlarm` says once, in plain words, when hard-negative training sits on the
  collapse plateau, and what to do about it (:func:`advice`).

One module per concern: ``statistics``, ``gradients``, ``alarm`` and ``monitor``; every name
is importable from :mod:`selhn.diagnostics` itself.

Every statistic uses the package's single definition of hinge, hardest negative and gap, so
the vanishing fraction is exactly the share of anchors for which SelHN takes its fallback.
"""

from __future__ import annotations

from selhn.diagnostics.alarm import ADVISED_EPSILON, CollapseAlarm, CollapseWarning, advice
from selhn.diagnostics.gradients import GradientNorms, gradient_norms
from selhn.diagnostics.monitor import TrainingMonitor, plot_histories
from selhn.diagnostics.statistics import GAP_QUANTILES, DirectionStats, VanishingStats, vanishing_stats

__all__ = [
    "ADVISED_EPSILON",
    "GAP_QUANTILES",
    "CollapseAlarm",
    "CollapseWarning",
    "DirectionStats",
    "GradientNorms",
    "TrainingMonitor",
    "VanishingStats",
    "advice",
    "gradient_norms",
    "plot_histories",
    "vanishing_stats",
]
