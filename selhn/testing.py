"""Hypothesis strategies for image-text matching batches.

Use them to property-test your own losses and training code::

    from hypothesis import given
    from selhn.testing import score_matrices

    @given(score_matrices())
    def test_my_loss_is_finite(scores):
        assert torch.isfinite(my_loss(scores))

This module needs the optional ``hypothesis`` dependency (``pip install "selhn[testing]"``);
``import selhn`` never imports it.

Tensors are generated from a drawn seed with ``torch.Generator`` (fast, reproducible: the
falsifying example hypothesis prints names the seed, shape and scale), while batch sizes,
dimensions, scales and id patterns are drawn directly so that they shrink to the smallest
failing case.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "batch_sizes",
    "collapsed_embedding_pairs",
    "duplicate_ids",
    "embedding_pairs",
    "half_dtypes",
    "score_matrices",
]

_SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def batch_sizes(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[int]:
    """Batch sizes B in ``[min_size, max_size]`` (B = 1 has no negatives; B = 2 one each).

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import batch_sizes
        >>> @given(batch_sizes(2, 4))
        ... def check(size):
        ...     assert size in (2, 3, 4)
        >>> check()
    """
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"batch sizes need 1 <= min_size <= max_size, got {min_size} and {max_size}")
    return st.integers(min_value=min_size, max_value=max_size)


def half_dtypes() -> st.SearchStrategy[torch.dtype]:
    """``torch.float16`` or ``torch.bfloat16``.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> from selhn.testing import half_dtypes
        >>> @given(half_dtypes())
        ... def check(dtype):
        ...     assert torch.ones(2, dtype=dtype).dtype in (torch.float16, torch.bfloat16)
        >>> check()
    """
    return st.sampled_from([torch.float16, torch.bfloat16])


@st.composite
def score_matrices(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    scale: st.SearchStrategy[float] | None = None,
    levels: int | None = None,
) -> Tensor:
    """(B, B) score matrices with positives on the diagonal.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default :func:`batch_sizes`).
        dtype: dtype of the result (generated in float64, then cast).
        scale: strategy for the spread of the scores (default 0.01 to 3: scores are not
            assumed to lie in [-1, 1]).
        levels: if given, round the scores to ``levels`` distinct values per unit so that
            ties (equal negatives, gaps of exactly 0) occur often.

    Example:
        >>> from hypothesis import given
        >>> from selhn.functional import selhn_loss
        >>> from selhn.testing import score_matrices
        >>> @given(score_matrices(levels=4))
        ... def check(scores):
        ...     assert selhn_loss(scores).isfinite()
        >>> check()
    """
    size = draw(batch_size if batch_size is not None else batch_sizes())
    spread = draw(scale if scale is not None else st.floats(min_value=0.01, max_value=3.0))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    scores = torch.randn(size, size, generator=generator, dtype=torch.float64) * spread
    if levels is not None:
        scores = torch.round(scores * levels) / levels
    result: Tensor = scores.to(dtype)
    return result


def _unit_rows(x: Tensor) -> Tensor:
    norms = x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    return torch.div(x, norms)


@st.composite
def embedding_pairs(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    dim: st.SearchStrategy[int] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    normalized: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pairs ``(img_emb, txt_emb)`` of (B, D) embeddings, L2-normalised by default.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default :func:`batch_sizes`).
        dim: strategy for D (default 2 to 16).
        dtype: dtype of the result (generated in float64, then cast).
        normalized: L2-normalise each row.

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import embedding_pairs
        >>> @given(embedding_pairs())
        ... def check(pair):
        ...     img, txt = pair
        ...     assert img.shape == txt.shape
        >>> check()
    """
    size = draw(batch_size if batch_size is not None else batch_sizes())
    width = draw(dim if dim is not None else st.integers(min_value=2, max_value=16))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    img = torch.randn(size, width, generator=generator, dtype=torch.float64)
    txt = torch.randn(size, width, generator=generator, dtype=torch.float64)
    if normalized:
        img, txt = _unit_rows(img), _unit_rows(txt)
    return img.to(dtype), txt.to(dtype)


@st.composite
def collapsed_embedding_pairs(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int] | None = None,
    dim: st.SearchStrategy[int] | None = None,
    noise: st.SearchStrategy[float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Near-collapsed L2-normalised pairs: one shared centre plus noise of a drawn scale.

    This is the state of a freshly initialised ITM model on real region features: every
    embedding sits near one direction, all scores are nearly equal and every anchor's gap
    is about 0, which is where hard-negative gradients vanish.

    Args:
        draw: supplied by hypothesis.
        batch_size: strategy for B (default 2 to 8).
        dim: strategy for D (default 4 to 16).
        noise: strategy for the noise scale relative to the unit centre
            (default 1e-4 to 1e-2).
        dtype: dtype of the result.

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import collapsed_embedding_pairs
        >>> @given(collapsed_embedding_pairs())
        ... def check(pair):
        ...     img, txt = pair
        ...     assert ((img @ txt.T) > 0.9).all()
        >>> check()
    """
    size = draw(batch_size if batch_size is not None else batch_sizes(2, 8))
    width = draw(dim if dim is not None else st.integers(min_value=4, max_value=16))
    scale = draw(noise if noise is not None else st.floats(min_value=1e-4, max_value=1e-2))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    centre = _unit_rows(torch.randn(1, width, generator=generator, dtype=torch.float64))
    img = centre + scale * torch.randn(size, width, generator=generator, dtype=torch.float64)
    txt = centre + scale * torch.randn(size, width, generator=generator, dtype=torch.float64)
    return _unit_rows(img).to(dtype), _unit_rows(txt).to(dtype)


@st.composite
def duplicate_ids(draw: st.DrawFn, batch_size: int, *, max_distinct: int | None = None) -> Tensor:
    """(B,) integer image ids with repeats, as in COCO batches (5 captions per image).

    Args:
        draw: supplied by hypothesis.
        batch_size: B.
        max_distinct: most distinct ids (default ``max(1, B // 2)``, so repeats are common).

    Example:
        >>> from hypothesis import given
        >>> from selhn.testing import duplicate_ids
        >>> @given(duplicate_ids(6))
        ... def check(ids):
        ...     assert ids.shape == (6,) and len(set(ids.tolist())) <= 3
        >>> check()
    """
    distinct = max_distinct if max_distinct is not None else max(1, batch_size // 2)
    values = draw(st.lists(st.integers(0, distinct - 1), min_size=batch_size, max_size=batch_size))
    return torch.tensor(values, dtype=torch.long)
