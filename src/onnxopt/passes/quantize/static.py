"""quantize_static: Conv/MatMul/Gemm with calibrated u8 activation ranges and s8 per-channel weights;
quantize_auto: static when calibration data is given, dynamic otherwise (the "int8" preset's choice)."""
from __future__ import annotations

from collections import Counter
from typing import List

import onnx_graphsurgeon as gs

from ... import ir
from ...errors import PassOptionError
from ..base import Pass, PassContext, Refusal, register_pass
from . import calibrate
from .common import (QDQ, Emitter, Site, activation_params, check_common_options, find_site, lower_onnxopt,
                     lower_static_ort, resolve_target)
from .dynamic import QuantizeDynamic

STATIC_OPTIONS = {"target": "auto", "method": "minmax", "percentile": 99.999, "bins": 2048, "min_macs": 4096,
                  "op_types": ("Conv", "MatMul", "Gemm"), "exclude": (), "progress": True, "max_batches": None}


def _check_static_options(p) -> None:
    check_common_options(p)
    if p.options["method"] not in calibrate.METHODS:
        raise PassOptionError(f"{p.name}: method must be one of {', '.join(calibrate.METHODS)}, "
                              f"got {p.options['method']!r}")
    if not 50.0 < float(p.options["percentile"]) <= 100.0:
        raise PassOptionError(f"{p.name}: percentile must be in (50, 100]")
    if int(p.options["bins"]) < 512:
        raise PassOptionError(f"{p.name}: bins must be >= 512")


@register_pass
class QuantizeStatic(Pass):
    """Conv/MatMul/Gemm -> int8 with activation ranges calibrated on the given data."""

    name = "quantize_static"
    kind = "quantize"
    exact = False
    idempotent = True  # what it emits has no float weight left to quantize
    needs_calibration = True
    recurse_subgraphs = False  # calibration observes the main graph's tensors
    supported_ops = ("Conv", "MatMul", "Gemm")
    options = dict(STATIC_OPTIONS)

    def validate_options(self) -> None:
        _check_static_options(self)

    def sites(self, graph: gs.Graph, ctx: PassContext) -> List[Site]:
        refusals: Counter = Counter()
        sites = []
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
            elif site.macs < int(self.options["min_macs"]):
                refusals[f"{node.op} too small for int8 to pay (< min_macs={self.options['min_macs']})"] += 1
            else:
                sites.append(site)
        for reason, n in sorted(refusals.items()):
            ctx.note(f"left {n} node(s) in float: {reason}")
        return sites

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        target = resolve_target(self.options["target"])
        sites = self.sites(graph, ctx)
        if not sites:
            return False
        tensors = [s.x.name for s in sites]
        if target == "onnxruntime":  # onnxruntime fuses a Conv only when its output is quantized too
            tensors += [s.out.name for s in sites if s.kind == "conv"]
        model = calibrate.export_for_calibration(graph, ctx)
        ranges = calibrate.collect_ranges(
            model, tensors, ctx.calibration, method=self.options["method"], percentile=float(self.options["percentile"]),
            bins=int(self.options["bins"]), progress=bool(self.options["progress"]),
            max_batches=self.options["max_batches"])
        del model
        em = Emitter(graph, ctx, "qs")
        qdq = QDQ(em, ranges)
        done = 0
        for site in sites:
            if site.x.name not in ranges or (target == "onnxruntime" and site.kind == "conv"
                                             and site.out.name not in ranges):
                ctx.note(f"left {site.node.name or site.node.op} in float: no finite calibration values")
                continue
            if target == "onnxopt":
                scale, zp = activation_params(*ranges[site.x.name])
                lower_onnxopt(em, site, scale, zp)
            else:
                xd = qdq.insert(site.x, graph)
                out = site.out
                lower_static_ort(em, site, xd, qdq.params(site.x)[0], graph)
                if site.kind == "conv":
                    qdq.insert(out, graph)
            done += 1
        ctx.note(f"quantized {done} of {len(sites)} candidate node(s) ({target} target, {self.options['method']})")
        return done > 0


@register_pass
class QuantizeAuto(Pass):
    """quantize_static when calibration data is given, else quantize_dynamic (used by the "int8" preset)."""

    name = "quantize_auto"
    kind = "quantize"
    exact = False
    idempotent = True
    recurse_subgraphs = False  # walks the subgraphs itself for the dynamic case
    supported_ops = ("Conv", "MatMul", "Gemm")
    options = dict(STATIC_OPTIONS)

    def validate_options(self) -> None:
        _check_static_options(self)

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        opts = dict(self.options)
        if ctx.calibration is not None:
            return QuantizeStatic(**opts).run(graph, ctx)
        dyn = QuantizeDynamic(target=opts["target"], min_macs=opts["min_macs"], exclude=opts["exclude"],
                              op_types=tuple(o for o in opts["op_types"] if o in QuantizeDynamic.supported_ops))
        ctx.note("no calibration data: dynamic quantization (MatMul/Gemm only)")
        changed = False
        for g in list(ir.iter_graphs(graph)):
            changed |= bool(dyn.run(g, ctx))
        return changed
