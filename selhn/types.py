"""The vocabularies of the public signatures, as ``Literal`` types for your type checker.

Example:
    >>> from typing import get_args
    >>> from selhn.types import Fallback, LossName, Reduction
    >>> get_args(Reduction), get_args(LossName), get_args(Fallback)
    (('none', 'mean', 'sum'), ('selhn', 'hn', 'sum'), ('mean', 'sum'))
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Direction", "Fallback", "LossName", "Reduction"]

#: How per-anchor losses (2, B) are reduced: kept (``"none"``), averaged or added.
Reduction = Literal["none", "mean", "sum"]
#: The built-in losses by name: SelHN, max violation (hard negatives), the sum of hinges.
LossName = Literal["selhn", "hn", "sum"]
#: SelHN's fallback for a vanishing anchor: its hinges over all its negatives, averaged (the
#: authors' code) or added.
Fallback = Literal["mean", "sum"]
#: Which anchors a selection rule is scoring (:attr:`selhn.rules.Anchors.direction`): image
#: anchors against the captions (image-to-text), or caption anchors against the images.
Direction = Literal["i2t", "t2i"]
