"""Hypothesis settings profiles: a quick default for CI and a thorough one for local runs.

Select with ``SELHN_HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SELHN_HYPOTHESIS_PROFILE", "ci"))
