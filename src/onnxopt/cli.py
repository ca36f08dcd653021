"""`onnxopt optimize | passes | inspect | bench`. Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import List, Optional

from . import ir
from .errors import OptimizeError


def _split_passes(text: Optional[str]):
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def load_calibration(path: str, batch: int) -> list:
    """Feed dicts from an .npz (one array per model input, samples along axis 0, cut into batches)
    or a directory of such .npz files (one feed dict each)."""
    import glob

    import numpy as np

    from .errors import CalibrationError

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npz")))
        if not files:
            raise CalibrationError(f"{path}: no .npz files in the calibration directory")
        feeds = []
        for f in files:
            with np.load(f) as z:
                feeds.append({k: z[k] for k in z.files})
        return feeds
    if not os.path.isfile(path):
        raise CalibrationError(f"{path}: no such calibration file")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise CalibrationError(f"{path}: not an .npz file ({exc})") from None
    if not arrays:
        raise CalibrationError(f"{path}: the .npz holds no arrays")
    n = min(a.shape[0] if a.ndim else 1 for a in arrays.values())
    return [{k: a[i:i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]


def _configure(passes, **overrides):
    """Resolve `passes` and apply each override to every pass that has that option."""
    from .passes import base

    overrides = {k: v for k, v in overrides.items() if v is not None}
    out = []
    for p in base.resolve(passes):
        mine = {k: v for k, v in overrides.items() if k in p.options}
        out.append(base.get_pass(p.name, **{**p.options, **mine}) if mine else p)
    return out


def cmd_optimize(args) -> int:
    from .api import optimize, save
    from .bench import compare_models

    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise OptimizeError("output path is the input path: write the result somewhere else")
    passes = _configure(_split_passes(args.passes), target=args.target,
                        autotune=False if args.no_autotune else None)
    calibration = load_calibration(args.calibration, args.calibration_batch) if args.calibration else None
    source = ir.load_source(args.model)
    result, report = optimize(source, passes=passes, calibration=calibration, verify=args.verify,
                              return_report=True)
    print(report.format())
    save(result, args.output)
    print(f"\nwrote {args.output}")
    if not args.no_bench:
        print()
        feeds = calibration[0] if calibration else None  # real data when we have it
        cmp = compare_models(source.full(), result, feeds=feeds, rounds=args.rounds, threads=args.threads,
                             progress=True)
        print(cmp.format(("original", "optimized")))
    return 0


def cmd_passes(args) -> int:
    from . import passes as registry

    names = registry.list_passes()
    w = max(len(n) for n in names) if names else 4
    print(f"{'pass':<{w}}  {'kind':<9} {'exact':<5}  description")
    for name in names:
        entry = registry.base.pass_class(name)
        kind = getattr(entry, "kind", "?")
        exact = "yes" if getattr(entry, "exact", True) else "no"
        doc = entry.doc() if callable(getattr(entry, "doc", None)) else ""
        print(f"{name:<{w}}  {kind:<9} {exact:<5}  {doc}")
    print()
    for preset, members in registry.list_presets().items():
        print(f"preset {preset}: {', '.join(members) if members else '(empty)'}")
    return 0


def cmd_inspect(args) -> int:
    import onnx

    model = ir.load_model(args.model)
    hist = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in ir.walk_nodes(model.graph))
    print(f"model: {args.model}")
    print(f"ir_version {model.ir_version}, producer {model.producer_name or '?'} {model.producer_version}")
    print("opsets: " + ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in model.opset_import))
    print(f"size: {ir.model_size(model)} bytes, nodes: {sum(hist.values())}, "
          f"initializers: {len(model.graph.initializer)}")
    from .verify import input_specs

    for name, dtype, shape in input_specs(model):
        print(f"input  {name}: {dtype} {shape}")
    for o in model.graph.output:
        tt = o.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        print(f"output {o.name}: {onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else '?'} {shape}")
    print()
    w = max((len(f"{d}::{t}") for d, t in hist), default=4)
    print(f"{'op':<{w}}  count")
    for (dom, op), n in hist.most_common():
        label = op if dom == "ai.onnx" else f"{dom}::{op}"
        print(f"{label:<{w}}  {n}")
    return 0


def cmd_bench(args) -> int:
    from .bench import compare_models

    a = ir.load_model(args.original)
    b = ir.load_model(args.optimized)
    feeds = None
    if args.data:
        import numpy as np

        with np.load(args.data) as z:
            feeds = {k: z[k] for k in z.files}
    cmp = compare_models(a, b, feeds=feeds, rounds=args.rounds, threads=args.threads, progress=True)
    print(cmp.format(("original", "optimized")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxopt", description="Make ONNX models smaller and faster.")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="run a pass pipeline over a model")
    o.add_argument("model")
    o.add_argument("-o", "--output", required=True)
    o.add_argument("--passes", help="comma-separated pass or preset names (default: the 'default' preset)")
    o.add_argument("--verify", action="store_true", help="check outputs through onnxruntime, name the pass that broke them")
    o.add_argument("--calibration", help="calibration data: .npz (one array per input, samples on axis 0) or a directory of .npz feeds")
    o.add_argument("--calibration-batch", type=int, default=8, help="samples per calibration feed from an .npz (default 8)")
    o.add_argument("--no-autotune", action="store_true",
                   help="int8: skip the cost guard's timing (keep every node the accuracy guard accepts)")
    o.add_argument("--target", choices=["onnxopt", "onnxruntime"],
                   help="quantization target: com.onnxopt fused ops or standard QDQ for plain onnxruntime")
    o.add_argument("--no-bench", action="store_true", help="skip the before/after timing table")
    o.add_argument("--rounds", type=int, default=7)
    o.add_argument("--threads", type=int, default=1)
    o.set_defaults(fn=cmd_optimize)

    s = sub.add_parser("passes", help="list registered passes and presets")
    s.set_defaults(fn=cmd_passes)

    i = sub.add_parser("inspect", help="op histogram, opsets, inputs/outputs, size")
    i.add_argument("model")
    i.set_defaults(fn=cmd_inspect)

    b = sub.add_parser("bench", help="latency, size and fidelity of two models")
    b.add_argument("original")
    b.add_argument("optimized")
    b.add_argument("--data", help=".npz with one array per model input")
    b.add_argument("--rounds", type=int, default=7)
    b.add_argument("--threads", type=int, default=1)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except OptimizeError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
