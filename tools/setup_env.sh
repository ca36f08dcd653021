#!/usr/bin/env bash
# Creates .venv (if needed), installs onnxopt from this checkout with its native parts and the test
# dependencies. Used by tools/test.sh and tools/demo.sh; safe to run repeatedly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip_q() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_q --upgrade pip
# Test and example dependencies. torch 2.13.0 (CPU) comes from local disk; onnxscript is what the
# dynamo exporter needs; scikit-learn ships the digits data the example trains on;
# onnxruntime-extensions runs the custom ops when the native library is absent; matplotlib draws
# the HTML report's charts (the onnxopt[report] extra; its tests run here).
pip_q pytest "torch==2.13.0" onnxscript onnxruntime-extensions scikit-learn "matplotlib>=3.10"
# onnxruntime's C headers for the custom-op library (build-local, never installed system-wide).
if inc=$(tools/fetch_ort_headers.sh 2>build-headers.log | tail -n 1) && [ -f "$inc/onnxruntime_c_api.h" ]; then
  export ONNXOPT_ORT_INCLUDE_DIR="$inc"
else
  echo "note: onnxruntime headers unavailable (see build-headers.log); the custom-op library will be skipped"
fi
rm -f build-headers.log
mkdir -p build
# One wheel, built once: installed here and, by tools/test_fallback_env.sh, into a fresh venv.
rm -rf build/wheelhouse
if ! .venv/bin/python -m pip wheel --no-deps --disable-pip-version-check -v -w build/wheelhouse . \
    >build/pip-install.log 2>&1; then
  tail -n 60 build/pip-install.log
  echo "error: building the onnxopt wheel failed (full log: build/pip-install.log)" >&2
  exit 1
fi
wheel=$(ls build/wheelhouse/onnxopt-*.whl)
# its dependencies, then this build of it even when the version did not change
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check "$wheel" &&
       .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"; } \
    >>build/pip-install.log 2>&1; then
  tail -n 30 build/pip-install.log
  echo "error: installing $wheel failed (full log: build/pip-install.log)" >&2
  exit 1
fi
grep -h "onnxopt native parts built\|custom-op library" build/pip-install.log | sed 's/^ *-- */build: /' | sort -u || true
