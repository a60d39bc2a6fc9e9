"""Train one run of the study: the RVSE++ pipeline's ``train`` with the calibrated presets and
the candidate rules among its ``--preset`` and ``--loss`` choices.

Run: ``python -m examples.selection_study.train --preset calibrated --loss tempered-0.02
--out runs/tempered`` (every flag of ``examples.rvsepp.train``; see ``--help``).
"""

from __future__ import annotations

from examples.rvsepp import train as train_module
from examples.selection_study.presets import STUDY_PRESETS
from examples.selection_study.rules import STUDY_CRITERIA


def main(argv: list[str] | None = None) -> None:
    args = train_module.parse_args(argv, STUDY_PRESETS, STUDY_CRITERIA)
    try:
        train_module.train(args, STUDY_CRITERIA)
    except (train_module.RunError, train_module.DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
