"""Workarounds for onnxruntime's own graph fusions where they make a model slower (measured).

`avoid_skip_layernorm`: onnxruntime (ORT_ENABLE_EXTENDED and up) fuses `Add -> LayerNormalization`
into its com.microsoft `SkipLayerNormalization`. In onnxruntime 1.32 on the AVX-512 Xeons this
project runs on, that fused kernel is 7x slower than the two ops it replaces (1 thread, [1, 128, 768]:
456 us against 60 us for Sum + LayerNormalization), and BERT-base has 24 of them: about 10 ms of an
int8 BERT's 48 ms. Writing the Add as a two-input `Sum` (the same IEEE addition, bit for bit) keeps
onnxruntime from fusing it. Because the slowness is a property of the installed onnxruntime and the
machine, the pass measures both forms on the model's hidden size first and rewrites only when the
unfused pair is clearly faster.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassOptionError, register_pass
from .cleanup import is_default_domain

_DECISIONS: Dict[Tuple[str, int, int], Tuple[bool, float, float]] = {}  # (ort version, D, rows) -> decision


def _time_pair(d: int, rows: int, runs: int = 200) -> Tuple[float, float]:
    """Microseconds per run of Add->LayerNormalization (onnxruntime fuses it) and of
    Sum->LayerNormalization (it does not), [1, rows, d] float32, 1 thread, no spinning, interleaved."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    x = helper.make_tensor_value_info("x", 1, [1, rows, d])
    r = helper.make_tensor_value_info("r", 1, [1, rows, d])
    y = helper.make_tensor_value_info("y", 1, [1, rows, d])
    inits = [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    sessions = []
    for op in ("Add", "Sum"):
        nodes = [helper.make_node(op, ["x", "r"], ["s"]),
                 helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
        m = helper.make_model(helper.make_graph(nodes, "ln", [x, r], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        sessions.append(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, rows, d)).astype(np.float32),
            "r": rng.standard_normal((1, rows, d)).astype(np.float32)}
    for s in sessions:
        for _ in range(5):
            s.run(None, feed)
    samples = [[], []]
    for _ in range(5):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(runs // 5):
                s.run(None, feed)
            samples[i].append((time.perf_counter() - t0) / (runs // 5) * 1e6)
    return float(np.median(samples[0])), float(np.median(samples[1]))


def _candidates(graph: gs.Graph):
    """(Add node, LayerNormalization node) pairs: an Add of two computed tensors (a residual join, not
    a bias: a constant operand stays an Add, so MatMul + bias fusions still see it) feeding a
    LayerNormalization's X."""
    for ln in graph.nodes:
        if ln.op != "LayerNormalization" or not is_default_domain(ln) or not ln.inputs:
            continue
        x = ln.inputs[0]
        if len(x.inputs) != 1:
            continue
        add = x.inputs[0]
        if (add.op == "Add" and is_default_domain(add) and len(add.inputs) == 2
                and not any(isinstance(t, gs.Constant) for t in add.inputs)):
            yield add, ln


@register_pass
class AvoidSkipLayerNorm(Pass):
    """Keep onnxruntime from fusing Add -> LayerNormalization into a slower SkipLayerNormalization."""

    name = "avoid_skip_layernorm"
    kind = "lowering"
    exact = True
    idempotent = True
    options = {"measure": True, "min_speedup": 1.2}

    def validate_options(self) -> None:
        if not isinstance(self.options["measure"], bool):
            raise PassOptionError("avoid_skip_layernorm: measure must be True or False")
        s = self.options["min_speedup"]
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not s >= 1.0:
            raise PassOptionError("avoid_skip_layernorm: min_speedup must be a number >= 1")

    def decide(self, d: int, rows: int, ctx: PassContext) -> bool:
        if not self.options["measure"]:
            return True
        import onnxruntime as ort

        key = (ort.__version__, d, rows)
        if key not in _DECISIONS:
            fused, unfused = _time_pair(d, rows)
            _DECISIONS[key] = (fused >= float(self.options["min_speedup"]) * unfused, fused, unfused)
        ok, fused, unfused = _DECISIONS[key]
        ctx.note(f"onnxruntime {key[0]} on [1, {rows}, {d}]: SkipLayerNormalization {fused:.0f} us, "
                 f"Sum + LayerNormalization {unfused:.0f} us: " + ("unfused" if ok else "left to onnxruntime"))
        return ok

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        pairs = list(_candidates(graph))
        if not pairs:
            return False
        if ctx.opset() < 8:  # Sum broadcasts from opset 8 on
            return False
        shape = ctx.shape(pairs[0][1].inputs[0])
        d = shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
        if d is None:
            scale = ctx.value(pairs[0][1].inputs[1]) if len(pairs[0][1].inputs) > 1 else None
            d = int(scale.shape[-1]) if scale is not None and scale.ndim else None
        if d is None:
            ctx.note("hidden size unknown: left to onnxruntime")
            return False
        rows = 128
        if shape and len(shape) >= 2 and all(isinstance(v, int) and v > 0 for v in shape[:-1]):
            rows = int(np.prod(shape[:-1]))
        if not self.decide(d, min(max(rows, 1), 4096), ctx):
            return False
        for add, _ in pairs:
            add.op = "Sum"
            add.attrs.clear()
        ctx.note(f"{len(pairs)} Add -> LayerNormalization written as Sum -> LayerNormalization")
        return True
