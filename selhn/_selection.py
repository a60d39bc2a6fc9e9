"""The single definition of *hinge*, *hardest negative* and *gap*.

Every loss, fast path and diagnostic in the package reads these three notions from here, so
they can never disagree about which negative is the hardest or which anchor is vanishing.

Conventions (see the "Losses" docs page):

* ``scores`` is (B, B); row ``i`` is image anchor ``i`` (image-to-text), column ``j`` is
  caption anchor ``j`` (text-to-image), ``scores[k, k]`` are the positives.
* A pair ``(i, j)`` is *excluded* (not a negative of image anchor ``i`` nor of caption
  anchor ``j``) when ``i == j`` or the user's mask marks it (e.g. a shared image id).
  :func:`fill_excluded_` sets excluded scores to ``-inf``, after which the hardest negative
  of image anchor ``i`` is the maximum of row ``i`` and that of caption anchor ``j`` the
  maximum of column ``j``.
* The hinge of a negative is ``max(0, margin - s_pos + s_neg)``; its subgradient at the
  kink (argument exactly 0) is 0, i.e. a hinge is *active* when its argument is ``> 0``.
* The hardest negative of an anchor is its highest-scoring negative; a tie goes to the
  lowest index (PyTorch's ``max``/``argmax`` rule). An anchor without negatives has hardest
  score ``-inf``, hence a zero hinge and an infinite gap.
* Candidates whose embeddings are exact copies (a caption that occurs twice in a batch) tie
  in exact arithmetic, but a matrix product rounds their scores differently by their
  position and by the product's shape, so the computed scores no longer tie. Where the
  embeddings are known, the hardest negative among exact copies is the copy with the lowest
  index that is a negative of the anchor (:func:`first_copies`, :func:`lowest_copy`): the
  choice then depends on the embeddings, never on rounding, and a rank of the distributed
  loss picks what one process picks.
* The gap is ``s_pos - s_hardest``; an anchor is in the vanishing regime when
  ``|gap| < epsilon``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: Smallest score matrix (in entries) whose maxima are taken in two levels on a CPU: B = 768.
#: ``benchmarks/bench_maxima.py`` on a 2-core CPU, torch 2.13, both directions on a fresh score
#: matrix after a pass over a buffer larger than the caches (as a training step meets it), as a
#: share of ``max``'s time: 2.79x at B = 256, 1.26x at 512, 1.05x at 640, 0.77x at 768, 0.35x at
#: 1024, 0.16x at 2048 on two threads; 0.94x at 512 and 0.64x at 768 on one (``max(dim=0)``
#: slows down sharply once a row no longer fits in cache beside its neighbours). Called over and
#: over on one hot matrix, two levels read faster from B = 256 on: a tight loop misleads here.
TWO_LEVEL_MIN_SIZE = 768 * 768
#: Group widths of the two-level maxima: a row is reduced in groups of ``ROW_GROUP`` adjacent
#: entries, a column in groups of ``COL_GROUP`` adjacent rows.
ROW_GROUP = 64
COL_GROUP = 16
#: On a GPU only column maxima take two levels, in groups of ``GPU_COL_GROUP`` rows: there
#: ``max(dim=0)`` of a large matrix stages its partial results in a scratch buffer of about
#: 512 MiB (8 B x B float32 buffers at B = 4096, measured on an H200 with torch 2.11), while
#: two levels with groups of 64 rows peak at 3 MiB (16 MiB at B = 16384) in about the same time
#: (0.10 ms against 0.08 ms at B = 4096, 0.37 ms against 0.35 ms at B = 16384; groups of 16
#: rows still staged 576 MiB at B = 16384). Row maxima need no scratch there.
GPU_COL_GROUP = 64
#: Smallest score matrix (in entries) whose column maxima take two levels on a GPU: B = 1024
#: (the scratch buffer above is what they save; measured from there).
GPU_TWO_LEVEL_MIN_SIZE = 1024 * 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses run in float32 for half-precision inputs, else in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def embedding_compute_dtype(img: Tensor, txt: Tensor) -> torch.dtype:
    """The dtype embeddings are scored in: their common dtype, float32 at the least."""
    return torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)


def hinge(positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """``max(0, margin - positive + negative)``; ``negative = -inf`` gives exactly 0."""
    return torch.relu(margin - positive + negative)


def gap(positive: Tensor, hardest: Tensor) -> Tensor:
    """``s_pos - s_hardest`` on detached scores (``+inf`` for an anchor with no negative)."""
    return positive.detach() - hardest.detach()


def vanishing(gap_: Tensor, epsilon: float) -> Tensor:
    """Anchors in the gradient-vanishing regime: ``|gap| < epsilon``."""
    return gap_.abs() < epsilon


def hardest_negatives(scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hardest negative of every image anchor (row) and caption anchor (column).

    ``scores`` must have its non-negatives set to ``-inf`` (:func:`fill_excluded_`). Returns
    the row maxima and their indices, then the column maxima and their indices, exactly as
    ``scores.max(dim=1)`` and ``scores.max(dim=0)`` do (:func:`max_along`): ties go to the
    lowest index.
    """
    return (*max_along(scores, 1), *max_along(scores, 0))


def max_along(scores: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=dim)`` of a matrix as (values, indices); ties go to the lowest index.

    Large matrices are reduced in two levels (:func:`_two_level_max`): on a CPU in both
    directions from ``TWO_LEVEL_MIN_SIZE`` entries, because there a maximum that tracks its
    index runs several times slower than one that does not (``amax``), and a column maximum
    much slower still; on a GPU the column maxima from ``GPU_TWO_LEVEL_MIN_SIZE`` entries,
    because there ``max(dim=0)`` needs a scratch buffer of several B x B matrices
    (``GPU_COL_GROUP``). Otherwise, and under ``torch.compile``, ``max`` is called directly.
    """
    on_cpu = scores.device.type == "cpu"
    smallest = TWO_LEVEL_MIN_SIZE if on_cpu else GPU_TWO_LEVEL_MIN_SIZE
    if scores.numel() < smallest or (not on_cpu and dim == 1) or torch.compiler.is_compiling():
        values, indices = scores.max(dim=dim)
        return values, indices
    group = (ROW_GROUP if dim == 1 else COL_GROUP) if on_cpu else GPU_COL_GROUP
    return _two_level_max(scores.contiguous(), dim, group)


def _two_level_max(scores: Tensor, dim: int, group: int) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=dim)`` of a contiguous matrix, in two levels.

    The reduced dimension is cut into groups of ``group`` adjacent entries. First each group's
    maximum value (``amax``: vectorised, no index), then the first group holding the overall
    maximum (``max`` over B / group values per line), then the first position of that maximum
    inside the winning group (``max`` over ``group`` gathered values). The first group that
    attains the maximum holds its first occurrence, so ties go to the lowest index, and a NaN
    (which ``max`` and ``amax`` both propagate) to the first NaN, as in ``max``. A remainder
    shorter than a group is reduced directly and wins only when strictly greater (or a NaN
    where the groups have none), since its indices are the highest.
    """
    columns = dim == 0
    length, lines = scores.shape[dim], scores.shape[1 - dim]
    whole = length - length % group
    if whole == 0:
        values, indices = scores.max(dim=dim)
        return values, indices
    n_groups = whole // group
    width = scores.shape[1]
    if columns:
        # groups of `group` adjacent rows; column j's candidates are scores[w_j * group + t, j]
        values, winner = scores[:whole].view(n_groups, group, width).amax(dim=1).max(dim=0)
        rows = (winner * group).unsqueeze(0) + torch.arange(group, device=scores.device).unsqueeze(1)
        within = scores.gather(0, rows).max(dim=0).indices
    else:
        # groups of `group` adjacent entries; row i's candidates are one contiguous run,
        # starting at flat position i * width + w_i * group (a row of the windows view)
        values, winner = scores[:, :whole].view(lines, n_groups, group).amax(dim=2).max(dim=1)
        starts = torch.arange(lines, device=scores.device) * width + winner * group
        within = scores.view(-1).unfold(0, group, 1).index_select(0, starts).max(dim=1).indices
    indices = winner * group + within
    if whole < length:
        tail_values, tail_indices = (scores[whole:] if columns else scores[:, whole:]).max(dim=dim)
        later = (tail_values > values) | (tail_values.isnan() & ~values.isnan())
        values = torch.where(later, tail_values, values)
        indices = torch.where(later, tail_indices + whole, indices)
    return values, indices


def negatives_mask(shape: tuple[int, int], positive_column: Tensor, excluded: Tensor | None) -> Tensor:
    """(L, C) boolean, ``True`` where candidate ``c`` is a negative of anchor ``a``: every
    candidate but the anchor's positive (column ``positive_column[a]``) and the pairs
    ``excluded`` marks (shared ids). The one definition of "a negative" over anchors x candidates.

    Example:
        >>> import torch
        >>> negatives_mask((2, 3), torch.tensor([1, 2]), torch.tensor([[True, False, False], [False] * 3]))
        tensor([[False, False,  True],
                [ True,  True, False]])
    """
    negatives = torch.ones(shape, dtype=torch.bool, device=positive_column.device)
    negatives[torch.arange(shape[0], device=positive_column.device), positive_column] = False
    return negatives if excluded is None else negatives.logical_and_(~excluded)


def fill_excluded_(scores: Tensor, mask: Tensor | None) -> Tensor:
    """In place: set every pair that is not a negative (diagonal, ``mask``) to ``-inf``.

    On the result the hardest negative of image anchor ``i`` is the maximum of row ``i``, that
    of caption anchor ``j`` the maximum of column ``j``, and every hinge of an excluded pair
    is exactly 0, in both directions at once.
    """
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    scores.diagonal().fill_(float("-inf"))
    return scores


def _row_keys(*matrices: Tensor) -> Tensor:
    """(n, C) an integer key of each row of n (C, D) matrices that equal rows share.

    The key reads each row's first four coordinates (one cache line: no pass over the rows) as
    32-bit integers (16-bit for half precision; two each for double) and sums them with weights
    1, ..., 2^30 spread evenly, in 64-bit integers (no overflow: below 2^62). Rows of a nearly
    collapsed batch, which differ only in their coordinates' low bits, still get distinct keys:
    the weights move each coordinate's low bits to other positions of the key.
    """
    coordinates = torch.stack([rows[:, :KEY_COORDINATES] for rows in matrices])  # (n, C, 1 to 4)
    bits = coordinates.view(torch.int16 if coordinates.element_size() == 2 else torch.int32)  # (n, C, 1 to 8)
    return (bits.long() * _key_weights(bits.shape[2], bits.device)).sum(dim=2)


#: How many leading coordinates of a row :func:`_row_keys` reads.
KEY_COORDINATES = 4


@functools.cache
def _key_weights(n_values: int, device: torch.device) -> Tensor:
    """The weights 2^0 ... 2^30 of :func:`_row_keys`' ``n_values`` integers, evenly spread."""
    exponents = [30 * i // max(n_values - 1, 1) for i in range(n_values)]
    return torch.tensor([2**exponent for exponent in exponents], dtype=torch.long, device=device)


def first_copies(rows: Tensor) -> Tensor | None:
    """For each row of ``rows`` (C, D), the lowest index of a row equal to it; None when no
    two rows are equal, or under ``torch.compile`` (whose graphs cannot hold the search).

    Rows are keyed by their first four coordinates (:func:`_row_keys`); only when two rows
    share a key are the rows that share one compared whole, so a batch of distinct embeddings
    costs a sort of C keys. Rows holding a NaN equal no row.

    Example:
        >>> import torch
        >>> first_copies(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
        tensor([0, 1, 0])
        >>> first_copies(torch.eye(3)) is None
        True
    """
    return _first_copies_of(rows)[0]


def first_copies_of_pair(first: Tensor, second: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """:func:`first_copies` of two sets of rows (a batch's captions and images), with one sort
    and one device read for both where their shapes and dtypes agree (the common case: no copies)."""
    if first.shape != second.shape or first.dtype != second.dtype or first.device != second.device:
        return first_copies(first), first_copies(second)
    found = _first_copies_of(first, second)
    return found[0], found[1]


def _first_copies_of(*matrices: Tensor) -> list[Tensor | None]:
    """:func:`first_copies` of n (C, D) matrices of one shape, dtype and device: their keys
    sorted together, one device read for which of them share a key."""
    size, width = matrices[0].shape
    if size < 2 or width == 0 or torch.compiler.is_compiling():
        return [None] * len(matrices)
    rows = [matrix.detach() for matrix in matrices]
    keys = _row_keys(*rows)
    ordered = keys.sort(dim=1).values
    shared = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).tolist()
    return [
        _copies_sharing_keys(one, its_keys) if any_shared else None
        for one, its_keys, any_shared in zip(rows, keys, shared, strict=True)
    ]


def _copies_sharing_keys(rows: Tensor, keys: Tensor) -> Tensor | None:
    """:func:`first_copies` of ``rows`` (C, D) where some of their keys (C,) are shared: the rows
    that share one are compared whole."""
    size = rows.shape[0]
    _, key_group, key_counts = torch.unique(keys, return_inverse=True, return_counts=True)
    suspects = (key_counts.index_select(0, key_group) > 1).nonzero().squeeze(1)
    _, group = torch.unique(rows.index_select(0, suspects), dim=0, return_inverse=True)
    lowest = torch.full((suspects.numel(),), size, dtype=torch.long, device=rows.device)
    lowest = lowest.scatter_reduce(0, group, suspects, reduce="amin").index_select(0, group)
    if bool((lowest == suspects).all()):  # keys shared by rows that differ: no copies after all
        return None
    return torch.arange(size, device=rows.device).index_copy(0, suspects, lowest)


def lowest_copy(scores: Tensor, index: Tensor, copies: Tensor | None) -> Tensor:
    """Each anchor's chosen candidate ``index`` (L,), moved to the lowest-index exact copy of it
    (``copies``: :func:`first_copies` of the candidates) that is a negative of the anchor.

    ``scores`` is (L, C), anchors as rows, ``-inf`` where a candidate is no negative. Anchors
    whose choice has no copy keep it; so does every anchor when ``copies`` is None.

    Example:
        >>> import torch
        >>> inf = float("-inf")
        >>> scores = torch.tensor([[inf, 0.5, 0.7, 0.7 + 1e-7], [0.1, inf, 0.3, 0.3]])
        >>> lowest_copy(scores, torch.tensor([3, 2]), torch.tensor([0, 1, 2, 2]))
        tensor([2, 2])
    """
    if copies is None:
        return index
    group = copies.index_select(0, index)
    members = torch.bincount(copies, minlength=copies.numel())
    shared = (members.index_select(0, group) > 1).nonzero().squeeze(1)
    if shared.numel() == 0:
        return index
    lines = scores.index_select(0, shared)
    qualifies = (copies.unsqueeze(0) == group.index_select(0, shared).unsqueeze(1)) & (lines != float("-inf"))
    first = qualifies.to(torch.uint8).argmax(dim=1)  # the first True (the lowest such copy)
    moved = torch.where(qualifies.any(dim=1), first, index.index_select(0, shared))
    return index.index_copy(0, shared, moved)


#: :func:`top_k` reads a line's candidates in groups of this many adjacent entries: along a
#: row, and along a column (whose groups span adjacent rows). On a 2-core CPU at B = 2048 the
#: groups' maxima cost 2.0 ms per matrix in groups of 32 along the rows (13.6 ms in groups of
#: 16: a short inner reduction is not vectorised) and 2.6 ms in groups of 16 along the columns.
TOP_K_ROW_GROUP = 32
TOP_K_COLUMN_GROUP = 16
#: :func:`top_k` masks (``below``) at most about this many scores at a time: its buffers stay a
#: small share of a B x B matrix.
TOP_K_BLOCK = 1 << 17


def top_k(scores: Tensor, k: int, dim: int, below: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries along ``dim`` of each line of a matrix, highest first, ties to
    the lowest index; with ``below`` (one bound per line) only entries strictly below it count.

    Returns ``(values, indices)``, each (lines, k); ``k`` must not exceed ``scores.shape[dim]``.
    Where a line has fewer than ``k`` entries above ``-inf`` the rest are ``-inf`` (their index
    is meaningless). The entries are read in groups of adjacent ones (``TOP_K_ROW_GROUP``,
    ``TOP_K_COLUMN_GROUP``): first
    each group's maximum (``amax``: one vectorised pass, no index, and along the matrix's own
    memory order for either ``dim``), then the ``k`` best groups of each line, then the ``k``
    best of their entries. That is exact, ties included: ordered by (value, then lowest index),
    a line's ``k`` best entries lie in its ``k`` best groups, ordered by their best entries.
    """
    length, group = scores.shape[dim], (TOP_K_ROW_GROUP if dim == 1 else TOP_K_COLUMN_GROUP)
    n_groups = -(-length // group)
    bests = _group_bests(scores, dim, below, group, n_groups)  # (lines, groups)
    group_values, best_groups = _top_lowest_first(bests, min(k, n_groups), overwrite=True)
    del bests
    # a line's chosen groups in ascending order (position order is then index order), a group
    # chosen for a slot beyond the line's finite entries left out
    best_groups = best_groups.masked_fill(group_values == float("-inf"), n_groups).sort(dim=1).values
    values = scores.new_empty(best_groups.shape[0], k)
    indices = torch.empty(best_groups.shape[0], k, dtype=torch.long, device=scores.device)
    offsets = torch.arange(group, device=scores.device)
    step = max(1, TOP_K_BLOCK // (best_groups.shape[1] * group))  # lines per block: small index buffers
    for start in range(0, best_groups.shape[0], step):
        lines = slice(start, start + step)
        positions = (best_groups[lines].unsqueeze(2) * group + offsets).flatten(1)  # (lines, groups * group)
        inside = positions < length
        positions.clamp_(max=length - 1)
        # line l's candidates: scores[l, positions[l]] along the rows, scores[positions[l], l] along the columns
        along_rows = dim == 1
        candidates = scores[lines].gather(1, positions) if along_rows else scores[:, lines].gather(0, positions.t()).t()
        keep = inside if below is None else inside & (candidates < below[lines].unsqueeze(1))
        candidates = candidates.masked_fill(~keep, float("-inf"))
        values[lines], picked = _top_lowest_first(candidates, k, overwrite=True)
        indices[lines] = positions.gather(1, picked)
    return values, indices


def _group_bests(scores: Tensor, dim: int, below: Tensor | None, group: int, n_groups: int) -> Tensor:
    """(lines, groups) the maximum of each group of ``group`` adjacent entries along ``dim``,
    entries at or above ``below`` left out. Along the columns the result is a transposed view of
    a (groups, lines) matrix.

    Eager, the groups' maxima are taken unmasked in one pass over views of the matrix, and only
    the groups whose maximum reaches ``below`` are read again, masked (a hard negative above the
    bound is the exception; masking every score costs several times the pass), unless they hold
    more than ``REREAD_SHARE`` of the scores. Compiled, or then, every score is masked, in blocks
    whose buffers stay small."""
    if below is None or not torch.compiler.is_compiling():
        bests = _unmasked_group_bests(scores, dim, group)
        if below is None:
            return bests
        reaching = (bests >= below.unsqueeze(1)).nonzero()  # (n, 2): line, group
        if reaching.shape[0] * group <= REREAD_SHARE * scores.numel():
            _mask_reaching_groups(bests, scores, dim, below, group, reaching)
            return bests
    # compiled, or most groups reach the bound: every score masked
    length, n_lines = scores.shape[dim], scores.shape[1 - dim]
    pad = n_groups * group - length
    if dim == 1:  # lines are rows: blocks of rows, groups of adjacent columns
        out = scores.new_empty(n_lines, n_groups)
        step = max(1, TOP_K_BLOCK // max(length, 1))
        for start in range(0, n_lines, step):
            rows = scores[start : start + step]
            rows = rows.masked_fill(rows >= below[start : start + step].unsqueeze(1), float("-inf"))
            rows = torch.nn.functional.pad(rows, (0, pad), value=float("-inf"))
            out[start : start + step] = rows.reshape(rows.shape[0], n_groups, group).amax(dim=2)
        return out
    # lines are columns: blocks of whole groups of rows, groups of adjacent rows
    out = scores.new_empty(n_groups, n_lines)
    step = group * max(1, TOP_K_BLOCK // max(group * n_lines, 1))
    for start in range(0, length, step):
        rows = scores[start : start + step]
        rows = rows.masked_fill(rows >= below.unsqueeze(0), float("-inf"))
        rows = torch.nn.functional.pad(rows, (0, 0, 0, -rows.shape[0] % group), value=float("-inf"))
        out[start // group : start // group + rows.shape[0] // group] = rows.reshape(-1, group, n_lines).amax(dim=1)
    return out.t()


def _unmasked_group_bests(scores: Tensor, dim: int, group: int) -> Tensor:
    """(lines, groups) each group's maximum, in one pass over views of the matrix (a last,
    shorter group reduced on its own). A fresh tensor (along the columns, a transposed view of one)."""
    length, n_lines = scores.shape[dim], scores.shape[1 - dim]
    whole = length - length % group
    if dim == 1:
        parts = [scores[:, :whole].view(n_lines, whole // group, group).amax(dim=2)] if whole else []
        if whole < length:
            parts.append(scores[:, whole:].amax(dim=1, keepdim=True))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    parts = [scores[:whole].view(whole // group, group, n_lines).amax(dim=1)] if whole else []
    if whole < length:
        parts.append(scores[whole:].amax(dim=0, keepdim=True))
    return (torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]).t()


def _mask_reaching_groups(bests: Tensor, scores: Tensor, dim: int, below: Tensor, group: int, reaching: Tensor) -> None:
    """In place: the maximum of each group in ``reaching`` ((n, 2): line, group; those whose
    maximum reaches the line's bound), taken again over the entries below the bound (``-inf``
    where none is)."""
    length = scores.shape[dim]
    offsets = torch.arange(group, device=scores.device)
    step = max(1, TOP_K_BLOCK // group)
    for start in range(0, reaching.shape[0], step):
        line, chosen = reaching[start : start + step].unbind(1)
        positions = chosen.unsqueeze(1) * group + offsets  # (n, group)
        inside = positions < length
        positions.clamp_(max=length - 1)
        lines = line.unsqueeze(1)
        values = scores[lines, positions] if dim == 1 else scores[positions, lines]
        values = values.masked_fill(~inside | (values >= below[lines]), float("-inf"))
        bests[line, chosen] = values.amax(dim=1)


#: :func:`top_k` with a bound re-reads the groups that reach it one by one while they hold at
#: most this share of the scores (a gather of their entries); beyond it, it masks every score
#: in blocks (on a 2-core CPU the masking pass costs about 15 times the groups' maxima).
REREAD_SHARE = 0.25


#: Up to this ``k``, :func:`_top_lowest_first` takes ``k`` maxima one after the other (on a CPU
#: ``topk`` with k > 1 costs several times that at these widths, 15 ms against 1.4 ms for k = 1
#: on 2048 lines of 320 at B = 2048); above it, ``topk``.
ITERATED_MAXIMA = 8


def _top_lowest_first(rows: Tensor, k: int, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row and their positions, highest first, ties to the
    lowest position. Where a row has fewer than ``k`` entries above ``-inf``, its other slots
    hold ``-inf`` (their positions are meaningless, and may repeat a position already taken).
    ``overwrite``: ``rows`` is the caller's scratch, and may be overwritten (no copy is made)."""
    if k <= ITERATED_MAXIMA:  # each maximum is the first of the remaining ones: ties by position
        work = rows if overwrite else rows.clone()
        values = rows.new_empty(rows.shape[0], k)
        found = torch.empty(rows.shape[0], k, dtype=torch.long, device=rows.device)
        for slot in range(k):
            values[:, slot], found[:, slot] = work.max(dim=1)
            work.scatter_(1, found[:, slot : slot + 1], float("-inf"))
        return values, found
    # topk, then the ties across the cut (a (k+1)-th value equal to the k-th) redone line by line
    extra = min(k + 1, rows.shape[1])
    values, found = rows.topk(extra, dim=1)
    if extra > k:
        cut = values[:, k - 1]
        tied = ((values[:, k] == cut) & (cut > float("-inf"))).nonzero().flatten().tolist()
        values, found = values[:, :k], found[:, :k].clone()
        for line in tied:
            row = rows[line]
            above = (row > cut[line]).nonzero().flatten()
            equal = (row == cut[line]).nonzero().flatten()[: k - above.numel()]
            found[line] = torch.cat([above, equal])
    found = found.sort(dim=1).values  # by position, then stably by value: highest first, ties by position
    values = rows.gather(1, found)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), found.gather(1, order)
