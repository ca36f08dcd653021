"""Guards for quantize_auto: int8 that is never silently wrong and never slower than fp32.

The calibration feeds are split: ranges are fitted on the first part, everything the guard judges
(fidelity, sensitivity, timing shapes) uses the held-out rest (heldout.py). Each lowering target is
judged on its own — com.onnxopt ops ("onnxopt"), onnxruntime's QDQ ("onnxruntime"), and with
target="auto" and the library built both of them plus "mixed" (the sites our ops win as com.onnxopt
ops, the others as QDQ) — so one lowering that is slow on this machine throws no int8 away:

1. cost, per target, with that lowering's own costs (`autotune`): for com.onnxopt ops each site, cut
   out as a one-op model with the input it saw on held-out data, is timed in float and in int8; it
   goes back to float when int8 is below `min_speedup` beyond the measured spread (within it after
   re-measuring: when slower than fp32 by the medians). Sites with
   the same shapes and attributes are timed once. Convs sent back are then tried together in the
   whole model (after the preset's residual and uint8-chain rewrites, where a conv between uint8
   neighbours pays without its float input and output). onnxruntime's QDQ ops only pay in chains
   (NHWC int8 regions), so that target keeps every site here and step 3 decides.
2. accuracy, per target, with that lowering's numerics (`tolerance` or `eval_fn`/`max_drop`, see
   accuracy.py): sites ranked by SQNR and end-to-end cosine go back to fp32, block by block, until
   the target's model meets the tolerance; the MatMul/Gemm among them then try dynamic activations
   (quantized per call) and stay int8 that way when the model still meets it.
3. the whole candidate models are timed against each other and fp32, interleaved, at the deployment
   settings (`threads`, `spinning`; default onnxruntime's own). The fastest wins; a target within the
   spread of the fastest is as fast (ties go to the one with more int8 sites, then onnxruntime QDQ,
   then mixed, then com.onnxopt ops),
   and a difference within the spread is re-measured first (costs.Clock). When the winner is not
   `min_speedup` faster than fp32 beyond the spread (or, within the spread after re-measuring, slower
   than fp32 by the medians), its sites that saved least go back to float
   (half at a time); with none left the optimized fp32 model comes out. The number of whole-model
   timings is reported (one joint timing, one uint8-chain check, a few halvings, at most RETIMES
   repeats each).

Everything is recorded per node in `report.quantization` (per target: kept, or why sent back) and
summarized in the report's messages; a QDQ result is audited for QDQ that onnxruntime did not fuse.
A candidate onnxruntime fails on is dropped with its reason; the fp32 model always remains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import execution, ir, verify
from ...errors import CalibrationError, PassOptionError
from ..base import PassContext, Report, tidy
from . import calibrate
from .accuracy import AccuracySearch
from .cost_search import ORT_ERRORS, CostSearch, first_line
from .common import Emitter, Site, activation_params, find_site, lower_onnxopt
from .costs import Clock, Timed, default_timer, fusion_audit, not_slower, pays  # noqa: F401 (static uses them)
from .heldout import Fidelity, fidelity, split_feeds, sqnr_db  # noqa: F401  (split_feeds: public)

F32 = np.float32
TRUSTED_HELDOUT_SAMPLES = 16  # fewer held-out samples than this: the accuracy verdict comes with a warning
DEFAULT_TOLERANCE = {"cosine": 0.995, "top1": 0.99}
GUARD_OPTIONS = {"tolerance": None, "eval_fn": None, "max_drop": 0.01, "autotune": False,
                 "min_speedup": 1.05, "threads": None, "spinning": None, "holdout": 0.25, "probe": 8,
                 "timer": None}
LABEL = {"onnxopt": "com.onnxopt ops", "onnxruntime": "onnxruntime QDQ", "mixed": "mixed"}


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
    if o["threads"] is not None and (isinstance(o["threads"], bool) or not isinstance(o["threads"], int)
                                     or o["threads"] < 0):
        raise PassOptionError(f"{p.name}: threads must be None (onnxruntime picks) or an int >= 0, "
                              f"got {o['threads']!r}")
    if o["spinning"] not in (None, True, False):
        raise PassOptionError(f"{p.name}: spinning must be None (onnxruntime's default), True or False")
    if float(o["max_drop"]) < 0 or float(o["min_speedup"]) <= 0 or int(o["probe"]) < 0:
        raise PassOptionError(f"{p.name}: max_drop and probe must be >= 0, min_speedup > 0")
    if not 0.0 < float(o["holdout"]) <= 0.5:
        raise PassOptionError(f"{p.name}: holdout must be in (0, 0.5]")


def tolerance_of(options) -> Optional[dict]:
    tol = options["tolerance"]
    if tol is None:
        return None
    if isinstance(tol, (int, float)):
        return {"cosine": float(tol)}
    return {**DEFAULT_TOLERANCE, **tol}


def settings_of(options) -> execution.Settings:
    """The deployment settings the guard times at (None: onnxruntime's defaults)."""
    return execution.Settings(int(options["threads"] or 0), options["spinning"])


def clock_of(options) -> Clock:
    settings = settings_of(options)
    return Clock(options["timer"] or default_timer(settings), settings)


@contextlib.contextmanager
def scratch(ctx: PassContext, graph: gs.Graph):
    """Let the lowering helpers work on a scratch graph without touching the real root or report."""
    saved = ctx.root, ctx.report, ctx._noted
    ctx.root, ctx.report, ctx._noted = graph, Report(), set()
    try:
        yield
    finally:
        ctx.root, ctx.report, ctx._noted = saved


@dataclasses.dataclass
class Plan:
    """One lowering target's choice: the sites it lowers (`ours`: those as com.onnxopt ops when the
    target is mixed), why each other site went back, notes on kept ones, its whole-model timing."""

    target: str
    kept: List[str] = dataclasses.field(default_factory=list)
    ours: frozenset = frozenset()
    dynamic: frozenset = frozenset()  # kept MatMul/Gemm sites with per-call activation quantization
    status: Dict[str, str] = dataclasses.field(default_factory=dict)
    notes: Dict[str, str] = dataclasses.field(default_factory=dict)
    timed: Optional[Timed] = None

    @property
    def label(self) -> str:
        return LABEL[self.target]


class Guard(AccuracySearch, CostSearch):
    """One run of the guards over `graph` (float, after the default pipeline) for quantize_auto."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, static_pass, target: str, options: dict,
                 lower: Callable):
        self.graph, self.ctx, self.static, self.target, self.o = graph, ctx, static_pass, target, options
        self.lower = lower  # static.lower_sites (passed in: static imports this module)
        self.tol = tolerance_of(options)
        self.eval_fn = options["eval_fn"]
        self.accuracy = self.tol is not None or self.eval_fn is not None
        self.clock = clock_of(options)
        self.margin = float(options["min_speedup"])
        # target="auto" with the library built and the cost guard on: every lowering is judged
        self.auto = options.get("target") == "auto" and target == "onnxopt" and bool(options["autotune"])
        self.rows: Dict[str, dict] = {}
        self.sites: Dict[str, Site] = {}
        self.plan = Plan(target)
        self._fid_cache: Dict[tuple, Fidelity] = {}

    # ---- bookkeeping
    def fall_back(self, name: str, reason: str) -> None:
        self.plan.status[name] = reason

    # ---- models
    def build(self, base: onnx.ModelProto, names, shadow: bool = False, fused: bool = False,
              plan: Optional[Plan] = None) -> onnx.ModelProto:
        """`base` with the sites rooted at the nodes `names` lowered as `plan` (default: the current
        one) lowers them (shadow: quantized copies next to the float sites, with both results and each
        site's input as extra outputs; fused: followed by the exact rewrites the int8 preset runs after
        lowering — residual Adds into QConv, uint8 chains — so that timings see what the preset makes)."""
        plan = plan or self.plan
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
                self.lower_plan(g, sites, plan, prefix="qg")
                if fused and plan.target != "onnxruntime":
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

    def lower_plan(self, g: gs.Graph, sites: List[Site], plan: Plan, prefix: str) -> int:
        if plan.target != "mixed":
            return self.lower(g, self.ctx, sites, self.ranges, plan.target, prefix=prefix, dynamic=plan.dynamic)
        ours = [s for s in sites if s.node.name in plan.ours]
        theirs = [s for s in sites if s.node.name not in plan.ours]
        return (self.lower(g, self.ctx, ours, self.ranges, "onnxopt", prefix=prefix, dynamic=plan.dynamic)
                + self.lower(g, self.ctx, theirs, self.ranges, "onnxruntime", prefix=prefix + "m",
                             dynamic=plan.dynamic))

    def run_model(self, model: onnx.ModelProto, names: Optional[List[str]] = None) -> List[List[np.ndarray]]:
        sess = verify.session(model, optimization="basic", threads=0)
        return [sess.run(names, f) for f in self.check]

    def fid_key(self, names) -> tuple:
        names = frozenset(names)
        return self.plan.target, self.plan.ours & names, self.plan.dynamic & names, names

    def evaluate(self, names) -> Fidelity:
        key = self.fid_key(names)
        names = key[-1]
        hit = self._fid_cache.get(key)
        if hit is None:
            hit = self.judge(self.build(self.fp32, names) if names else self.fp32)
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
            return self.finish(None)
        feeds = list(calibrate.iter_feeds(ctx.calibration))
        if not feeds:
            raise CalibrationError("calibration data is empty: it yielded no feeds")
        self.fit, self.check = split_feeds(feeds, float(self.o["holdout"]))
        specs = verify.input_specs(ctx.model)
        self.check = [calibrate.validate_feed(f, specs, len(self.fit) + i) for i, f in enumerate(self.check)]
        # (auto: the ranges every target needs, conv outputs included)
        self.ranges = self.static.calibrate(graph, ctx, sites, "onnxruntime" if self.auto else self.target, self.fit)
        sites = [s for s in sites if s.x.name in self.ranges and not (
            self.target == "onnxruntime" and s.kind == "conv" and s.out.name not in self.ranges)]
        self.sites = {s.node.name: s for s in sites}
        for s in sites:
            self.rows[s.node.name] = {"node": s.node.name, "op": s.node.op, "quantized": False, "reason": "",
                                      "macs": s.macs}
        self.fp32 = calibrate.export_for_calibration(graph, ctx)
        if self.eval_fn is not None:
            self.base_score = float(self.eval_fn(self.fp32))
        self.measure_sites()
        plans = self.plan_targets(list(self.sites))
        if not plans:
            return self.finish(None, plans)
        return self.finish(self.choose(plans) if self.o["autotune"] else plans[0], plans)

    def plan_targets(self, names: List[str]) -> List[Plan]:
        """Each target's kept sites, chosen with its own costs and numerics; a target onnxruntime
        fails on is dropped with its reason."""
        targets = ["onnxopt", "onnxruntime", "mixed"] if self.auto else [self.target]
        plans: List[Plan] = []
        for t in targets:
            self.plan = plan = Plan(t)
            try:
                if t == "onnxopt":
                    kept = names
                    if self.o["autotune"]:
                        kept = self.readmit_chained(self.tune_nodes(kept))
                    plan.ours = frozenset(kept)
                elif t == "onnxruntime":
                    kept = [n for n in names if self.has_qdq(n)]
                else:  # mixed: the sites our ops win, the others (that have one) as QDQ
                    ours = plans[0].ours if plans and plans[0].target == "onnxopt" else frozenset()
                    theirs = [n for n in names if n not in ours and self.has_qdq(n)]
                    if not ours or not theirs:
                        continue  # the same model as one of the others
                    kept, plan.ours = [n for n in names if n in ours or n in theirs], ours
                if self.accuracy:
                    kept = self.dynamic_rescue(kept, self.accuracy_guard(kept))
                plan.kept = kept
                plans.append(plan)
            except ORT_ERRORS as e:
                self.ctx.note(f"guard: {plan.label} dropped: onnxruntime failed on it ({first_line(e)})")
        return plans

    def has_qdq(self, name: str) -> bool:
        s = self.sites[name]
        why = None
        if s.node.op == "ConvTranspose":
            why = "no onnxruntime QDQ lowering for ConvTranspose"
        elif s.kind == "conv" and s.out.name not in self.ranges:
            why = "onnxruntime fuses a Conv only with its output quantized: no output range"
        elif (self.ctx.opset() or 0) < 10:
            why = "QuantizeLinear/DequantizeLinear need opset >= 10"
        if why:
            self.fall_back(name, why)
        return why is None

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

    def finish(self, plan: Optional[Plan], plans: List[Plan] = ()) -> bool:
        ctx = self.ctx
        kept = plan.kept if plan is not None else []
        for n, r in self.rows.items():
            if n not in self.sites:
                continue
            r["quantized"] = n in kept
            if r["quantized"]:
                r["activations"] = "dynamic" if n in plan.dynamic else "static"
                r["reason"] = ("int8 pays" if self.o["autotune"] else "int8") + (", within tolerance" if self.accuracy else "")
                if n in plan.notes:
                    r["reason"] += f" ({plan.notes[n]})"
            else:
                r["reason"] = plan.status.get(n, "") if plan is not None else ""
                r["reason"] = r["reason"] or "cost: no target pays as a whole model"
            if len(plans) > 1:  # every target's own verdict on the site
                r["targets"] = {p.target: ("kept" if n in p.kept else p.status.get(n, "not lowered")) for p in plans}
                r["reason"] += " [" + "; ".join(f"{p.label}: {r['targets'][p.target]}" for p in plans) + "]"
        ctx.report.quantization = list(self.rows.values())
        falls = [r["node"] for r in self.rows.values() if r["reason"].startswith(("accuracy", "cost"))]
        if falls:
            more = f" and {len(falls) - 12} more (all in the table)" if len(falls) > 12 else ""
            ctx.note(f"guard: kept {len(falls)} node(s) in fp32: {', '.join(falls[:12])}{more}")
        if self.clock.whole or self.clock.single:
            ctx.note(f"guard: timed at {self.clock.settings.describe()}: {self.clock.whole} whole-model and "
                     f"{self.clock.single} single-op timing(s)")
        if not kept:
            ctx.note("guard: nothing worth quantizing: the result is the optimized fp32 model")
            return False
        self.plan = plan
        fid = self.evaluate(kept)
        n_samples = sum(next(iter(f.values())).shape[0] if next(iter(f.values())).ndim else 1 for f in self.check)
        want = ""
        if self.eval_fn is not None:
            want = f" (fp32 eval_fn {self.base_score:.5g}, max_drop {self.o['max_drop']:g})"
        elif self.tol is not None:
            want = " (tolerance " + ", ".join(f"{k} >= {v:g}" for k, v in self.tol.items()) + ")"
        ctx.note(f"guard: fidelity on {len(self.check)} held-out feed(s), {n_samples} sample(s): {fid.text()}{want}")
        if n_samples < TRUSTED_HELDOUT_SAMPLES:  # the corpus: 2 held-out samples passed, 12 others lost labels
            text = (f"guard: only {n_samples} held-out sample(s) judged int8's accuracy: too few to trust; give "
                    "more calibration samples (a few hundred real ones)")
            ctx.note("warning: " + text)
            warnings.warn(f"onnxopt: {text}", RuntimeWarning, stacklevel=2)
        if plan.timed is not None:
            tf, tq = self.fp32_timed.median, plan.timed.median
            ctx.note(f"guard: whole model {tq:.3f} ms int8 ({plan.label}) vs {tf:.3f} ms fp32 = "
                     f"{tf / max(tq, 1e-12):.2f}x on a held-out feed (interleaved medians, spread "
                     f"±{max(self.fp32_timed.spread, plan.timed.spread):.0%})")
        if plan.target != "onnxopt":
            audit = fusion_audit(self.build(self.fp32, set(kept), plan=plan))
            msg = (f"guard: onnxruntime fused {audit['fused']} integer op(s), {len(audit['unfused'])} float "
                   f"Conv/MatMul/Gemm left between DequantizeLinear and QuantizeLinear "
                   f"(coverage {audit['coverage']:.0%})")
            if audit["coverage"] < 0.9:
                msg = "warning: " + msg + ": unfused QDQ runs slower than fp32: " + ", ".join(audit["unfused"][:10])
            ctx.note(msg)
        done = self.lower_plan(self.graph, [self.sites[n] for n in kept], plan, prefix="qs")
        ctx.note(f"quantized {done} of {len(self.rows)} node(s) ({plan.target} target, {self.o['method']}, guarded)")
        return done > 0
