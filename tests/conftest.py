"""The suite's hypothesis profile (:mod:`tests.profiles`) and the small synthetic data set the
pipeline's tests share."""

from pathlib import Path

import pytest

from tests import profiles

profiles.load()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set (60 / 20 / 20 images) for the pipeline's tests; read only."""
    from examples.rvsepp import synthetic

    root = tmp_path_factory.mktemp("data")
    synthetic.generate(root, "synthetic", synthetic.Config(train=60, dev=20, test=20, regions=6, dim=32))
    return root
