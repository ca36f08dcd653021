#!/usr/bin/env bash
# The main job on the bundled example model: optimize with the default pipeline (verified through
# onnxruntime) and print the per-pass report and a before/after table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup_env.sh" >/dev/null
cd "$root"
mkdir -p build
.venv/bin/onnxopt optimize examples/small_cnn.onnx -o build/small_cnn.opt.onnx --verify
