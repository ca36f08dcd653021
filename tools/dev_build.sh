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
# copy then rename: a process that has the old .so loaded keeps its (unlinked) copy instead of crashing
found=0
for so in "$bdir"/install/onnxopt/*.so; do
  [ -e "$so" ] || continue
  found=1
  cp "$so" "$root/src/onnxopt/.$(basename "$so").tmp" && mv -f "$root/src/onnxopt/.$(basename "$so").tmp" "$root/src/onnxopt/$(basename "$so")"
  echo "installed src/onnxopt/$(basename "$so")"
done
[ "$found" = 1 ] || echo "(no native artifacts installed)"
