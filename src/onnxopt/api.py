"""optimize(): load -> PassContext -> PassManager -> export (-> verify)."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import onnx

from . import ir
from .errors import CalibrationError, OptimizeError
from .passes import base
from .passes.base import Pass, PassContext, PassManager, Report


def optimize(model: Union[ir.ModelLike, ir.Source], passes: Optional[Iterable[Union[str, Pass]]] = None, *, calibration=None,
             verify: bool = False, max_iterations: int = 8, return_report: bool = False, seed: int = 0):
    """Optimize `model` (path, bytes or ModelProto; never modified) and return a new ModelProto.

    `passes`: registered pass names, preset names ("default", ...) or configured Pass objects;
    None means the "default" preset (exact passes only). `calibration`: feeds for passes that need
    them (see passes.md). `verify=True` runs the original and the result through onnxruntime on
    generated inputs and raises VerificationError naming the first pass that changed the outputs.
    With `return_report=True` the result is `(model, report)`.
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
    if verify:
        from .verify import verify_pipeline

        verify_pipeline(source, result, pipeline, calibration=calibration, max_iterations=max_iterations,
                        seed=seed, report=report)
    return (result, report) if return_report else result


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
