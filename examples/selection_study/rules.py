r"""The candidate selection rules of the study "beyond SelHN" (docs: Results, section 5), as
user rules of :mod:`selhn.rules`, and the criterion factories that train them.

Each rule decides, per anchor, the weight of each negative's hinge. With :math:`s_p` the
anchor's positive score, :math:`s_n` its negatives' scores, :math:`h_n = \max(0, m - s_p + s_n)`
their hinges and :math:`\hat n` the hardest negative:

* ``selhn-sum``: SelHN's condition (:math:`|s_p - s_{\hat n}| < \epsilon`) with the sum of
  the hinges as the fallback instead of their mean, so that a collapsed anchor gets the sum
  of hinges' gradient (B - 1 times the mean's) rather than a vanishing one. It is the
  library's ``SelHN(epsilon, fallback="sum")``.
* ``share-<tau>`` (:class:`Share`): the sum of the hinges while more than a share ``tau`` of
  the anchor's negatives violate the margin, else the hardest negative's hinge. At
  initialisation every negative violates it, so training starts as the sum of hinges.
* ``tempered-<T>`` (:class:`Tempered`): every hinge weighted by
  :math:`w_n = e^{(s_n - s_{\hat n}) / T}` (the hardest weighs 1): near the sum of hinges
  while the negatives' scores are within ``T`` of each other (as at a collapse), near the
  hardest negative once they spread beyond ``T``.
* ``semihard`` (:class:`SemiHard`): FaceNet's semi-hard negative (Schroff et al., CVPR 2015):
  the hardest negative scoring below the positive; an anchor with none takes its easiest
  negative, as TensorFlow Addons' ``triplet_semihard_loss`` does.

The losses are summed over anchors and directions (the VSE++ scale) unless ``--reduction``
says otherwise. The rules were fixed before the study's runs; written here on the library's
rule API, they train through :func:`examples.rvsepp.train.train` like any loss, DDP included.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor

import selhn
from examples.rvsepp.train import CRITERIA, Criterion, CriterionFactory, reduction_of
from selhn.rules import Anchors, SelectionRule, SelHN, check_rule


class Share(SelectionRule):
    """The sum of hinges while more than ``tau`` of the negatives are active, else the hardest."""

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def weights(self, anchors: Anchors) -> Tensor:
        share = (anchors.hinges > 0).sum(dim=1) / anchors.count.clamp(min=1)
        every = anchors.negatives.to(anchors.scores.dtype)
        return torch.where((share > self.tau).unsqueeze(1), every, anchors.one_hot(anchors.hardest_index))

    def __repr__(self) -> str:
        return f"Share({self.tau})"


class Tempered(SelectionRule):
    """Every hinge weighted by exp((s_n - s_hardest) / T)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def weights(self, anchors: Anchors) -> Tensor:
        return torch.exp((anchors.scores - anchors.hardest.unsqueeze(1)) / self.temperature)

    def __repr__(self) -> str:
        return f"Tempered({self.temperature})"


class SemiHard(SelectionRule):
    """The hardest negative below the positive; the easiest negative where there is none."""

    def weights(self, anchors: Anchors) -> Tensor:
        below = anchors.negatives & (anchors.scores < anchors.positive.unsqueeze(1))
        semi_hard = anchors.scores.masked_fill(~below, -math.inf).argmax(dim=1)
        easiest = anchors.scores.masked_fill(~anchors.negatives, math.inf).argmin(dim=1)
        return anchors.one_hot(torch.where(below.any(dim=1), semi_hard, easiest))


def candidate(name: str, epsilon: float) -> SelectionRule:
    """The rule of candidate ``name`` (a key of :data:`RULES`)."""
    kind, parameter = RULES[name]
    if kind == "selhn-sum":
        return SelHN(epsilon, "sum")
    if kind == "share":
        return Share(parameter)
    if kind == "tempered":
        return Tempered(parameter)
    return SemiHard()


#: The study's candidates: name -> (rule, parameter). Fixed before the study's runs.
RULES: dict[str, tuple[str, float]] = {
    "selhn-sum": ("selhn-sum", math.nan),
    "share-0.5": ("share", 0.5),
    "share-0.1": ("share", 0.1),
    "tempered-0.02": ("tempered", 0.02),
    "tempered-0.1": ("tempered", 0.1),
    "semihard": ("semihard", math.nan),
}


def factory(name: str) -> CriterionFactory:
    """The criterion factory of candidate ``name``: its rule's loss module, at the VSE++ scale."""

    def make(args: argparse.Namespace) -> Criterion:
        return selhn.RuleLoss(candidate(name, args.epsilon), args.margin, reduction=reduction_of(args, "sum"))

    return make


#: What ``--loss`` names in the study: the pipeline's losses and the candidates.
STUDY_CRITERIA: dict[str, CriterionFactory] = {**CRITERIA, **{name: factory(name) for name in RULES}}

#: A rule of your own, as ``compare --losses`` and ``--loss`` take it: ``module:Class`` or
#: ``module:Class(arguments)``, the module importable (on ``PYTHONPATH``), the arguments Python
#: literals, e.g. ``my_rules:TopK(k=5)``.
USER_RULE = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)(?:\((?P<arguments>.*)\))?", re.DOTALL)


def is_user_rule(name: str) -> bool:
    """Whether a loss name is written as a user's rule (``module:Class(arguments)``)."""
    return USER_RULE.fullmatch(name) is not None


def user_rule(spec: str) -> SelectionRule:
    """The rule ``module:Class(arguments)`` names: the class imported from the module and called
    with the arguments (Python literals, positional or by keyword). Raises ``ValueError`` naming
    what is wrong (the form, the import, the class, the arguments, or a class that makes no
    :class:`~selhn.rules.SelectionRule`)."""
    match = USER_RULE.fullmatch(spec)
    if match is None:
        raise ValueError(f"{spec!r}: a rule of your own is written module:Class or module:Class(arguments)")
    try:
        module = importlib.import_module(match["module"])
    except ImportError as error:
        raise ValueError(f"{spec!r}: cannot import {match['module']} ({error}); is its folder on PYTHONPATH?") from None
    cls = getattr(module, match["name"], None)
    if cls is None:
        raise ValueError(f"{spec!r}: {match['module']} has no {match['name']}")
    try:
        call = ast.parse(f"f({match['arguments'] or ''})", mode="eval").body
        assert isinstance(call, ast.Call)
        positional = [ast.literal_eval(argument) for argument in call.args]
        keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg}
        if len(keywords) != len(call.keywords):
            raise ValueError("**arguments are not literals")
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"{spec!r}: the arguments must be Python literals ({error})") from None
    try:
        return check_rule(cls(*positional, **keywords), spec)
    except TypeError as error:
        raise ValueError(f"{spec!r}: {error}") from None


def user_factory(spec: str) -> CriterionFactory:
    """The criterion factory of a user's rule: its loss module, at the VSE++ scale."""
    rule = user_rule(spec)

    def make(args: argparse.Namespace) -> Criterion:
        return selhn.RuleLoss(rule, args.margin, reduction=reduction_of(args, "sum"))

    return make


def criteria_with(losses: Iterable[str]) -> dict[str, CriterionFactory]:
    """:data:`STUDY_CRITERIA` and the user rules among ``losses`` (``module:Class(arguments)``)."""
    return {**STUDY_CRITERIA, **{name: user_factory(name) for name in losses if is_user_rule(name)}}
