"""Does the int8 preset choose the same target and kept sites run after run? (issue 17)

    PYTHONPATH=src python benchmarks/int8_stability.py MODEL.onnx [--runs 10] [--calib 16]

Runs `onnxopt.optimize(model, ["int8"], calibration=...)` `--runs` times in one process on the same
calibration data (random normal inputs, seed 0) and prints, per run, the lowering chosen, the kept
sites and the guard's whole-model line; ends with one summary line: how many distinct choices.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import onnxopt  # noqa: E402
from onnxopt import verify  # noqa: E402


def choice(model, report):
    ops = {n.op_type for n in model.graph.node}
    custom = any(n.domain == "com.onnxopt" for n in model.graph.node)
    qdq = "DequantizeLinear" in ops and any(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    target = {(True, True): "mixed", (True, False): "onnxopt", (False, True): "onnxruntime"}.get((custom, qdq), "fp32")
    kept = tuple(sorted(r["node"] for r in report.quantization if r["quantized"]))
    return target, kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib", type=int, default=16)
    args = ap.parse_args()
    src = onnx.load(args.model)
    rng = np.random.default_rng(0)
    specs = verify.input_specs(src)
    calib = [{n: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in shape]).astype(dt)
              for n, dt, shape in specs} for _ in range(args.calib)]
    seen = {}
    for i in range(args.runs):
        t0 = time.perf_counter()
        model, report = onnxopt.optimize(src, ["int8"], calibration=calib, return_report=True)
        c = choice(model, report)
        seen.setdefault(c, []).append(i)
        line = next((t for _, t in report.messages if "whole model" in t), "")
        print(f"run {i + 1}: {c[0]}, {len(c[1])} site(s) kept, {time.perf_counter() - t0:.1f} s | {line}", flush=True)
    print(f"summary: {len(seen)} distinct choice(s) over {args.runs} runs: "
          + "; ".join(f"{t} with {len(k)} site(s) in runs {[r + 1 for r in runs]}" for (t, k), runs in seen.items()))


if __name__ == "__main__":
    main()
