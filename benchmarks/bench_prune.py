"""Structured channel pruning: latency and size against the original model, alone and with int8.

    PYTHONPATH=src python benchmarks/bench_prune.py MODEL.onnx [...] [--data digits_data.npz]
        [--ratio 0.3] [--multiple-of 8] [--threads 1] [--rounds 7] [--calib 8]

For every model, in one process:
  fp32            the original model in onnxruntime (ORT_ENABLE_ALL)
  default         onnxopt "default" preset alone (exact): what pruning's figures include besides pruning
  pruned          onnxopt "default" then prune_channels(ratio) (not fine-tuned)
  int8            onnxopt "int8" preset (static, calibrated on random inputs) when it exists
  pruned+int8     prune_channels then the "int8" preset
Latency: batch 1, every session created once, then rounds in which the variants run interleaved,
each a timed batch of calls sized to ~0.2 s; the median over rounds. session.intra_op.allow_spinning=0.
Size: bytes of the model with its weights. Fidelity on random inputs: cosine of the first output
against fp32 and top-1 agreement (a pruned, untrained-after-pruning net is expected to drift).
With --data (digits_data.npz: Xte/yte) a model with input [b, 1, 8, 8] also gets its test accuracy
at ratios 0.1 / 0.3 / 0.5, without fine-tuning, with multiple_of=1 (the exact ratio) and the default,
and after prune_magnitude (50% unstructured, 2:4) with its zlib-compressed size against the original's.
Ends with a summary line (targets for ResNet-50 at ratio 0.3: >= 1.5x faster, <= 0.55x size).
"""
from __future__ import annotations

import argparse
import os
import zlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import onnxopt  # noqa: E402
from onnxopt import ir, runtime, verify  # noqa: E402
from onnxopt.bench import time_sessions  # noqa: E402


def session(model_or_path, threads):
    return verify.session(model_or_path, optimization="all", threads=threads)


def random_feed(specs, rng, batch=1):
    feed = {}
    for name, dtype, shape in specs:
        dims = [d if isinstance(d, int) and d > 0 else batch for d in (shape or [])]
        feed[name] = rng.standard_normal(dims).astype(dtype)
    return feed


def prune_pass(ratio, multiple_of):
    return onnxopt.get_pass("prune_channels", ratio=ratio, multiple_of=multiple_of)


def kept_summary(report):
    """'a->b' channel counts of the pruned groups, from the pass notes."""
    return [text.rsplit(": ", 1)[1].replace(" channels", "").replace(" -> ", "->")
            for name, text in report.messages if name == "prune_channels" and text.endswith(" channels")]


def bench_latency(path, args):
    rng = np.random.default_rng(0)
    specs = verify.input_specs(onnx.load(path, load_external_data=False))
    calib = [random_feed(specs, rng) for _ in range(args.calib)]
    evals = [random_feed(specs, rng) for _ in range(4)]
    src = onnx.load(path)
    has_int8 = "int8" in onnxopt.passes.list_presets()
    models, notes = {"fp32": path, "default": onnxopt.optimize(src, ["default"])}, {}
    t0 = time.perf_counter()
    models["pruned"], report = onnxopt.optimize(src, ["default", prune_pass(args.ratio, args.multiple_of)],
                                                return_report=True)
    notes["pruned"] = f"optimize {time.perf_counter() - t0:.1f}s; " + next(
        (t for n, t in report.messages if n == "prune_channels" and t.startswith("pruned ")), "")
    if has_int8:
        try:
            models["int8"] = onnxopt.optimize(src, ["int8"], calibration=calib)
            models["pruned+int8"] = onnxopt.optimize(src, ["default", prune_pass(args.ratio, args.multiple_of), "int8"],
                                                     calibration=calib)
        except Exception as e:  # noqa: BLE001 - a failing quantizer is a result
            notes["int8"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            models.pop("int8", None)
    sessions = {k: session(m, args.threads) for k, m in models.items()}
    rows = {}
    ref = [sessions["fp32"].run(None, f)[0] for f in evals]
    a = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
    for k, s in sessions.items():
        outs = [s.run(None, f)[0] for f in evals]
        b = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs])
        rows[k] = {"size": ir.model_size(models[k]),
                   "cos": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
                   "top1": float(np.mean([np.mean(r.argmax(-1) == o.argmax(-1)) for r, o in zip(ref, outs)]))}
    # interleaved rounds of ~0.2 s timed batches, medians (onnxopt.bench.time_sessions)
    ms = time_sessions(list(sessions.values()), evals[0], rounds=args.rounds, min_time=0.2)
    for k, m in zip(sessions, ms):
        rows[k]["ms"] = m
    return rows, notes


def bench_accuracy(path, digits, args):
    """Test accuracy of the digits CNN pruned at 10/30/50%, no fine-tuning."""
    src = onnx.load(path)
    name = verify.input_specs(src)[0][0]
    x, y = digits["Xte"].astype(np.float32), digits["yte"]
    base = session(path, args.threads).run(None, {name: x})[0]
    rows = [("original", "-", float(np.mean(base.argmax(-1) == y)), 1.0, 1.0, "")]
    for multiple_of in (1, args.multiple_of):
        for ratio in (0.1, 0.3, 0.5):
            m, report = onnxopt.optimize(src, ["default", prune_pass(ratio, multiple_of)], return_report=True)
            out = session(m, args.threads).run(None, {name: x})[0]
            cos = float((base.ravel() @ out.ravel()) / (np.linalg.norm(base) * np.linalg.norm(out) + 1e-30))
            rows.append((f"ratio {ratio:.1f}", str(multiple_of), float(np.mean(out.argmax(-1) == y)),
                         ir.model_size(m) / ir.model_size(path), cos, " ".join(kept_summary(report))))
    for label, options in (("mag 50%", {"sparsity": 0.5}), ("mag 2:4", {"pattern": "2:4"})):
        m = onnxopt.optimize(src, [onnxopt.get_pass("prune_magnitude", **options)])
        out = session(m, args.threads).run(None, {name: x})[0]
        cos = float((base.ravel() @ out.ravel()) / (np.linalg.norm(base) * np.linalg.norm(out) + 1e-30))
        rows.append((label, "-", float(np.mean(out.argmax(-1) == y)), ir.model_size(m) / ir.model_size(path), cos,
                     f"zlib size {compressed(m) / compressed(src):.3f} of the original's"))
    return rows


def compressed(model):
    return len(zlib.compress(model.SerializeToString(), 6))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", help="digits_data.npz (Xte/yte) for a [b,1,8,8] digits CNN: accuracy per ratio")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--multiple-of", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calib", type=int, default=8, help="calibration batches for int8 (random inputs)")
    args = ap.parse_args()
    digits = dict(np.load(args.data)) if args.data else None
    print(f"onnxruntime {ort.__version__}, native ops: {runtime.custom_ops_library() is not None}, "
          f"threads {args.threads}, rounds {args.rounds}, batch 1, ratio {args.ratio}, multiple_of {args.multiple_of}")
    summary = []
    for path in args.models:
        name = os.path.splitext(os.path.basename(path))[0]
        specs = verify.input_specs(onnx.load(path, load_external_data=False))
        if digits is not None and len(specs) == 1 and list(specs[0][2] or [])[1:] == [1, 8, 8]:
            print(f"{'model':<18} {'pruning':<10} {'mult':>4} {'acc':>7} {'size':>6} {'cos':>8}  channels kept")
            for label, mult, acc, size, cos, kept in bench_accuracy(path, digits, args):
                print(f"{name:<18} {label:<10} {mult:>4} {acc * 100:6.2f}% {size:6.3f} {cos:8.4f}  {kept}")
                if label == "original" or mult == "1":
                    summary.append(f"{name}/acc@{label.split()[-1].replace('original', '0')}={acc * 100:.1f}%")
            continue
        rows, notes = bench_latency(path, args)
        print(f"{'model':<18} {'variant':<12} {'ms':>9} {'x fp32':>7} {'MB':>8} {'size':>6} {'cos':>8} {'top1':>6}")
        base = rows["fp32"]
        for k, r in rows.items():
            print(f"{name:<18} {k:<12} {r['ms']:9.2f} {base['ms'] / r['ms']:7.2f} {r['size'] / 1e6:8.1f} "
                  f"{r['size'] / base['size']:6.3f} {r['cos']:8.5f} {r['top1']:6.3f}")
        for k, text in notes.items():
            print(f"  {k}: {text}")
        speed = base["ms"] / rows["pruned"]["ms"]
        size = rows["pruned"]["size"] / base["size"]
        summary.append(f"{name}/pruned={speed:.2f}x,size={size:.2f}")
        if "int8" in rows:
            q = base["ms"] / rows["int8"]["ms"]
            both = base["ms"] / rows["pruned+int8"]["ms"]
            summary.append(f"{name}/int8={q:.2f}x {name}/product={speed * q:.2f}x {name}/pruned+int8={both:.2f}x,"
                           f"size={rows['pruned+int8']['size'] / base['size']:.2f}")
        sys.stdout.flush()
    print("summary (speed over the original in onnxruntime, >1 is faster; size relative): " + " ".join(summary))


if __name__ == "__main__":
    main()
