"""Constant folding (size-capped, through onnx's reference evaluator) and shape-inference refresh."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .. import ir
from ..errors import PassOptionError
from .base import Pass, PassContext, register_pass
from .cleanup import (NONDETERMINISTIC, Scope, _iter_graph_objects, _opset, _subgraphs, const_value,
                      is_default_domain, onnx_dtype, static_shape)

# Ops never folded: stateful or random, sequence/optional plumbing, and ops other passes remove
# without copying their (possibly large) input.
NO_FOLD = NONDETERMINISTIC | {"Constant", "Identity", "Dropout", "If", "Loop", "Scan", "SequenceMap",
                              "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                              "SequenceAt", "SequenceLength", "SplitToSequence", "ConcatFromSequence",
                              "Optional", "OptionalHasElement", "OptionalGetElement"}
SMALL_DATA = 4096  # constant inputs up to this many elements are given to shape inference as data


def _type_proto(t: gs.Tensor) -> Optional[onnx.TypeProto]:
    dt = onnx_dtype(t)
    if dt is None:
        return None
    shape = static_shape(t) if isinstance(t, gs.Constant) else t.shape
    return onnx.helper.make_tensor_type_proto(dt, None if shape is None else
                                              [d if isinstance(d, (int, np.integer)) and d >= 0 else None
                                               for d in shape])


def _predict_outputs(node: gs.Node, proto: onnx.NodeProto, opset: int) -> Optional[List[tuple]]:
    """(onnx dtype, static shape) of each output, through onnx's per-node shape inference."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
    except Exception:
        return None
    types, data = {}, {}
    for t in node.inputs:
        if t.is_empty():
            continue
        tp = _type_proto(t)
        if tp is None:
            return None
        types[t.name] = tp
        if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) <= SMALL_DATA:
            value = const_value(t)
            if value is None:
                return None
            data[t.name] = onnx.numpy_helper.from_array(value, t.name)
    try:
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data, opset_imports=[onnx.helper.make_opsetid("", opset)])
    except Exception:
        return None
    out = []
    for t in node.outputs:
        if t.is_empty():
            out.append(None)
            continue
        tp = inferred.get(t.name)
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dims = tp.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            return None
        out.append((tp.tensor_type.elem_type, tuple(int(d.dim_value) for d in dims)))
    return out


def _nbytes(dtype: int, shape: tuple) -> int:
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    except Exception:
        size = 8
    return int(np.prod(shape, dtype=np.int64)) * size


def _shape_fold(node: gs.Node, scope: Scope) -> Optional[np.ndarray]:
    """Shape / Size of a statically shaped tensor, or Gather of static dims out of Shape."""
    if node.op in ("Shape", "Size"):
        dims = static_shape(node.inputs[0])
        if dims is None:
            return None
        if node.op == "Size":
            return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        return np.array(dims[start:None if end is None else int(end)], dtype=np.int64)
    if node.op == "Gather" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant):
        shape_node = scope.producer(node.inputs[0])
        if shape_node is None or shape_node.op != "Shape" or not is_default_domain(shape_node) \
                or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        full = shape_node.inputs[0].shape
        if full is None:
            return None
        start, end = int(shape_node.attrs.get("start", 0)), shape_node.attrs.get("end")
        dims = list(full)[start:None if end is None else int(end)]
        idx = const_value(node.inputs[1])
        if idx is None or idx.dtype.kind not in "iu" or np.any(idx >= len(dims)) or np.any(idx < -len(dims)):
            return None
        picked = [dims[int(i)] for i in idx.reshape(-1)]
        if any(not isinstance(d, (int, np.integer)) or d < 0 for d in picked):
            return None
        return np.array(picked, dtype=np.int64).reshape(idx.shape)
    return None


@register_pass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants (and Shape/Size of static shapes), size-capped."""

    name = "fold_constants"
    kind = "fold"
    options = {"max_output_bytes": 1 << 20}

    def validate_options(self):
        v = self.options["max_output_bytes"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise PassOptionError(f"fold_constants: max_output_bytes must be a non-negative int, got {v!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        scope = Scope(graph, ctx)
        opset = _opset(ctx, graph)
        cap = self.options["max_output_bytes"]
        failures: Dict[str, int] = {}
        for node in list(graph.nodes):
            if not node.outputs or any(scope.is_output(t) for t in node.outputs):
                continue
            if not is_default_domain(node) or node.op in NO_FOLD or _subgraphs(node):
                continue
            if node.op == "DequantizeLinear":
                # DQ(int8/int32 initializer) is a quantized weight or bias: folding it to a float
                # constant would erase the QAT structure import_qdq keeps bit-exact (and quadruple the
                # size). Q of a float constant still folds: DQ(int8 constant) is what we want.
                continue
            values = None
            special = _shape_fold(node, scope) if node.op in ("Shape", "Size", "Gather") else None
            if special is not None:
                values = [special]
            else:
                inputs = [t for t in node.inputs if not t.is_empty()]
                if not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
                    continue
                if any(onnx_dtype(t) is None or t._export_dtype is not None and onnx_dtype(t) !=
                       _np_onnx_dtype(t) for t in inputs):
                    continue  # values numpy cannot hold faithfully (e.g. bfloat16 stored as float32)
                proto = OnnxExporter.export_node(node)
                predicted = _predict_outputs(node, proto, opset)
                if predicted is None:
                    continue
                out_bytes = sum(_nbytes(*p) for p in predicted if p is not None)
                if out_bytes > cap and out_bytes > self._freed_bytes(node, scope):
                    continue
                values = self._evaluate(node, proto, opset, failures)
                if values is None or len(values) != len(node.outputs):
                    continue
                if not all(p is None or (isinstance(v, np.ndarray) and tuple(v.shape) == p[1]
                                         and _np_dtype_matches(v, p[0]))
                           for v, p in zip(values, predicted)):
                    failures[node.op] = failures.get(node.op, 0) + 1
                    continue
            outs = list(node.outputs)
            if not all(self._consistent(t, v) for t, v in zip(outs, values) if not t.is_empty()):
                continue
            scope.remove(node)
            for t, v in zip(outs, values):
                if not t.is_empty():
                    t.to_constant(np.asarray(v))
        for op, n in sorted(failures.items()):
            ctx.note(f"could not evaluate {n} {op} node(s); left as they are")
        return scope.commit()

    @staticmethod
    def _freed_bytes(node: gs.Node, scope: Scope) -> int:
        """Bytes of constant inputs that only this node reads (they disappear with it)."""
        seen, total = set(), 0
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen and not scope.is_boundary(t) \
                    and all(c is node for c in t.outputs):
                seen.add(id(t))
                total += ir.nbytes(t)
        return total

    @staticmethod
    def _consistent(t: gs.Tensor, v: np.ndarray) -> bool:
        dt = onnx_dtype(t)
        if dt is not None and not _np_dtype_matches(v, dt):
            return False
        shape = static_shape(t)
        return shape is None or shape == tuple(v.shape)

    @staticmethod
    def _evaluate(node: gs.Node, proto: onnx.NodeProto, opset: int, failures: Dict[str, int]):
        from onnx.reference import ReferenceEvaluator

        try:
            feeds = {t.name: np.asarray(t.values) for t in node.inputs if not t.is_empty()}
            return list(ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds))
        except Exception:
            failures[node.op] = failures.get(node.op, 0) + 1
            return None


def _np_onnx_dtype(t: gs.Constant) -> Optional[int]:
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)))
    except Exception:
        return None


def _np_dtype_matches(v, dtype: int) -> bool:
    if not isinstance(v, np.ndarray):
        return False
    try:
        want = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    except Exception:
        return False
    if dtype == onnx.TensorProto.STRING:
        return v.dtype.kind in "OSU"
    return v.dtype == want


# ----------------------------------------------------------------------------------- infer_shapes

def _signature(root: gs.Graph) -> int:
    return hash(tuple((id(n), tuple(map(id, n.inputs)), tuple(map(id, n.outputs)))
                      for g in _iter_graph_objects(root) for n in g.nodes))


def _skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """The model without stale value_info and with large weights as typed inputs (no bytes copied)."""
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    listed = {t.name for t in graph.inputs}
    inits = []
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in listed:
                listed.add(t.name)
                dt = onnx_dtype(t)
                if int(np.prod(t.shape, dtype=np.int64)) <= SMALL_DATA or dt is None:
                    inits.append(OnnxExporter.export_tensor_proto(t))
                else:
                    inputs.append(onnx.helper.make_tensor_value_info(t.name, dt, list(t.shape)))
    g = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in graph.nodes], graph.name or "g", inputs,
                               outputs, inits)
    opsets = list(graph.import_domains or [])
    if not any(o.domain in ("", "ai.onnx") for o in opsets):
        opsets.insert(0, onnx.helper.make_opsetid("", int(graph.opset)))
    model = onnx.helper.make_model(g, opset_imports=opsets)
    model.functions.extend(OnnxExporter.export_function(f) for f in (graph.functions or []))
    return model


def _collect_types(g: onnx.GraphProto, into: Dict[str, onnx.TypeProto]) -> None:
    for v in g.value_info:
        into[v.name] = v.type
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect_types(a.g, into)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _collect_types(sub, into)


@register_pass
class InferShapes(Pass):
    """Refresh dtypes/shapes of intermediate tensors with onnx shape inference (changes no nodes)."""

    name = "infer_shapes"
    kind = "analysis"
    recurse_subgraphs = False  # one inference over the whole model covers every subgraph

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        sig = _signature(graph)
        if getattr(ctx, "_onnxopt_shapes_sig", None) == (id(graph), sig):
            return False  # nothing changed since the last refresh
        try:
            inferred = onnx.shape_inference.infer_shapes(_skeleton(graph), check_type=False, strict_mode=False,
                                                         data_prop=True)
        except Exception as exc:
            ctx.note(f"shape inference failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                     "shapes left as they were")
            return False
        types: Dict[str, onnx.TypeProto] = {}
        _collect_types(inferred.graph, types)
        scope = Scope(graph, ctx)
        for g in _iter_graph_objects(graph):
            for node in g.nodes:
                for t in node.outputs:
                    if t.is_empty() or not isinstance(t, gs.Variable) or scope.is_boundary(t):
                        continue
                    tp = types.get(t.name)
                    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.elem_type:
                        continue  # not derivable (e.g. custom op): keep what the tensor had
                    tt = tp.tensor_type
                    try:
                        t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                    except Exception:
                        continue
                    t.shape = None if not tt.HasField("shape") else [
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        ctx._onnxopt_shapes_sig = (id(graph), sig)
        return False


DEFAULT = ["fold_constants", "infer_shapes"]
