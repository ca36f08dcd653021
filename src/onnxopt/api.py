"""optimize(): load -> PassContext -> PassManager -> export (-> verify)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Iterable, Optional, Union

import onnx

from . import ir
from .errors import CalibrationError, InvalidModelError, OptimizeError, UnsupportedModelError
from .passes import base
from .passes.base import Pass, PassContext, PassManager, Report


def optimize(model: Union[ir.ModelLike, ir.Source], passes: Optional[Iterable[Union[str, Pass]]] = None, *, calibration=None,
             verify: bool = False, max_iterations: int = 8, return_report: bool = False, seed: int = 0,
             measure_fidelity: Optional[bool] = None):
    """Optimize `model` (path, bytes or ModelProto; never modified) and return a new ModelProto.

    `passes`: registered pass names, preset names ("default", ...) or configured Pass objects;
    None means the "default" preset (exact passes only). `calibration`: feeds for passes that need
    them (see passes.md): a list of feed dicts, a callable or reader, or the path of an .npz (split to
    the model's fixed batch, else batches of 8) or of a directory of .npz feeds. `verify=True` runs the original and the result through onnxruntime on
    generated inputs and raises VerificationError naming the first pass that changed the outputs.
    With `return_report=True` the result is `(model, report)`. When an approximate pass (quantization,
    pruning, fp16) changed the model, the result is also run against the original on sample inputs
    (a calibration feed when given) and `report.fidelity` holds max abs diff, cosine and argmax
    agreement (`measure_fidelity=False` skips it, True forces it).

    The result is what `onnx.load` gives: weights in the proto, so a plain `onnx.save` writes a
    model onnxruntime loads. Above 2 GiB the weights stay on disk and only `onnxopt.save` can write
    it (a plain `onnx.save` stops with an error saying so).
    """
    source = ir.load_source(model)
    result, report = optimize_lazy(source, passes, calibration=calibration, verify=verify,
                                   max_iterations=max_iterations, seed=seed, measure_fidelity=measure_fidelity)
    # before the weights come into memory: onnxruntime holds its own copy while it loads the model
    result = _loading_in_onnxruntime(source, result, report)
    ir.materialize(result)
    return (result, report) if return_report else result


def optimize_lazy(model, passes=None, *, calibration=None, verify: bool = False, max_iterations: int = 8,
                  seed: int = 0, measure_fidelity: Optional[bool] = None) -> tuple:
    """`optimize` returning (model, report) with external weights still on disk (lazy markers only
    this process resolves): for `onnxopt.save` in the same process, which streams them. Unlike
    `optimize` it does not load the result in onnxruntime (that would hold the weights in memory):
    the CLI's before/after bench does."""
    from . import passes as _registered  # noqa: F401  (registers the built-in passes)

    pipeline = base.resolve(passes)
    if calibration is None:
        needing = [p.name for p in pipeline if p.needs_calibration]
        if needing:
            raise CalibrationError(f"pass(es) {', '.join(needing)} need calibration data: "
                                   "pass calibration=... (see passes.md)")
    source = ir.load_source(model)
    calibration, notes = _prepare_calibration(calibration, source)
    result, report = run_pipeline(source, pipeline, calibration=calibration, max_iterations=max_iterations)
    report.messages[:0] = [("calibration", text) for text in notes]
    approximate_changed = any(not p.exact for p in pipeline) and any(
        r.changed for r in report.records if not base.pass_is_exact(pipeline, r.name))
    if measure_fidelity or (measure_fidelity is None and approximate_changed):
        _measure_fidelity(source, result, report, calibration, seed)
    if verify:
        from .verify import verify_pipeline

        verify_pipeline(source, result, pipeline, calibration=calibration, max_iterations=max_iterations,
                        seed=seed, report=report)
    return result, report


def _prepare_calibration(calibration, source: ir.Source):
    """(calibration, notes): a path loaded into feeds; materialized feeds checked up front, in order,
    so an error names the first bad batch; notes on NaN/Inf values (also warned)."""
    if calibration is None:
        return None, []
    from . import verify
    from .passes.quantize import calibrate

    specs = verify.input_specs(source.proto)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = calibrate.load_npz_feeds(calibration, None, specs)
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)):
        return calibration, []  # a stream: each batch is checked when it runs
    calibration, notes = calibrate.validate_feeds(list(calibration), specs)
    _check_runs_in_onnxruntime(source, calibration[0])
    for text in notes:
        warnings.warn(f"calibration data: {text}", RuntimeWarning, stacklevel=3)
    return calibration, notes


# onnxruntime refusing a model for what the model says (types, shapes, attributes: "invalid"), for
# an opset it does not support ("unsupported"), or for what this installation lacks (a kernel, a
# custom-op library, a locale: "unavailable", which says nothing of the model)
_REFUSAL_MARKS = (("invalid", ("ShapeInferenceError", "TypeInferenceError", "Type Error", "INVALID_GRAPH",
                               "This is an invalid model", "Invalid tensor data type")),
                  ("unsupported", ("ValidateOpsetForDomain",)))


def refusal_error(path: str, refusal: tuple) -> Optional[OptimizeError]:
    """The error for an onnxruntime refusal that is the model's doing, None for an "unavailable" one."""
    text, kind = refusal
    if kind == "invalid":
        return InvalidModelError(f"{path}: onnxruntime refuses the model: {text}")
    if kind == "unsupported":
        return UnsupportedModelError(f"{path}: this onnxruntime does not support the model's opsets: {text}")
    return None


def onnxruntime_refusal(model) -> Optional[tuple]:
    """(first line of onnxruntime's refusal to load `model`, "invalid" | "unsupported" | "unavailable"),
    or None when it loads or cannot be tried here (no custom-op library). `model`: a ModelProto
    (written to a temp folder, weights streamed) or a path."""
    import tempfile

    from . import verify

    with tempfile.TemporaryDirectory(prefix="onnxopt-load-") as folder:
        path = model
        if isinstance(model, onnx.ModelProto):
            path = os.path.join(folder, "model.onnx")
            ir.save(model, path)
        try:
            verify.session(path, optimization="all")  # as users load it: onnxruntime's optimizer may refuse too
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                return None
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            kind = next((k for k, marks in _REFUSAL_MARKS if any(m in text for m in marks)), "unavailable")
            return text, kind
    return None


def _loading_in_onnxruntime(source: ir.Source, result: onnx.ModelProto, report: Report) -> onnx.ModelProto:
    """`result`, checked to load in onnxruntime as the contract says. When it does not: an input that
    onnxruntime refuses as invalid is an InvalidModelError; an input it loads means the optimization
    broke it, and the input comes back unchanged with the reason in the report (a valid model never
    makes onnxopt fail); an input it cannot load for want of a kernel or a custom-op library leaves
    nothing to compare with (the result is returned, the report says it was not checked)."""
    refusal = onnxruntime_refusal(result)
    if refusal is None:
        return result
    original = source.full()
    own = onnxruntime_refusal(original)
    error = refusal_error(source.where, own) if own is not None else None
    if error is not None:
        raise error
    if own is not None:
        report.messages.append(("onnxruntime", f"not checked: this onnxruntime cannot load the input either ({own[0]})"))
        return result
    text = f"the optimized model does not load in onnxruntime ({refusal[0]}): the input is returned unchanged"
    report.messages.append(("onnxruntime", text))
    warnings.warn(f"onnxopt: {text}", RuntimeWarning, stacklevel=3)
    return original


def _check_runs_in_onnxruntime(source: ir.Source, feed: dict) -> None:
    """Calibration runs the model in onnxruntime: a model it refuses is an InvalidModelError naming
    the model, before the pipeline starts, not an onnxruntime traceback from inside a pass."""
    from . import verify

    try:
        verify.session(source.full(), optimization="disable").run(None, feed)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{source.where}: onnxruntime cannot run it on the calibration data: {first}") \
            from None


def _finite_feed(calibration):
    """The first calibration feed whose float inputs are all finite (None without one)."""
    import numpy as np

    for feed in calibration if isinstance(calibration, (list, tuple)) else []:
        if all(np.asarray(a).dtype.kind not in "fc" or np.isfinite(a).all() for a in feed.values()):
            return feed
    return None


def _finite_samples(ref: list, got: list):
    """(ref, got) keeping only the samples (axis 0) whose outputs are finite in both, and how many
    were dropped; outputs without a common batch axis are kept whole."""
    import numpy as np

    arrays = [np.asarray(a) for a in ref + got]
    floats = [a for a in arrays if a.dtype.kind in "fc" and a.ndim]
    n = {a.shape[0] for a in floats}
    if len(n) != 1:
        return ref, got, 0
    keep = np.ones(n.pop(), bool)
    for a in floats:
        keep &= np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    if keep.all():
        return ref, got, 0
    cut = [a[keep] if a.ndim and a.shape[0] == keep.size else a for a in arrays]
    return cut[:len(ref)], cut[len(ref):], int((~keep).sum())


# below this cosine between the result's outputs and the original's, optimize() warns (the int8 guard's
# default tolerance; with the guard off nothing else would say it)
FIDELITY_WARNING_COSINE = 0.995


def _measure_fidelity(source: ir.Source, result: onnx.ModelProto, report: Report, calibration, seed: int) -> None:
    from . import bench, verify

    try:
        original = source.full()
        feeds = _finite_feed(calibration) or verify.sample_feeds(original, calibration, seed)
        ref = verify.run(original, feeds)
        got = verify.run(result, feeds)
    except Exception as exc:  # fidelity is information; a model that cannot run here still optimizes
        report.messages.append(("fidelity", f"not measured: {str(exc).splitlines()[0] if str(exc) else exc!r}"))
        return
    ref, got, dropped = _finite_samples(ref, got)
    if dropped and not any(len(a) for a in ref if getattr(a, "ndim", 0)):
        report.messages.append(("fidelity", f"not measured: every sample's outputs hold NaN/Inf ({dropped})"))
        return
    max_abs, cos, agree = bench.fidelity(ref, got)
    report.fidelity = {"max_abs_diff": max_abs, "cosine": cos, "argmax_agreement": agree,
                       "data": "calibration feed" if calibration is not None else "generated inputs"}
    text = f"vs original on {report.fidelity['data']}: max abs diff {max_abs:.3g}, cosine {cos:.6f}"
    if agree is not None:
        text += f", argmax agreement {agree:.4f}"
    if dropped:
        text += f" ({dropped} sample(s) with NaN/Inf outputs left out)"
    report.messages.append(("fidelity", text))
    if not cos >= FIDELITY_WARNING_COSINE:  # NaN included: a result this far off is never returned silently
        text = (f"the result's outputs are far from the original's (cosine {cos:.4f} < {FIDELITY_WARNING_COSINE} on the "
                f"{report.fidelity['data']}): check the calibration data (outliers, scale) or keep the accuracy guard on")
        report.messages.append(("fidelity", "warning: " + text))
        warnings.warn(f"onnxopt: {text}", RuntimeWarning, stacklevel=4)


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
    """Write atomically; weights go to `<path>.data` when asked, when they must (>2 GiB) or when
    they are still on disk. Output files get the mode the umask gives plain files."""
    ir.save(model, path, external_data=external_data)
