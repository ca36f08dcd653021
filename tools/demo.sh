#!/usr/bin/env bash
# The main job on the bundled example model: optimize with the default (exact) pipeline, then
# quantize to int8 with the bundled calibration inputs; each run is verified through onnxruntime
# and prints the per-pass report and a before/after table (nodes, size, latency ratio, fidelity), and
# writes the same as an HTML report with charts next to each output (build/*.report.html).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup_env.sh" >/dev/null
cd "$root"
mkdir -p build
echo "== default pipeline (exact) =="
.venv/bin/onnxopt optimize examples/small_cnn.onnx -o build/small_cnn.opt.onnx --verify \
  --report build/small_cnn.opt.report.html
echo
echo "== int8 (static quantization, calibrated on examples/small_cnn_calib.npz) =="
.venv/bin/onnxopt optimize examples/small_cnn.onnx -o build/small_cnn.int8.onnx --passes int8 \
  --calibration examples/small_cnn_calib.npz --verify --report build/small_cnn.int8.report.html
echo
echo "open build/small_cnn.opt.report.html and build/small_cnn.int8.report.html in a browser"
