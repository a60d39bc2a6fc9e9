"""The RVSE++ reference pipeline (the SelHN paper's model and recipe); see docs/rvsepp.rst."""

try:
    import numpy  # noqa: F401 (the pipeline's one requirement beyond the library)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the RVSE++ pipeline in examples/rvsepp needs numpy, which the library alone does not install: "
        'run pip install ".[examples]" in the source tree\'s top folder (or use make train)'
    ) from error
