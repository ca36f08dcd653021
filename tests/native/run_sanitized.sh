#!/usr/bin/env bash
# Run tests/test_kernels.py and tests/test_ortops.py against an ASan+UBSan build of the native
# kernels and of the onnxruntime custom-op library (when onnxruntime's headers are available).
#
#   PYTHON=/work/venv/bin/python tests/native/run_sanitized.sh [pytest args...]
#
# Builds the _kernels module with -DONNXOPT_SANITIZE=ON into build/asan (BUILD_DIR overrides),
# stages a copy of the Python package next to it (so the dev build in src/ is untouched), and
# runs pytest with libasan preloaded (the interpreter itself is not instrumented). Leak detection
# is off (CPython and numba keep allocations alive on purpose); any ASan report or UBSan finding
# aborts the run (halt_on_error), so a green run means no findings.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-python3}
bdir=${BUILD_DIR:-"$root/build/asan"}
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DONNXOPT_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$bdir" -j 2 --target _kernels
ops_tests=()
if cmake --build "$bdir" -j 2 --target onnxopt_ops >/dev/null 2>&1; then
  export ONNXOPT_OPS_LIBRARY="$bdir/csrc/ortops/libonnxopt_ops.so"
  ops_tests=(tests/test_ortops.py)
else
  echo "(no onnxruntime headers: the custom-op library is not sanitized)"
fi

stage="$bdir/pkg/onnxopt"
rm -rf "$bdir/pkg"
mkdir -p "$stage"
for f in "$root"/src/onnxopt/*; do
  case "$f" in *.so) ;; *) ln -s "$f" "$stage/" ;; esac
done
cp "$bdir"/csrc/python/_kernels*.so "$stage/"

# libstdc++ is preloaded too: python is a C program, and ASan's __cxa_throw interceptor must find
# the real symbol at start-up or it aborts on the first C++ exception.
libasan=$(${CXX:-g++} -print-file-name=libasan.so)
libstdcxx=$(${CXX:-g++} -print-file-name=libstdc++.so)
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$bdir/pkg"
cd "$root"
"$py" -c "import onnxopt._kernels as k, sys; print('sanitized module:', k.__file__, k.info()['active_isa'])"
exec "$py" -m pytest tests/test_kernels.py "${ops_tests[@]}" -q -p no:cacheprovider "$@"
