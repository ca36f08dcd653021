"""Default-pipeline cost and benefit.

    python benchmarks/bench_optimize.py [MODEL.onnx ...] [--synthetic 1000,10000,100000] [--rounds 5]
                                        [--external-gib 2.1]

For each model given (e.g. bert_base.onnx from ../shared/bench-models/make.py) and for synthetic
transformer-like graphs of the requested node counts: wall time and peak RSS of
`onnxopt.optimize(model)` (each in a fresh subprocess, so RSS is the optimizer's own), node counts,
and for the real models the onnxruntime latency of optimized vs original (ORT_ENABLE_ALL, same
process, interleaved, median of rounds). Ends with a summary line: time per 1k nodes at each size
(linear growth means a flat column) and the worst latency ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MEASURE = r"""
import json, sys, time
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
import onnxopt
base = hwm()
t0 = time.perf_counter()
out, report = onnxopt.optimize(sys.argv[1], return_report=True)
dt = time.perf_counter() - t0
onnxopt.save(out, sys.argv[2])
print(json.dumps({"seconds": dt, "peak_rss": hwm(), "base_rss": base, "before": report.nodes_before,
                  "after": report.nodes_after, "iterations": report.iterations}))
"""


def synthetic(n_nodes: int, hidden: int = 64) -> onnx.ModelProto:
    """A chain of transformer-ish blocks (MatMul+Add, LayerNorm decomposed, GELU, Identity on
    weights, residual) with about n_nodes nodes; weights small so the graph, not bytes, dominates."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    i = 0
    while len(nodes) < n_nodes:
        p = f"b{i}"
        w = rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.05
        inits += [numpy_helper.from_array(w, f"{p}.w"), numpy_helper.from_array(np.zeros(hidden, np.float32), f"{p}.b"),
                  numpy_helper.from_array(np.array([-1], np.int64), f"{p}.axes"),
                  numpy_helper.from_array(np.array(2.0, np.float32), f"{p}.two"),
                  numpy_helper.from_array(np.array(1e-5, np.float32), f"{p}.eps"),
                  numpy_helper.from_array(np.array(0.5, np.float32), f"{p}.half"),
                  numpy_helper.from_array(np.array(1.0, np.float32), f"{p}.one"),
                  numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), f"{p}.sqrt2")]
        nodes += [
            helper.make_node("Identity", [f"{p}.w"], [f"{p}.wi"]),
            helper.make_node("MatMul", [x, f"{p}.wi"], [f"{p}.mm"]),
            helper.make_node("Add", [f"{p}.mm", f"{p}.b"], [f"{p}.lin"]),
            helper.make_node("ReduceMean", [f"{p}.lin", f"{p}.axes"], [f"{p}.mu"]),
            helper.make_node("Sub", [f"{p}.lin", f"{p}.mu"], [f"{p}.d"]),
            helper.make_node("Pow", [f"{p}.d", f"{p}.two"], [f"{p}.d2"]),
            helper.make_node("ReduceMean", [f"{p}.d2", f"{p}.axes"], [f"{p}.var"]),
            helper.make_node("Add", [f"{p}.var", f"{p}.eps"], [f"{p}.ve"]),
            helper.make_node("Sqrt", [f"{p}.ve"], [f"{p}.std"]),
            helper.make_node("Div", [f"{p}.d", f"{p}.std"], [f"{p}.ln"]),
            helper.make_node("Div", [f"{p}.ln", f"{p}.sqrt2"], [f"{p}.g0"]),
            helper.make_node("Erf", [f"{p}.g0"], [f"{p}.g1"]),
            helper.make_node("Add", [f"{p}.g1", f"{p}.one"], [f"{p}.g2"]),
            helper.make_node("Mul", [f"{p}.ln", f"{p}.g2"], [f"{p}.g3"]),
            helper.make_node("Mul", [f"{p}.g3", f"{p}.half"], [f"{p}.gelu"]),
            helper.make_node("Dropout", [f"{p}.gelu"], [f"{p}.drop"]),
            helper.make_node("Add", [x, f"{p}.drop"], [f"{p}.out"]),
        ]
        x = f"{p}.out"
        i += 1
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def external_model(directory: str, gib: float, rows: int = 8192) -> tuple:
    """A MatMul chain whose weights (about `gib` GiB, float32 [rows, rows] each, behind Identity
    nodes) live in one external data file, written tensor by tensor. Returns (path, weight bytes)."""
    per = rows * rows * 4
    count = max(1, -(-int(gib * 2**30) // per))  # at least `gib` GiB
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    data_path = os.path.join(directory, "big.onnx.data")
    with open(data_path, "wb") as f:
        for i in range(count):
            offset = f.tell()
            (rng.standard_normal((rows, rows), dtype=np.float32) * 0.01).tofile(f)
            t = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, rows],
                                 data_location=TensorProto.EXTERNAL)
            for k, v in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(per))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            nodes += [helper.make_node("Identity", [f"w{i}"], [f"wi{i}"]),
                      helper.make_node("MatMul", [x, f"wi{i}"], [f"h{i}"])]
            x = f"h{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", rows])], inits)
    path = os.path.join(directory, "big.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, count * per


def measure(path: str, tmp: str) -> dict:
    out = os.path.join(tmp, "opt_" + os.path.basename(path))
    proc = subprocess.run([sys.executable, "-c", MEASURE, path, out], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"optimizing {path} failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["output"] = out
    return res


def latency_ratio(original: str, optimized: str, rounds: int) -> tuple:
    from onnxopt import bench, ir, verify

    a, b = ir.load_model(original), ir.load_model(optimized)
    feeds = verify.make_feeds(a, seed=0, dims=_dims_for(a))
    cmp = bench.compare_models(a, b, feeds=feeds, rounds=rounds, optimization="all", progress=True)
    return cmp.latency_ms[0], cmp.latency_ms[1], cmp.max_abs_diff


def _dims_for(model) -> dict:
    # typical serving shapes for symbolic dims: batch 1, sequence 128
    dims = {}
    for vi in model.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param:
                dims[d.dim_param] = 1 if i == 0 else 128
    return dims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--synthetic", default="1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--external-gib", type=float, default=0,
                    help="also optimize a model with this many GiB of external weights (peak RSS vs weights)")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            print(f"optimizing {path} ...", file=sys.stderr)
            res = measure(path, tmp)
            before_ms, after_ms, diff = latency_ratio(path, res["output"], args.rounds)
            rows.append((os.path.basename(path), res, before_ms / after_ms, diff))
        if args.external_gib:
            print(f"writing a {args.external_gib} GiB external-data model ...", file=sys.stderr)
            big, weights = external_model(tmp, args.external_gib)
            res = measure(big, tmp)
            data = res["output"] + ".data"
            saved = os.path.getsize(data) if os.path.exists(data) else 0
            print(f"external data: {weights / 2**30:.2f} GiB of weights, optimize+save peak RSS "
                  f"{res['peak_rss'] / 2**30:.2f} GiB = {res['peak_rss'] / weights:.2f}x the weights "
                  f"(target <= 1.5x), {res['seconds']:.1f} s; saved back as external data: "
                  f"{saved / 2**30:.2f} GiB in {os.path.basename(data)}")
            for f in (big, big + ".data", res["output"], data):
                if os.path.exists(f):
                    os.unlink(f)
        sizes = [int(s) for s in args.synthetic.split(",") if s.strip()]
        for n in sizes:
            p = os.path.join(tmp, f"synthetic_{n}.onnx")
            onnx.save(synthetic(n), p)
            print(f"optimizing synthetic {n} ...", file=sys.stderr)
            rows.append((f"synthetic {n}", measure(p, tmp), None, None))

    print(f"\n{'model':<24} {'nodes':>15} {'seconds':>8} {'s/1k nodes':>10} {'peak RSS':>9} {'ORT speedup':>11} {'max diff':>9}")
    for name, res, ratio, diff in rows:
        nodes = f"{res['before']}->{res['after']}"
        per_k = res["seconds"] / max(res["before"], 1) * 1000
        rss = f"{res['peak_rss'] / 2**20:.0f} MiB"
        rat = f"{ratio:.2f}x" if ratio is not None else "-"
        dif = f"{diff:.2g}" if diff is not None else "-"
        print(f"{name:<24} {nodes:>15} {res['seconds']:>8.2f} {per_k:>10.3f} {rss:>9} {rat:>11} {dif:>9}")
    synth = [(n, r) for n, r, _, _ in rows if n.startswith("synthetic")]
    ratios = [r for _, _, r, _ in rows if r is not None]
    growth = ", ".join(f"{n.split()[1]}: {r['seconds'] / r['before'] * 1000:.3f}" for n, r in synth)
    worst = f"{min(ratios):.2f}x" if ratios else "n/a"
    print(f"\nsummary: s per 1k nodes [{growth}]; worst ORT speedup of optimized vs original: {worst}")


if __name__ == "__main__":
    main()
