"""chain_qconv_u8 and QConv's uint8 mode: chained convs pass uint8 activations, bit-exactly."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import runtime
from onnxopt.passes.quantize.common import DOMAIN

from .helpers import init, make_model, vi

F32 = np.float32
pytestmark = pytest.mark.skipif(runtime.custom_ops_library() is None, reason="native custom-op library not built")


def chain_net(n_convs=4, seed=0, branch_at=None):
    """Conv(3x3) -> Relu -> depthwise(3x3, stride 2) -> Clip -> 1x1 ... -> GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    C = 8
    nodes, inits = [], []
    x = "x"
    for i in range(n_convs):
        kind = i % 3
        if kind == 0:
            w, attrs = (rng.standard_normal((C, C, 3, 3)) * 0.2).astype(F32), dict(pads=[1, 1, 1, 1])
        elif kind == 1:
            w, attrs = (rng.standard_normal((C, 1, 3, 3)) * 0.5).astype(F32), dict(pads=[1, 1, 1, 1], group=C, strides=[2, 2])
        else:
            w, attrs = (rng.standard_normal((C, C, 1, 1)) * 0.4).astype(F32), {}
        inits += [init(f"w{i}", w), init(f"b{i}", (rng.standard_normal(C) * 0.1).astype(F32))]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], f"conv{i}", **attrs))
        if i % 2 == 0:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"a{i}"], f"relu{i}"))
        else:
            nodes.append(helper.make_node("Clip", [f"c{i}", "lo", "hi"], [f"a{i}"], f"clip{i}"))
        x = f"a{i}"
    inits += [init("lo", np.array(0.0, F32)), init("hi", np.array(6.0, F32))]
    outputs = [vi("y", ["b", C, 1, 1])]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], "gap"))
    if branch_at is not None:
        nodes.append(helper.make_node("Sigmoid", [f"a{branch_at}"], ["side"], "side"))
        outputs.append(vi("side", ["b", C, 8, 8]))
    return make_model(nodes, [vi("x", ["b", C, 16, 16])], outputs, inits, opset=17)


def calib(seed=1, n=6):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8, 16, 16)).astype(F32)} for _ in range(n)]


def quantized(model):
    return onnxopt.optimize(model, ["default", onnxopt.get_pass("quantize_static", target="onnxopt", min_macs=0)],
                            calibration=calib())


def run(model, x):
    return runtime.InferenceSession(model).run(None, {"x": x})


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_chain_is_bit_exact_and_uint8_between_convs():
    q = quantized(chain_net(5))
    chained, report = onnxopt.optimize(q, ["chain_qconv_u8"], return_report=True)
    onnx.checker.check_model(chained, full_check=True)
    ops = [n.op_type for n in chained.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1 and ops.count("QConv") == 5
    assert any("1 QConv chain(s), 3 uint8 link(s)" in t for _, t in report.messages)
    inferred = onnx.shape_inference.infer_shapes(chained)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    convs = [n for n in chained.graph.node if n.op_type == "QConv" and n.domain == DOMAIN]
    assert [types.get(n.output[0]) for n in convs[:4]] == [TensorProto.UINT8] * 4
    assert types.get(convs[4].input[0]) == TensorProto.FLOAT and types.get(convs[4].output[0]) == TensorProto.FLOAT
    x = np.random.default_rng(5).standard_normal((3, 8, 16, 16)).astype(F32) * 1.5
    assert same_bits(run(q, x)[0], run(chained, x)[0])
    assert [o.name for o in chained.graph.output] == ["y"]


def test_chain_fallback_matches_native(monkeypatch):
    pytest.importorskip("onnxruntime_extensions")
    chained = onnxopt.optimize(quantized(chain_net(4)), ["chain_qconv_u8"])
    x = np.random.default_rng(6).standard_normal((2, 8, 16, 16)).astype(F32)
    native = run(chained, x)[0]
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fb = run(chained, x)[0]
    assert same_bits(native, fb)


def test_short_chains_branches_and_idempotence():
    q3 = quantized(chain_net(3))
    assert [n.op_type for n in onnxopt.optimize(q3, ["chain_qconv_u8"]).graph.node] == [n.op_type for n in q3.graph.node]
    short = onnxopt.optimize(q3, [onnxopt.get_pass("chain_qconv_u8", min_length=3)])
    assert [n.op_type for n in short.graph.node].count("QuantizeLinear") == 1
    x = np.random.default_rng(7).standard_normal((1, 8, 16, 16)).astype(F32)
    assert same_bits(run(q3, x)[0], run(short, x)[0])
    # a second consumer of conv1's output splits the 6-conv chain into 2 + 4: only the second is long enough
    qb = quantized(chain_net(6, branch_at=1))
    chained = onnxopt.optimize(qb, ["chain_qconv_u8"])
    assert [n.op_type for n in chained.graph.node].count("QuantizeLinear") == 1
    assert all(same_bits(a, b) for a, b in zip(run(qb, x), run(chained, x)))
    again = onnxopt.optimize(chained, ["chain_qconv_u8"])
    assert [(n.op_type, list(n.input)) for n in again.graph.node] == [(n.op_type, list(n.input)) for n in chained.graph.node]
    with pytest.raises(onnxopt.errors.PassOptionError):
        onnxopt.get_pass("chain_qconv_u8", min_length=2)


def test_dynamic_member_breaks_the_chain():
    q = quantized(chain_net(5))
    convs = [n for n in q.graph.node if n.op_type == "QConv"]
    del convs[2].input[4:]  # conv2 quantizes its input dynamically: 0-1 | 2 | 3-4, none long enough
    chained = onnxopt.optimize(q, ["chain_qconv_u8"])
    assert "QuantizeLinear" not in [n.op_type for n in chained.graph.node]
    del convs[1].input[4:]  # now 2-3-4 (conv2 dynamic itself can start nothing) stays too short as well
    assert "QuantizeLinear" not in [n.op_type for n in onnxopt.optimize(q, ["chain_qconv_u8"]).graph.node]
    q6 = quantized(chain_net(6))
    del [n for n in q6.graph.node if n.op_type == "QConv"][1].input[4:]  # 0 | 1 | 2-3-4-5: one chain of 4
    chained = onnxopt.optimize(q6, ["chain_qconv_u8"])
    assert [n.op_type for n in chained.graph.node].count("QuantizeLinear") == 1
    x = np.random.default_rng(8).standard_normal((1, 8, 16, 16)).astype(F32)
    assert same_bits(run(q6, x)[0], run(chained, x)[0])


def _u8_conv_model(with_y_scale=True, x_type=TensorProto.UINT8):
    rng = np.random.default_rng(3)
    inputs = ["X", "W", "ws", "", "xs", "xz", ""] + (["ys", "yz"] if with_y_scale else [])
    node = helper.make_node("QConv", inputs, ["Y"], "qc", domain=DOMAIN, pads=[1, 1, 1, 1])
    inits = [init("W", rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)), init("ws", np.full(4, 0.01, F32)),
             init("xs", np.array(0.05, F32)), init("xz", np.array(128, np.uint8))]
    if with_y_scale:
        inits += [init("ys", np.array(0.1, F32)), init("yz", np.array(5, np.uint8))]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", x_type, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("Y", x_type, [1, 4, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def test_uint8_qconv_op_matches_kernels_and_checks_inputs():
    from onnxopt import kernels as K
    m = _u8_conv_model()
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(4).integers(0, 256, (1, 3, 6, 6)).astype(np.uint8)
    y = runtime.InferenceSession(m).run(None, {"X": x})[0]
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    ref = K.qconv2d(x, K.pack_conv_weights(w, pads=(1, 1, 1, 1)), np.full(4, 0.01, F32), x_scale=0.05, x_zp=128,
                    y_scale=0.1, y_zp=5)
    assert y.dtype == np.uint8 and np.array_equal(y, ref)
    bad = _u8_conv_model(with_y_scale=False)
    with pytest.raises(Exception, match="y_scale"):
        onnx.shape_inference.infer_shapes(bad, check_type=True, strict_mode=True)
    with pytest.raises(Exception, match="y_scale"):
        runtime.InferenceSession(bad.SerializeToString()).run(None, {"X": x})
    f = _u8_conv_model(with_y_scale=True, x_type=TensorProto.FLOAT)
    with pytest.raises(Exception, match="y_scale"):
        runtime.InferenceSession(f.SerializeToString()).run(None, {"X": x.astype(F32)})


def test_chain_with_omitted_zero_points_is_exact_and_valid():
    q = quantized(chain_net(4))
    convs = [n for n in q.graph.node if n.op_type == "QConv"]
    for n in convs:  # x_zero_point omitted: 0 by the op's contract
        zp = next(t for t in q.graph.initializer if t.name == n.input[5])
        zp.CopyFrom(onnx.numpy_helper.from_array(np.zeros((), np.uint8), zp.name))
        del n.input[5:]
    chained = onnxopt.optimize(q, ["chain_qconv_u8"])
    onnx.checker.check_model(chained, full_check=True)
    names = [t.name for t in chained.graph.initializer]
    assert len(names) == len(set(names))
    x = np.random.default_rng(9).standard_normal((1, 8, 16, 16)).astype(F32)
    assert same_bits(run(q, x)[0], run(chained, x)[0])
