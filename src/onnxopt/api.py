"""optimize(): load -> PassContext -> PassManager -> export (-> verify)."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import onnx

from . import ir
from .errors import CalibrationError, OptimizeError
from .passes import base
from .passes.base import Pass, PassContext, PassManager, Report


def optimize(model: Union[ir.ModelLike, ir.Source], passes: Optional[Iterable[Union[str, Pass]]] = None, *, calibration=None,
             verify: bool = False, max_iterations: int = 8, return_report: bool = False, seed: int = 0,
             measure_fidelity: Optional[bool] = None):
    """Optimize `model` (path, bytes or ModelProto; never modified) and return a new ModelProto.

    `passes`: registered pass names, preset names ("default", ...) or configured Pass objects;
    None means the "default" preset (exact passes only). `calibration`: feeds for passes that need
    them (see passes.md). `verify=True` runs the original and the result through onnxruntime on
    generated inputs and raises VerificationError naming the first pass that changed the outputs.
    With `return_report=True` the result is `(model, report)`. When an approximate pass (quantization,
    pruning, fp16) changed the model, the result is also run against the original on sample inputs
    (a calibration feed when given) and `report.fidelity` holds max abs diff, cosine and argmax
    agreement (`measure_fidelity=False` skips it, True forces it).
    """
    from . import passes as _registered  # noqa: F401  (registers the built-in passes)

    pipeline = base.resolve(passes)
    if calibration is None:
        needing = [p.name for p in pipeline if p.needs_calibration]
        if needing:
            raise CalibrationError(f"pass(es) {', '.join(needing)} need calibration data: "
                                   "pass calibration=... (see passes.md)")
    source = ir.load_source(model)
    result, report = run_pipeline(source, pipeline, calibration=calibration, max_iterations=max_iterations)
    approximate_changed = any(not p.exact for p in pipeline) and any(
        r.changed for r in report.records if not base.pass_is_exact(pipeline, r.name))
    if measure_fidelity or (measure_fidelity is None and approximate_changed):
        _measure_fidelity(source, result, report, calibration, seed)
    if verify:
        from .verify import verify_pipeline

        verify_pipeline(source, result, pipeline, calibration=calibration, max_iterations=max_iterations,
                        seed=seed, report=report)
    return (result, report) if return_report else result


def _measure_fidelity(source: ir.Source, result: onnx.ModelProto, report: Report, calibration, seed: int) -> None:
    from . import bench, verify

    try:
        original = source.full()
        feeds = verify.sample_feeds(original, calibration, seed)
        ref = verify.run(original, feeds)
        got = verify.run(result, feeds)
    except Exception as exc:  # fidelity is information; a model that cannot run here still optimizes
        report.messages.append(("fidelity", f"not measured: {str(exc).splitlines()[0] if str(exc) else exc!r}"))
        return
    max_abs, cos, agree = bench.fidelity(ref, got)
    report.fidelity = {"max_abs_diff": max_abs, "cosine": cos, "argmax_agreement": agree,
                       "data": "calibration feed" if calibration is not None else "generated inputs"}
    text = f"vs original on {report.fidelity['data']}: max abs diff {max_abs:.3g}, cosine {cos:.6f}"
    if agree is not None:
        text += f", argmax agreement {agree:.4f}"
    report.messages.append(("fidelity", text))


def run_pipeline(source: ir.Source, pipeline, *, calibration=None, max_iterations: int = 8,
                 after_pass=None) -> tuple:
    """Run `pipeline` on a private copy of `source`; returns (ModelProto, Report)."""
    graph = ir.import_graph(source)
    ctx = PassContext(source.proto, calibration=calibration, report=Report())
    PassManager(pipeline, max_iterations=max_iterations, after_pass=after_pass).run(graph, ctx)
    result = ir.export_model(graph, source, hydrate_payloads=False)
    ir.check(result, "internal error: the optimized model", error=OptimizeError)
    ir.hydrate(result, graph.__dict__["_onnxopt_payloads"])
    return result, ctx.report


def save(model: onnx.ModelProto, path, external_data: Optional[bool] = None) -> None:
    """Write atomically; weights go external when they must (>2 GiB) or already were."""
    ir.save(model, path, external_data=external_data)
