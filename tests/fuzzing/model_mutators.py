"""Mutations of a model: protobuf fields, dims, dtypes, raw_data lengths, typed fields, names
(non-UTF-8 included), nodes, attributes, opsets, If bodies; and blind damage to its bytes.

Each mutator takes (model, ctx) and returns a description of what it did, or None when it does not
apply to this model."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import onnx
from onnx import TensorProto

from .external_mutators import m_external
from .protowalk import graphs, messages, nodes, tensors, value_names


def _rename_value(model: onnx.ModelProto, old: str, new: str, everywhere: bool, rng) -> None:
    for g in graphs(model.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.name == old:
                v.name = new
        for t in g.initializer:
            if t.name == old:
                t.name = new
        for n in g.node:
            for field in (n.input, n.output):
                for i, x in enumerate(field):
                    if x == old and (everywhere or rng.random() < 0.5):
                        field[i] = new


DTYPES = [v for v in TensorProto.DataType.values()] + [99, 1000]


def m_dims(model, ctx):
    t = ctx.choice(tensors(model))
    dims = list(t.dims)
    how = ctx.choice(["drop", "append1", "zero", "negative", "huge", "double", "int64max", "scalar"])
    if how == "drop" and dims:
        dims.pop()
    elif how == "append1":
        dims.append(1)
    elif how == "zero" and dims:
        dims[0] = 0
    elif how == "negative" and dims:
        dims[-1] = -dims[-1] or -1
    elif how == "huge":
        dims = [2**31] + dims[1:] if dims else [2**31]
    elif how == "double" and dims:
        dims[-1] *= 2
    elif how == "int64max":
        dims = [2**62, 4] if len(dims) != 1 else [2**63 - 1]
    else:
        dims = []
    del t.dims[:]
    t.dims.extend(dims)
    return f"tensor {t.name!r} dims -> {dims} ({how})"


def m_raw_length(model, ctx):
    ts = [t for t in tensors(model) if t.HasField("raw_data")]
    if not ts:
        return None
    t = ctx.choice(ts)
    n = len(t.raw_data)
    new = ctx.choice([0, n - 1, n - 4, n - 12, max(n // 2, 1), n + 1, n + 4, n + 64])
    new = max(new, 0)
    t.raw_data = (t.raw_data + bytes(ctx.rng.integers(0, 256, max(new - n, 0), dtype=np.uint8)))[:new]
    return f"tensor {t.name!r} raw_data {n} -> {new} bytes"


def m_dtype(model, ctx):
    t = ctx.choice(tensors(model))
    old = t.data_type
    t.data_type = int(ctx.choice(DTYPES))
    return f"tensor {t.name!r} data_type {old} -> {t.data_type}"


def m_typed_fields(model, ctx):
    """Values moved out of raw_data into the typed repeated fields, with wrong counts or kinds."""
    ts = [t for t in tensors(model)
          if t.HasField("raw_data") and t.data_type == TensorProto.FLOAT and len(t.raw_data) % 4 == 0]
    if not ts:
        return None
    t = ctx.choice(ts)
    values = np.frombuffer(t.raw_data, np.float32)
    how = ctx.choice(["float_short", "float_long", "both", "int64", "string", "double"])
    t.ClearField("raw_data")
    if how == "float_short":
        t.float_data.extend(values[:-1].tolist())
    elif how == "float_long":
        t.float_data.extend(values.tolist() + [1.0, 2.0])
    elif how == "both":
        t.float_data.extend(values.tolist())
        t.raw_data = values.tobytes()
    elif how == "int64":
        t.int64_data.extend([1] * len(values))
    elif how == "string":
        t.string_data.extend([b"x"] * len(values))
    else:
        t.double_data.extend(values.astype(float).tolist())
    return f"tensor {t.name!r} values in typed fields ({how})"


def m_value_info(model, ctx):
    g = ctx.choice(list(graphs(model.graph)))
    vis = list(g.input) + list(g.output)
    if not vis:
        return None
    v = ctx.choice(vis)
    tt = v.type.tensor_type
    how = ctx.choice(["elem_type", "no_type", "no_shape", "dim_negative", "dim_zero", "extra_dim",
                      "drop_dim", "dim_param_empty", "sequence_type"])
    if how == "elem_type":
        tt.elem_type = int(ctx.choice(DTYPES))
    elif how == "no_type":
        v.ClearField("type")
    elif how == "no_shape":
        tt.ClearField("shape")
    elif how in ("dim_negative", "dim_zero") and len(tt.shape.dim):
        tt.shape.dim[-1].dim_value = -3 if how == "dim_negative" else 0
    elif how == "extra_dim":
        tt.shape.dim.add().dim_value = 5
    elif how == "drop_dim" and len(tt.shape.dim):
        del tt.shape.dim[-1]
    elif how == "dim_param_empty" and len(tt.shape.dim):
        tt.shape.dim[0].dim_param = ""
    elif how == "sequence_type":
        elem = tt.elem_type
        v.type.sequence_type.elem_type.tensor_type.elem_type = elem
    return f"value_info {v.name!r} ({how})"


def m_rename(model, ctx):
    how = ctx.choice(["empty", "duplicate", "long", "unicode", "non_utf8", "slashes", "nul"])
    target = ctx.choice(["value", "value_one_use", "node", "graph", "attribute"])
    names = value_names(model)

    def new_name(old):
        if how == "empty":
            return ""
        if how == "duplicate":
            return ctx.choice(names)
        if how == "long":
            return "n" * 5000
        if how == "unicode":
            return old + "_é中\u202e"
        if how == "non_utf8":
            return ctx.non_utf8(old)
        if how == "slashes":
            return "../../" + old
        return old + "\x00x"

    if target in ("value", "value_one_use"):
        old = ctx.choice(names)
        new = new_name(old)
        _rename_value(model, old, new, everywhere=target == "value", rng=ctx.rng)
    elif target == "node":
        node = ctx.choice(nodes(model))
        old, new = node.name, new_name(node.name)
        node.name = new
    elif target == "graph":
        g = ctx.choice(list(graphs(model.graph)))
        old, new = g.name, new_name(g.name)
        g.name = new
    else:
        attrs = [a for n in nodes(model) for a in n.attribute]
        if not attrs:
            return None
        a = ctx.choice(attrs)
        old, new = a.name, new_name(a.name)
        a.name = new
    return f"{target} {old[:40]!r} renamed ({how})"


OPS = ["Conv", "MatMul", "Gemm", "Add", "Relu", "Identity", "If", "Loop", "Reshape", "QLinearConv",
       "QGemm", "QConv", "DequantizeLinear", "NoSuchOp", "BatchNormalization", "Constant", "Cast"]


def m_node(model, ctx):
    g = ctx.choice(list(graphs(model.graph)))
    if not len(g.node):
        return None
    i = int(ctx.rng.integers(len(g.node)))
    node = g.node[i]
    how = ctx.choice(["op_type", "domain", "drop_input", "extra_input", "empty_input", "drop_output",
                      "remove", "duplicate", "reorder", "self_loop", "unknown_input"])
    if how == "op_type":
        node.op_type = ctx.choice(OPS + ["non_utf8"])
        if node.op_type == "non_utf8":
            node.op_type = ctx.non_utf8(OPS[0])
    elif how == "domain":
        node.domain = ctx.choice(["com.onnxopt", "com.microsoft", "ai.onnx", "ai.onnx.ml", "no.such.domain", "non_utf8"])
        if node.domain == "non_utf8":
            node.domain = ctx.non_utf8("domain")
    elif how == "drop_input" and len(node.input):
        del node.input[-1]
    elif how == "extra_input":
        node.input.append(ctx.choice(value_names(model)))
    elif how == "empty_input" and len(node.input):
        node.input[0] = ""
    elif how == "drop_output" and len(node.output):
        del node.output[-1]
    elif how == "remove":
        del g.node[i]
    elif how == "duplicate":
        g.node.add().CopyFrom(node)
    elif how == "reorder" and len(g.node) > 1:
        moved = onnx.NodeProto()
        moved.CopyFrom(node)
        del g.node[i]
        g.node.append(moved) if i == 0 else g.node.insert(0, moved)
    elif how == "self_loop" and len(node.input) and len(node.output):
        node.input[0] = node.output[0]
    elif how == "unknown_input" and len(node.input):
        node.input[0] = "no_such_value"
    return f"node {node.name!r} ({node.op_type}) {how}"


def m_attribute(model, ctx):
    attrs = [(n, a) for n in nodes(model) for a in n.attribute if a.type != onnx.AttributeProto.GRAPH]
    if not attrs:
        return None
    node, a = ctx.choice(attrs)
    how = ctx.choice(["int", "ints_empty", "ints_negative", "ints_long", "type", "float", "remove", "unknown"])
    if how == "int":
        a.ClearField("ints")
        a.type, a.i = onnx.AttributeProto.INT, int(ctx.choice([0, -1, 3, 2**40]))
    elif how == "ints_empty":
        a.type = onnx.AttributeProto.INTS
        del a.ints[:]
    elif how == "ints_negative":
        a.type = onnx.AttributeProto.INTS
        del a.ints[:]
        a.ints.extend([-1, -2, -1, -2])
    elif how == "ints_long":
        a.type = onnx.AttributeProto.INTS
        a.ints.extend([1] * 7)
    elif how == "type":
        a.type = int(ctx.choice(onnx.AttributeProto.AttributeType.values()))
    elif how == "float":
        a.type, a.f = onnx.AttributeProto.FLOAT, 1.5
    elif how == "remove":
        node.attribute.remove(a)
    else:
        extra = node.attribute.add()
        extra.name, extra.type, extra.i = "no_such_attr", onnx.AttributeProto.INT, 1
    return f"node {node.name!r} attribute {a.name!r} ({how})"


def m_opset(model, ctx):
    how = ctx.choice(["version", "version", "remove_default", "duplicate_default", "custom_domain", "ir_version"])
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if how == "version" and default:
        default[0].version = int(ctx.choice([0, 1, 5, 7, 9, 11, 13, 19, 21, 22, 23, 99, 2**40, -1]))
        return f"default opset -> {default[0].version}"
    if how == "remove_default" and default:
        model.opset_import.remove(default[0])
        return "default opset import removed"
    if how == "duplicate_default":
        model.opset_import.add().CopyFrom(onnx.helper.make_opsetid("", 11))
        return "second default opset import (11)"
    if how == "custom_domain":
        dom = ctx.choice(["com.onnxopt", "com.microsoft", "weird.domain"])
        model.opset_import.add().CopyFrom(onnx.helper.make_opsetid(dom, int(ctx.choice([0, 1, 2, 1000]))))
        return f"opset import {dom}"
    model.ir_version = int(ctx.choice([0, 1, 2, 3, 4, 7, 10, 11, 12, 99, -1]))
    return f"ir_version -> {model.ir_version}"


def m_subgraph(model, ctx):
    ifs = [n for n in nodes(model) if n.op_type == "If"]
    if not ifs:
        return None
    node = ctx.choice(ifs)
    how = ctx.choice(["drop_branch", "branch_outputs", "branch_input", "outer_name", "swap_branch_output_type"])
    branches = [a for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    if how == "drop_branch" and branches:
        node.attribute.remove(ctx.choice(branches))
    elif how == "branch_outputs" and branches:
        g = ctx.choice(branches).g
        g.output.add().CopyFrom(g.output[0])
    elif how == "branch_input" and branches:
        g = ctx.choice(branches).g
        g.input.add().CopyFrom(onnx.helper.make_tensor_value_info("body_in", TensorProto.FLOAT, [1]))
    elif how == "outer_name" and branches:
        g = ctx.choice(branches).g
        if len(g.node) and len(g.node[0].input):
            g.node[0].input[0] = "outer_missing"
    elif branches:
        g = ctx.choice(branches).g
        g.output[0].type.tensor_type.elem_type = TensorProto.INT64
    return f"If {node.name!r} {how}"


_INTS = [0, 1, -1, 2, 7, 255, 2**31 - 1, -2**31, 2**63 - 1, -2**63]


def m_proto_field(model, ctx):
    """Any scalar field of any message of the model set to an edge value (protobuf's own types)."""
    msg = ctx.choice(list(messages(model)))
    fields = [f for f in msg.DESCRIPTOR.fields if f.type != f.TYPE_MESSAGE]
    if not fields:
        return None
    f = ctx.choice(fields)
    if f.is_repeated:
        getattr(msg, f.name).__delitem__(slice(None))
        return f"{msg.DESCRIPTOR.name}.{f.name} cleared"
    if f.type == f.TYPE_STRING:
        value = ctx.choice(["", "x" * 10000, "../../etc/passwd", "\x00", "é"])
    elif f.type == f.TYPE_BYTES:
        value = ctx.choice([b"", b"\xff" * 7, bytes(4099)])
    elif f.type == f.TYPE_ENUM:
        value = int(ctx.choice([v.number for v in f.enum_type.values] + [99]))
    elif f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
        value = float(ctx.choice([0.0, -1.0, float("nan"), float("inf"), 1e38]))
    elif f.type == f.TYPE_BOOL:
        value = not getattr(msg, f.name)
    else:
        value = int(ctx.choice([v for v in _INTS if v >= 0] if f.type in (f.TYPE_UINT32, f.TYPE_UINT64) else _INTS))
        value = value if f.type not in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32, f.TYPE_ENUM) else \
            max(min(value, 2**31 - 1), -2**31)
    try:
        setattr(msg, f.name, value)
    except (ValueError, TypeError):
        return None
    return f"{msg.DESCRIPTOR.name}.{f.name} = {str(value)[:20]!r}"


MODEL_MUTATORS: Dict[str, Callable] = {
    "dims": m_dims, "raw_length": m_raw_length, "dtype": m_dtype, "typed_fields": m_typed_fields,
    "value_info": m_value_info, "rename": m_rename, "node": m_node, "attribute": m_attribute,
    "opset": m_opset, "external": m_external, "subgraph": m_subgraph, "proto_field": m_proto_field,
}
MODEL_WEIGHTS = {"dims": 1.0, "raw_length": 1.0, "dtype": 1.0, "typed_fields": 0.6, "value_info": 0.8,
                 "rename": 1.0, "node": 1.0, "attribute": 0.8, "opset": 1.0, "external": 2.0, "subgraph": 0.5,
                 "proto_field": 1.5}


def mutate_bytes(data: bytes, ctx) -> Tuple[bytes, str]:
    """Blind byte-level damage to the serialized model (protobuf's parser is the target)."""
    rng = ctx.rng
    how = ctx.choice(["truncate", "flip", "insert", "delete", "varint"])
    b = bytearray(data)
    if how == "truncate":
        b = b[:int(rng.integers(1, len(b)))]
    elif how == "flip":
        for _ in range(int(rng.integers(1, 6))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif how == "insert":
        i = int(rng.integers(len(b)))
        b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
    elif how == "delete":
        i = int(rng.integers(len(b)))
        del b[i:i + int(rng.integers(1, 16))]
    else:  # a length prefix made huge
        i = int(rng.integers(len(b)))
        b[i:i + 1] = b"\xff\xff\xff\xff\x0f"
    return bytes(b), f"serialized bytes: {how}"
