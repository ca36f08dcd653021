"""Calibration: stream feeds through the float model and collect activation ranges.

`ctx.calibration` is an iterable of feed dicts, a callable returning one, an object with `get_next()`
(onnxruntime's CalibrationDataReader; None ends it) or a single feed dict. Every feed is checked
against the model's inputs (names, dtypes, ranks, fixed dimensions) before it runs. The needed
intermediate tensors become extra outputs of a copy of the model, run by onnxruntime batch by batch;
only per-tensor statistics are kept (min/max, or a fixed-size histogram), so memory is bounded by the
number of tensors times the number of bins, not by the amount of data.

Methods: `minmax` (the observed range), `percentile` (drop the `percentile`-th tails of each side of
the histogram), `entropy` (the range whose 255-level quantization loses the least information, KL
divergence as in TensorRT's calibrator, over the same histogram).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import onnx

from ... import ir, verify
from ...errors import CalibrationError

METHODS = ("minmax", "percentile", "entropy")


# ------------------------------------------------------------------------------------------- feeds

def iter_feeds(calibration) -> Iterator[dict]:
    """The feed dicts of any accepted calibration source, lazily."""
    if calibration is None:
        raise CalibrationError("no calibration data: pass calibration=... (see passes.md)")
    if isinstance(calibration, Mapping):
        yield calibration
        return
    if hasattr(calibration, "get_next"):
        if hasattr(calibration, "rewind"):
            try:
                calibration.rewind()
            except Exception:  # a reader that cannot rewind is read once
                pass
        while True:
            feed = calibration.get_next()
            if feed is None:
                return
            yield feed
    src = calibration() if callable(calibration) else calibration
    if isinstance(src, Mapping):
        yield src
        return
    try:
        it = iter(src)
    except TypeError:
        raise CalibrationError(
            f"calibration must be an iterable of feed dicts, a callable returning one or an object with "
            f"get_next(); got {type(calibration).__name__}") from None
    yield from it


def validate_feed(feed, specs: List[tuple], index: int) -> Dict[str, np.ndarray]:
    """`feed` checked against the model inputs `specs` ((name, dtype, shape) from verify.input_specs)."""
    where = f"calibration batch {index}"
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    names = [s[0] for s in specs]
    unknown = sorted(set(feed) - set(names))
    missing = [n for n in names if n not in feed]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        raise CalibrationError(f"{where}: {'; '.join(parts)} (the model's inputs are {', '.join(map(repr, names))})")
    out = {}
    for name, dtype, shape in specs:
        arr = feed[name]
        if not isinstance(arr, np.ndarray):
            raise CalibrationError(f"{where}: input {name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != dtype:
            raise CalibrationError(f"{where}: input {name!r} has dtype {arr.dtype}, the model wants {dtype}")
        if shape is not None:
            if arr.ndim != len(shape):
                raise CalibrationError(f"{where}: input {name!r} has shape {list(arr.shape)}, the model wants "
                                       f"rank {len(shape)} {_fmt_shape(shape)}")
            for d, want in zip(arr.shape, shape):
                if isinstance(want, int) and want > 0 and d != want:
                    raise CalibrationError(f"{where}: input {name!r} has shape {list(arr.shape)}, the model "
                                           f"wants {_fmt_shape(shape)}")
        if arr.size == 0:
            raise CalibrationError(f"{where}: input {name!r} is empty (shape {list(arr.shape)})")
        out[name] = arr
    return out


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


# ---------------------------------------------------------------------------------------- statistics

class Histogram:
    """Counts over [lo, hi] in a fixed number of bins; the range doubles (merging bin pairs, exactly)
    whenever data falls outside it, so any stream fits in `bins` counters. The range always holds 0."""

    def __init__(self, bins: int = 2048):
        self.bins = bins - bins % 2
        self.counts: Optional[np.ndarray] = None
        self.lo = self.hi = 0.0
        self.min, self.max = np.inf, -np.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        mn, mx = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        if self.counts is None:
            self.lo, self.hi = min(mn, 0.0), max(mx, 0.0)
            if self.hi == self.lo:
                self.hi = self.lo + 1e-30
            self.counts = np.zeros(self.bins, np.int64)
        while mn < self.lo or mx > self.hi:
            self._grow(left=mn < self.lo)
        c, _ = np.histogram(x, self.bins, (self.lo, self.hi))
        self.counts += c

    def _grow(self, left: bool) -> None:
        width = self.hi - self.lo
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        new = np.zeros_like(self.counts)
        half = self.bins // 2
        if left:
            new[half:] = merged
            self.lo -= width
        else:
            new[:half] = merged
            self.hi += width
        self.counts = new

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def percentile_range(self, percentile: float) -> Tuple[float, float]:
        total = self.counts.sum()
        cum = np.cumsum(self.counts)
        tail = total * (100.0 - percentile) / 100.0
        edges = self.edges
        lo_bin = int(np.searchsorted(cum, tail, side="right"))
        hi_bin = int(np.searchsorted(cum, total - tail, side="left"))
        lo = edges[min(lo_bin, self.bins - 1)] if self.min < 0 else 0.0
        hi = edges[min(hi_bin + 1, self.bins)]
        return max(float(lo), self.min), min(float(hi), self.max)

    def entropy_range(self, levels: int = 255, stride: int = 0) -> Tuple[float, float]:
        """The window of bins around 0 minimizing KL(P || quantized P), its outliers folded into the edge bins."""
        counts = self.counts.astype(np.float64)
        n = self.bins
        edges = self.edges
        zero = int(np.clip(round((0.0 - self.lo) / (self.hi - self.lo) * n), 0, n))
        # 0 is exact in every u8 grid with a zero point: the spike of zeros (ReLU outputs, padding)
        # would otherwise make any window coarser than one bin per level look lossy.
        counts[min(int((0.0 - self.lo) / (self.hi - self.lo) * n), n - 1)] = 0
        stride = stride or max(1, n // 256)
        best, best_win = np.inf, (0, n)
        if zero <= 0 or zero >= n:  # one-sided data: shrink the far end only
            widths = range(min(levels, n), n + 1, stride)
            windows = [(0, w) for w in widths] if zero <= 0 else [(n - w, n) for w in widths]
        else:
            widths = range(max(1, levels // 2), max(zero, n - zero) + 1, stride)
            windows = sorted({(max(0, zero - w), min(n, zero + w)) for w in widths})
        for a, b in windows:
            if b - a < levels:
                continue
            p = counts[a:b].copy()
            p[0] += counts[:a].sum()
            p[-1] += counts[b:].sum()
            # the quantized distribution: each of `levels` chunks spreads its in-window mass evenly
            # over its non-empty bins (outliers are what clipping loses, so they are left out here)
            inner = counts[a:b]
            bounds = np.linspace(0, b - a, levels + 1).astype(np.int64)
            starts = bounds[:-1]
            sums = np.add.reduceat(inner, starts)
            nonzero = np.add.reduceat((inner > 0).astype(np.float64), starts)
            per = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
            q = np.repeat(per, np.diff(bounds)) * (inner > 0)
            ps, qs = p.sum(), q.sum()
            if ps <= 0 or qs <= 0:
                continue
            p, q = p / ps, q / qs
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best:
                best, best_win = kl, (a, b)
        a, b = best_win
        lo = float(edges[a]) if self.min < 0 else 0.0
        return max(lo, self.min), min(float(edges[b]), self.max)


class RangeCollector:
    """Per-tensor statistics for one calibration method."""

    def __init__(self, method: str = "minmax", percentile: float = 99.999, bins: int = 2048):
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method, self.percentile, self.bins = method, percentile, bins
        self.minmax: Dict[str, List[float]] = {}
        self.hists: Dict[str, Histogram] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        v = np.asarray(value)
        if v.dtype.kind != "f" or v.size == 0:
            return
        if self.method == "minmax":
            finite = v[np.isfinite(v)] if not np.all(np.isfinite(v)) else v
            if finite.size == 0:
                return
            lo, hi = float(finite.min()), float(finite.max())
            cur = self.minmax.get(name)
            self.minmax[name] = [lo, hi] if cur is None else [min(cur[0], lo), max(cur[1], hi)]
        else:
            self.hists.setdefault(name, Histogram(self.bins)).add(v)

    def ranges(self) -> Dict[str, Tuple[float, float]]:
        if self.method == "minmax":
            return {k: (v[0], v[1]) for k, v in self.minmax.items()}
        out = {}
        for k, h in self.hists.items():
            if h.counts is None:
                continue
            out[k] = h.percentile_range(self.percentile) if self.method == "percentile" else h.entropy_range()
        return out


# ------------------------------------------------------------------------------------------- running

def model_with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """`model` (modified in place) with the float tensors `names` added as graph outputs."""
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return model


def collect_ranges(model: onnx.ModelProto, tensors: List[str], calibration, *, method: str = "minmax",
                   percentile: float = 99.999, bins: int = 2048, progress: bool = True,
                   max_batches: Optional[int] = None) -> Dict[str, Tuple[float, float]]:
    """Activation range of each of `tensors` (names in `model`) over the calibration feeds."""
    specs = verify.input_specs(model)
    input_names = {s[0] for s in specs}
    wanted = [t for t in dict.fromkeys(tensors)]
    extra = [t for t in wanted if t not in input_names]
    model_with_outputs(model, extra)
    sess = verify.session(model, optimization="basic", threads=0)
    collector = RangeCollector(method, percentile, bins)
    t0 = time.perf_counter()
    batches = samples = 0
    show = progress and sys.stderr is not None
    live = show and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()  # redraw one line on a terminal
    for feed in iter_feeds(calibration):
        feed = validate_feed(feed, specs, batches)
        outs = sess.run([n for n in extra], feed)
        for name, value in zip(extra, outs):
            collector.add(name, value)
        for name in wanted:
            if name in input_names:
                collector.add(name, feed[name])
        batches += 1
        first = next(iter(feed.values()))
        samples += int(first.shape[0]) if first.ndim else 1
        if live:
            sys.stderr.write(f"\r[onnxopt] calibrating ({method}): {batches} batch(es), {samples} sample(s), "
                             f"{time.perf_counter() - t0:.1f} s")
            sys.stderr.flush()
        if max_batches is not None and batches >= max_batches:
            break
    if show and batches:
        sys.stderr.write(("\r" if live else "") + f"[onnxopt] calibrated ({method}): {batches} batch(es), "
                         f"{samples} sample(s), {len(wanted)} tensor(s), {time.perf_counter() - t0:.1f} s\n")
    if batches == 0:
        raise CalibrationError("calibration data is empty: it yielded no feeds")
    return collector.ranges()


def export_for_calibration(graph, ctx) -> onnx.ModelProto:
    """The current graph as a complete float model (weights filled in) to run for calibration."""
    return ir.export_model(graph, ctx.model)
