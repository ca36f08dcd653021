"""End-to-end int8: onnxopt's quantization vs onnxruntime fp32 and onnxruntime's own quantizer, per model.

    PYTHONPATH=src python benchmarks/bench_e2e.py MODEL.onnx [...] [--data digits_data.npz] [--tokenizer tokenizer.json]
        [--threads 0] [--spinning on|off] [--rounds 7] [--calib 16] [--variants ...]

For every model, in one process:
  fp32            the original model in onnxruntime (ORT_ENABLE_ALL)
  oo-int8         onnxopt "int8" preset with its guards (accuracy tolerance + autotune), target onnxopt
  oo-int8-ort     the same, target onnxruntime
  oo-int8-auto    the same with the preset's default target="auto": both lowerings of the kept sites
                  timed whole, the faster taken (what `onnxopt.optimize(m, ["int8"], calibration=...)` does)
  oo-static       onnxopt "int8" preset with calibration, target onnxopt (com.onnxopt QConv/QGemm)
  oo-static-ort   the same, target onnxruntime (standard QDQ fused by onnxruntime)
  oo-dynamic      onnxopt "int8" preset without calibration (MatMul/Gemm only), target onnxopt
  ort-dynamic     onnxruntime.quantization.quantize_dynamic (QInt8 weights)
  ort-static      onnxruntime.quantization.quantize_static (QDQ, per-channel s8 weights, u8 activations)
Latency: batch 1 (symbolic sequence length 128), every variant's session created once, then rounds in
which the variants run interleaved, each a timed batch of calls sized to ~0.2 s; the median over rounds.
Sessions and the guards' timings at the same settings: onnxruntime's defaults (it picks the intra-op
thread count, spinning on) unless --threads / --spinning say otherwise. Size: bytes of the model with
its weights. Fidelity on held-out
inputs: cosine of the first output against fp32 and top-1 agreement; with --data (digits_data.npz:
Xtr/ytr/Xte/yte) for a model whose input is [b, 1, 8, 8], test accuracy, and the calibration uses Xtr
(in batches of --digits-batch, default 1: the guards time at the calibration batch size).
Calibration for other models: random inputs (normal images, random token ids), so their fidelity
figures say how the numerics hold, not how a trained net's accuracy would; token_type_ids are 0. With
--tokenizer (a HuggingFace tokenizer.json) a text encoder gets real sentences instead (padded to 128
tokens; the first --calib calibrate, the rest judge) and the table adds the cosine of the mean-pooled
sentence embeddings (mean and min over sentences), which then decides the fidelity summary. The guarded variants fit
ranges on the first 75% of the calibration feeds and judge on the rest; their per-node decisions are
printed with --report. Ends with summary lines: speed of every variant over ORT fp32, and for the
guarded int8 preset the geomean speedup, whether it is ever slower than fp32 and whether its fidelity
on the held-out inputs is within the tolerance (cosine >= 0.995, top-1 agreement >= 0.99).
The machine may be shared with other jobs: ratios are measured interleaved in one process, but
absolute figures and small ratios are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import onnxopt  # noqa: E402
from onnxopt import execution, ir, runtime, verify  # noqa: E402
from onnxopt.bench import time_sessions  # noqa: E402

SEQ = 128
VARIANTS = ["fp32", "oo-int8", "oo-int8-ort", "oo-int8-auto", "oo-static", "oo-static-ort", "oo-dynamic", "ort-dynamic", "ort-static"]
UNGUARDED = {"tolerance": None, "autotune": False, "eval_fn": None}


def int8_preset(settings, **options):
    """The "int8" preset with the guards on (whatever the defaults), timing at `settings`."""
    from onnxopt.passes import base
    from onnxopt.passes.quantize import guard

    guarded = {"tolerance": guard.DEFAULT_TOLERANCE, "autotune": True, "threads": settings.threads,
               "spinning": settings.spinning, "progress": False}
    return [base.get_pass(p.name, **{**p.options, **guarded, **options}) if p.name == "quantize_auto" else p
            for p in base.resolve(["int8"])]


def make_feed(specs, rng, batch=1):
    feed = {}
    for name, dtype, shape in specs:
        dims = []
        for i, d in enumerate(shape or []):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            else:
                dims.append(batch if i == 0 else SEQ)
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(dims).astype(dtype)
        elif "mask" in name.lower():
            feed[name] = np.ones(dims, dtype)
        elif "token_type" in name.lower():  # segment ids: 0 (one sentence)
            feed[name] = np.zeros(dims, dtype)
        else:
            feed[name] = rng.integers(0, 1000, dims).astype(dtype)
    return feed


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street corner.",
    "Quantized transformers trade a little accuracy for a lot of speed.", "It rained all night in the valley.",
    "How do I reset my password?", "The committee postponed its decision until next spring.",
    "She ordered a coffee and sat by the window to read.", "Prices of solar panels fell again this year.",
    "Children were building a sandcastle near the waves.", "What is the capital city of Australia?",
    "The recipe needs two eggs, flour, butter and a pinch of salt.", "Our train was delayed by forty minutes.",
    "Neural networks learn representations from data.", "He fixed the bicycle chain with a borrowed tool.",
    "The museum opens a new exhibition on ancient maps.", "Please send the report before Friday afternoon.",
    "A cat sleeps in a patch of warm sunlight.", "The stock market closed slightly higher on Tuesday.",
    "Volunteers planted three hundred trees in the park.", "Can you recommend a good book about history?",
    "The orchestra played a symphony by Beethoven.", "Heavy snow blocked the mountain pass for days.",
    "The startup raised funding to expand into Europe.", "My phone battery drains too quickly lately.",
]


def text_feeds(specs, tokenizer_path):
    """One feed per sentence (batch 1, padded to SEQ) from a HuggingFace tokenizer.json."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(tokenizer_path)
    tok.enable_padding(length=SEQ)
    tok.enable_truncation(SEQ)
    feeds = []
    for text in SENTENCES:
        e = tok.encode(text)
        cols = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        feeds.append({name: np.asarray([cols[name]], dtype) for name, dtype, _ in specs})
    return feeds


def pooled_cosine(ref, outs, masks):
    """Mean over samples of the cosine between mask-mean-pooled [b, seq, d] outputs (sentence embeddings)."""
    cos = []
    for r, o, m in zip(ref, outs, masks):
        w = m[..., None].astype(np.float64)
        a = (np.asarray(r, np.float64) * w).sum(1) / w.sum(1)
        b = (np.asarray(o, np.float64) * w).sum(1) / w.sum(1)
        cos.extend(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30))
    return float(np.mean(cos)), float(np.min(cos))


def session(model_or_path, settings):
    return execution.session(model_or_path, "all", settings)


class Reader:
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def build_variants(path, calib, settings, wanted, tmp):
    """name -> (model or path) for every variant that could be built; errors reported, not raised."""
    out, errors = {}, {}
    t_opt = {}
    src = onnx.load(path, load_external_data=True)
    if "fp32" in wanted:
        out["fp32"] = path
    reports = {}

    def guarded(target):
        suffix = {"onnxruntime": "-ort", "auto": "-auto"}.get(target, "")
        model, reports[f"oo-int8{suffix}"] = onnxopt.optimize(
            src, int8_preset(settings, target=target), calibration=calib, return_report=True)
        return model

    builders = {
        "oo-int8": lambda: guarded("onnxopt"),
        "oo-int8-ort": lambda: guarded("onnxruntime"),
        "oo-int8-auto": lambda: guarded("auto"),
        "oo-static": lambda: onnxopt.optimize(src, ["default", onnxopt.get_pass(
            "quantize_auto", target="onnxopt", progress=False, **UNGUARDED)], calibration=calib),
        "oo-static-ort": lambda: onnxopt.optimize(src, ["default", onnxopt.get_pass(
            "quantize_auto", target="onnxruntime", progress=False, **UNGUARDED)], calibration=calib),
        "oo-dynamic": lambda: onnxopt.optimize(src, ["default", onnxopt.get_pass("quantize_auto", target="onnxopt",
                                                                                  **UNGUARDED)]),
        "ort-dynamic": lambda: _ort_dynamic(path, tmp),
        "ort-static": lambda: _ort_static(path, tmp, calib),
    }
    for name, build in builders.items():
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            out[name] = build()
            t_opt[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failing quantizer is a result
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    return out, errors, t_opt, reports


def _ort_dynamic(path, tmp):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = os.path.join(tmp, os.path.basename(path) + ".ortdyn.onnx")
    quantize_dynamic(path, dst, weight_type=QuantType.QInt8, use_external_data_format=False)
    return dst


def _ort_static(path, tmp, calib):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst = os.path.join(tmp, os.path.basename(path) + ".ortstat.onnx")
    quantize_static(path, dst, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return dst


def bench_model(path, args, digits):
    rng = np.random.default_rng(0)
    proto = onnx.load(path, load_external_data=False)
    specs = verify.input_specs(proto)
    is_digits = digits is not None and len(specs) == 1 and list(specs[0][2] or [])[1:] == [1, 8, 8]
    name0 = specs[0][0]
    if is_digits:
        # batch 1, like the latency runs: the guards time int8 against fp32 at the calibration batch size
        b = args.digits_batch
        calib = [{name0: digits["Xtr"][i:i + b].astype(np.float32)} for i in range(0, len(digits["Xtr"]), b)]
        evals = [{name0: digits["Xte"].astype(np.float32)}]
        lat_feed = {name0: digits["Xte"][:1].astype(np.float32)}
    elif args.tokenizer:  # real sentences: the first --calib calibrate, the rest judge fidelity
        feeds = text_feeds(specs, args.tokenizer)
        calib, evals = feeds[:args.calib], feeds[args.calib:]
        lat_feed = evals[0]
    else:
        calib = [make_feed(specs, rng) for _ in range(args.calib)]
        evals = [make_feed(specs, rng) for _ in range(args.evals)]
        lat_feed = evals[0]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        models, errors, t_opt, reports = build_variants(path, calib, args.settings, args.variants, tmp)
        sessions = {}
        for k, m in models.items():
            try:
                sessions[k] = session(m, args.settings)
            except Exception as e:  # noqa: BLE001
                errors[k] = f"session: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows = {}
        ref = [sessions["fp32"].run(None, f)[0] for f in evals] if "fp32" in sessions else None
        for k, s in sessions.items():
            try:
                outs = [s.run(None, f)[0] for f in evals]
            except Exception as e:  # noqa: BLE001
                errors[k] = f"run: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                continue
            row = {"size": ir.model_size(models[k])}
            if ref is not None:
                a = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
                b = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs])
                row["cos"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
                if ref[0].ndim >= 2:
                    row["top1"] = float(np.mean([np.mean(r.argmax(-1) == o.argmax(-1)) for r, o in zip(ref, outs)]))
                row["logits"] = ref[0].ndim == 2  # the guard judges top-1 on 2-D (classifier) outputs only
                if ref[0].ndim == 3 and "attention_mask" in evals[0]:
                    row["emb"] = pooled_cosine(ref, outs, [f["attention_mask"] for f in evals])
            if is_digits:
                row["acc"] = float(np.mean(outs[0].argmax(-1) == digits["yte"]))
            rows[k] = row
        sessions = {k: s for k, s in sessions.items() if k in rows}
        # interleaved rounds of ~0.2 s timed batches, medians (onnxopt.bench.time_sessions)
        ms = time_sessions(list(sessions.values()), lat_feed, rounds=args.rounds, min_time=0.2)
        for k, m in zip(sessions, ms):
            rows[k]["ms"] = m
            rows[k]["opt_s"] = t_opt.get(k)
    return rows, errors, reports


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", help="digits_data.npz (Xtr/ytr/Xte/yte) for the digits CNN")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime picks)")
    ap.add_argument("--spinning", choices=["on", "off"], default=None, help="default: onnxruntime's")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calib", type=int, default=8, help="calibration batches (random inputs)")
    ap.add_argument("--evals", type=int, default=4, help="held-out random inputs for fidelity")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--report", action="store_true", help="print the guards' per-node table")
    ap.add_argument("--tokenizer", help="tokenizer.json: feed real sentences (calibration and fidelity) to a "
                    "text encoder and report the mean-pooled embedding cosine (mean/min over sentences)")
    ap.add_argument("--digits-batch", type=int, default=1, help="calibration batch for the digits CNN")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    args.settings = execution.Settings(args.threads, None if args.spinning is None else args.spinning == "on")
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    digits = dict(np.load(args.data)) if args.data else None
    print(f"onnxruntime {ort.__version__}, native ops: {runtime.custom_ops_library() is not None}, "
          f"{args.settings.describe()}, rounds {args.rounds}, batch 1")
    hdr = (f"{'model':<18} {'variant':<14} {'ms':>9} {'x fp32':>7} {'MB':>8} {'size':>6} {'cos':>8} {'top1':>6} "
           f"{'acc':>6} {'opt s':>6}")
    print(hdr)
    summary, guarded = [], []
    for path in args.models:
        name = os.path.splitext(os.path.basename(path))[0]
        rows, errors, reports = bench_model(path, args, digits)
        base = rows.get("fp32", {})
        for k in args.variants:
            if k in errors:
                print(f"{name:<18} {k:<14} FAILED {errors[k]}")
                continue
            r = rows.get(k)
            if r is None:
                continue
            ratio = base["ms"] / r["ms"] if base.get("ms") else float("nan")
            rel = r["size"] / base["size"] if base.get("size") else float("nan")
            acc = f"{r['acc'] * 100:6.2f}" if "acc" in r else f"{'':>6}"
            top1 = f"{r['top1']:6.3f}" if "top1" in r else f"{'':>6}"
            opt_s = f"{r['opt_s']:6.1f}" if r.get("opt_s") is not None else f"{'':>6}"
            emb = f"  emb cos mean {r['emb'][0]:.5f} min {r['emb'][1]:.5f}" if "emb" in r else ""
            print(f"{name:<18} {k:<14} {r['ms']:9.3f} {ratio:7.2f} {r['size'] / 1e6:8.1f} {rel:6.3f} "
                  f"{r.get('cos', float('nan')):8.5f} {top1} {acc} {opt_s}{emb}")
            if k != "fp32":
                summary.append(f"{name}/{k}={ratio:.2f}x")
            if k.startswith("oo-int8"):
                cos = r["emb"][0] if "emb" in r else r.get("cos", 0)  # embeddings: judged pooled
                ok = cos >= 0.995 and (not r.get("logits") or r.get("top1", 1.0) >= 0.99)
                rep = reports.get(k)
                fp32_kept = rep is not None and any("nothing worth quantizing" in t for _, t in rep.messages)
                guarded.append((k, name, ratio, ok, fp32_kept))
        for k, rep in reports.items():
            quantized = sum(1 for q in rep.quantization if q["quantized"])
            print(f"  {name}/{k}: {quantized} of {len(rep.quantization)} Conv/MatMul/Gemm int8; "
                  + " | ".join(t for p, t in rep.messages if p == "quantize_auto" and t.startswith(("guard", "warning"))))
            if args.report:
                print("    " + rep.format().split("\n\n", 1)[-1].replace("\n", "\n    "))
        sys.stdout.flush()
    print("summary (speed over ORT fp32, >1 is faster): " + " ".join(summary))
    for k in ("oo-int8", "oo-int8-ort", "oo-int8-auto"):
        got = [g for g in guarded if g[0] == k]
        if not got:
            continue
        geo = float(np.exp(np.mean([np.log(g[2]) for g in got])))
        # a guard that kept fp32 returns the fp32 model itself: a ratio below 1 there is timing noise
        slower = [g[1] for g in got if g[2] < 1.0 and not g[4]]
        off = [g[1] for g in got if not g[3]]
        print(f"summary {k} (guarded int8 preset): geomean {geo:.2f}x over ORT fp32 on {len(got)} model(s); "
              f"slower than fp32: {', '.join(slower) or 'none'}; outside tolerance on held-out inputs: "
              f"{', '.join(off) or 'none'}  (shared machine: ratios near 1.0 are within noise)")


if __name__ == "__main__":
    main()
