"""Argument checks shared by every public entry point.

Each check raises a ``TypeError`` (wrong type) or a ``ValueError`` (wrong value or shape)
whose message names the argument, what was expected and what was given. The checks only
read shapes, dtypes and Python numbers, never tensor values, so they cost nothing on the
hot path and stay transparent to ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, get_args, overload

import torch
from torch import Tensor

from selhn.types import Fallback, LossName, Reduction

#: The losses, one vocabulary inside and out (:data:`selhn.types.LossName`).
Mode = LossName
MODES: tuple[Mode, ...] = get_args(LossName)
FALLBACKS: tuple[Fallback, ...] = get_args(Fallback)
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def check_float_tensor(value: Any, name: str) -> Tensor:
    """Require a floating-point tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without values): the loss needs real values")
    return value


def check_scores(value: Any, name: str = "scores") -> Tensor:
    """Require a square (B, B) floating-point score matrix with B >= 1."""
    scores = check_float_tensor(value, name)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (B, B) score matrix, got {scores.ndim}-D shape {tuple(scores.shape)}")
    if scores.shape[0] != scores.shape[1]:
        raise ValueError(
            f"{name} must be square (B, B) with positives on the diagonal, got shape {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one pair, got shape {tuple(scores.shape)}")
    return scores


def check_embeddings(img_emb: Any, txt_emb: Any) -> None:
    """Require two (B, D) floating-point embedding matrices of equal shape and device."""
    for name, emb in (("img_emb", img_emb), ("txt_emb", txt_emb)):
        check_float_tensor(emb, name)
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (B, D), got {emb.ndim}-D shape {tuple(emb.shape)}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one row, got shape {tuple(emb.shape)}")
    if img_emb.shape[0] != txt_emb.shape[0]:
        raise ValueError(
            "img_emb and txt_emb must have the same batch size (row i of each is a matched pair), "
            f"got {img_emb.shape[0]} and {txt_emb.shape[0]}"
        )
    if img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(
            f"img_emb and txt_emb must have the same embedding size, got {img_emb.shape[1]} and {txt_emb.shape[1]}"
        )
    if img_emb.device != txt_emb.device:
        raise ValueError(f"img_emb and txt_emb must be on the same device, got {img_emb.device} and {txt_emb.device}")


def _is_real(value: Any) -> bool:
    """A real number of any type (Python, numpy, ...), not a bool and not a tensor (numpy's
    bool_ is no numbers.Real)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(value: Any, name: str) -> float:
    """Require a finite, non-negative real number of any real type (bool is rejected)."""
    if not _is_real(value):
        hint = " (use .item() for a one-element tensor)" if isinstance(value, Tensor) else ""
        raise TypeError(
            f"{name} must be a real number (int, float or a numpy scalar), got {type(value).__name__}{hint}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range, such as 10**400
        raise ValueError(f"{name} must be a finite number >= 0, got an integer too large for a float") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    return number


def check_positive_int(value: Any, name: str) -> int:
    """Require an integer >= 1 of any integer type (bool is rejected)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def check_count(value: Any, name: str) -> int:
    """Require an integer >= 0 of any integer type (bool is rejected)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Require one of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def as_mode(value: Any, name: str = "loss") -> Mode:
    """Require a loss name (:data:`MODES`); return it as a :data:`Mode`."""
    check_choice(value, name, MODES)
    return value  # type: ignore[no-any-return]


def as_reduction(value: Any, name: str = "reduction") -> Reduction:
    """Require a reduction (:data:`REDUCTIONS`); return it as a :data:`selhn.types.Reduction`."""
    check_choice(value, name, REDUCTIONS)
    return value  # type: ignore[no-any-return]


def as_fallback(value: Any, name: str = "fallback") -> Fallback:
    """Require SelHN's fallback (:data:`FALLBACKS`); return it as a :data:`Fallback`."""
    check_choice(value, name, FALLBACKS)
    return value  # type: ignore[no-any-return]


def check_mask(value: Any, batch: int, device: torch.device) -> Tensor | None:
    """Require ``None`` or a boolean (B, B) mask on the scores' device."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of dtype torch.bool or None, got {type(value).__name__}")
    mask: Tensor = value
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = not a negative), got {mask.dtype}")
    if tuple(mask.shape) != (batch, batch):
        raise ValueError(f"mask must have shape ({batch}, {batch}) like scores, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the scores' device {device}, got {mask.device}")
    return mask


def ids_to_mask(value: Any, batch: int, device: torch.device) -> Tensor | None:
    """Turn per-pair ids into the (B, B) mask of pairs that share an id.

    ``ids`` may be ``None``, a 1-D integer tensor or a sequence of ints of length B.
    """
    ids = ids_as_tensor(value, batch)
    if ids is None:
        return None
    ids = ids.to(device)
    return ids.unsqueeze(1) == ids.unsqueeze(0)


def ids_as_tensor(value: Any, batch: int) -> Tensor | None:
    """Per-pair ids as a checked 1-D integer tensor of length ``batch`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        ids: Tensor = value
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
        for item in items:
            if not isinstance(item, numbers.Integral) or isinstance(item, bool):
                raise TypeError(
                    f"ids must hold integers (one image id per pair), got {type(item).__name__} {item!r}; "
                    "map other ids (strings, file names) to integers first"
                )
            if not -(2**63) <= int(item) < 2**63:
                raise ValueError(f"ids must fit in int64, got {item}")
        ids = torch.tensor([int(item) for item in items], dtype=torch.int64)
    elif hasattr(value, "__array__") and not isinstance(value, (str, bytes)):  # a numpy array
        kind = getattr(getattr(value, "dtype", None), "kind", "i")
        if kind not in "iu":  # strings, objects, floats, bools: not image ids
            raise TypeError(
                f"ids must hold integers (one image id per pair), got an array of dtype {value.dtype}; "
                "map other ids (strings, file names) to integers first"
            )
        ids = torch.as_tensor(value)
    else:
        raise TypeError(f"ids must be a 1-D integer tensor, array or sequence of ints, got {type(value).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must hold integers (one image id per pair), got dtype {ids.dtype}")
    if ids.ndim != 1 or ids.shape[0] != batch:
        raise ValueError(f"ids must have shape ({batch},), one id per pair, got {tuple(ids.shape)}")
    if ids.is_meta:
        raise ValueError("ids is a meta tensor (a shape without values): the mask needs the real ids")
    return ids


def check_bool(value: Any, name: str) -> bool:
    """Require a bool (an int such as 1 is refused: a switch is True or False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r} (a switch is True or False)")
    return value


T = TypeVar("T")


class Setting(Generic[T]):
    """A public setting of a loss module, checked on every assignment, not only in ``__init__``:
    ``criterion.epsilon = -1`` raises as ``SelHNLoss(epsilon=-1)`` does, instead of silently
    training another loss. ``check(value, name)`` returns the value to keep (e.g. a float)."""

    def __init__(self, check: Any) -> None:
        self.check = check
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Setting[T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> T: ...
    def __get__(self, instance: object | None, owner: type) -> Setting[T] | T:
        if instance is None:
            return self
        value: T = instance.__dict__["_setting_" + self.name]
        return value

    def __set__(self, instance: object, value: Any) -> None:
        instance.__dict__["_setting_" + self.name] = self.check(value, self.name)
