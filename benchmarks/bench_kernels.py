"""int8 kernel benchmark: onnxopt GEMM / conv against onnxruntime in the same process.

For every shape: our GOP/s at 1 and 2 threads, onnxruntime MatMulInteger (QLinearConv for convs)
and fp32 MatMul/Conv with matched intra_op_num_threads (spinning off), torch's FBGEMM
`quantized::linear` (AVX-512 VNNI / AVX2, never AMX) when torch is installed, the ratios, and the
fraction of this core's measured peak for the instruction mix of the active ISA path
(onnxopt._kernels.peak_probe: vpdpbusd zmm for avx512vnni, vpmaddwd ymm for the widened avx2 path).
oneDNN with ONEDNN_MAX_CPU_ISA capped to the active path's ISA (AVX512_CORE_VNNI or AVX2) is a
second same-ISA reference; the cap must be set before oneDNN's first use, so it runs in a
subprocess (--onednn-worker) that times our GEMM against it, interleaved, in that process.
Measurements are interleaved (every implementation once per round, rounds repeated) and the
median per-call time is reported. Prints a table and a final summary line.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--quick] [--rounds N] [--no-torch]
    ONNXOPT_ISA=avx2 PYTHONPATH=src python benchmarks/bench_kernels.py --quick   # the AVX2 path

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

import json
import subprocess

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# torch's OpenMP pool spins like onnxruntime's would: off on every side (as the ORT sessions below)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def torch_qlinear(engine, a, w, threads):
    """torch's quantized::linear (u8 in, u8 out, requantized) on `engine`, or None without torch."""
    try:
        import warnings

        import torch
    except ImportError:
        return None
    if engine not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated, still the way in
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(a), 0.02, 128)
        qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(w.T)), 0.01, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)

    def run():
        torch.set_num_threads(threads)
        return torch.ops.quantized.linear(qx, packed, 0.05, 128)
    return run


# the instruction mix (peak_probe name) each ISA path's micro-kernel runs (avx2 with 7-bit weights:
# vpmaddubsw_ymm, see main)
PATH_PEAK = {"avx512vnni": "vpdpbusd_zmm", "amx": "vpdpbusd_zmm", "avx2": "vpmaddwd_ymm"}
ONEDNN_CAP = {"avx512vnni": "AVX512_CORE_VNNI", "amx": "AVX512_CORE_VNNI", "avx2": "AVX2"}


def onednn_worker(cap, shapes, rounds, target, wbits):
    """In a process started with ONEDNN_MAX_CPU_ISA=cap: ours vs torch's onednn engine, interleaved."""
    rng = np.random.default_rng(0)
    for (M, Kd, N) in shapes:
        a = rng.integers(0, 256, (M, Kd)).astype(np.uint8)
        w = rng.integers(-(1 << (wbits - 1)), 1 << (wbits - 1), (Kd, N)).astype(np.int8)
        pw, ws = K.pack_weights(w), np.full(N, 0.01, np.float32)
        fns = {}
        for t in (1, 2):
            fns[f"ours{t}"] = (lambda t=t: K.qgemm_u8(a, 128, 0.02, pw, ws, out_scale=0.05, out_zp=128, threads=t))
            fns[f"dnnl{t}"] = torch_qlinear("onednn", a, w, t)
        res = measure(fns, rounds, target)
        print(json.dumps({"shape": [M, Kd, N], "cap": cap, **{k: 2 * M * Kd * N / v / 1e9 for k, v in res.items()}}),
              flush=True)


def run_onednn(cap, shapes, rounds, quick, wbits):
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap)
    cmd = [sys.executable, os.path.abspath(__file__), "--onednn-worker", cap, "--rounds", str(rounds),
           "--wbits", str(wbits), "--only", "gemm"]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        print(f"(oneDNN {cap} worker failed: {out.stderr.strip().splitlines()[-1:]})")
        return []
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


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
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-numba", action="store_true", help="skip the numba backend column")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch FBGEMM / oneDNN references")
    ap.add_argument("--only", choices=("gemm", "conv"), default=None, help="run only the GEMM or the conv table")
    ap.add_argument("--wbits", type=int, choices=(7, 8), default=8,
                    help="weight range: 8 = all of s8, 7 = [-64, 63] (the AVX2 path then runs vpmaddubsw)")
    ap.add_argument("--onednn-worker", metavar="CAP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    target = 0.02 if args.quick else 0.05
    gemms = [] if args.only == "conv" else QUICK_GEMM if args.quick else GEMM_SHAPES
    if args.onednn_worker:
        onednn_worker(args.onednn_worker, [g for g in gemms if g[0] >= 16], rounds, target, args.wbits)
        return
    info = K.info()
    if not info["native_available"]:
        sys.exit("native kernels not built (tools/dev_build.sh)")
    import onnxopt._kernels as native
    isa = info["isa"]
    peaks = {name: native.peak_probe(name, 0.3) for name in native.peak_probe_names()}
    peak_name = "vpmaddubsw_ymm" if isa == "avx2" and args.wbits == 7 else PATH_PEAK.get(isa)
    ceiling = peaks.get(peak_name, float("nan"))  # GOP/s of one core for the path in use
    print(f"onnxopt kernels: isa={isa} onnxruntime {ort.__version__} cores={os.cpu_count()}; measured peaks "
          f"GOP/s/core: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(f"peak of the {isa} path ({peak_name}): {ceiling:.0f} GOP/s/core; weights {args.wbits}-bit")
    rng = np.random.default_rng(0)
    wbits = args.wbits
    rows = []

    use_torch = not args.no_torch and torch_qlinear("fbgemm", np.zeros((1, 4), np.uint8), np.zeros((4, 4), np.int8), 1)
    print("\nGEMM (M,K,N)          ours1T  ours2T  mlas1T  mlas2T  fbg1T   fbg2T   fp32_1T fp32_2T  rM1T  rM2T  rF1T  "
          "rF2T  peak1T  numba   [GOP/s; rM: vs MLAS, rF: vs FBGEMM]")
    for (M, Kd, N) in gemms:
        a = rng.integers(0, 256, (M, Kd)).astype(np.uint8)
        w = rng.integers(-(1 << (wbits - 1)), 1 << (wbits - 1), (Kd, N)).astype(np.int8)
        x = rng.standard_normal((M, Kd)).astype(np.float32)
        wf = w.astype(np.float32)
        pw = K.pack_weights(w)
        ws = np.full(N, 0.01, np.float32)
        fns = {}
        for t in (1, 2):
            fns[f"ours{t}"] = (lambda t=t: K.qgemm_u8(a, 128, 0.02, pw, ws, threads=t))
            fns[f"mlas{t}"] = ort_matmulinteger(a, w, t)
            fns[f"fp32{t}"] = ort_matmul_f32(x, wf, t)
            if use_torch:
                fns[f"fbg{t}"] = torch_qlinear("fbgemm", a, w, t)
        res = measure(fns, rounds, target)
        numba_gops = None
        if not args.no_numba and M * Kd * N <= 2e8:
            K.qgemm_u8(a[:1], 128, 0.02, pw, ws, backend="numba")
            t0 = time.perf_counter()
            K.qgemm_u8(a, 128, 0.02, pw, ws, backend="numba")
            numba_gops = 2 * M * Kd * N / (time.perf_counter() - t0) / 1e9
        g = {k: 2 * M * Kd * N / v / 1e9 for k, v in res.items()}
        r1, r2 = g["ours1"] / g["mlas1"], g["ours2"] / g["mlas2"]
        f1, f2 = (g["ours1"] / g["fbg1"], g["ours2"] / g["fbg2"]) if use_torch else (None, None)
        rows.append(("gemm", (M, Kd, N), r1, r2, g["ours1"] / ceiling, f1, f2))
        print(f"{str((M, Kd, N)):20s} {fmt(g['ours1'])}{fmt(g['ours2'])}{fmt(g['mlas1'])}{fmt(g['mlas2'])}"
              f"{fmt(g.get('fbg1'))}{fmt(g.get('fbg2'))}{fmt(g['fp321'])}{fmt(g['fp322'])} {r1:5.2f} {r2:5.2f} "
              f"{fmt(f1, 5, 2)} {fmt(f2, 5, 2)} {100 * g['ours1'] / ceiling:6.1f}%{fmt(numba_gops, 8, 2)}", flush=True)

    dnnl = []
    cap = ONEDNN_CAP.get(isa)
    if gemms and use_torch and cap:
        dnnl = run_onednn(cap, gemms, rounds, args.quick, args.wbits)
        print(f"\nGEMM vs torch oneDNN capped at {cap} (u8 out on both sides; subprocess, interleaved there)")
        print("GEMM (M,K,N)          ours1T  ours2T  dnnl1T  dnnl2T   r1T   r2T  peak1T")
        for d in dnnl:
            print(f"{str(tuple(d['shape'])):20s} {fmt(d['ours1'])}{fmt(d['ours2'])}{fmt(d['dnnl1'])}{fmt(d['dnnl2'])} "
                  f"{d['ours1'] / d['dnnl1']:5.2f} {d['ours2'] / d['dnnl2']:5.2f} {100 * d['ours1'] / ceiling:6.1f}%")

    convs = [] if args.only == "gemm" else QUICK_CONVS if args.quick else CONVS
    if convs:
        print(f"\nConv (NCHW, N=1)      ours1T  ours2T  st1T    qlc1T   qlc2T   fp32_1T fp32_2T  r1T   r2T  vsfp32 vs32st [GOP/s]")
    for (name, C, M, HW, k, stride, pad, group) in convs:
        x = rng.standard_normal((1, C, HW, HW)).astype(np.float32)
        xq = rng.integers(0, 256, x.shape).astype(np.uint8)
        w = rng.integers(-(1 << (wbits - 1)), 1 << (wbits - 1), (M, C // group, k, k)).astype(np.int8)
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
    geo = lambda v: float(np.exp(np.mean(np.log(v)))) if len(v) else float("nan")  # noqa: E731
    parts = []
    if gr:
        m16 = [r for r in gr if r[1][0] >= 16]
        parts.append(f"gemm[{isa}] vs MLAS 1T geomean {geo([r[2] for r in gr]):.2f}x min(M>=16) "
                     f"{min((r[2] for r in m16), default=float('nan')):.2f}x, 2T geomean {geo([r[3] for r in gr]):.2f}x "
                     f"min(M>=16) {min((r[3] for r in m16), default=float('nan')):.2f}x")
        if use_torch:
            parts.append(f"vs FBGEMM min(M>=16) 1T {min(r[5] for r in m16):.2f}x 2T {min(r[6] for r in m16):.2f}x")
        if dnnl:
            parts.append(f"vs oneDNN[{cap}] min 1T {min(d['ours1'] / d['dnnl1'] for d in dnnl):.2f}x "
                         f"2T {min(d['ours2'] / d['dnnl2'] for d in dnnl):.2f}x")
        parts.append(f"peak fraction 1T (M>=16) {100 * min(r[4] for r in m16):.0f}-{100 * max(r[4] for r in m16):.0f}% "
                     f"of {ceiling:.0f} GOP/s ({peak_name})")
    if cr:
        r50 = [r for r in cr if r[1].startswith("r50")]
        parts.append(f"conv vs QLinearConv 1T geomean {geo([r[2] for r in cr]):.2f}x, vs fp32 Conv 1T geomean "
                     f"{geo([r[4] for r in cr]):.2f}x (static {geo([r[5] for r in cr]):.2f}x)" +
                     (f", ResNet-50 layers min {min(r[4] for r in r50):.2f}x dynamic / {min(r[5] for r in r50):.2f}x static"
                      if r50 else ""))
    print("\nSUMMARY " + "; ".join(parts))


if __name__ == "__main__":
    main()
