"""Quantization passes: known answers against a numpy reference, valid models, both targets."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt import runtime, verify
from onnxopt.passes.quantize import common

from .helpers import init, make_model, vi
from .test_ortops_ref import qgemm_ref

F32 = np.float32


# ------------------------------------------------------------------------------------ references

def ref_weight(w, axis):
    """The documented weight numerics, written independently of the pass."""
    w = np.asarray(w, F32)
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=red) / F32(127)).astype(F32)
    scale[scale == 0] = 1
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def the_node(model, op):
    nodes = [n for n in model.graph.node if n.op_type == op]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0]


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def run_int8(model, feeds):
    return runtime.InferenceSession(model).run(None, feeds)


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_valid(original, quantized):
    onnx.checker.check_model(quantized, full_check=True)
    for field in ("input", "output"):
        a, b = getattr(original.graph, field), getattr(quantized.graph, field)
        assert [v.name for v in a] == [v.name for v in b]
        assert [v.type for v in a] == [v.type for v in b]


def mlp(seed=0, k=64, n=96, rank3=True, bias=True, relu=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    last = "m"
    if bias:
        nodes.append(helper.make_node("Add", [last, "b"], ["a"]))
        last = "a"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["r"]))
        last = "r"
    nodes[-1].output[0] = "y"
    shape_in = ["b", 10, k] if rank3 else ["b", k]
    shape_out = shape_in[:-1] + [n]
    model = make_model(nodes, [vi("x", shape_in)], [vi("y", shape_out)],
                       [init("W", w)] + ([init("b", b)] if bias else []))
    return model, w, b


TARGETS = ["onnxopt", "onnxruntime"]


# ------------------------------------------------------------------------------- quantize_dynamic

def test_dynamic_matmul_add_relu_known_answer():
    model, w, b = mlp()
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt")])
    check_valid(model, q)
    node = the_node(q, "QGemm")
    assert node.domain == "com.onnxopt" and ("com.onnxopt", 1) in [(o.domain, o.version) for o in q.opset_import]
    assert len(q.graph.node) == 1
    vals = inits(q)
    wq, ws, bias = vals[node.input[1]], vals[node.input[2]], vals[node.input[3]]
    rq, rs = ref_weight(w, 1)
    np.testing.assert_array_equal(wq, rq)
    np.testing.assert_array_equal(ws, rs)
    np.testing.assert_array_equal(bias, b)
    assert len(node.input) == 4  # dynamic: no x_scale
    assert attr(node, "activation") == "relu"
    x = np.random.default_rng(1).standard_normal((3, 10, 64)).astype(F32)
    got = run_int8(q, {"x": x})[0]
    want, tol = qgemm_ref(x, rq, rs, b, act="relu")
    assert np.all(np.abs(got - want) <= tol + 1e-6)
    assert cosine(got, verify.run(model, {"x": x})[0]) > 0.999


def test_weight_quantization_numerics():
    w = np.array([[0.5, -2.0, 0.0], [1.0, 1.0, 0.0], [-0.25, 0.635, 0.0]], F32)
    q, s = common.quantize_weight(w, axis=1)
    np.testing.assert_array_equal(s, np.array([1.0 / 127, 2.0 / 127, 1.0], F32))
    np.testing.assert_array_equal(q[:, 0], [64, 127, -32])  # 63.5 rounds half to even -> 64; -31.75 -> -32
    np.testing.assert_array_equal(q[:, 1], [-127, 64, 40])  # 63.5 -> 64; 40.3225 -> 40
    np.testing.assert_array_equal(q[:, 2], [0, 0, 0])
    q2, s2 = common.quantize_weight(np.array([[2.5 / 127 * 2, 1.0]], F32).T, axis=1)  # per column
    assert q2.dtype == np.int8 and s2.shape == (1,)


def test_activation_params():
    s, z = common.activation_params(-1.0, 3.0)
    assert s == F32(4.0 / 255) and z == np.uint8(np.rint(1.0 / F32(4.0 / 255)))
    s, z = common.activation_params(0.5, 2.0)  # widened to hold 0
    assert s == F32(2.0 / 255) and z == 0
    s, z = common.activation_params(-2.0, -1.0)
    assert s == F32(2.0 / 255) and z == 255
    assert common.activation_params(0.0, 0.0) == (1.0, 0)


def test_dynamic_gemm_transb_alpha_beta_c():
    rng = np.random.default_rng(2)
    b_mat = rng.standard_normal((96, 64)).astype(F32)  # [N, K] with transB
    c = rng.standard_normal((1, 96)).astype(F32)
    model = make_model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                       [vi("x", ["n", 64])], [vi("y", ["n", 96])], [init("B", b_mat), init("C", c)])
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt")])
    check_valid(model, q)
    node = the_node(q, "QGemm")
    vals = inits(q)
    rq, rs = ref_weight(0.5 * b_mat.T, 1)
    np.testing.assert_array_equal(vals[node.input[1]], rq)
    np.testing.assert_array_equal(vals[node.input[2]], rs)
    np.testing.assert_allclose(vals[node.input[3]], 2.0 * c.reshape(-1))
    x = rng.standard_normal((5, 64)).astype(F32)
    assert cosine(run_int8(q, {"x": x})[0], verify.run(model, {"x": x})[0]) > 0.999


def test_dynamic_refusals_are_reported():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64)).astype(F32)
    small = rng.standard_normal((4, 4)).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["a"]),  # weight fed at run time
             helper.make_node("MatMul", ["a", "W"], ["b"]),  # quantized
             helper.make_node("MatMul", ["s", "S"], ["y2"])]  # tiny
    nodes[1].output[0] = "y"
    model = make_model(nodes, [vi("x", [2, 64]), vi("w_in", [64, 64]), vi("s", [2, 4])],
                       [vi("y", [2, 64]), vi("y2", [2, 4])], [init("W", w), init("S", small)])
    q, report = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt")],
                                 return_report=True)
    check_valid(model, q)
    assert sorted(n.op_type for n in q.graph.node) == ["MatMul", "MatMul", "QGemm"]
    text = str(report)
    assert "weight is not a constant initializer" in text and "min_macs" in text
    q2 = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt", min_macs=0)])
    assert sorted(n.op_type for n in q2.graph.node) == ["MatMul", "QGemm", "QGemm"]


def test_dynamic_shared_weight_quantized_once():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 64)).astype(F32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])],
                       [vi("x", [2, 64])], [vi("y", [2, 64])], [init("W", w)])
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt")])
    nodes = [n for n in q.graph.node if n.op_type == "QGemm"]
    assert len(nodes) == 2 and nodes[0].input[1] == nodes[1].input[1]
    assert len(q.graph.initializer) == 2  # one int8 weight, one scale


def test_dynamic_bias_not_per_column_stays_an_add():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64)).astype(F32)
    b = rng.standard_normal((10, 64)).astype(F32)  # per row and column: not a bias
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                       [vi("x", [2, 10, 64])], [vi("y", [2, 10, 64])], [init("W", w), init("b", b)])
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxopt")])
    assert [n.op_type for n in q.graph.node] == ["QGemm", "Add"]
    x = rng.standard_normal((2, 10, 64)).astype(F32)
    assert cosine(run_int8(q, {"x": x})[0], verify.run(model, {"x": x})[0]) > 0.999


def test_dynamic_onnxruntime_target_fuses_and_agrees():
    model, w, b = mlp(seed=6, k=128, n=128)
    x = np.random.default_rng(7).standard_normal((4, 10, 128)).astype(F32)
    ref = verify.run(model, {"x": x})[0]
    outs = {}
    for target in TARGETS:
        q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target=target)])
        check_valid(model, q)
        outs[target] = run_int8(q, {"x": x})[0]
        assert cosine(outs[target], ref) > 0.999
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_dynamic", target="onnxruntime")])
    assert not any(o.domain == "com.onnxopt" for o in q.opset_import)
    # plain onnxruntime fuses the standard form into its integer kernel
    import tempfile, os
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "DynamicQuantizeMatMul" in fused and "MatMulInteger" not in fused
    # per-row (ours) vs per-tensor (onnxruntime) activation scales: close, not equal
    assert cosine(outs["onnxopt"], outs["onnxruntime"]) > 0.999


def test_bad_target_option():
    with pytest.raises(onnxopt.PassOptionError):
        onnxopt.get_pass("quantize_dynamic", target="gpu")
