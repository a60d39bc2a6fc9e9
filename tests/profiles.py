"""Hypothesis settings profiles; ``SELHN_HYPOTHESIS_PROFILE=NAME pytest`` picks one.

* ``ci``, the default where the ``CI`` environment variable is set: 40 examples a test,
  derandomized, so every CI run tries the same examples and a green run stays green;
* ``dev``, the default elsewhere: 40 fresh random examples a test on every run, with the local
  example database replaying whatever failed before (``pytest --hypothesis-seed=N`` repeats a run);
* ``thorough``: 600 random examples a test (15 times ``dev``), for a change to a loss or a strategy.

A test that needs fewer (or more) examples than the default asks for :func:`examples`, which
scales with the profile. A failing example found once is kept in its test as an ``@example``
(or, where the test draws interactively, as a regression test of its own), so every profile
replays it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per test under the quick profiles (``ci``, ``dev``).
QUICK = 40
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=QUICK, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=QUICK, **_COMMON)
settings.register_profile("thorough", max_examples=15 * QUICK, print_blob=True, **_COMMON)


def load() -> None:
    """Load the profile ``SELHN_HYPOTHESIS_PROFILE`` names, else ``ci`` under CI and ``dev`` elsewhere."""
    settings.load_profile(os.environ.get("SELHN_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def examples(quick: int) -> settings:
    """Settings for a test that takes ``quick`` examples under the quick profiles, and as many
    times more under another profile as its default takes more than theirs."""
    return settings(max_examples=max(1, round(quick * settings.default.max_examples / QUICK)))
