"""Walks over a ModelProto: graphs (subgraphs included), tensors, nodes, value names, messages."""
from __future__ import annotations

from typing import List

import onnx
from onnx import TensorProto


def graphs(g: onnx.GraphProto):
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graphs(a.g)
            for sub in a.graphs:
                yield from graphs(sub)


def tensors(model: onnx.ModelProto) -> List[TensorProto]:
    out = []
    for g in graphs(model.graph):
        out.extend(g.initializer)
        for node in g.node:
            out.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return out


def nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    return [n for g in graphs(model.graph) for n in g.node]


def value_names(model: onnx.ModelProto) -> List[str]:
    names = set()
    for g in graphs(model.graph):
        names.update(v.name for v in list(g.input) + list(g.output))
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.update(x for x in list(n.input) + list(n.output) if x)
    return sorted(names)


def messages(msg):
    """Every sub-message of `msg` (depth first), `msg` included."""
    yield msg
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            for sub in value:
                yield from messages(sub)
        else:
            yield from messages(value)
