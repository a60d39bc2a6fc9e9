#!/usr/bin/env bash
# Build the sdist and the wheel, check them with twine, install the wheel into a fresh virtual
# environment that holds torch alone, and import the package there (outside the source tree).
set -euo pipefail
PY=${PY:-.venv/bin/python}
rm -rf dist build
"$PY" -m build --quiet
"$PY" -m twine check --strict dist/*
wheel=$(ls "$PWD"/dist/selhn-*-py3-none-any.whl)
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet --no-deps "$wheel"
"$venv/bin/pip" check
cd "$(mktemp -d)"
"$venv/bin/python" - <<'PY'
import importlib.util, pathlib, sys
import selhn, torch
assert selhn.__version__, "no version"
site = pathlib.Path(selhn.__file__).parent.parent
for name in ("examples", "tests", "docs", "benchmarks"):
    assert not (site / name).exists(), f"{name} was installed into site-packages"
assert (pathlib.Path(selhn.__file__).parent / "py.typed").is_file(), "py.typed missing"
img = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
print("selhn", selhn.__version__, "imports with torch alone; SelHN loss", float(selhn.SelHNLoss()(img, img)))
assert importlib.util.find_spec("hypothesis") is None
try:
    import selhn.testing
except ImportError as error:
    assert "pip install" in str(error)
else:
    sys.exit("selhn.testing imported without hypothesis")
PY
# the README's install of a wheel with an extra: "dist/selhn-<version>-py3-none-any.whl[testing]"
"$venv/bin/pip" install --quiet "${wheel}[testing]"
"$venv/bin/python" -c "import selhn.testing, hypothesis; print('selhn.testing imports from the wheel with its extra')"
rm -rf "$(dirname "$venv")"
