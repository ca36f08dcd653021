"""Before/after comparison of two models through onnxruntime: latency (interleaved, medians of
rounds, measured in one process), size, node count and output fidelity."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import onnx

from . import execution, ir, verify


@dataclasses.dataclass
class Comparison:
    nodes: tuple
    size: tuple
    latency_ms: tuple  # medians
    max_abs_diff: float
    cosine: float
    argmax_agreement: Optional[float]
    rounds: int
    samples_ms: tuple = ()  # per model, every round's milliseconds (the distribution behind the medians)
    settings: str = ""  # the session settings the latency was measured at

    @property
    def speedup(self) -> float:
        return self.latency_ms[0] / self.latency_ms[1] if self.latency_ms[1] > 0 else float("nan")

    def format(self, names=("before", "after")) -> str:
        b, a = names
        rows = [
            ("nodes", f"{self.nodes[0]}", f"{self.nodes[1]}", f"{self.nodes[1] / max(self.nodes[0], 1):.2f}x"),
            ("size", _human(self.size[0]), _human(self.size[1]), f"{self.size[1] / max(self.size[0], 1):.2f}x"),
            ("latency (median)", f"{self.latency_ms[0]:.3f} ms", f"{self.latency_ms[1]:.3f} ms",
             f"{self.speedup:.2f}x faster"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(b), *(len(r[1]) for r in rows))
        w2 = max(len(a), *(len(r[2]) for r in rows))
        lines = [f"{'':<{w0}}  {b:>{w1}}  {a:>{w2}}  ratio", "-" * (w0 + w1 + w2 + 18)]
        lines += [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]}" for r in rows]
        fid = f"max abs diff {self.max_abs_diff:.3g}, cosine {self.cosine:.6f}"
        if self.argmax_agreement is not None:
            fid += f", argmax agreement {self.argmax_agreement:.4f}"
        lines.append(f"fidelity: {fid}  (onnxruntime, same inputs; latency: {self.rounds} interleaved rounds)")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def time_sessions(sessions, feeds: Dict[str, np.ndarray], rounds: int = 7, min_time: float = 0.05,
                  progress: bool = False) -> List[float]:
    """Median milliseconds per run of each session on `feeds`, measured interleaved round by round."""
    samples = execution.time_pairs([(s, feeds) for s in sessions], rounds, min_time, progress)
    return [float(np.median(s)) for s in samples]


def fidelity(ref: List[np.ndarray], got: List[np.ndarray]) -> tuple:
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in ref]) if ref else np.zeros(0)
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in got]) if got else np.zeros(0)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom > 0 else (1.0 if np.allclose(a, b) else 0.0)
    agree = None
    first_ref, first_got = np.asarray(ref[0]), np.asarray(got[0])
    if first_ref.ndim >= 2 and first_ref.shape[-1] > 1 and first_ref.dtype.kind == "f":
        agree = float(np.mean(first_ref.argmax(-1) == first_got.argmax(-1)))
    return max_abs, cos, agree


def compare_models(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Optional[Dict] = None,
                   rounds: int = 7, threads: Optional[int] = None, optimization: str = "all", progress: bool = False,
                   seed: int = 0) -> Comparison:
    """Both models timed interleaved at onnxruntime's default session settings (what users run), or at
    `threads` intra-op threads with onnxruntime's default spinning."""
    settings_used = execution.Settings(threads or 0)
    # sessions first: a model onnxruntime refuses says so before inputs of its declared shapes are made
    s_before = execution.session(before, optimization, settings_used)
    s_after = execution.session(after, optimization, settings_used)
    feeds = feeds if feeds is not None else verify.make_feeds(before, seed)
    ref = s_before.run(None, feeds)
    got = s_after.run(None, feeds)
    max_abs, cos, agree = fidelity(ref, got)
    samples = execution.time_pairs([(s_before, feeds), (s_after, feeds)], rounds, progress=progress)
    lat = [float(np.median(s)) for s in samples]
    settings = f"graph optimization {optimization}, {settings_used.describe()}"
    return Comparison(nodes=(ir_count(before), ir_count(after)), size=(ir.model_size(before), ir.model_size(after)),
                      latency_ms=(lat[0], lat[1]), max_abs_diff=max_abs, cosine=cos, argmax_agreement=agree,
                      rounds=rounds, samples_ms=tuple(tuple(s) for s in samples), settings=settings)


def ir_count(model: onnx.ModelProto) -> int:
    return sum(1 for _ in ir.walk_nodes(model.graph))
