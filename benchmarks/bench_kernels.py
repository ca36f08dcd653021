"""int8 kernel benchmark: onnxopt GEMM / conv against onnxruntime in the same process.

For every shape: our GOP/s at 1 and 2 threads, onnxruntime MatMulInteger (QLinearConv for convs)
and fp32 MatMul/Conv with matched intra_op_num_threads (spinning off), the ratio to ORT int8 and
the fraction of the VNNI ceiling (vpdpbusd zmm: 64 MAC = 128 ops per cycle per core).
Measurements are interleaved (every implementation once per round, rounds repeated) and the
median per-call time is reported. Prints a table and a final summary line.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--quick] [--ghz 3.65|auto] [--rounds N]

Notes: our GEMM is qgemm_u8 (u8 in, zero points, float out with per-column scale), ORT's is
MatMulInteger (u8 x s8 -> int32, no output stage). Our conv takes float32 NCHW and quantizes
inside: dynamically per image (ours1T/ours2T) and, in the st1T column, statically with a fixed
scale/zero point as the int8 preset's calibrated convs do (no min/max pass over the image); ORT
QLinearConv starts from an already quantized u8 tensor. vsfp32 is the dynamic one, vs32st static.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import onnxopt.kernels as K  # noqa: E402

GEMM_SHAPES = [(1, 768, 768), (16, 768, 768), (128, 768, 3072), (128, 3072, 768), (512, 1024, 1024),
               (3136, 576, 64), (784, 1152, 128), (196, 2304, 256), (49, 4608, 512)]
QUICK_GEMM = [(1, 768, 768), (16, 768, 768), (128, 768, 3072), (3136, 576, 64)]

# name, C, M, H(=W), k, stride, pad, group
CONVS = [
    ("r50.l1.1x1 64>64", 64, 64, 56, 1, 1, 0, 1),
    ("r50.l1.3x3 64", 64, 64, 56, 3, 1, 1, 1),
    ("r50.l1.1x1 64>256", 64, 256, 56, 1, 1, 0, 1),
    ("r50.l2.3x3 128", 128, 128, 28, 3, 1, 1, 1),
    ("r50.l3.3x3 256", 256, 256, 14, 3, 1, 1, 1),
    ("r50.l3.1x1 1024>256", 1024, 256, 14, 1, 1, 0, 1),
    ("r50.l4.3x3 512", 512, 512, 7, 3, 1, 1, 1),
    ("mbv2.dw3x3 144", 144, 144, 56, 3, 1, 1, 144),
    ("mbv2.dw3x3 s2 96", 96, 96, 112, 3, 2, 1, 96),
]
QUICK_CONVS = [CONVS[1], CONVS[2], CONVS[7]]


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make_model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "bench", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def ort_matmulinteger(a, w, threads):
    M, Kd = a.shape
    N = w.shape[1]
    m = make_model([helper.make_node("MatMulInteger", ["A", "B", "azp"], ["Y"])],
                   [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, Kd])],
                   [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])],
                   [numpy_helper.from_array(w, "B"), numpy_helper.from_array(np.array(128, np.uint8), "azp")])
    s = session(m, threads)
    return lambda: s.run(None, {"A": a})


def ort_matmul_f32(x, wf, threads):
    M, Kd = x.shape
    m = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                   [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, Kd])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, wf.shape[1]])],
                   [numpy_helper.from_array(wf, "W")])
    s = session(m, threads)
    return lambda: s.run(None, {"X": x})


def conv_attrs(k, stride, pad, group):
    return dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)


def ort_qlinearconv(xq, w, attrs, threads):
    M = w.shape[0]
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.full(M, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(M, np.int8), "wz"), numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    node = helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["Y"], **attrs)
    m = make_model([node], [helper.make_tensor_value_info("X", TensorProto.UINT8, list(xq.shape))],
                   [helper.make_tensor_value_info("Y", TensorProto.UINT8, None)], inits)
    s = session(m, threads)
    return lambda: s.run(None, {"X": xq})


def ort_conv_f32(x, wf, attrs, threads):
    node = helper.make_node("Conv", ["X", "W"], ["Y"], **attrs)
    m = make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [numpy_helper.from_array(wf, "W")])
    s = session(m, threads)
    return lambda: s.run(None, {"X": x})


def measure(fns, rounds, target_s):
    """fns: name -> callable. Interleaved rounds; returns name -> median seconds per call."""
    reps = {}
    for name, f in fns.items():  # warm up and size the repetition count
        f()
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, min(2000, int(target_s / dt)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            n = reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def fmt(v, width=8, prec=1):
    return f"{v:{width}.{prec}f}" if v is not None else " " * (width - 1) + "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--ghz", default="3.65", help="core clock for the VNNI ceiling, or 'auto' to estimate it")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-numba", action="store_true", help="skip the numba backend column")
    ap.add_argument("--only", choices=("gemm", "conv"), default=None, help="run only the GEMM or the conv table")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    target = 0.02 if args.quick else 0.05
    info = K.info()
    if not info["native_available"]:
        sys.exit("native kernels not built (tools/dev_build.sh)")
    import onnxopt._kernels as native
    est = native.estimate_ghz()
    ghz = est if args.ghz == "auto" else float(args.ghz)
    ceiling = 128 * ghz  # GOP/s per core
    print(f"onnxopt kernels: isa={info['isa']} onnxruntime {ort.__version__} cores={os.cpu_count()} "
          f"clock={ghz:.2f} GHz (estimated {est:.2f}) VNNI ceiling {ceiling:.0f} GOP/s/core")
    rng = np.random.default_rng(0)
    rows = []

    gemms = [] if args.only == "conv" else QUICK_GEMM if args.quick else GEMM_SHAPES
    print(f"\nGEMM (M,K,N)          ours1T  ours2T  mlas1T  mlas2T  fp32_1T fp32_2T  r1T   r2T  ceil1T  numba   [GOP/s]")
    for (M, Kd, N) in gemms:
        a = rng.integers(0, 256, (M, Kd)).astype(np.uint8)
        w = rng.integers(-128, 128, (Kd, N)).astype(np.int8)
        x = rng.standard_normal((M, Kd)).astype(np.float32)
        wf = w.astype(np.float32)
        pw = K.pack_weights(w)
        ws = np.full(N, 0.01, np.float32)
        fns = {}
        for t in (1, 2):
            fns[f"ours{t}"] = (lambda t=t: K.qgemm_u8(a, 128, 0.02, pw, ws, threads=t))
            fns[f"mlas{t}"] = ort_matmulinteger(a, w, t)
            fns[f"fp32{t}"] = ort_matmul_f32(x, wf, t)
        res = measure(fns, rounds, target)
        numba_gops = None
        if not args.no_numba and M * Kd * N <= 2e8:
            K.qgemm_u8(a[:1], 128, 0.02, pw, ws, backend="numba")
            t0 = time.perf_counter()
            K.qgemm_u8(a, 128, 0.02, pw, ws, backend="numba")
            numba_gops = 2 * M * Kd * N / (time.perf_counter() - t0) / 1e9
        g = {k: 2 * M * Kd * N / v / 1e9 for k, v in res.items()}
        r1, r2 = g["ours1"] / g["mlas1"], g["ours2"] / g["mlas2"]
        rows.append(("gemm", (M, Kd, N), r1, r2, g["ours1"] / ceiling))
        print(f"{str((M, Kd, N)):20s} {fmt(g['ours1'])}{fmt(g['ours2'])}{fmt(g['mlas1'])}{fmt(g['mlas2'])}"
              f"{fmt(g['fp32' + '1'])}{fmt(g['fp322'])} {r1:5.2f} {r2:5.2f} {100 * g['ours1'] / ceiling:6.1f}%"
              f"{fmt(numba_gops, 8, 2)}", flush=True)

    convs = [] if args.only == "gemm" else QUICK_CONVS if args.quick else CONVS
    print(f"\nConv (NCHW, N=1)      ours1T  ours2T  st1T    qlc1T   qlc2T   fp32_1T fp32_2T  r1T   r2T  vsfp32 vs32st [GOP/s]")
    for (name, C, M, HW, k, stride, pad, group) in convs:
        x = rng.standard_normal((1, C, HW, HW)).astype(np.float32)
        xq = rng.integers(0, 256, x.shape).astype(np.uint8)
        w = rng.integers(-128, 128, (M, C // group, k, k)).astype(np.int8)
        wf = w.astype(np.float32)
        pc = K.pack_conv_weights(w, group, (stride, stride), (pad,) * 4)
        ws = np.full(M, 0.01, np.float32)
        attrs = conv_attrs(k, stride, pad, group)
        OH = (HW + 2 * pad - k) // stride + 1
        ops = 2 * OH * OH * M * (C // group) * k * k
        fns = {}
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        xs = np.float32((hi - lo) / 255.0)
        xz = int(np.clip(np.rint(-lo / xs), 0, 255))
        fns["st1"] = (lambda: K.qconv2d(x, pc, ws, threads=1, x_scale=xs, x_zp=xz))
        for t in (1, 2):
            fns[f"ours{t}"] = (lambda t=t: K.qconv2d(x, pc, ws, threads=t))
            fns[f"qlc{t}"] = ort_qlinearconv(xq, w, attrs, t)
            fns[f"fp32{t}"] = ort_conv_f32(x, wf, attrs, t)
        res = measure(fns, rounds, target)
        g = {kk: ops / v / 1e9 for kk, v in res.items()}
        r1, r2 = g["ours1"] / g["qlc1"], g["ours2"] / g["qlc2"]
        vf = g["ours1"] / g["fp321"]
        vs = g["st1"] / g["fp321"]
        rows.append(("conv", name, r1, r2, vf, vs))
        print(f"{name:20s} {fmt(g['ours1'])}{fmt(g['ours2'])}{fmt(g['st1'])}{fmt(g['qlc1'])}{fmt(g['qlc2'])}"
              f"{fmt(g['fp321'])}{fmt(g['fp322'])} {r1:5.2f} {r2:5.2f} {vf:6.2f}x {vs:5.2f}x", flush=True)

    gr = [r for r in rows if r[0] == "gemm"]
    cr = [r for r in rows if r[0] == "conv"]
    geo = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
    m16 = [r[2] for r in gr if r[1][0] >= 16]
    if not gr or not cr:
        part = gr or cr
        print(f"\nSUMMARY {part[0][0] if part else ''} 1T geomean {geo([r[2] for r in part]):.2f}x, "
              f"2T geomean {geo([r[3] for r in part]):.2f}x (partial run: --only)")
        return
    print(f"\nSUMMARY gemm vs MLAS 1T: geomean {geo([r[2] for r in gr]):.2f}x, min(M>=16) "
          f"{min(m16) if m16 else float('nan'):.2f}x, M=1 {[round(r[2], 2) for r in gr if r[1][0] == 1]}; "
          f"2T geomean {geo([r[3] for r in gr]):.2f}x; best VNNI-ceiling fraction 1T {100 * max(r[4] for r in gr):.0f}% "
          f"@{ghz:.2f}GHz; conv vs QLinearConv 1T geomean {geo([r[2] for r in cr]):.2f}x, vs fp32 Conv 1T geomean "
          f"{geo([r[4] for r in cr]):.2f}x (static {geo([r[5] for r in cr]):.2f}x), ResNet-50 layers min "
          f"{min(r[4] for r in cr if r[1].startswith('r50')):.2f}x dynamic / "
          f"{min(r[5] for r in cr if r[1].startswith('r50')):.2f}x static")


if __name__ == "__main__":
    main()
