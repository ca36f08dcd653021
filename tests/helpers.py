"""Small-model builders and numeric checks shared by the tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import verify

F = TensorProto.FLOAT


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=(), ir_version=None, value_info=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def ops(model):
    """Op types of the main graph, in order."""
    return [n.op_type for n in model.graph.node]


def assert_equivalent(original, optimized, feeds=None, rtol=1e-4, atol=1e-5, seed=0):
    """Same output names, dtypes, shapes and values (through onnxruntime) as the original."""
    onnx.checker.check_model(optimized)
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    assert [o.type.tensor_type.elem_type for o in optimized.graph.output] == \
        [o.type.tensor_type.elem_type for o in original.graph.output]
    assert [i.name for i in optimized.graph.input] == [i.name for i in original.graph.input]
    feeds = feeds if feeds is not None else verify.make_feeds(original, seed)
    ref = verify.run(original, feeds)
    got = verify.run(optimized, feeds)
    problem = verify.compare(ref, got, rtol=rtol, atol=atol)
    assert problem is None, problem
    return ref, got


def check_valid(original, out):
    """out passes the full checker and keeps the original's graph inputs and outputs (names, types)."""
    onnx.checker.check_model(out, full_check=True)
    for field in ("input", "output"):
        a, b = getattr(original.graph, field), getattr(out.graph, field)
        assert [v.name for v in a] == [v.name for v in b]
        assert [v.type for v in a] == [v.type for v in b]
