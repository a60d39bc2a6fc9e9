r"""Negatives across GPUs: the triplet losses over the global batch, with torch.distributed.

With DistributedDataParallel every ITM code base mines negatives inside each rank's local
batch. :func:`global_loss` mines them in the global batch: it scores this rank's images
against every rank's captions and its captions against every rank's images (each positive at
its global offset), so the memory per rank grows with :math:`B_\text{local} \times
B_\text{global}`, not :math:`B_\text{global}^2`. Both rectangles go through the modules' own
autograd Function (``selhn._core.EmbeddingLoss``), which all-gathers in forward and
reduce-scatters in backward, and keeps only what the modules keep in between.

Equivalence: the value returned on every rank is exactly the loss of one process on the
concatenated batch (same reduction); its gradient is :math:`W` (world size) times that of
this rank's share: the gather's adjoint sums every rank's contribution into the owner's
embeddings, and DDP averages the parameter gradients over the :math:`W` ranks, so after
``backward()`` they hold exactly the single-process gradient. Ranks may hold different batch
sizes (a last, smaller batch), of one row at least: a rank with none, like any rank whose
arguments fail their checks, stops every rank with a clear error, and so do ranks that
disagree on the loss, its settings, the embedding size or dtype, or whether ids are given
(ids of any integer dtype mix freely). Without a process group of more than one rank,
:func:`global_loss` is the plain single-process loss.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from selhn import _core, _validation
from selhn.losses import RuleLoss
from selhn.rules import SelectionRule, resolve_rule, rule_settings
from selhn.types import Fallback, LossName

__all__ = ["global_loss", "is_distributed"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised.

    Example:
        >>> from selhn.distributed import is_distributed
        >>> is_distributed()      # a plain process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# torch 2.13 renamed the single-tensor collectives and deprecated the old names; torch < 2.13 has the old ones only
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Ranks:
    """This rank's rows in the global batch and the loss's collectives (``_core.Ranks``). Sizes
    may differ by rank (exchanged once; tensors are padded to the largest). :meth:`scatter`,
    the gather's adjoint, sums over ranks the gradient at this rank's rows: a reduce-scatter
    on NCCL, an all-reduce and a slice on backends without one (gloo)."""

    def __init__(self, local: int, device: torch.device, sizes: list[int] | None = None) -> None:
        if sizes is None:  # (global_loss hands over the sizes its agreement check exchanged)
            gathered = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, torch.tensor([local], device=device))
            sizes = [int(size) for size in gathered]
        self.sizes, self.rank = sizes, dist.get_rank()
        self.offset, self.largest = sum(self.sizes[: self.rank]), max(self.sizes)

    def _padded(self, tensor: Tensor) -> Tensor:
        missing = self.largest - tensor.shape[0]
        return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])]) if missing else tensor.contiguous()

    def rows(self, tensor: Tensor) -> Tensor:
        """Every rank's rows of ``tensor`` (B_r, ...), in rank order: one all-gather."""
        out = tensor.new_empty((len(self.sizes) * self.largest, *tensor.shape[1:]))
        _all_gather_single(out, self._padded(tensor))
        return torch.cat([part[:size] for part, size in zip(torch.split(out, self.largest), self.sizes, strict=True)])

    def gather(self, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
        both = self.rows(torch.cat([img, txt], dim=1))
        return both[:, : img.shape[1]], both[:, img.shape[1] :]

    def scatter(self, d_img: Tensor, d_txt: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled():  # create_graph=True: the collectives below are not recorded
            raise RuntimeError(
                "selhn.distributed: second derivatives across ranks are not supported (backward was called "
                "with create_graph=True, e.g. for a gradient penalty). Use the loss modules or selhn.functional "
                "on the local batch for a penalty term: they are twice differentiable."
            )
        both = torch.cat([d_img, d_txt], dim=1)
        padded = torch.cat([self._padded(part) for part in torch.split(both, self.sizes)])
        if dist.get_backend() == dist.Backend.NCCL:
            local = padded.new_empty((self.largest, *both.shape[1:]))
            _reduce_scatter_single(local, padded)
        else:
            dist.all_reduce(padded)
            local = padded[self.rank * self.largest : (self.rank + 1) * self.largest]
        local = local[: self.sizes[self.rank]]
        return local[:, : d_img.shape[1]], local[:, d_img.shape[1] :]


def global_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    loss: LossName | SelectionRule = "selhn",
    margin: float = 0.2,
    epsilon: float | None = None,
    *,
    fallback: Fallback | None = None,
    ids: Any = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    r"""A triplet loss over the global batch of all ranks, for this rank's anchors.

    Returns, on every rank, the value a single process computes on the concatenated batch;
    see the module docs for the gradient scaling that makes DDP's averaged gradients equal
    the single-process ones. With ``ids``, pairs sharing an id are not negatives of each
    other, across ranks too.

    Args:
        img_emb: (B_r, D) this rank's L2-normalised image embeddings.
        txt_emb: (B_r, D) this rank's L2-normalised caption embeddings.
        loss: ``"selhn"``, ``"hn"`` (max violation) or ``"sum"`` (sum of hinges), or any
            :class:`selhn.rules.SelectionRule` (a rule of your own is computed by plain
            autograd through a differentiable all-gather, with the same equivalence).
        margin: triplet margin.
        epsilon: SelHN's gap threshold for ``loss="selhn"`` (None: 0.01); refused beside a
            rule, which carries its own.
        fallback: SelHN's fallback for ``loss="selhn"``, ``"mean"`` (None) or ``"sum"``;
            refused beside a rule.
        ids: optional (B_r,) integer ids (e.g. image ids).
        reduction: ``"mean"`` or ``"sum"`` over the 2 B_global anchors (``"none"`` is not
            available: the per-anchor losses live on different ranks).

    Returns:
        A scalar.

    Shape:
        - img_emb, txt_emb: :math:`(B_r, D)`
        - ids: :math:`(B_r,)`
        - output: :math:`()`

    Example:
        >>> import torch
        >>> import selhn
        >>> from selhn.distributed import global_loss
        >>> img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> torch.allclose(global_loss(img, txt, "hn"), selhn.MaxViolationLoss()(img, txt))
        True
    """
    if not is_distributed():  # the single-process loss: the module of the rule (the lean path for a built-in one)
        rule, margin = _checked(img_emb, txt_emb, loss, margin, epsilon, fallback, ids, reduction)
        value: Tensor = RuleLoss(rule, margin, reduction=reduction)(img_emb, txt_emb, ids)
        return value

    # Every rank checks its own arguments, then all ranks compare them in one exchange: a rank
    # whose input is refused, or ranks that disagree, stop every rank with a clear error
    # (a rank that raised alone would leave the others waiting in a collective until a timeout).
    problem: Exception | None = None
    checked: tuple[SelectionRule, float] | None = None
    try:
        checked = _checked(img_emb, txt_emb, loss, margin, epsilon, fallback, ids, reduction)
    except (TypeError, ValueError) as error:
        problem = error
    agreed_rule = None if checked is None else checked[0]
    sizes = _agree(_signature(img_emb, agreed_rule, margin, ids, reduction, problem is None), problem, agreed_rule)
    assert checked is not None  # (_agree raised otherwise)
    rule, margin = checked
    local = img_emb.shape[0]
    ranks = _Ranks(local, img_emb.device, sizes)
    excluded = None
    own_ids = _validation.ids_as_tensor(ids, local)
    if own_ids is not None:  # gathered as int64 whatever each rank's integer dtype (uint64 wraps, equality holds)
        own_ids = own_ids.to(img_emb.device, torch.int64)
        excluded = own_ids.unsqueeze(1) == ranks.rows(own_ids).unsqueeze(0)
    problem = None
    try:
        share = _core.embedding_losses(img_emb, txt_emb, excluded, margin, rule, ranks).sum()
    except Exception as error:  # the user's rule raised, or returned a choice the checks refused
        problem = error
    _agree_the_rule_ran(problem, rule)
    share = share / (2 * sum(ranks.sizes)) if reduction == "mean" else share
    value = share.detach().clone()
    dist.all_reduce(value)
    world = dist.get_world_size()
    # the value of the global loss, with the gradient of W x this rank's share (see module docs)
    return world * share + (value - world * share).detach()


def _checked(
    img_emb: Any, txt_emb: Any, loss: Any, margin: Any, epsilon: Any, fallback: Any, ids: Any, reduction: Any
) -> tuple[SelectionRule, float]:
    """This rank's arguments, checked (the errors name the argument): the rule and the margin."""
    _validation.check_embeddings(img_emb, txt_emb)
    rule = resolve_rule(loss, epsilon, fallback)
    _validation.check_choice(reduction, "reduction", tuple(r for r in _validation.REDUCTIONS if r != "none"))
    margin = _validation.check_nonnegative(margin, "margin")
    _validation.ids_as_tensor(ids, img_emb.shape[0])  # (checked here; the mask is built where it is used)
    return rule, margin


def _collective_device() -> torch.device:
    """Where the small agreement exchanges live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _agree_the_rule_ran(problem: Exception | None, rule: SelectionRule) -> None:
    """Stop every rank when the rule failed on any of them: the failing rank re-raises its own
    error, the others raise one that names the failing ranks and their errors (without this
    exchange they would wait in the next collective until the process group's timeout)."""
    failed = torch.tensor([0.0 if problem is None else 1.0], device=_collective_device())
    flags = [torch.empty_like(failed) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, failed)
    failing = [rank for rank, flag in enumerate(flags) if float(flag) != 0.0]
    if not failing:
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if problem is None else f"{type(problem).__name__}: {problem}")
    if problem is not None:
        raise problem
    described = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failing)
    raise ValueError(
        f"selhn.distributed.global_loss: the rule {rule!r} failed on rank(s) {failing} ({described}), "
        "so every rank stops here"
    )


#: What every rank must agree on, in the order of :func:`_signature`'s vector (after a flag
#: that says whether the rank's own arguments passed their checks, and its number of rows).
_AGREED = ("embedding size", "embedding dtype", "ids given", "loss (its rule and settings)", "margin", "reduction")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _code(value: Any, choices: tuple[Any, ...]) -> float:
    """The index of ``value`` among ``choices`` (-1 when it is not one of them)."""
    return float(choices.index(value)) if any(value is c or value == c for c in choices) else -1.0


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _signature(
    img_emb: Any, rule: SelectionRule | None, margin: Any, ids: Any, reduction: Any, ok: bool
) -> list[float]:
    """This rank's call as numbers (read even from arguments that failed their checks). The
    rule is compared by a checksum of its class and settings (:func:`selhn.rules.rule_settings`),
    so two rules that differ in a parameter disagree even where their ``repr`` hides it."""
    shape = tuple(img_emb.shape) if isinstance(img_emb, Tensor) else ()
    dtype = img_emb.dtype if isinstance(img_emb, Tensor) else None
    return [
        1.0 if ok else 0.0,
        float(shape[0]) if len(shape) == 2 else -1.0,
        float(shape[1]) if len(shape) == 2 else -1.0,
        _code(dtype, _DTYPES),
        0.0 if ids is None else 1.0,
        -1.0 if rule is None else float(zlib.crc32(f"{type(rule).__module__} {rule_settings(rule)}".encode())),
        _number(margin),
        _code(reduction, _validation.REDUCTIONS),
    ]


def _agree(signature: list[float], problem: Exception | None, rule: SelectionRule | None) -> list[int]:
    """Exchange every rank's signature; raise on every rank if any rank's arguments failed
    their checks or the ranks disagree; else return every rank's number of rows. (Only when
    the rules differ are their descriptions exchanged too, for the message: every rank sees
    the same table, so all of them take that path together.)"""
    mine = torch.tensor(signature, dtype=torch.float64, device=_collective_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).cpu().tolist()
    refused = [rank for rank, row in enumerate(table) if row[0] != 1.0]
    if problem is not None:
        raise problem
    if refused:
        raise ValueError(
            f"selhn.distributed.global_loss: rank(s) {refused} refused their arguments (their own error says why), "
            "so every rank stops here"
        )
    for column, name in enumerate(_AGREED, start=2):
        values = [row[column] for row in table]
        if any(not (v == values[0] or (math.isnan(v) and math.isnan(values[0]))) for v in values):
            readable: list[Any] = [_readable(name, value) for value in values]
            if name.startswith("loss"):  # each rank's rule as it describes itself
                dist.all_gather_object(readable, None if rule is None else rule_settings(rule))
            per_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(readable))
            raise ValueError(
                f"selhn.distributed.global_loss: the ranks disagree on the {name} ({per_rank}); "
                "every rank must call it with the same loss, margin, epsilon, fallback, reduction, embedding size and "
                "dtype, and with ids on every rank or on none"
            )
    return [int(row[1]) for row in table]


def _readable(name: str, value: float) -> str:
    """A signature entry as the argument it came from."""
    choices: dict[str, tuple[Any, ...]] = {
        "embedding dtype": _DTYPES,
        "reduction": _validation.REDUCTIONS,
        "ids given": ("no", "yes"),
    }
    if name in choices:
        return str(choices[name][int(value)])
    return f"{int(value)}" if name == "embedding size" else f"{value:g}"
