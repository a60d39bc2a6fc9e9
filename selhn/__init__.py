"""selhn: Selectively Hard Negative mining for image-text matching, as a one-line loss swap.

The public names:

* :class:`SelHNLoss`, :class:`MaxViolationLoss`, :class:`SumHingeLoss`: modules over
  (image, caption) embeddings;
* :class:`ContrastiveLoss`: a drop-in for VSE++ / VSE-infinity's switchable loss;
* :mod:`selhn.functional`: the same losses over a score matrix.
"""

from selhn import functional
from selhn._version import __version__
from selhn.losses import ContrastiveLoss, MaxViolationLoss, SelHNLoss, SumHingeLoss

__all__ = [
    "ContrastiveLoss",
    "MaxViolationLoss",
    "SelHNLoss",
    "SumHingeLoss",
    "__version__",
    "functional",
]
