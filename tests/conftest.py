"""Hypothesis settings profiles (a quick default for CI and a thorough one for local runs),
and the small synthetic data set the pipeline's tests share.

Select the profile with ``SELHN_HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SELHN_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set (60 / 20 / 20 images) for the pipeline's tests; read only."""
    from examples.rvsepp import synthetic

    root = tmp_path_factory.mktemp("data")
    synthetic.generate(root, "synthetic", synthetic.Config(train=60, dev=20, test=20, regions=6, dim=32))
    return root
