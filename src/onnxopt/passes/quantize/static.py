"""quantize_static: Conv/MatMul/Gemm with calibrated u8 activation ranges and s8 per-channel weights;
quantize_auto: static when calibration data is given, dynamic otherwise (the "int8" preset's choice)."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Tuple

import onnx_graphsurgeon as gs

from ... import ir
from ...errors import PassOptionError
from ..base import Pass, PassContext, Refusal, register_pass
from . import calibrate, guard
from .common import (QDQ, Emitter, Site, activation_params, check_common_options, find_site, lower_dynamic_ort,
                     lower_onnxopt, lower_static_ort, resolve_target)
from .dynamic import QuantizeDynamic

STATIC_OPTIONS = {"target": "auto", "method": "minmax", "percentile": 99.999, "bins": 2048, "min_macs": 4096,
                  "op_types": ("Conv", "ConvTranspose", "MatMul", "Gemm"), "exclude": (), "progress": True,
                  "max_batches": None}


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
    """Conv/ConvTranspose/MatMul/Gemm -> int8 with activation ranges calibrated on the given data."""

    name = "quantize_static"
    kind = "quantize"
    exact = False
    idempotent = True  # what it emits has no float weight left to quantize
    needs_calibration = True
    recurse_subgraphs = False  # calibration observes the main graph's tensors
    supported_ops = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    options = dict(STATIC_OPTIONS)

    def validate_options(self) -> None:
        _check_static_options(self)

    def sites(self, graph: gs.Graph, ctx: PassContext, refused: Optional[list] = None) -> List[Site]:
        """The candidate sites; `refused`, when given, collects (node, reason) for the others."""
        refusals: Counter = Counter()
        sites = []
        exclude = set(self.options["exclude"])
        ort_target = resolve_target(self.options["target"]) == "onnxruntime"
        for node in list(graph.nodes):
            if node.op not in self.options["op_types"] or not node.outputs:
                continue
            if node.name in exclude:
                site = Refusal("excluded by option")
            elif node.op == "ConvTranspose" and ort_target:
                site = Refusal("ConvTranspose is quantized for the onnxopt target only")
            else:
                site = find_site(node, graph, ctx)
            if not isinstance(site, Refusal) and site.macs < int(self.options["min_macs"]):
                site = Refusal(f"{node.op} too small for int8 to pay (< min_macs={self.options['min_macs']})")
            if isinstance(site, Refusal):
                refusals[str(site)] += 1
                if refused is not None:
                    refused.append((node, str(site)))
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
        ranges = self.calibrate(graph, ctx, sites, target, ctx.calibration)
        done = lower_sites(graph, ctx, sites, ranges, target)
        ctx.note(f"quantized {done} of {len(sites)} candidate node(s) ({target} target, {self.options['method']})")
        return done > 0

    def calibrate(self, graph: gs.Graph, ctx: PassContext, sites: List[Site], target: str,
                  calibration) -> Dict[str, Tuple[float, float]]:
        """Activation ranges of the tensors `sites` quantize, over the feeds of `calibration`."""
        tensors = [s.x.name for s in sites]
        if target == "onnxruntime":  # onnxruntime fuses a Conv only when its output is quantized too
            tensors += [s.out.name for s in sites if s.kind == "conv"]
        model = calibrate.export_for_calibration(graph, ctx)
        return calibrate.collect_ranges(
            model, tensors, calibration, method=self.options["method"], percentile=float(self.options["percentile"]),
            bins=int(self.options["bins"]), progress=bool(self.options["progress"]),
            max_batches=self.options["max_batches"])


def lower_sites(graph: gs.Graph, ctx: PassContext, sites: List[Site], ranges: Dict[str, Tuple[float, float]],
                target: str, prefix: str = "qs", dynamic: frozenset = frozenset()) -> int:
    """Lower `sites` (found in `graph`) to int8 with the calibrated `ranges`; returns how many were.
    The MatMul/Gemm sites named in `dynamic` quantize their activations per call instead (per row as
    com.onnxopt QGemm, per tensor as onnxruntime's DynamicQuantizeMatMul): the guard's choice for a
    site whose static range costs too much accuracy."""
    em = Emitter(graph, ctx, prefix)
    qdq = QDQ(em, ranges)
    done = 0
    for site in sites:
        if site.node.name in dynamic and site.kind == "gemm":
            if target == "onnxopt":
                lower_onnxopt(em, site)
            else:
                lower_dynamic_ort(em, site)
            done += 1
            continue
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
    return done


@register_pass
class QuantizeAuto(Pass):
    """quantize_static (guarded) when calibration data is given, else quantize_dynamic (the "int8" preset's)."""

    name = "quantize_auto"
    kind = "quantize"
    exact = False
    idempotent = True
    recurse_subgraphs = False  # walks the subgraphs itself for the dynamic case
    supported_ops = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    options = {**STATIC_OPTIONS, **guard.GUARD_OPTIONS}

    def validate_options(self) -> None:
        _check_static_options(self)
        guard.check_guard_options(self)

    def guarded(self) -> bool:
        o = self.options
        return bool(o["autotune"]) or o["tolerance"] is not None or o["eval_fn"] is not None

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        opts = dict(self.options)
        if ctx.calibration is not None:
            static = QuantizeStatic(**{k: v for k, v in opts.items() if k in STATIC_OPTIONS})
            if not self.guarded():
                return static.run(graph, ctx)
            return guard.Guard(graph, ctx, static, resolve_target(opts["target"]), opts, lower_sites).run()
        dyn = QuantizeDynamic(target=opts["target"], min_macs=opts["min_macs"], exclude=opts["exclude"],
                              op_types=tuple(o for o in opts["op_types"] if o in QuantizeDynamic.supported_ops))
        accuracy = opts["tolerance"] is not None or opts["eval_fn"] is not None
        ctx.note("no calibration data: dynamic quantization (MatMul/Gemm only)"
                 + ("; the accuracy guard needs calibration data and did not run" if accuracy else ""))
        if opts["autotune"] and not self._dynamic_pays(graph, ctx, dyn, opts):
            return False

        changed = False
        for g in list(ir.iter_graphs(graph)):
            changed |= bool(dyn.run(g, ctx))
        return changed

    @staticmethod
    def _dynamic_pays(graph: gs.Graph, ctx: PassContext, dyn, opts) -> bool:
        """Cost guard without calibration data: time the whole model fp32 vs dynamic int8 on generated
        inputs (batch 1, other symbolic dims 128) and keep fp32 unless int8 is min_speedup faster."""
        from ... import verify
        from ..base import tidy

        fp32 = calibrate.export_for_calibration(graph, ctx)
        trial = ir.import_graph(fp32)
        with guard.scratch(ctx, trial):
            changed = any([bool(dyn.run(g, ctx)) for g in list(ir.iter_graphs(trial))])
        if not changed:
            return True  # nothing to quantize: let the real run say so
        tidy(trial)
        int8 = ir.export_model(trial, fp32)
        dims = {d.dim_param: (1 if i == 0 else 128) for vi in fp32.graph.input
                for i, d in enumerate(vi.type.tensor_type.shape.dim) if d.dim_param}
        feed = verify.make_feeds(fp32, seed=0, dims=dims)
        clock = guard.clock_of(opts)
        v, t = clock.decide([fp32, int8], [feed, feed], lambda t: guard.pays(t[0], t[1], float(opts["min_speedup"])))
        tf, tq = t[0].median, t[1].median
        speed = tf / tq if tq > 0 else float("inf")
        keep = v if v is not None else guard.not_slower(t[1], t[0], spread=False)
        verdict = "keeps int8" if keep else "kept fp32: nothing worth quantizing, the result is the optimized fp32 model"
        ctx.note(f"guard: dynamic int8 {tq:.3f} ms vs fp32 {tf:.3f} ms = {speed:.2f}x on generated inputs "
                 f"(min {float(opts['min_speedup']):g}x, at {clock.settings.describe()}): {verdict}")
        return keep
