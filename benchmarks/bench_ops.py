"""com.onnxopt QGemm / QConv vs onnxruntime's own int8 path and fp32, in one process.

    PYTHONPATH=src python benchmarks/bench_ops.py [--quick] [--rounds 7] [--threads 1,2]

Every case is a single-op model run three ways on the same int8 weights:
  ours  com.onnxopt QGemm (dynamic activation quantization) / QConv (static, per-channel weights)
  ort   the QDQ / integer graph onnxruntime fuses into its own kernels: DynamicQuantizeLinear +
        MatMulInteger + Cast + Mul -> DynamicQuantizeMatMul for GEMMs; Q -> DQ -> Conv -> Q -> DQ with
        per-channel s8 weights and u8 activations -> QLinearConv for convs (the fused op types are
        printed, read from ORT's optimized graph)
  fp32  MatMul / Conv on the dequantized weights
Sessions use ORT_ENABLE_ALL and session.intra_op.allow_spinning=0, 1 and 2 intra-op threads. Within a
round the variants run interleaved (each a timed batch of calls sized to ~20 ms); the table shows
the median over rounds. Also the per-call overhead of a 1x1 QGemm over a 1x1 MatMul. Ends with one
summary line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from onnxopt import runtime  # noqa: E402

F32 = np.float32
GEMMS = [(1, 768, 768), (16, 768, 768), (128, 768, 3072), (128, 3072, 768), (512, 1024, 1024)]
# name, (N, C, H, W), M, k, stride, pad, group
CONVS = [
    ("r50_conv1_7x7s2", (1, 3, 224, 224), 64, 7, 2, 3, 1),
    ("r50_l1_3x3", (1, 64, 56, 56), 64, 3, 1, 1, 1),
    ("r50_l1_1x1", (1, 64, 56, 56), 256, 1, 1, 0, 1),
    ("r50_l3_3x3", (1, 256, 14, 14), 256, 3, 1, 1, 1),
    ("r50_l4_1x1", (1, 2048, 7, 7), 512, 1, 1, 0, 1),
    ("mbv2_dw_3x3", (1, 144, 56, 56), 144, 3, 1, 1, 144),
]
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.onnxopt", 1)]


def _model(nodes, inputs, outputs, inits, opset=OPSET):
    g = helper.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    return helper.make_model(g, opset_imports=opset)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


# ---- GEMM models --------------------------------------------------------------------------------

def gemm_models(M, K, N, rng):
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, N).astype(F32)
    x, y = _vi("X", [M, K]), _vi("Y", [M, N])
    ours = _model([helper.make_node("QGemm", ["X", "W", "ws"], ["Y"], domain="com.onnxopt")], [x], [y],
                  [_init("W", w), _init("ws", ws)])
    ort_q = _model([
        helper.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "W", "xz", "wz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["sc"]),
        helper.make_node("Mul", ["accf", "sc"], ["Y"]),
    ], [x], [y], [_init("W", w), _init("ws", ws), _init("wz", np.zeros(N, np.int8))])
    fp32 = _model([helper.make_node("MatMul", ["X", "Wf"], ["Y"])], [x], [y],
                  [_init("Wf", (w.astype(F32) * ws).astype(F32))])
    feed = {"X": rng.standard_normal((M, K)).astype(F32)}
    return {"ours": ours, "ort": ort_q, "fp32": fp32}, feed, 2.0 * M * K * N


# ---- conv models --------------------------------------------------------------------------------

def conv_models(xshape, M, k, stride, pad, group, rng):
    N, C, H, W = xshape
    w = rng.integers(-127, 128, (M, C // group, k, k)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, M).astype(F32)
    OH = (H + 2 * pad - k) // stride + 1
    OW = (W + 2 * pad - k) // stride + 1
    attrs = dict(strides=[stride, stride], pads=[pad] * 4, group=group)
    xs, xz = np.array(0.02, F32), np.array(128, np.uint8)
    x, y = _vi("X", list(xshape)), _vi("Y", [N, M, OH, OW])
    ours = _model([helper.make_node("QConv", ["X", "W", "ws", "", "xs", "xz"], ["Y"], domain="com.onnxopt",
                                    **attrs)], [x], [y], [_init("W", w), _init("ws", ws), _init("xs", xs),
                                                          _init("xz", xz)])
    ort_q = _model([
        helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["yc"], **attrs),
        helper.make_node("QuantizeLinear", ["yc", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["Y"]),
    ], [x], [y], [_init("W", w), _init("ws", ws), _init("wz", np.zeros(M, np.int8)), _init("xs", xs),
                  _init("xz", xz), _init("ys", np.array(0.05, F32)), _init("yz", np.array(128, np.uint8))])
    fp32 = _model([helper.make_node("Conv", ["X", "Wf"], ["Y"], **attrs)], [x], [y],
                  [_init("Wf", (w.astype(F32) * ws[:, None, None, None]).astype(F32))])
    feed = {"X": rng.standard_normal(xshape).astype(F32)}
    return {"ours": ours, "ort": ort_q, "fp32": fp32}, feed, 2.0 * N * M * OH * OW * (C // group) * k * k


# ---- sessions and timing ------------------------------------------------------------------------

def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return runtime.InferenceSession(model, so)


def fused_ops(model):
    """Op types onnxruntime actually runs for a model (its optimized graph)."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        runtime.InferenceSession(model, so)
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def calls_for(sess, feed, target_s):
    t0 = time.perf_counter()
    sess.run(None, feed)
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(2000, int(target_s / one)))


def batch_time(sess, feed, n):
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, feed)
    return (time.perf_counter() - t0) / n


def measure(models, feed, threads, rounds, target_s):
    sess = {k: session(m, threads) for k, m in models.items()}
    for s in sess.values():  # warm up (first-run allocations, pool start)
        for _ in range(3):
            s.run(None, feed)
    ncalls = {k: calls_for(s, feed, target_s) for k, s in sess.items()}
    times = {k: [] for k in sess}
    for r in range(rounds):
        order = list(sess) if r % 2 == 0 else list(reversed(list(sess)))
        for k in order:
            times[k].append(batch_time(sess[k], feed, ncalls[k]))
    return {k: float(np.median(v)) for k, v in times.items()}


def overhead(rounds, target_s):
    """Per-call cost of a 1x1 QGemm minus a 1x1 MatMul (both single-node sessions, 1 thread)."""
    rng = np.random.default_rng(0)
    models, feed, _ = gemm_models(1, 1, 1, rng)
    t = measure({"ours": models["ours"], "fp32": models["fp32"]}, feed, 1, max(rounds, 9), target_s)
    return t["ours"] - t["fp32"], t["ours"], t["fp32"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter batches, a subset of cases")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    if runtime.custom_ops_library() is None:
        print("bench_ops: the native library libonnxopt_ops is not built; nothing to compare", file=sys.stderr)
        return 2
    rounds = args.rounds or (3 if args.quick else 7)
    target_s = 0.01 if args.quick else 0.03
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    gemms = GEMMS[:3] if args.quick else GEMMS
    convs = CONVS[1:3] + CONVS[-1:] if args.quick else CONVS

    cases = [(f"gemm {M}x{K}x{N}", *gemm_models(M, K, N, rng), M * K * N >= 128 * 768 * 768)
             for M, K, N in gemms]
    cases += [(f"conv {name}", *conv_models(xs, M, k, s, p, g, rng), g == 1)
              for name, xs, M, k, s, p, g in convs]

    print(f"onnxruntime {ort.__version__}, native lib {runtime.custom_ops_library()}")
    try:
        from onnxopt import kernels
        print("kernels:", kernels.info())
    except Exception as e:  # pragma: no cover
        print("kernels: unavailable:", e)
    shown = set()
    for name, models, _, _, _ in cases:
        kind = name.split()[0]
        if kind not in shown:
            shown.add(kind)
            print(f"{kind}: ORT int8 path runs {fused_ops(models['ort'])}, ours {fused_ops(models['ours'])}")

    hdr = f"{'case':28s} {'thr':>3s} {'ours us':>9s} {'ort-int8 us':>11s} {'fp32 us':>9s} " \
          f"{'vs ort':>7s} {'vs fp32':>7s} {'ours GOP/s':>10s}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for name, models, feed, ops, large in cases:
        for t in threads:
            m = measure(models, feed, t, rounds, target_s)
            vs_ort, vs_fp = m["ort"] / m["ours"], m["fp32"] / m["ours"]
            rows.append((name, t, vs_ort, vs_fp, large))
            print(f"{name:28s} {t:3d} {m['ours'] * 1e6:9.1f} {m['ort'] * 1e6:11.1f} {m['fp32'] * 1e6:9.1f} "
                  f"{vs_ort:6.2f}x {vs_fp:6.2f}x {ops / m['ours'] / 1e9:10.1f}", flush=True)

    ovh, t_ours, t_mm = overhead(rounds, target_s)
    print(f"per-call: 1x1 QGemm {t_ours * 1e6:.2f} us, 1x1 MatMul {t_mm * 1e6:.2f} us, overhead {ovh * 1e6:+.2f} us")
    worst = min(rows, key=lambda r: r[2])
    geo = float(np.exp(np.mean([np.log(r[2]) for r in rows])))
    large = [r[3] for r in rows if r[4]]
    print(f"SUMMARY bench_ops: vs onnxruntime int8 geo-mean {geo:.2f}x, worst {worst[2]:.2f}x ({worst[0]}, "
          f"{worst[1]} thr); vs fp32 on large cases min {min(large):.2f}x; "
          f"per-call overhead {ovh * 1e6:+.2f} us over a built-in op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
