"""`onnxopt optimize | passes | inspect | bench`. Bad input: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from typing import List, Optional

from . import ir, progress
from .errors import OptimizeError


def _split_passes(text: Optional[str]):
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    from . import verify
    from .api import _finite_feed, optimize_lazy, save
    from .passes.quantize.calibrate import load_npz_feeds

    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise OptimizeError("output path is the input path: write the result somewhere else")
    ir.check_output_path(args.output)  # before the work: a bad -o must not cost a whole run
    _check_report(args, args.model, args.output)
    passes = _configure(_split_passes(args.passes), target=args.target,
                        autotune=False if args.no_autotune else None)
    source = ir.load_source(args.model)
    calibration = None
    if args.calibration:
        calibration = load_npz_feeds(args.calibration, args.calibration_batch, verify.input_specs(source.proto))
    with warnings.catch_warnings():  # the report says what the warnings would
        warnings.simplefilter("ignore", RuntimeWarning)
        result, report = optimize_lazy(source, passes=passes, calibration=calibration, verify=args.verify)
    print(report.format())
    cmp = None
    if not args.no_bench:  # before writing: an input onnxruntime cannot run is an error, and nothing is written
        feeds = _finite_feed(calibration)  # real data when we have it
        cmp = _compare([(args.model, source.full()), (None, result)], feeds, args)
    save(result, args.output)
    print(f"\nwrote {args.output}")
    if cmp is not None:
        print()
        print(cmp.format(("original", "optimized")))
    if args.report:
        report.to_html(args.report, cmp)
        print(f"wrote {args.report}")
    return 0


def _check_report(args, *others) -> None:
    """--report's library and path, checked before the work (like -o)."""
    if args.report:
        from . import report_html

        report_html.require()
        report_html.check_path(args.report, *others)


def _from_onnxruntime(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


def _compare(models, feeds, args):
    """compare_models on [(user's path or None, model), ...], or None with a note when this
    onnxruntime cannot run a model the user gave (a kernel or custom-op library it lacks). onnxruntime
    refusing such a model as invalid is an InvalidModelError naming it; one that onnxopt made failing
    is a bug: raised as is."""
    from .api import onnxruntime_refusal, refusal_error
    from .bench import compare_models

    try:
        return compare_models(models[0][1], models[1][1], feeds=feeds, rounds=args.rounds, threads=args.threads,
                              progress=True)
    except MemoryError:  # inputs generated from declared dims (2**31 - 1 ...) that do not fit
        print("(no before/after table: inputs of the declared shapes do not fit in memory)")
        return None
    except Exception as exc:
        if not _from_onnxruntime(exc):
            raise
        for path, model in models:
            if path is None:
                continue
            refusal = onnxruntime_refusal(model)
            error = refusal_error(path, refusal) if refusal is not None else None
            if error is not None:
                raise error from None
            if refusal is None:
                refusal = _run_refusal(model, feeds)
            if refusal is not None:
                print(f"(no before/after table: onnxruntime cannot run {path} here: {_one_line(refusal[0])})")
                return None
        raise


def _run_refusal(model, feeds):
    """(onnxruntime's first line,) when running `model` on `feeds` (generated when None) fails, else None."""
    from . import verify

    try:
        verify.session(model, optimization="all").run(None, feeds if feeds is not None else verify.make_feeds(model))
    except Exception as exc:
        if _from_onnxruntime(exc):
            return ((str(exc).strip().splitlines() or [type(exc).__name__])[0],)
        raise
    return None


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
    from . import verify
    from .passes.quantize.calibrate import load_npz_feeds, validate_feed

    _check_report(args, args.original, args.optimized)
    a = ir.load_model(args.original)
    b = ir.load_model(args.optimized)
    feeds = None
    if args.data:
        specs = verify.input_specs(a)
        loaded = load_npz_feeds(args.data, None, specs)
        feeds = validate_feed(loaded[0], specs, 0, where=f"{args.data}")
        if [s[0] for s in verify.input_specs(b)] != [s[0] for s in specs]:
            raise OptimizeError(f"{args.optimized}: its inputs differ from {args.original}'s")
    cmp = _compare([(args.original, a), (args.optimized, b)], feeds, args)
    if cmp is None:
        raise OptimizeError("nothing to compare: onnxruntime cannot run the models here")
    print(cmp.format(("original", "optimized")))
    if args.report:
        from .report_html import write_report

        write_report(args.report, None, cmp, names=("original", "optimized"))
        print(f"wrote {args.report}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2, like every other onnxopt error."""

    def error(self, message):
        self.exit(2, f"onnxopt: error: {self.prog.split()[-1]}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxopt", description="Make ONNX models smaller and faster.")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="run a pass pipeline over a model")
    o.add_argument("model")
    o.add_argument("-o", "--output", required=True)
    o.add_argument("--passes", help="comma-separated pass or preset names (default: the 'default' preset)")
    o.add_argument("--verify", action="store_true", help="check outputs through onnxruntime, name the pass that broke them")
    o.add_argument("--calibration", help="calibration data: .npz (one array per input, samples on axis 0) or a directory of .npz feeds")
    o.add_argument("--calibration-batch", type=_positive_int, default=None,
                   help="samples per calibration feed from an .npz (default: the model's fixed batch, else 8)")
    o.add_argument("--no-autotune", action="store_true",
                   help="int8: skip the cost guard's timing (keep every node the accuracy guard accepts)")
    o.add_argument("--target", choices=["onnxopt", "onnxruntime"],
                   help="quantization target: com.onnxopt fused ops or standard QDQ for plain onnxruntime")
    o.add_argument("--no-bench", action="store_true", help="skip the before/after timing table")
    o.add_argument("--rounds", type=_positive_int, default=7)
    o.add_argument("--threads", type=_positive_int, help="intra-op threads of the timed sessions "
                   "(default: onnxruntime's own choice, as plain onnxruntime runs)")
    _report_flags(o)
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
    b.add_argument("--rounds", type=_positive_int, default=7)
    b.add_argument("--threads", type=_positive_int, help="intra-op threads (default: onnxruntime's own choice)")
    _report_flags(b)
    b.set_defaults(fn=cmd_bench)
    return p


def _report_flags(p) -> None:
    p.add_argument("--report", metavar="OUT.html",
                   help="also write a self-contained HTML report with charts (needs onnxopt[report])")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are drawn only on a terminal)")


def _one_line(text: str) -> str:
    """`text` on one printable line (names from a model may hold newlines or undecodable bytes)."""
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(getattr(args, "quiet", False))
    try:
        code = args.fn(args)
        sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
        return code
    except OptimizeError as exc:
        print(f"onnxopt: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # protobuf decodes a model's strings only when they are read
        print(f"onnxopt: error: the model holds a name or string that is not UTF-8 ({_one_line(exc)})",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`onnxopt inspect m.onnx | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        print("onnxopt: error: output closed before everything was written (broken pipe)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
