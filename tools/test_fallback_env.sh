#!/usr/bin/env bash
# The path users without the native custom-op library meet, in a fresh virtual environment: only the
# wheel tools/setup_env.sh built, its `fallback` extra and pytest; ONNXOPT_DISABLE_NATIVE_OPS=1. A
# missing or broken extra, a wheel that does not import, wrong numbers: each fails this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
wheel=$(ls build/wheelhouse/onnxopt-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "error: no onnxopt wheel in build/wheelhouse (tools/setup_env.sh builds it)" >&2
  exit 1
fi
venv=build/fallback-venv
rm -rf "$venv"
"$py" -m venv "$venv"
if ! "$venv/bin/python" -m pip install --disable-pip-version-check "${wheel}[fallback]" pytest \
    >build/fallback-install.log 2>&1; then
  tail -n 40 build/fallback-install.log
  echo "error: installing ${wheel}[fallback] into a fresh venv failed (log: build/fallback-install.log)" >&2
  exit 1
fi
# the installed wheel, not the checkout, must be what the tests import
"$venv/bin/python" -c "import onnxopt, sys; sys.exit(0 if '$venv' in onnxopt.__file__ else 'onnxopt imported from ' + onnxopt.__file__)"
echo "fallback: fresh venv with ${wheel##*/}[fallback], native custom ops disabled"
ONNXOPT_DISABLE_NATIVE_OPS=1 exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_fallback_install.py tests/test_runtime.py -k "fallback or Fallback"
