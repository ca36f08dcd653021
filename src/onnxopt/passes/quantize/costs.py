"""How the quantization guard measures cost: timings with their spread, decisions that only reject
what is slower beyond the spread (re-measured when a difference is within it), and the audit of the
QDQ onnxruntime did not fuse.

A timer is `timer(models, feeds) -> one entry per model`: milliseconds, or a list of per-round
milliseconds (the default timer's, so the spread is known). Tests inject timers; nothing decides by
the machine's load unless it times.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import onnx

from ... import execution, ir, runtime
from ...errors import PassOptionError

NOISE_FLOOR = 0.02  # relative spread assumed at least: differences under 2% are never evidence
RETIMES = 2  # extra timings (pooled with the first) when a decision falls within the spread
FUSED_ORT_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                 "ConvInteger", "MatMulInteger", "QAttention"}
T = TypeVar("T")


class Timed:
    """One model's timing: its per-round samples, their median and relative spread."""

    def __init__(self, samples: Sequence[float]):
        self.samples = [float(s) for s in samples]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def spread(self) -> float:
        """Relative interquartile range of the samples, at least NOISE_FLOOR."""
        m = self.median
        if len(self.samples) < 2 or m <= 0:
            return NOISE_FLOOR
        q1, q3 = np.percentile(self.samples, [25, 75])
        return max(NOISE_FLOOR, float(q3 - q1) / m)

    def pooled(self, other: "Timed") -> "Timed":
        return Timed(self.samples + other.samples)


def timed(entry) -> Timed:
    return Timed(entry if isinstance(entry, (list, tuple, np.ndarray)) else [entry])


def pays(slow: Timed, fast: Timed, margin: float) -> Optional[bool]:
    """Is `fast` at least `margin` times faster than `slow`? False only when below it beyond the
    spread, True when above it beyond the spread, None within (re-measure)."""
    ratio = slow.median / fast.median if fast.median > 0 else float("inf")
    band = max(slow.spread, fast.spread)
    if ratio < margin * (1 - band):
        return False
    if ratio >= margin * (1 + band):
        return True
    return None


def not_slower(a: Timed, b: Timed, spread: bool = True) -> bool:
    """`a` is not slower than `b` beyond the spread of the two (spread=False: by the medians)."""
    return a.median <= b.median * (1 + (max(a.spread, b.spread) if spread else 0.0))


class Clock:
    """The guard's timer with bookkeeping: whole-model timings are counted (the search's cost) and a
    decision within the spread is timed again, the samples pooled, at most RETIMES times."""

    def __init__(self, timer: Callable, settings: execution.Settings):
        self.timer, self.settings = timer, settings
        self.whole = 0  # whole-model timing calls (each times its models interleaved)
        self.single = 0  # single-op timing calls

    def time(self, models: Sequence[onnx.ModelProto], feeds: Sequence[dict], whole: bool = True) -> List[Timed]:
        if whole:
            self.whole += 1
        else:
            self.single += 1
        got = list(self.timer(list(models), list(feeds)))
        if len(got) != len(models):
            raise PassOptionError(f"quantize_auto: the timer gave {len(got)} timing(s) for {len(models)} models")
        return [timed(t) for t in got]

    def decide(self, models: Sequence[onnx.ModelProto], feeds: Sequence[dict],
               verdict: Callable[[List[Timed]], Optional[T]], whole: bool = True) -> Tuple[Optional[T], List[Timed]]:
        """`verdict` of the timings, re-timed while it says None (within the spread); None at the end
        means the difference stayed within the spread."""
        t = self.time(models, feeds, whole)
        v = verdict(t)
        for _ in range(RETIMES):
            if v is not None:
                break
            t = [a.pooled(b) for a, b in zip(t, self.time(models, feeds, whole))]
            v = verdict(t)
        return v, t


def default_timer(settings: execution.Settings) -> Callable:
    return lambda models, feeds: execution.time_models(models, feeds, settings)


def fusion_audit(model: onnx.ModelProto) -> dict:
    """Float Conv/MatMul/Gemm that onnxruntime left reading a DequantizeLinear (QDQ it did not fuse
    into an integer kernel, slower than plain fp32) against the integer ops it formed."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxopt-audit-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3
        if runtime.uses_custom_ops(model):  # a mixed model: com.onnxopt ops next to the QDQ
            runtime.register_custom_ops(so)
        src = os.path.join(d, "model.onnx")
        ir.save(model, src)
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    nodes = list(ir.walk_nodes(opt.graph))
    producer = {o: n for n in nodes for o in n.output}
    fused = sum(1 for n in nodes if n.op_type in FUSED_ORT_OPS)
    unfused = [n.name or n.op_type for n in nodes
               if n.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")
               and any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in n.input[:2])]
    total = fused + len(unfused)
    return {"fused": fused, "unfused": unfused, "coverage": fused / total if total else 1.0}


def medians(timings: Sequence[Timed]) -> List[float]:
    return [t.median for t in timings]

