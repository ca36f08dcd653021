"""The cost half of the quantization guard (see guard.py, steps 1 and 3): com.onnxopt ops timed site
by site, convs re-admitted in uint8 chains, the whole candidates timed against each other and fp32,
and the winner halved down while it does not pay. A mixin of Guard: it uses the guard's sites, rows,
plans, clock and build."""
from __future__ import annotations

from typing import Dict, List, Optional

import onnx

from ... import execution
from ...progress import bar as progress_bar
from .costs import Timed, not_slower, pays

PREFERENCE = ("onnxruntime", "mixed", "onnxopt")  # among targets within the spread of each other
ORT_ERRORS = execution.RUN_ERRORS


class CostSearch:
    """Steps 1 and 3 of Guard (guard.py's doc); the per-site and whole-model decisions go through
    costs.Clock, so a difference within the measured spread is timed again before it decides."""

    def choose(self, plans: List["Plan"]) -> "Plan":
        """Time the candidates whole against each other and fp32; the winner (see the module doc),
        halved down while it does not pay."""
        cands = [p for p in plans if p.kept]
        if not cands:
            return plans[0]
        feed = self.check[0]
        models = [self.fp32] + [self.build(self.fp32, set(p.kept), fused=True, plan=p) for p in cands]
        try:
            winner, t = self.clock.decide(models, [feed] * len(models), lambda t: self.pick(cands, t))
        except ORT_ERRORS as e:  # one candidate's sessions failed: time each against fp32 alone
            self.ctx.note(f"guard: timing all candidates together failed ({first_line(e)}): timed one by one")
            return self.choose_one_by_one(cands)
        self.fp32_timed = t[0]
        for p, tp in zip(cands, t[1:]):
            p.timed = tp
        winner = winner or self.pick(cands, t, final=True)
        if len(plans) > 1:
            times = ", ".join(f"{p.label} {p.timed.median:.3f} ms ({len(p.kept)} site(s))" if p.kept else
                              f"{p.label}: no site left" for p in plans)
            self.ctx.note(f"guard: whole models: fp32 {t[0].median:.3f} ms, {times}: {winner.label} wins")
        self.plan = winner
        return self.tune_model(winner)

    def pick(self, cands: List["Plan"], t: List[Timed], final: bool = False) -> Optional["Plan"]:
        """The fastest candidate, or one not slower beyond the spread that keeps more sites or comes
        first in PREFERENCE; None (time again) while several are within the spread and not final."""
        timed = dict(zip((p.target for p in cands), t[1:]))
        fastest = min(cands, key=lambda p: timed[p.target].median)
        ties = [p for p in cands if not_slower(timed[p.target], timed[fastest.target])]
        if len(ties) > 1 and not final:
            return None
        # as fast: the one with more int8 (smaller), then the fixed order
        return min(ties, key=lambda p: (-len(p.kept), PREFERENCE.index(p.target)))

    def choose_one_by_one(self, cands: List["Plan"]) -> "Plan":
        feed = self.check[0]
        ok = []
        for p in cands:
            try:
                m = self.build(self.fp32, set(p.kept), fused=True, plan=p)
                self.fp32_timed, p.timed = self.clock.time([self.fp32, m], [feed, feed])
                ok.append(p)
            except ORT_ERRORS as e:
                self.ctx.note(f"guard: {p.label} dropped: onnxruntime failed on it ({first_line(e)})")
                p.kept = []
        if not ok:
            self.plan = cands[0]
            return cands[0]
        best = min(ok, key=lambda p: (p.timed.median, PREFERENCE.index(p.target)))
        self.plan = best
        return self.tune_model(best)

    def single_op(self, name: str):
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
        """com.onnxopt ops' own cost: each site alone, fp32 against int8."""
        cache: Dict[tuple, tuple] = {}
        kept = []
        for n in progress_bar(names, desc="guard: timing nodes", unit="node", show=self.o.get("progress", True)):
            model, feed, key = self.single_op(n)
            if key not in cache:
                v, t = self.clock.decide([model, self.build(model, {n})], [feed, feed],
                                         lambda t: pays(t[0], t[1], self.margin), whole=False)
                keep = v if v is not None else not_slower(t[1], t[0], spread=False)
                cache[key] = (keep, t[0].median, t[1].median)
            keep, tf, tq = cache[key]
            r = self.rows[n]
            r["ms_fp32"], r["ms_int8"] = round(tf, 4), round(tq, 4)
            if keep:
                kept.append(n)
            else:
                speed = tf / tq if tq > 0 else float("inf")
                self.fall_back(n, f"cost: int8 {speed:.2f}x of fp32 alone (< {self.margin:g}x beyond the spread)")
        return kept

    def readmit_chained(self, kept: List[str]) -> List[str]:
        """Sites slower alone can pay inside a chain of uint8 convs (no float tensor in or out): time
        the whole model (with the preset's post-lowering rewrites) with and without the convs the cost
        step returned to float, and take them back when that pays min_speedup beyond the spread."""
        rejected = [n for n in self.sites if n not in kept and self.plan.status.get(n, "").startswith("cost")
                    and self.sites[n].kind == "conv"]  # only QConv chains (QGemm has no uint8 mode)
        if not rejected or not kept:
            return kept
        feed = self.check[0]
        without = self.build(self.fp32, set(kept), fused=True)
        with_all = self.build(self.fp32, set(kept) | set(rejected), fused=True)
        v, t = self.clock.decide([without, with_all], [feed, feed], lambda t: pays(t[0], t[1], self.margin))
        if v is not True:  # within the spread: no evidence the chain pays
            return kept
        ta, tb = t[0].median, t[1].median
        for n in rejected:
            del self.plan.status[n]
            self.plan.notes[n] = f"cost: slower alone, whole model {ta:.3f} -> {tb:.3f} ms with it (uint8 chain)"
        self.ctx.note(f"guard: {len(rejected)} site(s) slower alone re-admitted: the whole model runs "
                      f"{ta / tb:.2f}x faster with them (uint8 chains)")
        return kept + rejected

    def tune_model(self, plan: "Plan") -> "Plan":
        """The winner against fp32: while it does not pay beyond the spread, the sites that saved least
        go back to float, half at a time."""
        feed = self.check[0]
        first = True
        while plan.kept:
            if first and plan.timed is not None:
                v, t = pays(self.fp32_timed, plan.timed, self.margin), [self.fp32_timed, plan.timed]
            else:
                q = self.build(self.fp32, set(plan.kept), fused=True, plan=plan)
                v, t = self.clock.decide([self.fp32, q], [feed, feed], lambda t: pays(t[0], t[1], self.margin))
            first = False
            if v is None:  # within the spread after re-measuring: int8 stays unless slower by the medians
                v = not_slower(t[1], t[0], spread=False)
            self.fp32_timed, plan.timed = t
            if v is not False:
                return plan
            speed = t[0].median / t[1].median if t[1].median > 0 else float("inf")
            gain = sorted(plan.kept, key=lambda n: (self.rows[n].get("ms_fp32", 0) - self.rows[n].get("ms_int8", 0),
                                                    self.rows[n]["macs"]))
            drop = set(gain[:max(1, len(plan.kept) // 2)])
            for n in drop:
                plan.status[n] = (f"cost: whole model int8 {speed:.2f}x of fp32 (< {self.margin:g}x beyond the "
                                  f"spread), least time saved")
            plan.kept = [n for n in plan.kept if n not in drop]
        return plan


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
