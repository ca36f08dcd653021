"""Numerical checks through onnxruntime: generated inputs, running models, comparing outputs, and
verify=True's bisection that names the first pass that broke a model."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import onnx

from . import execution, ir
from .errors import VerificationError

DEFAULT_DIM = 2  # value for symbolic / unknown dimensions


def input_specs(model: onnx.ModelProto) -> List[tuple]:
    """(name, numpy dtype, shape with symbolic dims as strings or None) of the real graph inputs."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        specs.append((vi.name, np.dtype(dtype), shape))
    return specs


MAX_FEED_BYTES = 1 << 34  # a generated input larger than 16 GiB is a declared shape nobody runs


def make_feeds(model: onnx.ModelProto, seed: int = 0, dims: Optional[Dict[str, int]] = None) -> Dict[str, np.ndarray]:
    """Random inputs respecting dtypes and shapes; a symbolic dim gets the same value everywhere."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = {}
    for name, dtype, shape in input_specs(model):
        concrete = []
        for d in shape or []:
            if isinstance(d, int) and d > 0:
                concrete.append(d)
            elif isinstance(d, str):
                concrete.append(dims.setdefault(d, DEFAULT_DIM))
            else:
                concrete.append(DEFAULT_DIM)
        if math.prod(concrete) * max(dtype.itemsize, 1) > MAX_FEED_BYTES:  # numpy says ValueError past 2**63
            raise MemoryError(f"input {name!r} of the declared shape {concrete} does not fit in memory")
        if dtype.kind == "f":
            arr = rng.standard_normal(concrete).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, concrete).astype(bool)
        elif dtype.kind in "iu":
            arr = rng.integers(0, 4, concrete).astype(dtype)  # small: safe as indices and sizes
        elif dtype.kind in "OU":
            arr = np.array(rng.choice(["a", "b"], concrete), dtype=object)
        else:
            arr = np.zeros(concrete, dtype)
        feeds[name] = arr
    return feeds


def sample_feeds(model: onnx.ModelProto, calibration=None, seed: int = 0) -> Dict[str, np.ndarray]:
    """Inputs to compare models on: the first calibration feed when there is calibration data
    (approximate passes are judged on real data: random inputs fall outside calibrated ranges),
    else generated ones."""
    if calibration is not None:
        from .passes.quantize.calibrate import iter_feeds

        feed = next(iter(iter_feeds(calibration)), None)
        if feed is not None:
            return feed
    return make_feeds(model, seed)


def session(model, optimization: str = "disable", threads: int = 1, tmpdir: Optional[str] = None):
    """An onnxruntime session for `model` (ModelProto or path) at `threads` threads, spinning off
    (checks, not timing: they should not hold cores spinning); see execution.session."""
    return execution.session(model, optimization, execution.Settings(threads, spinning=False), tmpdir)


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], **kw) -> List[np.ndarray]:
    sess = session(model, **kw)
    return sess.run(None, feeds)


def compare(ref: List[np.ndarray], got: List[np.ndarray], rtol: float = 1e-4, atol: float = 1e-5) -> Optional[str]:
    """None when outputs agree, else a one-line description of the first difference."""
    if len(ref) != len(got):
        return f"{len(ref)} outputs vs {len(got)}"
    for i, (a, b) in enumerate(zip(ref, got)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.dtype.kind in "fc":
            scale = max(1.0, float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)))
            if not np.allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=True):
                diff = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                return f"output {i}: max abs diff {diff:.3g}"
        elif not np.array_equal(a, b):
            return f"output {i}: values differ"
    return None


def max_abs_diff(ref: List[np.ndarray], got: List[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "fciub" and a.shape == b.shape and a.size:
            worst = max(worst, float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def verify_pipeline(source: "ir.Source", result: onnx.ModelProto, pipeline, *, calibration=None,
                    max_iterations: int = 8, seed: int = 0, report=None, approx_cosine: float = 0.99) -> None:
    """Compare `result` with `source`; on a mismatch, re-run pass by pass to name the culprit."""
    from .api import run_pipeline

    original = source.full()
    feeds = sample_feeds(original, calibration if not all(p.exact for p in pipeline) else None, seed)
    ref = run(original, feeds)
    del original
    exact = all(p.exact for p in pipeline)
    problem = _judge(ref, run(result, feeds), exact, approx_cosine)
    if report is not None:
        report.messages.append(("verify", "outputs match the original" if problem is None else problem))
    if problem is None:
        return
    culprit = {}
    seen: list = []  # passes run so far in the bisection: exactness of the prefix sets the tolerance

    def after(p, graph, ctx):
        seen.append(p)
        if culprit:
            return
        got = run(ir.export_model(graph, source), feeds)
        bad = _judge(ref, got, all(q.exact for q in seen), approx_cosine)
        if bad is not None:
            culprit["pass"], culprit["why"] = p.name, bad

    run_pipeline(source, pipeline, calibration=calibration, max_iterations=max_iterations, after_pass=after)
    name = culprit.get("pass", "<export>")
    why = culprit.get("why", problem)
    raise VerificationError(f"verify: pass {name!r} changed the model's outputs ({why})", pass_name=name,
                            max_abs_diff=max_abs_diff(ref, run(result, feeds)))


def _judge(ref, got, exact: bool, approx_cosine: float) -> Optional[str]:
    if exact:
        return compare(ref, got)
    shape_problem = compare([np.zeros(np.shape(a), np.asarray(a).dtype) for a in ref],
                            [np.zeros(np.shape(b), np.asarray(b).dtype) for b in got])
    if shape_problem:
        return shape_problem
    for i, (a, b) in enumerate(zip(ref, got)):
        a = np.asarray(a, np.float64).ravel()
        b = np.asarray(b, np.float64).ravel()
        if a.size == 0:
            continue
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cos = float(a @ b / denom) if denom > 0 else float(np.allclose(a, b))
        if cos < approx_cosine:
            return f"output {i}: cosine {cos:.4f} < {approx_cosine}"
    return None
