"""quantize_dynamic: MatMul/Gemm with constant weights -> int8 weights, activations quantized per call."""
from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from ..base import Pass, PassContext, Refusal, register_pass
from .common import Emitter, check_common_options, find_site, lower_dynamic_ort, lower_onnxopt, resolve_target


@register_pass
class QuantizeDynamic(Pass):
    """MatMul/Gemm with constant weights -> int8 per-channel weights, activations quantized per call."""

    name = "quantize_dynamic"
    kind = "quantize"
    exact = False
    idempotent = True  # what it emits has no float weight left to quantize
    supported_ops = ("MatMul", "Gemm")
    options = {"target": "auto", "min_macs": 4096, "op_types": ("MatMul", "Gemm"), "exclude": ()}

    def validate_options(self) -> None:
        check_common_options(self)

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        target = resolve_target(self.options["target"])
        em = Emitter(graph, ctx, "dq")
        refusals: Counter = Counter()
        changed = False
        exclude = set(self.options["exclude"])
        for node in list(graph.nodes):
            if node.op not in self.options["op_types"] or not node.outputs:
                continue
            if node.name in exclude:
                refusals["excluded by option"] += 1
                continue
            site = find_site(node, graph, ctx)
            if isinstance(site, Refusal):
                refusals[str(site)] += 1
                continue
            if site.macs < int(self.options["min_macs"]):
                refusals[f"{node.op} too small for int8 to pay (< min_macs={self.options['min_macs']})"] += 1
                continue
            if target == "onnxopt":
                lower_onnxopt(em, site)
            else:
                lower_dynamic_ort(em, site)
            changed = True
        for reason, n in sorted(refusals.items()):
            ctx.note(f"left {n} node(s) in float: {reason}")
        return changed
