"""quantize_embeddings: large float32 Gather tables (embeddings) -> int8 rows with a float32 scale each.

Transformer embedding tables are a large share of the weights (BERT-base's word embeddings: 94 MB of
its 435 MB) and are read by Gather, not by a MatMul, so the MatMul/Gemm/Conv quantizers never touch
them. Here a table `T[V, D]` read only by `Gather(T, ids, axis=0)` is stored as

    s[v] = max|T[v, :]| / 127            (float32; 1 for an all-zero row)
    Q[v, :] = clamp(rint(T[v, :] / s[v]), -127, 127)   int8, round half to even

(the weight numerics of `common.quantize_weight`, one scale per row) and every such Gather becomes

    Mul(Cast(Gather(Q, ids), to=FLOAT), Gather(S, ids))      with S = s as [V, 1]

which is standard ONNX (any opset with these ops), gathers the same rows, and costs a Cast and a Mul
over the gathered rows only (ids.size * D elements, not the table). Each element is off by at most
s[v] / 2 (rounding) plus float32 rounding of the product.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir
from ...errors import PassOptionError
from ..base import Pass, PassContext, register_pass
from ..fusion import _is_const
from .common import F32, Emitter, quantize_weight


def _gather_axis0(node: gs.Node) -> bool:
    return int(node.attrs.get("axis", 0)) in (0, -2)


@register_pass
class QuantizeEmbeddings(Pass):
    """Large float32 Gather tables (embeddings) -> int8 with a float32 scale per row."""

    name = "quantize_embeddings"
    kind = "quantize"
    exact = False
    idempotent = True  # the int8 table is not float32 and the [V, 1] scale table has one column
    recurse_subgraphs = False  # one run walks every graph: a table's uses are counted in all of them
    options = {"min_elements": 65536, "exclude": ()}

    def validate_options(self) -> None:
        m = self.options["min_elements"]
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or int(m) < 0:
            raise PassOptionError(f"quantize_embeddings: min_elements must be an int >= 0, got {m!r}")
        if isinstance(self.options["exclude"], str):
            raise PassOptionError("quantize_embeddings: exclude must be a list of table (initializer) names")

    def _tables(self, graph: gs.Graph, ctx: PassContext) -> Dict[int, Tuple[gs.Tensor, List[Tuple[gs.Graph, gs.Node]]]]:
        """Every constant table some default-domain Gather reads as its data: id -> (table, [(graph, Gather)])."""
        found: Dict[int, Tuple[gs.Tensor, List[Tuple[gs.Graph, gs.Node]]]] = {}
        for g in ir.iter_graphs(graph):
            for node in g.nodes:
                if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) != 2 \
                        or not node.outputs:
                    continue
                t = node.inputs[0]
                if isinstance(t, gs.Constant):
                    found.setdefault(id(t), (t, []))[1].append((g, node))
        return found

    def _refusal(self, ctx: PassContext, graph: gs.Graph, table: gs.Tensor, uses) -> str:
        """Why `table` stays float, or "" when it can be quantized (loads no values)."""
        if not _is_const(ctx, table):
            return "table is a graph input (overridable initializer)"
        if table.name in set(self.options["exclude"]):
            return "excluded by option"
        try:
            float32 = np.dtype(table.dtype) == np.float32
        except TypeError:
            float32 = False
        if not float32:
            return "table is not float32"
        shape = tuple(table.shape)
        if len(shape) != 2:
            return "table is not 2-D"
        if int(np.prod(shape)) < int(self.options["min_elements"]):
            return f"table smaller than min_elements={self.options['min_elements']}"
        if shape[1] < 2:  # int8 + a float32 scale per row would not be smaller (also keeps scale tables float)
            return "table has one column"
        gathers = {id(n) for _, n in uses}
        for g in ir.iter_graphs(graph):
            if any(o is table for o in g.outputs) or any(i is table for i in g.inputs):
                return "table is a graph input or output"
        for consumer in table.outputs:
            if id(consumer) not in gathers:
                return f"table also read by {consumer.op} (e.g. tied weights)"
            if consumer.inputs[1] is table:
                return "table also used as Gather indices"
            if not _gather_axis0(consumer):
                return "Gather along axis 1"
        return ""

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        refusals: Counter = Counter()
        done = []
        for table, uses in self._tables(graph, ctx).values():
            reason = self._refusal(ctx, graph, table, uses)
            if reason:
                refusals[reason] += 1
                continue
            value = ctx.value(table)
            if value is None:
                refusals["table values cannot be read"] += 1
                continue
            value = np.asarray(value, F32)
            if not np.all(np.isfinite(value)):
                refusals["table holds inf or NaN"] += 1
                continue
            q, s = quantize_weight(value, 0)  # one scale per row (axis 0 is the row)
            del value
            em = Emitter(graph, ctx, "qe")
            base = table.name or "table"
            tq = em.const(f"{base}_q", q)
            ts = em.const(f"{base}_scale", s.reshape(-1, 1))
            for g, node in uses:
                self._rewrite(Emitter(g, ctx, "qe"), node, tq, ts, q.shape[1])
            done.append((table.name, tuple(q.shape), 4 * q.size, q.nbytes + s.nbytes, len(uses)))
        for reason, n in sorted(refusals.items()):
            ctx.note(f"left {n} Gather table(s) alone: {reason}")
        if done:
            before, after = sum(d[2] for d in done), sum(d[3] for d in done)
            names = ", ".join(f"{name} {list(shape)} ({n} Gather{'s' if n > 1 else ''})"
                              for name, shape, _, _, n in done)
            ctx.note(f"quantized {len(done)} embedding table(s) to int8 with a scale per row: {names}; "
                     f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        return bool(done)

    @staticmethod
    def _rewrite(em: Emitter, node: gs.Node, tq: gs.Constant, ts: gs.Constant, d: int) -> None:
        """Gather(T, ids) -> Mul(Cast(Gather(Q, ids), FLOAT), Gather(S, ids)), writing the Gather's output."""
        ids, out = node.inputs[1], node.outputs[0]
        lead = list(ids.shape) if ids.shape is not None else None
        base = node.name or "Gather"
        rows_q = em.var("rows_q", np.int8, lead + [d] if lead is not None else None)
        em.node("Gather", [tq, ids], [rows_q], f"{base}_q", axis=0)
        rows = em.var("rows", F32, lead + [d] if lead is not None else None)
        em.node("Cast", [rows_q], [rows], f"{base}_cast", to=int(onnx.TensorProto.FLOAT))
        scales = em.var("row_scale", F32, lead + [1] if lead is not None else None)
        em.node("Gather", [ts, ids], [scales], f"{base}_scale", axis=0)
        node.outputs.clear()  # the old Gather dies; the Mul writes its output (name, dtype, shape kept)
        em.node("Mul", [rows, scales], [out], f"{base}_dequant")
