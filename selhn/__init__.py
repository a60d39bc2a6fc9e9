"""selhn: Selectively Hard Negative mining for image-text matching, as a one-line loss swap.

The public names:

* :class:`SelHNLoss`, :class:`MaxViolationLoss`, :class:`SumHingeLoss`: modules over
  (image, caption) embeddings;
* :class:`ContrastiveLoss`: a drop-in for VSE++ / VSE-infinity's switchable loss;
* :class:`RuleLoss` and :mod:`selhn.rules`: the loss of any selection rule, yours included;
* :mod:`selhn.functional`: the same losses over a score matrix;
* :mod:`selhn.diagnostics`: gradient-vanishing statistics, analytic gradient norms, a
  training monitor and a collapse alarm;
* :mod:`selhn.distributed`: the losses over the global batch of all ranks;
* :mod:`selhn.testing` (needs hypothesis): strategies and property helpers.
"""

from selhn import diagnostics, distributed, functional, rules
from selhn._version import __version__
from selhn.losses import ContrastiveLoss, MaxViolationLoss, RuleLoss, SelHNLoss, SumHingeLoss

__all__ = [
    "ContrastiveLoss",
    "MaxViolationLoss",
    "RuleLoss",
    "SelHNLoss",
    "SumHingeLoss",
    "__version__",
    "diagnostics",
    "distributed",
    "functional",
    "rules",
]
