#!/usr/bin/env bash
# Developer build: compile the native parts into build/dev and copy them into src/onnxopt so that
# `PYTHONPATH=src python -m pytest` uses them. Extra arguments go to cmake's configure step
# (e.g. -DONNXOPT_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug). BUILD_DIR overrides build/dev.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
bdir=${BUILD_DIR:-"$root/build/dev"}
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" "$@" >/dev/null
cmake --build "$bdir" -j 2
cmake --install "$bdir" --prefix "$bdir/install" >/dev/null
cp -v "$bdir"/install/onnxopt/*.so "$root/src/onnxopt/" 2>/dev/null || echo "(no native artifacts installed)"
