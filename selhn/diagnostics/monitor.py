"""The training monitor (:class:`TrainingMonitor`): per step, each encoder's gradient norm and
the batch statistics, a bounded history, CSV, TensorBoard scalars and a plot."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from selhn._validation import (
    check_nonnegative,
    check_positive_int,
)
from selhn.diagnostics.alarm import CollapseAlarm, _epsilon_of, _state_entries
from selhn.diagnostics.statistics import GAP_QUANTILES, vanishing_stats
from selhn.rules import SelectionRule, check_rule


def _parameters(source: nn.Module | Iterable[nn.Parameter], name: str) -> list[nn.Parameter]:
    if isinstance(source, nn.Module):
        return list(source.parameters())
    if isinstance(source, Tensor) or not isinstance(source, Iterable):
        raise TypeError(f"{name} must be an nn.Module or an iterable of its parameters, got {type(source).__name__}")
    params = list(source)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{name} must be an nn.Module or an iterable of its parameters (tensors)")
    return params


def _grad_norm(params: Sequence[Tensor], device: torch.device) -> Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2.0)
    total: Tensor = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
    return total


class TrainingMonitor:
    """Per-step gradient norms of two encoders plus the batch statistics, with low overhead.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.zero_grad()``. It adds
    no backward pass and no host sync: each step's values stay on the device as one small
    tensor, and they are read only every ``log_every`` steps (when the alarm is checked and
    :meth:`step` returns the values as floats) or when you export the history.

    Args:
        image_encoder: the image encoder (module or its parameters).
        text_encoder: the text encoder (module or its parameters).
        margin: triplet margin for the statistics.
        epsilon: SelHN's gap threshold for the statistics.
        history: most steps kept (older ones are dropped).
        log_every: read values back (and check the alarm) every this many steps.
        alarm: a :class:`CollapseAlarm`, ``True`` for a default one, ``False`` for none.
        rule: the selection rule being trained (a loss module's ``rule``), for the alarm's
            advice; set :attr:`rule` again when it changes (a warm-up's switch).

    Attributes:
        alarm_steps: the steps at which the alarm fired (empty while it never has).

    Example:
        >>> import torch, selhn
        >>> from selhn.diagnostics import TrainingMonitor
        >>> img_enc, txt_enc = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
        >>> monitor = TrainingMonitor(img_enc, txt_enc, log_every=1)
        >>> img = torch.nn.functional.normalize(img_enc(torch.randn(6, 4)), dim=1)
        >>> txt = torch.nn.functional.normalize(txt_enc(torch.randn(6, 5)), dim=1)
        >>> scores = img @ txt.T
        >>> loss = selhn.functional.selhn_loss(scores)
        >>> loss.backward()
        >>> logged = monitor.step(scores, loss)
        >>> sorted(logged)[:3]
        ['i2t/active_fraction', 'i2t/gap_mean', 'i2t/gap_q10']
        >>> monitor.history()["step"]
        [1.0]
    """

    def __init__(
        self,
        image_encoder: nn.Module | Iterable[nn.Parameter],
        text_encoder: nn.Module | Iterable[nn.Parameter],
        *,
        margin: float = 0.2,
        epsilon: float = 0.01,
        history: int = 100_000,
        log_every: int = 50,
        alarm: CollapseAlarm | bool = True,
        rule: SelectionRule | None = None,
    ) -> None:
        self.image_params = _parameters(image_encoder, "image_encoder")
        self.text_params = _parameters(text_encoder, "text_encoder")
        self.margin = check_nonnegative(margin, "margin")
        self.epsilon = check_nonnegative(epsilon, "epsilon")
        log_every = check_positive_int(log_every, "log_every")
        history = check_positive_int(history, "history")
        self.log_every = log_every
        if not isinstance(alarm, (CollapseAlarm, bool)):
            raise TypeError(
                f"alarm must be a CollapseAlarm, True (a default one) or False (none), got {type(alarm).__name__} "
                f"{alarm!r}"
            )
        self.alarm: CollapseAlarm | None = CollapseAlarm(margin) if alarm is True else (alarm or None)
        self.rule = None if rule is None else check_rule(rule)
        self._loss: Any = None  # the loss module followed (for_loss), or None
        self.steps = 0
        self.alarm_steps: list[int] = []
        self._records: deque[Tensor] = deque(maxlen=history)
        self._last: dict[str, float] = {}
        self.columns: list[str] = []

    @classmethod
    def for_loss(
        cls,
        loss: nn.Module,
        image_encoder: nn.Module | Iterable[nn.Parameter],
        text_encoder: nn.Module | Iterable[nn.Parameter],
        **options: Any,
    ) -> TrainingMonitor:
        """A monitor of a training run that uses ``loss`` (a selhn loss module): it takes the
        loss's margin, and at every step its rule (a warm-up's switch included) for the alarm's
        advice and, for SelHN, its epsilon for the vanishing fraction, so the monitor measures
        what the loss uses and never advises the rule already in use. ``options`` are the
        other arguments of :class:`TrainingMonitor` (``log_every``, ``alarm``, ``history``).

        Example:
            >>> import torch, selhn
            >>> from selhn.diagnostics import TrainingMonitor
            >>> criterion = selhn.SelHNLoss(epsilon=0.05)
            >>> image_encoder, text_encoder = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
            >>> monitor = TrainingMonitor.for_loss(criterion, image_encoder, text_encoder, log_every=1)
            >>> monitor.rule, monitor.epsilon, monitor.margin
            (SelHN(epsilon=0.05, fallback='mean'), 0.05, 0.2)
        """
        rule = getattr(loss, "rule", None)
        if not isinstance(rule, SelectionRule) or not hasattr(loss, "margin"):
            raise TypeError(
                f"loss must be a selhn loss module (with a rule and a margin, e.g. selhn.SelHNLoss), "
                f"got {type(loss).__name__}"
            )
        unknown = sorted(set(options) - {"history", "log_every", "alarm"})
        if unknown:
            raise TypeError(f"for_loss takes the margin, epsilon and rule from the loss; unknown option(s): {unknown}")
        margin: float = getattr(loss, "margin")  # noqa: B009 (a module's attribute: typed here)
        monitor = cls(image_encoder, text_encoder, margin=margin, epsilon=_epsilon_of(rule), rule=rule, **options)
        monitor._loss = loss
        return monitor

    def _follow_the_loss(self) -> None:
        """With :meth:`for_loss`: this step's rule and, for SelHN, its epsilon."""
        if self._loss is not None:
            self.rule = self._loss.rule
            self.epsilon = _epsilon_of(self.rule, self.epsilon)

    def step(
        self, scores: Tensor | None = None, loss: Tensor | None = None, *, mask: Tensor | None = None
    ) -> dict[str, float] | None:
        """Record one training step; returns its values as floats on logging steps, else None."""
        self._follow_the_loss()
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss must be a one-element torch.Tensor or None, got {type(loss).__name__}")
            if loss.is_meta:
                raise ValueError("loss is a meta tensor (a shape without values): the monitor records real values")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be the scalar training loss (one element), got shape {tuple(loss.shape)}: "
                    "reduce it first (reduction='mean' or 'sum')"
                )
        self.steps += 1
        device = scores.device if scores is not None else (loss.device if loss is not None else torch.device("cpu"))
        values: dict[str, Tensor] = {
            "step": torch.tensor(float(self.steps), device=device),
            "loss": loss.detach().float().reshape(()) if loss is not None else torch.tensor(math.nan, device=device),
            "image_grad_norm": _grad_norm(self.image_params, device),
            "text_grad_norm": _grad_norm(self.text_params, device),
        }
        stats = vanishing_stats(scores, self.margin, self.epsilon, mask) if scores is not None else None
        if stats is not None:
            for prefix, part in (("i2t/", stats.i2t), ("t2i/", stats.t2i)):
                for field in fields(part):
                    if field.name == "vanishing":
                        continue
                    value = getattr(part, field.name)
                    if field.name == "gap_quantiles":
                        for q, v in zip(GAP_QUANTILES, value, strict=True):
                            values[f"{prefix}gap_q{round(100 * q)}"] = v
                    else:
                        values[prefix + field.name] = value
            values["offdiag_mean"] = stats.offdiag_mean
        names = list(values)
        if self.columns and names != self.columns:
            raise ValueError("call step() the same way every time (with or without scores)")
        self.columns = names
        record = torch.stack([v.to(device=device, dtype=torch.float32) for v in values.values()])
        self._records.append(record)
        if self.steps % self.log_every:
            return None
        self._last = dict(zip(names, record.tolist(), strict=True))
        if self.alarm is not None and stats is not None:
            batch_size = scores.shape[0] if scores is not None else None
            if self.alarm.check(stats, batch_size=batch_size, rule=self.rule):
                self.alarm_steps.append(self.steps)
        return dict(self._last)

    def scalars(self) -> dict[str, float]:
        """The last logged values, for ``writer.add_scalar(name, value, step)``."""
        return {k: v for k, v in self._last.items() if k != "step"}

    def history(self) -> dict[str, list[float]]:
        """Every kept step's values, column by column (one host sync)."""
        if not self._records:
            return {name: [] for name in self.columns}
        table = torch.stack([r.cpu() for r in self._records]).t().tolist()
        return dict(zip(self.columns, table, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Where the monitor stands, as plain data for a checkpoint: its step count, the steps at
        which the alarm fired and the alarm's own state. The recorded history is not in it (write
        it with :meth:`to_csv`); a resumed run given this state back numbers its steps on and
        warns no second time for a collapse already reported.

        Example:
            >>> import torch
            >>> from selhn.diagnostics import TrainingMonitor
            >>> encoder = torch.nn.Linear(2, 2)
            >>> monitor = TrainingMonitor(encoder, encoder, log_every=1)
            >>> _ = monitor.step(torch.eye(3), torch.tensor(0.5))
            >>> resumed = TrainingMonitor(encoder, encoder, log_every=1)
            >>> resumed.load_state_dict(monitor.state_dict())
            >>> resumed.steps
            1
        """
        return {
            "steps": self.steps,
            "alarm_steps": list(self.alarm_steps),
            "alarm": None if self.alarm is None else self.alarm.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`state_dict`; an entry of the wrong kind is refused by name."""
        steps, alarm_steps, alarm = _state_entries(state, "TrainingMonitor", ("steps", "alarm_steps", "alarm"))
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"TrainingMonitor state: 'steps' must be an int >= 0, got {steps!r}")
        if not isinstance(alarm_steps, (list, tuple)) or not all(
            isinstance(step, int) and not isinstance(step, bool) for step in alarm_steps
        ):
            raise ValueError(f"TrainingMonitor state: 'alarm_steps' must be a list of ints, got {alarm_steps!r}")
        if self.alarm is not None and alarm is not None:
            self.alarm.load_state_dict(alarm)
        self.steps, self.alarm_steps = steps, list(alarm_steps)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the kept history as CSV, one row per step.

        The file is written whole or not at all: the rows go to a temporary file beside
        ``path``, which then replaces it, so a full disk or a crash leaves the previous file
        as it was (and no temporary file behind).
        """
        history = self.history()
        target = os.path.abspath(os.fspath(path))
        temporary: str | None = None
        try:
            # a temporary file of this call's own: two writers to one path never share one
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target)
            )
            with os.fdopen(descriptor, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(self.columns)
                writer.writerows(zip(*(history[c] for c in self.columns), strict=True))
            # mkstemp's file is private (0600): take the replaced file's mode, else an ordinary file's
            os.chmod(temporary, os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o644)
            os.replace(temporary, target)
        except BaseException as error:
            if temporary is not None:  # whatever failed, no temporary file stays behind
                with contextlib.suppress(OSError):
                    os.remove(temporary)
            if not isinstance(error, OSError):
                raise
            reason = error.strerror or str(error)
            raise OSError(
                error.errno, f"could not write the history to {target}: {reason} (any earlier file there is intact)"
            ) from error

    def plot(self, path: str | os.PathLike[str], **others: TrainingMonitor) -> None:
        """Draw this run (and any others, by label) with :func:`plot_histories`."""
        plot_histories(path, {"this run": self, **others})


def plot_histories(
    path: str | os.PathLike[str], runs: Mapping[str, TrainingMonitor | Mapping[str, Sequence[float]]]
) -> None:
    """Plot gradient norms, vanishing fraction and loss against the step, runs overlaid.

    Needs matplotlib (``pip install matplotlib``, or selhn's ``plot`` extra).

    Args:
        path: the PNG to write.
        runs: label -> a :class:`TrainingMonitor` or a history dict (as from
            :meth:`TrainingMonitor.history` or a CSV), e.g. ``{"HN": hn, "SelHN": selhn}``.

    Example:
        >>> import os, tempfile
        >>> from selhn.diagnostics import plot_histories
        >>> history = {"step": [1.0, 2.0], "loss": [0.2, 0.1], "image_grad_norm": [1.0, 0.5],
        ...            "text_grad_norm": [1.0, 0.4], "i2t/vanishing_fraction": [1.0, 0.5],
        ...            "t2i/vanishing_fraction": [1.0, 0.3]}
        >>> path = os.path.join(tempfile.mkdtemp(), "runs.png")
        >>> plot_histories(path, {"HN": history, "SelHN": history})
        >>> os.path.getsize(path) > 0
        True
    """
    try:  # a Figure on its own Agg canvas: no pyplot, so the caller's backend and figures are untouched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (selhn's 'plot' extra)") from error
    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for label, run in runs.items():
        history = run.history() if isinstance(run, TrainingMonitor) else run
        steps = history["step"]
        axes[0].plot(steps, history["image_grad_norm"], label=f"{label}: image encoder")
        axes[0].plot(steps, history["text_grad_norm"], "--", label=f"{label}: text encoder")
        if "i2t/vanishing_fraction" in history:
            both = [
                (a + b) / 2
                for a, b in zip(history["i2t/vanishing_fraction"], history["t2i/vanishing_fraction"], strict=True)
            ]
            axes[1].plot(steps, both, label=label)
        axes[2].plot(steps, history["loss"], label=label)
    axes[0].set(yscale="log", xlabel="step", ylabel="gradient norm", title="encoder gradient norms")
    axes[1].set(
        xlabel="step", ylabel="share of anchors", title="vanishing fraction (|gap| < epsilon)", ylim=(-0.02, 1.02)
    )
    axes[2].set(xlabel="step", ylabel="loss", title="loss")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
