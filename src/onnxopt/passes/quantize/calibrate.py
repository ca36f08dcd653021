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

import glob
import os
from collections.abc import Mapping
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import onnx

from ... import ir, verify
from ...progress import bar as progress_bar
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


def validate_feed(feed, specs: List[tuple], index: int, where: Optional[str] = None) -> Dict[str, np.ndarray]:
    """`feed` checked against the model inputs `specs` ((name, dtype, shape) from verify.input_specs);
    errors start with `where` (default "calibration batch <index>")."""
    where = where or f"calibration batch {index}"
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


def validate_feeds(feeds: List[dict], specs: List[tuple]) -> Tuple[List[dict], List[str]]:
    """(feeds, notes): every feed checked in order (an error names the first bad batch), samples whose
    float inputs hold NaN/Inf left out, with a note per input saying how many values and samples.

    NaN/Inf cannot be calibrated and make every fidelity figure NaN (the guards would then refuse all
    quantization and pass the fp32 model off as a result): when no sample is left, that is a
    CalibrationError naming the input.
    """
    if not feeds:
        raise CalibrationError("calibration data is empty: it yielded no feeds")
    checked = [validate_feed(feed, specs, i) for i, feed in enumerate(feeds)]
    fixed = fixed_batch(specs)
    counts: Dict[str, List[int]] = {}  # input -> [non-finite values, samples dropped for it]
    clean, total_samples, kept_samples = [], 0, 0
    for feed in checked:
        bad_rows = None
        lengths = {a.shape[0] if a.ndim else 1 for a in feed.values()}
        n = lengths.pop() if len(lengths) == 1 else 1
        total_samples += n
        for name, arr in feed.items():
            if arr.dtype.kind not in "fc":
                continue
            finite = np.isfinite(arr)
            if finite.all():
                continue
            rows = ~finite.reshape(n, -1).all(axis=1) if arr.ndim and arr.shape[0] == n else np.ones(n, bool)
            row = counts.setdefault(name, [0, 0])
            row[0] += int(finite.size - np.count_nonzero(finite))
            row[1] += int(rows.sum())
            bad_rows = rows if bad_rows is None else bad_rows | rows
        if bad_rows is None:
            clean.append(feed)
            kept_samples += n
        elif not bad_rows.all() and fixed is None:  # a fixed batch takes no partial feed
            keep = ~bad_rows
            clean.append({k: a[keep] if a.ndim and a.shape[0] == n else a for k, a in feed.items()})
            kept_samples += int(keep.sum())
    if not counts:
        return checked, []
    detail = "; ".join(f"input {k!r}: {v} NaN/Inf value(s) in {s} sample(s)" for k, (v, s) in counts.items())
    if not clean:
        raise CalibrationError(f"calibration data has no sample without NaN/Inf ({detail})")
    return clean, [f"{detail}: {total_samples - kept_samples} of {total_samples} sample(s) left out of "
                   "calibration and fidelity"]


# ------------------------------------------------------------------------------------- npz files

def fixed_batch(specs: List[tuple]) -> Optional[int]:
    """The batch size the model's inputs fix on axis 0 (all that fix one agree), else None."""
    fixed = {s[2][0] for s in specs if s[2] and isinstance(s[2][0], int) and s[2][0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def load_npz_feeds(path, batch: Optional[int] = None, specs: Optional[List[tuple]] = None) -> List[dict]:
    """Feed dicts from an .npz (one array per model input, samples along axis 0, cut into batches)
    or a directory of .npz files (one feed dict each).

    `batch` None: the model's fixed batch when its inputs fix one, else 8. With `specs` (the model's
    inputs) the arrays are matched to the inputs by name and a fixed batch dim is respected.
    """
    path = os.fspath(path)
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise CalibrationError(f"calibration batch size must be a positive integer, got {batch!r}")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.npz")))
        if not files:
            raise CalibrationError(f"{path}: no .npz files in the calibration directory")
        return [_read_npz(f) for f in files]
    arrays = _read_npz(path)
    if specs is not None:
        names = [s[0] for s in specs]
        extra = [k for k in arrays if k not in names]
        missing = [n for n in names if n not in arrays]
        if extra or missing:
            parts = ([f"array(s) {', '.join(map(repr, extra))} that are not model inputs"] if extra else []) + \
                    ([f"no array for input(s) {', '.join(map(repr, missing))}"] if missing else [])
            raise CalibrationError(f"{path}: {'; '.join(parts)} (the model's inputs are "
                                   f"{', '.join(map(repr, names))})")
    counts = {k: (a.shape[0] if a.ndim else 1) for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{path}: arrays hold different numbers of samples on axis 0 ("
                               + ", ".join(f"{k!r}: {n}" for k, n in counts.items()) + ")")
    n = next(iter(counts.values()))
    model_batch = fixed_batch(specs) if specs is not None else None
    if model_batch is not None:
        if batch is not None and batch != model_batch:
            raise CalibrationError(f"{path}: calibration batch {batch} does not fit the model, whose inputs fix "
                                   f"the batch at {model_batch} (leave the batch size unset to use it)")
        if n < model_batch:
            raise CalibrationError(f"{path}: {n} sample(s), the model's fixed batch needs {model_batch}")
        batch, n = model_batch, n - n % model_batch  # a fixed batch cannot take a partial one
    batch = batch or 8
    if any(a.ndim == 0 for a in arrays.values()):
        return [arrays]
    return [{k: a[i:i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise CalibrationError(f"{path}: no such calibration file")
    if not os.path.isfile(path):
        raise CalibrationError(f"{path}: not a regular file (calibration data is an .npz or a directory of them)")
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise CalibrationError(f"{path}: an .npy array, not an .npz "
                                   "(save with numpy.savez(path, input_name=array))")
        with z:
            arrays = {k: z[k] for k in z.files}
    except CalibrationError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(f"{path}: not an .npz file ({first})") from None
    if not arrays:
        raise CalibrationError(f"{path}: the .npz holds no arrays")
    return arrays


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
    batches = samples = 0
    calib_bar = progress_bar(desc=f"calibrating ({method})", unit="batch", show=progress, leave=True)
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
        calib_bar.update()
        calib_bar.set_postfix_str(f"{samples} sample(s), {len(wanted)} tensor(s)")
        if max_batches is not None and batches >= max_batches:
            break
    calib_bar.close()
    if batches == 0:
        raise CalibrationError("calibration data is empty: it yielded no feeds")
    return collector.ranges()


def export_for_calibration(graph, ctx) -> onnx.ModelProto:
    """The current graph as a complete float model (weights filled in) to run for calibration."""
    return ir.export_model(graph, ctx.model)
