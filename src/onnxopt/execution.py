"""Running models below the passes: one onnxruntime session factory and the timing of (session, feed)
pairs at given settings. Imports only ir and runtime (nothing that runs passes).

Timing decisions (the quantization guard, benchmarks) are made at the settings the user deploys with:
`Settings()` is onnxruntime's own defaults (it picks the intra-op thread count, spinning on).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort

from . import ir
from .progress import bar as progress_bar
from .runtime import DOMAIN, InferenceSession

# What running a model can raise: onnxruntime's errors (not RuntimeError subclasses), the Python
# fallback ops' ValueError, onnx's checker.
RUN_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
              ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.RuntimeException,
              ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
              RuntimeError, ValueError, onnx.checker.ValidationError)
SPINNING_KEY = "session.intra_op.allow_spinning"
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The session settings a model runs (and is timed) at; None / 0 leave onnxruntime's default."""

    threads: int = 0  # intra_op_num_threads; 0: onnxruntime picks (its default)
    spinning: Optional[bool] = None  # session.intra_op.allow_spinning; None: onnxruntime's default (on)

    def describe(self) -> str:
        t = f"{self.threads} intra-op thread(s)" if self.threads > 0 else "intra-op threads as onnxruntime picks"
        s = ("spinning on" if self.spinning else "spinning off") if self.spinning is not None else \
            "spinning as onnxruntime sets it"
        return f"{t}, {s}"

    def session_options(self, optimization: str = "all") -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = OPTIMIZATION[optimization]
        so.log_severity_level = 3
        if self.threads > 0:
            so.intra_op_num_threads = int(self.threads)
        if self.spinning is not None:
            so.add_session_config_entry(SPINNING_KEY, "1" if self.spinning else "0")
        return so


ORT_DEFAULTS = Settings()


def session(model, optimization: str = "all", settings: Settings = ORT_DEFAULTS, tmpdir: Optional[str] = None):
    """An onnxruntime session for `model` (ModelProto or path) at `settings`; the custom-op library
    is registered when the model uses com.onnxopt ops."""
    so = settings.session_options(optimization)
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):  # a path: only the structure is read to decide
        path = os.fspath(model)
        model = onnx.load(path, load_external_data=False)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            return ort.InferenceSession(path, so, providers=providers)
        model = onnx.load(path)
    session_class = InferenceSession if any(o.domain == DOMAIN for o in model.opset_import) else ort.InferenceSession
    if ir.needs_external(model):  # weights kept on disk (onnxopt's markers, which onnxruntime refuses) or > 2 GiB
        own = tmpdir is None
        tmpdir = tmpdir or tempfile.mkdtemp(prefix="onnxopt-session-")
        path = os.path.join(tmpdir, "model.onnx")
        try:
            ir.save(model, path)
            return session_class(path, sess_options=so, providers=providers)
        finally:
            if own:  # the session holds (or maps) its weights: the files are not needed past loading
                shutil.rmtree(tmpdir, ignore_errors=True)
    return session_class(model.SerializeToString(), sess_options=so, providers=providers)


def time_pairs(pairs: Sequence[Tuple[object, Dict[str, np.ndarray]]], rounds: int = 7, min_time: float = 0.05,
               progress: bool = False) -> List[List[float]]:
    """Milliseconds per run of each (session, feed) pair, one sample per round: the pairs run
    interleaved round by round, each round a batch of calls sized to about `min_time` seconds."""
    for s, f in pairs:  # warm-up
        s.run(None, f)
    per_round = []
    for s, f in pairs:
        t0 = time.perf_counter()
        s.run(None, f)
        per_round.append(max(1, int(min_time / max(time.perf_counter() - t0, 1e-6))))
    samples: List[List[float]] = [[] for _ in pairs]
    rounds_bar = progress_bar(total=rounds, desc="timing", unit="round", show=progress)
    for r in range(rounds):
        for i, (s, f) in enumerate(pairs):
            n = per_round[i]
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, f)
            samples[i].append((time.perf_counter() - t0) / n * 1e3)
        rounds_bar.update()
    rounds_bar.close()
    return samples


def time_models(models: Sequence[onnx.ModelProto], feeds: Sequence[Dict[str, np.ndarray]],
                settings: Settings = ORT_DEFAULTS, rounds: int = 7, min_time: float = 0.03) -> List[List[float]]:
    """Per-round milliseconds of each model on its own feed at `settings` (ORT_ENABLE_ALL, interleaved)."""
    pairs = [(session(m, "all", settings), f) for m, f in zip(models, feeds)]
    return time_pairs(pairs, rounds=rounds, min_time=min_time)
