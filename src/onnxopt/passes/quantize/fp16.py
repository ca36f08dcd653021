"""convert_fp16: float32 weights and compute -> float16, with an op block list and one Cast per
tensor and direction at each float16/float32 boundary.

Which inputs and outputs of a node change is read from the op's schema: the type variables that
hold a float32 tensor of the node and admit float16 form the node's float set; every input and output
typed by one of them becomes float16 (Resize's roi/scales, typed separately, stay float32; so do
indices, shapes and masks). A node whose float32 tensors are not all in such variables stays float32.
"""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..base import Pass, PassContext, PassOptionError, register_pass

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24
# Stay float32: index/score/shape arithmetic where float16 loses exact integers or ordering
# (NMS, TopK, Range, CumSum), random generators and ops whose output type is an attribute, quantization
# ops (their float side is part of an int8 contract) and control flow (bodies are not converted).
BLOCKED = ("NonMaxSuppression", "TopK", "Range", "CumSum", "RandomNormal", "RandomNormalLike", "RandomUniform",
           "RandomUniformLike", "Multinomial", "Bernoulli", "EyeLike", "ConstantOfShape", "QuantizeLinear",
           "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan")
# Inputs kept float32 even where the schema would allow float16 (coordinates and scale factors).
KEEP_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "RoiAlign": {1}, "GridSample": {1}, "CastLike": {0}}


def _dtype(t: gs.Tensor) -> Optional[np.dtype]:
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def _formal(params, i: int):
    if i < len(params):
        return params[i]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _outer_reads(graph: gs.Graph) -> Set[str]:
    """Names a subgraph reads from an enclosing scope (they must keep their float32 type)."""
    names: Set[str] = set()

    def walk(g: gs.Graph, inner: bool):
        local = {t.name for t in g.inputs} | {t.name for n in g.nodes for t in n.outputs}
        for n in g.nodes:
            if inner:
                names.update(t.name for t in n.inputs if not t.is_empty() and t.name not in local)
            for a in n.attrs.values():
                for sub in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(sub, gs.Graph):
                        walk(sub, True)
    walk(graph, False)
    return names


@register_pass
class ConvertFP16(Pass):
    """float32 weights and compute -> float16 (block list, keep_io_types, minimal Casts)."""

    name = "convert_fp16"
    kind = "quantize"
    exact = False
    idempotent = True  # a second run finds no float32 tensor outside the blocked ops and the IO casts
    recurse_subgraphs = False  # If/Loop/Scan stay float32, bodies included (reported)
    options = {"keep_io_types": True, "op_block_list": (), "node_block_list": ()}

    def validate_options(self) -> None:
        if not isinstance(self.options["keep_io_types"], bool):
            raise PassOptionError(f"{self.name}: keep_io_types must be True or False")
        for k in ("op_block_list", "node_block_list"):
            if isinstance(self.options[k], str):
                raise PassOptionError(f"{self.name}: {k} must be a list of names, not a string")

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        keep_io = bool(self.options["keep_io_types"])
        blocked_ops = set(BLOCKED) | set(self.options["op_block_list"])
        blocked_names = set(self.options["node_block_list"])
        opset = int(graph.opset)
        graph.toposort()
        outer = _outer_reads(graph)
        graph_outputs = {id(t) for t in graph.outputs}
        casts: Dict[Tuple[int, str], gs.Variable] = {}
        halves: Dict[int, gs.Constant] = {}
        changed_vars: Set[int] = set()  # float32 variables this pass turned float16
        stats = {"nodes": 0, "clipped": 0, "flushed": 0, "casts": 0, "blocked": 0}
        if any(n.op in ("If", "Loop", "Scan") for n in graph.nodes):
            ctx.note("If/Loop/Scan and their bodies stay float32 (not converted)")

        def cast(t: gs.Tensor, to: np.dtype) -> gs.Variable:
            key = (id(t), to.name)
            hit = casts.get(key)
            if hit is None:
                hit = gs.Variable(ctx.fresh_name(f"{t.name}_{to.name}"), dtype=to, shape=t.shape)
                code = onnx.TensorProto.FLOAT16 if to == F16 else onnx.TensorProto.FLOAT
                graph.nodes.append(gs.Node("Cast", ctx.fresh_name(f"{t.name}_cast"), {"to": code}, [t], [hit]))
                casts[key] = hit
                stats["casts"] += 1
            return hit

        def half_const(c: gs.Constant) -> gs.Constant:
            hit = halves.get(id(c))
            if hit is None:
                v = np.asarray(ctx.value(c), np.float32)
                big = np.abs(v) > FP16_MAX
                tiny = (v != 0) & (np.abs(v) < FP16_TINY / 2)
                stats["clipped"] += int(big.sum())
                stats["flushed"] += int(tiny.sum())
                h = np.asarray(np.clip(v, -FP16_MAX, FP16_MAX).astype(np.float16))
                hit = gs.Constant(ctx.fresh_name(f"{c.name}_fp16"), h)
                halves[id(c)] = hit
            return hit

        # graph inputs: float32 stays at the boundary (keep_io_types) or becomes float16
        if not keep_io:
            for t in graph.inputs:
                if _dtype(t) == F32 and t.name not in outer:
                    t.dtype = F16
                    changed_vars.add(id(t))

        for node in list(graph.nodes):
            floats = self._float_set(node, opset)
            is_blocked = (node.op in blocked_ops or node.name in blocked_names or floats is None
                          or (node.domain or "") not in ("", "ai.onnx")
                          or any(t.name in outer for t in node.outputs)
                          or (node.op == "Cast" and keep_io and any(id(t) in graph_outputs for t in node.outputs)))
            if is_blocked or not (floats[0] or floats[1]):
                if is_blocked and floats is not None and (floats[0] or floats[1]):
                    stats["blocked"] += 1
                # a float32 consumer: give back float32 where this pass made a tensor float16 (a
                # node with no float compute, e.g. Shape, takes float16 when its schema admits it)
                for i, t in enumerate(node.inputs):
                    if id(t) in changed_vars and (is_blocked or not self._admits(node, i, opset, F16)):
                        node.inputs[i] = cast(t, F32)
                continue
            in_slots, out_slots = floats
            stats["nodes"] += 1
            for i in in_slots:
                t = node.inputs[i]
                if isinstance(t, gs.Constant):
                    if _dtype(t) == F32:
                        node.inputs[i] = half_const(t)
                elif _dtype(t) == F32:
                    node.inputs[i] = cast(t, F16)
            for i, t in enumerate(node.inputs):  # inputs outside the float set that we made float16
                if i not in in_slots and id(t) in changed_vars and not self._admits(node, i, opset, F16):
                    node.inputs[i] = cast(t, F32)
            if node.op == "Cast":
                node.attrs["to"] = onnx.TensorProto.FLOAT16
            for i in out_slots:
                t = node.outputs[i]
                if t.is_empty():
                    continue
                if keep_io and id(t) in graph_outputs:  # keep the float32 output under its name
                    h = gs.Variable(ctx.fresh_name(f"{t.name}_fp16"), dtype=F16, shape=t.shape)
                    node.outputs[i] = h
                    t.inputs.clear()
                    graph.nodes.append(gs.Node("Cast", ctx.fresh_name(f"{t.name}_cast"),
                                               {"to": onnx.TensorProto.FLOAT}, [h], [t]))
                    stats["casts"] += 1
                    changed_vars.add(id(h))
                else:
                    t.dtype = F16
                    changed_vars.add(id(t))
        if stats["clipped"] or stats["flushed"]:
            ctx.note(f"{stats['clipped']} constant value(s) beyond +-65504 clipped, {stats['flushed']} below 2^-25 "
                     "flushed to zero")
        if stats["nodes"]:
            ctx.note(f"{stats['nodes']} node(s) in float16, {stats['blocked']} kept float32 by the block list, "
                     f"{stats['casts']} Cast(s)")
        if stats["nodes"]:
            graph.toposort()
        return stats["nodes"] > 0

    @staticmethod
    def _schema(node: gs.Node, opset: int):
        try:
            return onnx.defs.get_schema(node.op, opset, node.domain or "")
        except Exception:
            return None

    def _admits(self, node: gs.Node, i: int, opset: int, dtype: np.dtype) -> bool:
        schema = self._schema(node, opset)
        p = _formal(schema.inputs, i) if schema is not None else None
        if p is None:
            return False
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        want = "tensor(float16)" if dtype == F16 else "tensor(float)"
        return want in allowed.get(p.type_str, {p.type_str})

    def _float_set(self, node: gs.Node, opset: int):
        """(input slots, output slots) that become float16, ((), ()) when the node has no float32
        tensor to convert, or None when it has one the schema will not let us convert."""
        schema = self._schema(node, opset)
        if schema is None or any(isinstance(a, gs.Graph) for a in node.attrs.values()):
            return None
        if node.op == "Cast":  # the input keeps its type; a cast to float32 becomes a cast to float16
            out = node.outputs[0]
            to_float = int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT and _dtype(out) in (F32, None)
            return ((), (0,)) if to_float else ((), ())
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        keep = KEEP_INPUTS.get(node.op, set())
        tvars: Set[str] = set()
        for params, tensors, is_input in ((schema.inputs, node.inputs, True), (schema.outputs, node.outputs, False)):
            for i, t in enumerate(tensors):
                if t.is_empty() or _dtype(t) not in (F32, F16) or (is_input and i in keep):
                    continue
                p = _formal(params, i)
                if p is None:
                    return None
                if _dtype(t) == F16 and is_input:
                    tvars.add(p.type_str) if p.type_str in allowed else None
                    continue
                if _dtype(t) != F32:
                    continue
                if p.type_str not in allowed or "tensor(float16)" not in allowed[p.type_str]:
                    if is_input:
                        continue  # a fixed float input (e.g. scales): stays float32
                    return None
                tvars.add(p.type_str)
        if not tvars:
            return (), ()
        ins = tuple(i for i, t in enumerate(node.inputs) if not t.is_empty() and i not in keep
                    and (_formal(schema.inputs, i) is not None and _formal(schema.inputs, i).type_str in tvars)
                    and _dtype(t) in (F32, F16, None))
        outs = tuple(i for i, t in enumerate(node.outputs) if _formal(schema.outputs, i) is not None
                     and _formal(schema.outputs, i).type_str in tvars and _dtype(t) in (F32, None))
        if not outs and not any(_dtype(node.inputs[i]) == F32 for i in ins):  # nothing float32 left
            return (), ()
        return ins, outs
