"""Guards for quantize_auto: int8 that is never silently wrong and never slower than fp32.

The calibration feeds are split: ranges are fitted on the first part, everything the guard judges
(fidelity, sensitivity, timing shapes) uses the held-out rest. On the candidate sites (quantize_static's,
after `min_macs`):

1. cost (`autotune`, com.onnxopt target): each site, cut out as a one-op model with the input it saw
   on held-out data, is timed in float and in int8 on this machine (interleaved medians, sessions
   without spinning, `threads` threads); a site stays float unless int8 is at least `min_speedup`
   times faster. Sites with the same shapes and attributes are timed once. (onnxruntime's QDQ ops
   only pay in chains, so for that target step 3 decides alone.) Convs sent back this way are then
   tried together in the whole model (after the preset's residual and uint8-chain rewrites, where a
   conv between uint8 neighbours pays without its float input and output) and taken back if the
   model is `min_speedup` times faster with them.
2. accuracy (`tolerance` or `eval_fn`/`max_drop`): when the model with every remaining site quantized
   misses the tolerance, sites are ranked by their effect: SQNR of each site's own output when only it
   is quantized (one run of a "shadow" model holding a quantized copy of every site next to the float
   one), then, for the worst `probe` of them and the first and last site, the end-to-end cosine with
   that site alone quantized. Sites are grouped in blocks (`blocks`: the residual units between
   junction tensors); when some block holds several sites, whole blocks go back to fp32 first (ranked
   by their worst site; the shortest worst-first prefix that meets the tolerance, by doubling then
   bisection), then the sites of the returned blocks are re-admitted one at a time, least sensitive
   first, while the tolerance holds. Without such blocks the same search runs over single sites.
3. cost again, whole model (with the same rewrites): int8 against the float model on a held-out feed; when it is not
   `min_speedup` times faster the sites that saved least go back to float (half at a time), and with
   none left the optimized fp32 model is what comes out.

Everything is recorded per node in `report.quantization` and summarized in the report's messages;
for the onnxruntime target the result is also audited for QDQ that onnxruntime did not fuse.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import bench, ir, verify
from ...errors import CalibrationError, PassOptionError
from ..base import PassContext, Report, tidy
from . import calibrate
from .common import Emitter, Site, activation_params, find_site, lower_onnxopt

F32 = np.float32
DEFAULT_TOLERANCE = {"cosine": 0.995, "top1": 0.99}
GUARD_OPTIONS = {"tolerance": None, "eval_fn": None, "max_drop": 0.01, "autotune": False,
                 "min_speedup": 1.05, "threads": 1, "holdout": 0.25, "probe": 8, "timer": None}
FUSED_ORT_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                 "ConvInteger", "MatMulInteger", "QAttention"}


def check_guard_options(p) -> None:
    o = p.options
    tol = o["tolerance"]
    if tol is not None:
        tol = {"cosine": float(tol)} if isinstance(tol, (int, float)) else tol
        if not isinstance(tol, dict) or not set(tol) <= set(DEFAULT_TOLERANCE) or \
                not all(0.0 <= float(v) <= 1.0 for v in tol.values()):
            raise PassOptionError(f"{p.name}: tolerance must be None, a cosine in [0, 1] or a dict with keys "
                                  f"cosine/top1 in [0, 1], got {o['tolerance']!r}")
    if o["eval_fn"] is not None and not callable(o["eval_fn"]):
        raise PassOptionError(f"{p.name}: eval_fn must be a callable model -> float")
    if o["timer"] is not None and not callable(o["timer"]):
        raise PassOptionError(f"{p.name}: timer must be a callable (models, feeds) -> milliseconds per model")
    if float(o["max_drop"]) < 0 or float(o["min_speedup"]) <= 0 or int(o["threads"]) < 0 or int(o["probe"]) < 0:
        raise PassOptionError(f"{p.name}: max_drop, threads and probe must be >= 0, min_speedup > 0")
    if not 0.0 < float(o["holdout"]) <= 0.5:
        raise PassOptionError(f"{p.name}: holdout must be in (0, 0.5]")


def tolerance_of(options) -> Optional[dict]:
    tol = options["tolerance"]
    if tol is None:
        return None
    if isinstance(tol, (int, float)):
        return {"cosine": float(tol)}
    return {**DEFAULT_TOLERANCE, **tol}


# ------------------------------------------------------------------------------------------ data

def split_feeds(feeds: List[dict], holdout: float) -> Tuple[List[dict], List[dict]]:
    """(fit, check): the last `holdout` share of the feeds (at least one) is held out; a single feed
    is split along its batch axis instead."""
    n = len(feeds)
    if n >= 2:
        k = min(n - 1, max(1, int(round(n * holdout))))
        return feeds[:n - k], feeds[n - k:]
    feed = feeds[0]
    batch = {a.shape[0] if a.ndim else 1 for a in feed.values()}
    b = batch.pop() if len(batch) == 1 else 1
    if b < 2:
        raise CalibrationError("the accuracy guard holds out part of the calibration data and one feed of one "
                               "sample cannot be split: give more samples (or tolerance=None, autotune=False)")
    k = min(b - 1, max(1, int(round(b * holdout))))
    return [{k_: a[:b - k] for k_, a in feed.items()}], [{k_: a[b - k:] for k_, a in feed.items()}]


@dataclasses.dataclass
class Fidelity:
    cosine: float  # the worst output's
    top1: Optional[float]  # argmax agreement over rows of 2-D outputs (classifier logits); None without any
    score: Optional[float] = None  # eval_fn's, when given

    def text(self) -> str:
        s = f"cosine {self.cosine:.5f}"
        if self.top1 is not None:
            s += f", top-1 agreement {self.top1:.4f}"
        if self.score is not None:
            s += f", eval_fn {self.score:.5g}"
        return s


def fidelity(ref: List[List[np.ndarray]], got: List[List[np.ndarray]]) -> Fidelity:
    """Fidelity of outputs `got` against `ref` (per feed, per output)."""
    cos, agree, rows = 1.0, 0, 0
    for i in range(len(ref[0])):
        a = np.concatenate([np.asarray(r[i], np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(g[i], np.float64).ravel() for g in got])
        if a.size == 0:
            continue
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        c = float(a @ b / denom) if denom > 0 else float(np.allclose(a, b))
        cos = min(cos, c if np.isfinite(c) else -1.0)
        for r, g in zip(ref, got):
            x, y = np.asarray(r[i]), np.asarray(g[i])
            if x.ndim == 2 and x.shape[-1] > 1 and x.dtype.kind == "f":
                agree += int(np.sum(x.argmax(-1) == y.argmax(-1)))
                rows += x.shape[0]
    return Fidelity(cos, agree / rows if rows else None)


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


# ----------------------------------------------------------------------------------------- timing

def time_models(models: Sequence[onnx.ModelProto], feeds: Sequence[Dict[str, np.ndarray]], threads: int = 1,
                rounds: int = 7, min_time: float = 0.03) -> List[float]:
    """Median ms per run of each model on its feed: interleaved rounds, ORT_ENABLE_ALL, no spinning."""
    sessions = [_Bound(verify.session(m, optimization="all", threads=threads), f) for m, f in zip(models, feeds)]
    return bench.time_sessions(sessions, {}, rounds=rounds, min_time=min_time)


class _Bound:
    """A session that runs on its own feed (time_sessions gives every session the same one)."""

    def __init__(self, sess, feed):
        self.sess, self.feed = sess, feed

    def run(self, names, _feed):
        return self.sess.run(names, self.feed)


def fusion_audit(model: onnx.ModelProto) -> dict:
    """Float Conv/MatMul/Gemm that onnxruntime left reading a DequantizeLinear (QDQ it did not fuse
    into an integer kernel, slower than plain fp32) against the integer ops it formed."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxopt-audit-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3
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


# ------------------------------------------------------------------------------------------ guard

@contextlib.contextmanager
def scratch(ctx: PassContext, graph: gs.Graph):
    """Let the lowering helpers work on a scratch graph without touching the real root or report."""
    saved = ctx.root, ctx.report, ctx._noted
    ctx.root, ctx.report, ctx._noted = graph, Report(), set()
    try:
        yield
    finally:
        ctx.root, ctx.report, ctx._noted = saved


class Guard:
    """One run of the guards over `graph` (float, after the default pipeline) for quantize_auto."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, static_pass, target: str, options: dict,
                 lower: Callable):
        self.graph, self.ctx, self.static, self.target, self.o = graph, ctx, static_pass, target, options
        self.lower = lower  # static.lower_sites (passed in: static imports this module)
        self.tol = tolerance_of(options)
        self.eval_fn = options["eval_fn"]
        self.accuracy = self.tol is not None or self.eval_fn is not None
        self.timer = options["timer"] or (lambda models, feeds: time_models(models, feeds, int(self.o["threads"])))
        # target="auto" with the library built and the cost guard on: the final choice between the
        # com.onnxopt ops and onnxruntime's own QDQ kernels is measured (choose_target).
        self.auto = options.get("target") == "auto" and target == "onnxopt" and bool(options["autotune"])
        self.rows: Dict[str, dict] = {}
        self._fid_cache: Dict[frozenset, Fidelity] = {}

    # ---- bookkeeping
    def row(self, name: str) -> dict:
        return self.rows[name]

    def fall_back(self, name: str, reason: str) -> None:
        r = self.rows[name]
        r["quantized"], r["reason"] = False, reason

    # ---- models
    def build(self, base: onnx.ModelProto, names, shadow: bool = False, fused: bool = False,
              target: Optional[str] = None) -> onnx.ModelProto:
        """`base` with the sites rooted at the nodes `names` quantized (shadow: quantized copies next to
        the float sites, with both results and each site's input as extra outputs; fused: followed by
        the exact rewrites the int8 preset runs after lowering — residual Adds into QConv, uint8 chains —
        so that whole-model timings see what the preset will produce)."""
        g = ir.import_graph(base)
        with scratch(self.ctx, g):
            sites = [s for s in (find_site(n, g, self.ctx) for n in list(g.nodes) if n.name in names)
                     if isinstance(s, Site)]
            if shadow:
                em = Emitter(g, self.ctx, "sh")
                have = {t.name for t in g.outputs} | {t.name for t in g.inputs}
                self._shadow = {}
                for s in sites:
                    q = em.var(f"{s.node.name}_shadow", F32)
                    self._shadow[s.node.name] = q.name
                    lower_onnxopt(em, dataclasses.replace(s, nodes=[], out=q), *activation_params(*self.ranges[s.x.name]))
                    for t in (s.out, q, s.x):
                        if t.name not in have and not isinstance(t, gs.Constant):
                            t.dtype = t.dtype or F32
                            g.outputs.append(t)
                            have.add(t.name)
            else:
                target = target or self.target
                if target == "onnxruntime":  # it fuses a Conv only with its output quantized too
                    sites = [s for s in sites if not (s.kind == "conv" and s.out.name not in self.ranges)]
                self.lower(g, self.ctx, sites, self.ranges, target, prefix="qg")
                if fused and target == "onnxopt":
                    from .chain import ChainQConvU8
                    from .residual import FuseQConvResidual
                    # the replaced float nodes go first, as between the preset's passes: while they
                    # still read the QConv outputs no output has a single consumer and neither
                    # rewrite applied (the guard timed unchained, unfused models)
                    tidy(g)
                    for p in (FuseQConvResidual(), ChainQConvU8()):
                        p.run(g, self.ctx)
                        tidy(g)
            tidy(g)
            return ir.export_model(g, base)

    def run_model(self, model: onnx.ModelProto, names: Optional[List[str]] = None) -> List[List[np.ndarray]]:
        sess = verify.session(model, optimization="basic", threads=0)
        return [sess.run(names, f) for f in self.check]

    def evaluate(self, names) -> Fidelity:
        key = frozenset(names)
        hit = self._fid_cache.get(key)
        if hit is None:
            hit = self.judge(self.build(self.fp32, key) if key else self.fp32)
            self._fid_cache[key] = hit
        return hit

    def judge(self, model: onnx.ModelProto) -> Fidelity:
        """Fidelity of `model` against fp32 on the held-out feeds (and its eval_fn score)."""
        fid = fidelity(self.ref, self.run_model(model))
        if self.eval_fn is not None:
            fid.score = float(self.eval_fn(model))
        return fid

    def meets(self, fid: Fidelity) -> bool:
        if self.eval_fn is not None:
            return self.base_score - fid.score <= float(self.o["max_drop"])
        if self.tol is None:
            return True
        top1 = self.tol.get("top1")
        return fid.cosine >= self.tol.get("cosine", -1.0) and (fid.top1 is None or top1 is None or fid.top1 >= top1)

    # ---- the steps
    def run(self) -> bool:
        ctx, graph = self.ctx, self.graph
        for node in graph.nodes:  # every node named: sites are addressed by name in the copies
            if not node.name:
                node.name = ctx.fresh_name(node.op)
        refused: list = []
        sites = self.static.sites(graph, ctx, refused)
        for node, reason in refused:
            if node.op in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
                self.rows[node.name] = {"node": node.name, "op": node.op, "quantized": False, "reason": reason}
        if not sites:
            return self.finish([], None)
        feeds = list(calibrate.iter_feeds(ctx.calibration))
        if not feeds:
            raise CalibrationError("calibration data is empty: it yielded no feeds")
        self.fit, self.check = split_feeds(feeds, float(self.o["holdout"]))
        specs = verify.input_specs(ctx.model)
        self.check = [calibrate.validate_feed(f, specs, len(self.fit) + i) for i, f in enumerate(self.check)]
        # (auto: the ranges both targets need, conv outputs included)
        self.ranges = self.static.calibrate(graph, ctx, sites, "onnxruntime" if self.auto else self.target, self.fit)
        sites = [s for s in sites if s.x.name in self.ranges and not (
            self.target == "onnxruntime" and s.kind == "conv" and s.out.name not in self.ranges)]
        self.sites = {s.node.name: s for s in sites}
        for s in sites:
            self.rows[s.node.name] = {"node": s.node.name, "op": s.node.op, "quantized": True, "reason": "",
                                      "macs": s.macs}
        self.fp32 = calibrate.export_for_calibration(graph, ctx)
        self.measure_sites()
        kept = [s.node.name for s in sites]
        if self.o["autotune"] and self.target == "onnxopt":
            # onnxruntime's QDQ ops are not timed alone: it runs chains of them in NHWC int8 regions,
            # so a lone op pays layout transposes a chain does not (seen: every MobileNet conv slower
            # alone, the whole model 2.3x faster). The whole-model check below decides for them.
            kept = self.tune_nodes(kept)
            kept = self.readmit_chained(kept)
        if self.accuracy:
            if self.eval_fn is not None:
                self.base_score = float(self.eval_fn(self.fp32))
            kept = self.accuracy_guard(kept)
        timing = None
        if self.o["autotune"] and kept:
            kept, timing = self.tune_model(kept)
        if self.auto and kept:
            kept, timing = self.choose_target(kept, timing)
        return self.finish(kept, timing)

    def choose_target(self, kept: List[str], timing):  # -> (kept, timing)
        """target="auto": the same sites lowered both ways, timed as whole models; onnxruntime's QDQ
        kernels are taken when they are min_speedup faster and the result still meets the accuracy
        guard (its numerics differ slightly). On MobileNet-style nets onnxruntime's NHWC int8 depthwise
        path can win; on ResNet-50 and BERT the com.onnxopt ops do."""
        if any(self.sites[n].node.op == "ConvTranspose" for n in kept):
            self.ctx.note("guard: target auto: com.onnxopt (ConvTranspose sites have no onnxruntime lowering)")
            return kept, timing
        # The QDQ candidate also takes the convs the cost step timed alone for our ops: onnxruntime
        # runs QDQ chains as NHWC int8 regions, where a conv pays that did not pay alone.
        extra = [n for n in self.cost_rejected_convs(kept) if self.sites[n].node.op == "Conv"]
        qdq_set = list(kept) + extra
        feed = self.check[0]
        # Our ops get the same chance: with those convs too, as one uint8 chain (readmit_chained may
        # have declined them within its noise; both candidates are timed in the same interleaved run).
        ours_sets = [list(kept)] + ([list(kept) + extra] if extra else [])
        ours = [self.build(self.fp32, set(o), fused=True) for o in ours_sets]
        theirs = self.build(self.fp32, set(qdq_set), target="onnxruntime")
        times = [float(t) for t in self.timer([self.fp32] + ours + [theirs], [feed] * (len(ours) + 2))]
        tf, tb = times[0], times[-1]
        best = min(range(len(ours)), key=lambda i: times[1 + i])
        if best > 0 and self.accuracy and not self.meets(self.judge(ours[best])):
            best = 0  # the extra convs cost accuracy the accuracy step did not see
        ta = times[1 + best]
        if best > 0:  # our ops with the cost-rejected convs chained in
            kept = ours_sets[best]
            for n in extra:
                r = self.rows[n]
                r["quantized"], r["reason"] = True, ""
                r["readmitted_cost"] = (f"slower alone, whole model {times[1]:.3f} -> {ta:.3f} ms with it "
                                        f"(uint8 chain)")
        margin = float(self.o["min_speedup"])
        if tb <= 0 or ta / tb < margin:
            self.ctx.note(f"guard: target auto: com.onnxopt ops {ta:.3f} ms, onnxruntime QDQ {tb:.3f} ms: "
                          f"com.onnxopt")
            return kept, (tf, ta)
        if self.accuracy:
            fid = self.judge(theirs)
            if not self.meets(fid):
                self.ctx.note(f"guard: target auto: onnxruntime QDQ faster ({tb:.3f} vs {ta:.3f} ms) but outside "
                              f"the tolerance ({fid.text()}): com.onnxopt")
                return kept, (tf, ta)
        self.ctx.note(f"guard: target auto: onnxruntime QDQ {tb:.3f} ms vs com.onnxopt ops {ta:.3f} ms: onnxruntime")
        self.target = "onnxruntime"
        self._fid_cache.clear()  # fidelity of the kept set is re-measured for the new target
        for n in extra:
            r = self.rows[n]
            r["quantized"], r["reason"] = True, ""
            r["readmitted_cost"] = "slower alone as a com.onnxopt op; part of onnxruntime's int8 region"
        return qdq_set, (tf, tb)

    def measure_sites(self) -> None:
        """Per-site SQNR (each quantized alone, on float inputs) and each site's held-out input."""
        names = list(self.sites)
        shadow = self.build(self.fp32, set(names), shadow=True)
        n_out = len(self.fp32.graph.output)
        have = {o.name for o in shadow.graph.output}
        fetch = list(dict.fromkeys([o.name for o in self.fp32.graph.output]
                                   + [t for n in names for t in (self.sites[n].out.name, self._shadow[n],
                                                                  self.sites[n].x.name) if t in have]))
        index = {t: i for i, t in enumerate(fetch)}
        sig = {n: 0.0 for n in names}
        noise = {n: 0.0 for n in names}
        self.ref, self.inputs = [], {}
        sess = verify.session(shadow, optimization="basic", threads=0)
        for fi, feed in enumerate(self.check):
            outs = sess.run(fetch, feed)
            self.ref.append(outs[:n_out])
            for n in names:
                a = np.asarray(outs[index[self.sites[n].out.name]], np.float64)
                b = np.asarray(outs[index[self._shadow[n]]], np.float64)
                sig[n] += float(np.sum(a * a))
                noise[n] += float(np.sum((a - b) ** 2))
                if fi == 0:
                    x = self.sites[n].x.name
                    self.inputs[n] = outs[index[x]] if x in index else feed[x]
        for n in names:
            self.rows[n]["sqnr_db"] = round(sqnr_db(sig[n], noise[n]), 2)

    def single_op(self, name: str) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray], tuple]:
        """The site `name` alone as a float model, its held-out input, and a key for same-shaped sites."""
        s = self.sites[name]
        by_name = {n.name: n for n in self.fp32.graph.node}
        inits = {t.name: t for t in self.fp32.graph.initializer}
        nodes = [by_name[n.name] for n in s.nodes]
        used = [inits[i] for n in nodes for i in n.input if i in inits]
        x = self.inputs[name]
        g = onnx.helper.make_graph(nodes, "site", [onnx.helper.make_tensor_value_info(s.x.name, 1, list(x.shape))],
                                   [onnx.helper.make_tensor_value_info(s.out.name, 1, None)],
                                   list({t.name: t for t in used}.values()))
        m = onnx.helper.make_model(g, opset_imports=list(self.fp32.opset_import))
        m.ir_version = self.fp32.ir_version
        key = (tuple(x.shape), tuple((n.op_type, tuple(a.SerializeToString() for a in n.attribute)) for n in nodes),
               tuple(tuple(t.dims) for t in used))
        return m, {s.x.name: x}, key

    def tune_nodes(self, names: List[str]) -> List[str]:
        cache: Dict[tuple, Tuple[float, float]] = {}
        margin = float(self.o["min_speedup"])
        kept = []
        for n in names:
            model, feed, key = self.single_op(n)
            if key not in cache:
                t = self.timer([model, self.build(model, {n})], [feed, feed])
                cache[key] = (float(t[0]), float(t[1]))
            tf, tq = cache[key]
            r = self.rows[n]
            r["ms_fp32"], r["ms_int8"] = round(tf, 4), round(tq, 4)
            speed = tf / tq if tq > 0 else math.inf
            if speed >= margin:
                kept.append(n)
            else:
                self.fall_back(n, f"cost: int8 {speed:.2f}x of fp32 alone (< {margin:g}x)")
        return kept

    def blocks(self, kept: List[str]) -> List[List[str]]:
        """`kept` grouped by the block each site sits in, in graph order.

        The main graph is cut at its junction tensors: graph inputs, tensors read by more than one node
        (fan-outs) and outputs of Add/Sum/Concat joining two or more non-constant inputs (residual adds,
        branch concats). Nodes linked by any other tensor share a block, so a ResNet bottleneck (with its
        downsample conv) or a transformer attention sub-layer is one block. A block holding more than
        half of the sites (a plain chain without residual joins) is no block: its sites stand alone, as
        does every site that shares its block with no other."""
        parent: Dict[int, int] = {}

        def find(i: int) -> int:
            while parent.setdefault(i, i) != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        joins = {id(n) for n in self.graph.nodes if n.op in ("Add", "Sum", "Concat")
                 and sum(not isinstance(t, gs.Constant) for t in n.inputs) >= 2}
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Constant) or not t.inputs or len(t.outputs) != 1 or id(t.inputs[0]) in joins:
                continue  # a junction (or a dangling tensor): no link
            parent[find(id(t.inputs[0]))] = find(id(t.outputs[0]))
        groups: Dict[int, List[str]] = {}
        for n in kept:
            groups.setdefault(find(id(self.sites[n].node)), []).append(n)
        out = []
        for g in groups.values():
            if len(g) > 1 and 2 * len(g) <= len(kept):
                out.append(g)
            else:
                out.extend([n] for n in g)
        return out

    def shortest_prefix(self, kept: List[str], groups: List[List[str]]) -> int:
        """The fewest leading `groups` whose return to fp32 meets the tolerance (doubling, bisection)."""
        def ok(k):
            back = {n for g in groups[:k] for n in g}
            return k >= len(groups) or self.meets(self.evaluate([n for n in kept if n not in back]))
        hi = 1
        while not ok(hi):
            hi *= 2
        hi = min(hi, len(groups))
        lo = hi // 2  # ok(lo) is False (or lo == 0, which failed before)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def accuracy_guard(self, kept: List[str]) -> List[str]:
        if not kept:
            return kept
        fid = self.evaluate(kept)
        if self.meets(fid):
            return kept
        order = sorted(kept, key=lambda n: self.rows[n]["sqnr_db"])
        probe = list(dict.fromkeys(order[:int(self.o["probe"])] + [kept[0], kept[-1]]))
        for n in probe:
            self.rows[n]["alone_cosine"] = round(self.evaluate([n]).cosine, 6)
        probed = sorted(probe, key=lambda n: self.rows[n]["alone_cosine"])
        ranked = probed + [n for n in order if n not in probe]
        rank = {n: i for i, n in enumerate(ranked)}
        blocks = self.blocks(kept)
        label: Dict[str, str] = {}
        if any(len(b) > 1 for b in blocks):
            # whole blocks first, worst (by their worst site) first; then their sites back one by one
            for b in blocks:
                if len(b) > 1:
                    for n in b:
                        label[n] = f"{b[0]}..{b[-1]}" if len(b) > 2 else f"{b[0]}, {b[1]}"
                        self.rows[n]["block"] = label[n]
            blocks.sort(key=lambda b: min(rank[n] for n in b))
            k = self.shortest_prefix(kept, blocks)
            back = sorted((n for b in blocks[:k] for n in b), key=rank.get)
            returned = [label.get(b[0], b[0]) for b in blocks[:k]]
            limit = max(2 * int(self.o["probe"]), max(len(b) for b in blocks[:k]))
        else:
            back = ranked[:self.shortest_prefix(kept, [[n] for n in ranked])]
            limit = 2 * int(self.o["probe"])
        # the ranking is a guess: try the least sensitive of the returned nodes again, one at a time
        readmitted, tried = [], set()
        for n in list(reversed(back))[:limit]:
            tried.add(n)
            trial = [m for m in kept if m not in back or m == n]
            if len(back) > 1 and self.meets(self.evaluate(trial)):
                back.remove(n)
                readmitted.append(n)
        for n in back:
            r = self.rows[n]
            alone = f", alone cosine {r['alone_cosine']:.5f}" if "alone_cosine" in r else ""
            how = ""
            if n in label:
                how = (f" (block {label[n]} returned whole; "
                       f"{'missed the tolerance when tried back' if n in tried else 'not tried back'})")
            self.fall_back(n, f"accuracy{how}: SQNR {r['sqnr_db']:.1f} dB{alone}")
        for n in readmitted:
            if n in label:
                self.rows[n]["readmitted"] = True
        if label:
            again = f"; {len(readmitted)} node(s) re-admitted to int8: {', '.join(readmitted)}" if readmitted else ""
            self.ctx.note(f"guard: accuracy by block: returned {len(returned)} block(s) to fp32 worst first "
                          f"({'; '.join(returned)}){again}")
        return [n for n in kept if n not in back]

    def cost_rejected_convs(self, kept: List[str]) -> List[str]:
        """Conv sites the cost step sent back to float (slower alone)."""
        return [n for n in self.sites if n not in kept and self.rows[n]["reason"].startswith("cost")
                and self.sites[n].kind == "conv"]

    def readmit_chained(self, kept: List[str]) -> List[str]:
        """Sites slower alone can pay inside a chain of uint8 convs (no float tensor in or out): time
        the whole model (with the preset's post-lowering rewrites) with and without the sites the cost
        step returned to float, and take them back when that is at least `min_speedup` faster."""
        rejected = self.cost_rejected_convs(kept)  # only QConv chains (QGemm has no uint8 mode)
        if not rejected or not kept:
            return kept
        feed = self.check[0]
        without = self.build(self.fp32, set(kept), fused=True)
        with_all = self.build(self.fp32, set(kept) | set(rejected), fused=True)
        ta, tb = (float(t) for t in self.timer([without, with_all], [feed, feed]))
        if tb <= 0 or ta / tb < float(self.o["min_speedup"]):
            return kept
        for n in rejected:
            r = self.rows[n]
            r["quantized"], r["reason"] = True, ""
            r["readmitted_cost"] = f"slower alone, whole model {ta:.3f} -> {tb:.3f} ms with it"
        self.ctx.note(f"guard: {len(rejected)} site(s) slower alone re-admitted: the whole model runs "
                      f"{ta / tb:.2f}x faster with them (uint8 chains)")
        return kept + rejected

    def tune_model(self, kept: List[str]):
        margin = float(self.o["min_speedup"])
        feed = self.check[0]
        timing = None
        while kept:
            q = self.build(self.fp32, set(kept), fused=True)
            tf, tq = (float(t) for t in self.timer([self.fp32, q], [feed, feed]))
            timing = (tf, tq)
            speed = tf / tq if tq > 0 else math.inf
            if speed >= margin:
                return kept, timing
            gain = sorted(kept, key=lambda n: (self.rows[n].get("ms_fp32", 0) - self.rows[n].get("ms_int8", 0),
                                               self.rows[n]["macs"]))
            drop = set(gain[:max(1, len(kept) // 2)])
            for n in drop:
                self.fall_back(n, f"cost: whole model int8 {speed:.2f}x of fp32 (< {margin:g}x), "
                                  f"least time saved")
            kept = [n for n in kept if n not in drop]
        return kept, timing

    def finish(self, kept: List[str], timing) -> bool:
        ctx = self.ctx
        for r in self.rows.values():
            if r["quantized"] and r["node"] not in kept:
                r["quantized"] = False
        for r in self.rows.values():
            if r["quantized"]:
                r["reason"] = "int8 pays" if self.o["autotune"] else "int8"
                if self.accuracy:
                    r["reason"] += ", within tolerance"
                if r.get("readmitted_cost"):
                    r["reason"] += f" (cost: {r['readmitted_cost']})"
                if r.get("readmitted"):
                    r["reason"] += f" (accuracy (block {r['block']}): re-admitted after its block went to fp32)"
        ctx.report.quantization = list(self.rows.values())
        falls = [r["node"] for r in self.rows.values() if r["reason"].startswith(("accuracy", "cost"))]
        if falls:
            more = f" and {len(falls) - 12} more (all in the table)" if len(falls) > 12 else ""
            ctx.note(f"guard: kept {len(falls)} node(s) in fp32: {', '.join(falls[:12])}{more}")
        if not kept:
            ctx.note("guard: nothing worth quantizing: the result is the optimized fp32 model")
            return False
        fid = self.evaluate(kept)
        n_samples = sum(next(iter(f.values())).shape[0] if next(iter(f.values())).ndim else 1 for f in self.check)
        want = ""
        if self.eval_fn is not None:
            want = f" (fp32 eval_fn {self.base_score:.5g}, max_drop {self.o['max_drop']:g})"
        elif self.tol is not None:
            want = " (tolerance " + ", ".join(f"{k} >= {v:g}" for k, v in self.tol.items()) + ")"
        ctx.note(f"guard: fidelity on {len(self.check)} held-out feed(s), {n_samples} sample(s): {fid.text()}{want}")
        if timing is not None:
            ctx.note(f"guard: whole model {timing[1]:.3f} ms int8 vs {timing[0]:.3f} ms fp32 = "
                     f"{timing[0] / max(timing[1], 1e-12):.2f}x on a held-out feed ({self.o['threads']} thread(s), "
                     f"interleaved medians; noisy on a shared machine)")
        if self.target == "onnxruntime":
            audit = fusion_audit(self.build(self.fp32, set(kept)))
            msg = (f"guard: onnxruntime fused {audit['fused']} integer op(s), {len(audit['unfused'])} float "
                   f"Conv/MatMul/Gemm left between DequantizeLinear and QuantizeLinear "
                   f"(coverage {audit['coverage']:.0%})")
            if audit["coverage"] < 0.9:
                msg = "warning: " + msg + ": unfused QDQ runs slower than fp32: " + ", ".join(audit["unfused"][:10])
            ctx.note(msg)
        done = self.lower(self.graph, ctx, [self.sites[n] for n in kept], self.ranges, self.target)
        ctx.note(f"quantized {done} of {len(self.rows)} node(s) ({self.target} target, {self.o['method']}, guarded)")
        return done > 0
