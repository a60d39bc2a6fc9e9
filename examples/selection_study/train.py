"""Train one run of the study: the RVSE++ pipeline's ``train`` with the calibrated presets and
the candidate rules among its ``--preset`` and ``--loss`` choices.

Run: ``python -m examples.selection_study.train --preset calibrated --loss tempered-0.02
--out runs/tempered`` (every flag of ``examples.rvsepp.train``; see ``--help``). A rule of your
own trains as ``--loss module:Class(arguments)`` (the module on ``PYTHONPATH``).
"""

from __future__ import annotations

import sys

from examples.rvsepp import train as train_module
from examples.selection_study.presets import STUDY_PRESETS
from examples.selection_study.rules import criteria_with


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:  # a rule of your own as --loss module:Class(arguments) joins the choices
        criteria = criteria_with(argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--loss")
    except ValueError as error:
        raise SystemExit(f"error: --loss: {error}") from None
    args = train_module.parse_args(argv, STUDY_PRESETS, criteria)
    try:
        train_module.train(args, criteria)
    except (train_module.RunError, train_module.DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
