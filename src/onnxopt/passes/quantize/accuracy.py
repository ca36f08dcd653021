"""The accuracy half of the quantization guard: which sites go back to fp32 so that a target's int8
model meets the tolerance (see guard.py, step 2), and which MatMul/Gemm sites among those keep int8
with per-call (dynamic) activation quantization instead. A mixin of Guard: it uses the guard's sites,
rows, current plan and evaluate/meets."""
from __future__ import annotations

from typing import Dict, List

import onnx_graphsurgeon as gs

from ...progress import bar as progress_bar


class AccuracySearch:
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
        for n in progress_bar(probe, desc="guard: probing accuracy", unit="node", show=self.o.get("progress", True)):
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
                self.plan.notes[n] = f"accuracy (block {label[n]}): re-admitted after its block went to fp32"
        if label:
            again = f"; {len(readmitted)} node(s) re-admitted to int8: {', '.join(readmitted)}" if readmitted else ""
            self.ctx.note(f"guard: {self.plan.label}: accuracy by block: returned {len(returned)} block(s) to fp32 worst first "
                          f"({'; '.join(returned)}){again}")
        return [n for n in kept if n not in back]

    def dynamic_rescue(self, candidates: List[str], kept: List[str]) -> List[str]:
        """The MatMul/Gemm sites the accuracy step returned to fp32 try dynamic activations (quantized
        per call: no calibrated range to clip, so a transformer's outlier tokens do not cost the
        others their resolution). All of them at once first; when that misses the tolerance, every
        MatMul/Gemm dynamic (each site's error shrinks, so the sum may fit); when that misses too, the
        accuracy search runs again over that model, and the sites that were static go back to static
        if the result still meets the tolerance. The returned sites it keeps stay dynamic."""
        back = [n for n in candidates if n not in kept and self.sites[n].kind == "gemm"
                and self.plan.status.get(n, "").startswith("accuracy")]
        if not back:
            return kept
        static_reason = {n: self.plan.status.pop(n) for n in back}
        self.plan.dynamic = frozenset(back)
        trial = [n for n in candidates if n in kept or n in back]
        if not self.meets(self.evaluate(trial)):
            self.plan.dynamic = frozenset(n for n in trial if self.sites[n].kind == "gemm")
            if not self.meets(self.evaluate(trial)):
                trial = self.accuracy_guard(trial)
                everything = self.plan.dynamic
                self.plan.dynamic = frozenset(n for n in back if n in trial)
                if not self.meets(self.evaluate(trial)):
                    self.plan.dynamic = everything
        self.plan.dynamic = frozenset(n for n in self.plan.dynamic if n in trial)
        for n in self.plan.dynamic - set(back):
            self.plan.notes[n] = "dynamic activations: with the returned sites dynamic, static ones missed the tolerance"
        for n in back:
            if n in self.plan.dynamic:
                self.plan.notes[n] = f"dynamic activations: static u8 missed the tolerance, {static_reason[n]}"
            else:
                self.plan.status[n] = f"{self.plan.status.get(n) or static_reason[n]} (static and dynamic)"
        if self.plan.dynamic:
            rescued = sorted(self.plan.dynamic & set(back))
            self.ctx.note(f"guard: {self.plan.label}: {len(rescued)} MatMul/Gemm site(s) static ranges sent to "
                          f"fp32 keep int8 with dynamic activations ({len(self.plan.dynamic)} dynamic in all): "
                          f"{', '.join(rescued[:12])}")
        return trial
