"""Tiny, valid seed models for the fuzzer: each case mutates one of these.

Every seed is a few nodes with small tensors (some >= 1 KiB, so onnxopt's payload stripping and the
external-data paths are exercised), a dynamic batch dim so calibration feeds of any batch fit, and
one float input named ``x``. ``SEEDS`` maps a name to a builder returning ``(model, files)``: the
ModelProto and the extra files to lay beside it in the model's folder (external data).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
OPSET = 17


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=OPSET):
    graph = helper.make_graph(nodes, "seed", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(rng):
    """Conv -> BatchNormalization -> Relu -> Add(constant): the fusion and folding passes' food."""
    c, k = 3, 16
    inits = [numpy_helper.from_array(_w(rng, k, c, 3, 3), "conv_w"),  # 1728 bytes: stripped payload
             numpy_helper.from_array(_w(rng, k), "conv_b"),
             numpy_helper.from_array(1 + _w(rng, k) ** 2, "bn_scale"),
             numpy_helper.from_array(_w(rng, k), "bn_bias"),
             numpy_helper.from_array(_w(rng, k), "bn_mean"),
             numpy_helper.from_array(1 + _w(rng, k) ** 2, "bn_var"),
             numpy_helper.from_array(_w(rng, k, 1, 1), "shift")]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                              name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "shift"], ["y"], name="add")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", c, 8, 8])],
                  [helper.make_tensor_value_info("y", F, ["N", k, 8, 8])], inits), {}


def matmul_model(rng):
    """Identity -> MatMul -> Add -> Relu -> MatMul, with a Constant node (an attribute tensor)."""
    inits = [numpy_helper.from_array(_w(rng, 32, 16), "w1"),  # 2048 bytes
             numpy_helper.from_array(_w(rng, 16, 4), "w2")]
    bias = helper.make_node("Constant", [], ["b1"], name="bias",
                            value=numpy_helper.from_array(_w(rng, 16), "b1_value"))
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="ident"), bias,
             helper.make_node("MatMul", ["xi", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 32])],
                  [helper.make_tensor_value_info("y", F, ["N", 4])], inits), {}


def external_model(rng):
    """matmul_model with both weights in one external file ``weights.bin`` (offsets 0 and 4096)."""
    model, _ = matmul_model(rng)
    blob = bytearray()
    for t in model.graph.initializer:
        offset = len(blob) + (-len(blob)) % 4096
        blob.extend(b"\0" * (offset - len(blob)))
        raw = t.raw_data
        blob.extend(raw)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return model, {"weights.bin": bytes(blob)}


def if_model(rng):
    """If(cond) with a body on each branch that reads the outer x and its own initializer/Constant."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["xt"], name="then_ident"),
         helper.make_node("Add", ["xt", "then_c"], ["then_y"], name="then_add")],
        "then", [], [helper.make_tensor_value_info("then_y", F, ["N", 8])],
        [numpy_helper.from_array(_w(rng, 8), "then_c")])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["else_c"], name="else_const",
                          value=numpy_helper.from_array(_w(rng, 8), "else_c_value")),
         helper.make_node("Mul", ["x", "else_c"], ["else_y"], name="else_mul")],
        "else", [], [helper.make_tensor_value_info("else_y", F, ["N", 8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inputs = [helper.make_tensor_value_info("x", F, ["N", 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["N", 8])], []), {}


SEEDS = {"conv": conv_model, "matmul": matmul_model, "external": external_model, "if": if_model}


def calibration_arrays(model: onnx.ModelProto, rng, samples: int = 16) -> dict:
    """One array per graph input, `samples` along axis 0 (the seed's dynamic batch)."""
    out = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
        if vi.type.tensor_type.elem_type == TensorProto.BOOL:
            out[vi.name] = rng.integers(0, 2, [samples]).astype(bool) if not dims else \
                rng.integers(0, 2, [samples, *dims]).astype(bool)
        else:
            out[vi.name] = rng.standard_normal([samples, *dims]).astype(np.float32)
    return out
