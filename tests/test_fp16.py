"""convert_fp16: valid, close to float32, keep_io_types, blocked ops stay float32, minimal Casts."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxopt

from .helpers import init, make_model, vi

F32 = np.float32


def small_net():
    """Conv -> Relu -> Resize(x2, float32 scales) -> GAP -> Flatten -> Gemm -> (y, TopK values/indices),
    plus a float constant beyond the float16 range and an int -> float Cast."""
    rng = np.random.default_rng(0)
    ns = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
          helper.make_node("Relu", ["c"], ["r"]),
          helper.make_node("Resize", ["r", "", "scales"], ["up"], mode="nearest"),
          helper.make_node("GlobalAveragePool", ["up"], ["gap"]),
          helper.make_node("Flatten", ["gap"], ["f"]),
          helper.make_node("Gemm", ["f", "fc", "fb"], ["g"], transB=1),
          helper.make_node("Cast", ["k_int"], ["k_f"], to=TensorProto.FLOAT),
          helper.make_node("Mul", ["g", "k_f"], ["gk"]),
          helper.make_node("Min", ["gk", "big"], ["y"]),
          helper.make_node("TopK", ["y", "k"], ["top", "idx"])]
    inits = [init("w", rng.standard_normal((8, 3, 3, 3)).astype(F32) * 0.3), init("b", np.zeros(8, F32)),
             init("scales", np.array([1, 1, 2, 2], F32)), init("fc", rng.standard_normal((10, 8)).astype(F32)),
             init("fb", rng.standard_normal(10).astype(F32)), init("k_int", np.array(2, np.int64)),
             init("big", np.array(1e6, F32)), init("k", np.array([3], np.int64))]
    return make_model(ns, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 10]), vi("top", [2, 3]),
                                                      vi("idx", [2, 3], TensorProto.INT64)], inits, opset=17)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def by_output(model):
    return {o: n for n in model.graph.node for o in n.output}


def dtypes(model):
    m = onnx.shape_inference.infer_shapes(model)
    out = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.input)
           + list(m.graph.output)}
    out.update({t.name: t.data_type for t in m.graph.initializer})
    return out


FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(F32)}


def convert(model, **opts):
    return onnxopt.optimize(model, passes=[onnxopt.get_pass("convert_fp16", **opts)], return_report=True)


def test_valid_close_and_io_kept():
    model = small_net()
    out, report = convert(model)
    onnx.checker.check_model(out, full_check=True)
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    assert [(i.name, i.type.tensor_type.elem_type) for i in out.graph.input] == [("x", TensorProto.FLOAT)]
    ref, got = run(model, FEEDS), run(out, FEEDS)
    for r, g in zip(ref[:2], got[:2]):
        assert g.dtype == np.float32 and g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())
    types = dtypes(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert types[conv.input[1]] == TensorProto.FLOAT16 and types[conv.output[0]] == TensorProto.FLOAT16
    # the constant beyond float16 range was clipped, and the report says so
    assert any("clipped" in text for _, text in report.messages), report.messages


def test_blocked_ops_and_resize_scales_stay_float32():
    out, _ = convert(small_net())
    types = dtypes(out)
    topk = next(n for n in out.graph.node if n.op_type == "TopK")
    assert types[topk.input[0]] == TensorProto.FLOAT and types[topk.output[0]] == TensorProto.FLOAT
    resize = next(n for n in out.graph.node if n.op_type == "Resize")
    assert types[resize.input[0]] == TensorProto.FLOAT16 and types[resize.input[2]] == TensorProto.FLOAT
    out2, _ = convert(small_net(), op_block_list=["Gemm"])
    gemm = next(n for n in out2.graph.node if n.op_type == "Gemm")
    assert dtypes(out2)[gemm.output[0]] == TensorProto.FLOAT


def test_minimal_casts_and_idempotent():
    out, _ = convert(small_net())
    prod = by_output(out)
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    for c in casts:  # no Cast reads a Cast (a pair that would cancel or chain)
        p = prod.get(c.input[0])
        assert p is None or p.op_type != "Cast", (p.name, c.name)
    # the model's int -> float Cast became int -> float16 instead of gaining a second Cast
    assert any(helper.get_attribute_value(c.attribute[0]) == TensorProto.FLOAT16 and c.input[0] == "k_int"
               for c in casts)
    seen = set()
    for c in casts:  # one Cast per tensor and direction
        key = (c.input[0], helper.get_attribute_value(c.attribute[0]))
        assert key not in seen
        seen.add(key)
    again, _ = convert(out)
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in out.graph.node]


def test_keep_io_types_false_gives_a_float16_interface():
    m = small_net()
    out, _ = convert(m, keep_io_types=False)
    onnx.checker.check_model(out, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(out.graph.input) + list(out.graph.output)}
    assert types["x"] == TensorProto.FLOAT16 and types["y"] == TensorProto.FLOAT16
    assert types["idx"] == TensorProto.INT64  # non-float outputs untouched
    got = run(out, {"x": FEEDS["x"].astype(np.float16)})
    ref = run(m, FEEDS)
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0].astype(F32), ref[0], rtol=2e-2, atol=2e-2)
    with pytest.raises(onnxopt.OptimizeError, match="keep_io_types"):
        onnxopt.get_pass("convert_fp16", keep_io_types="no")


def test_control_flow_stays_float32():
    then = helper.make_graph([helper.make_node("Mul", ["a", "two"], ["t"])], "then", [],
                             [vi("t", [2, 4])], [init("two", np.array(2, F32))])
    other = helper.make_graph([helper.make_node("Add", ["a", "two2"], ["e"])], "else", [],
                              [vi("e", [2, 4])], [init("two2", np.array(2, F32))])
    ns = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("If", ["cond"], ["o"], then_branch=then,
                                                                     else_branch=other),
          helper.make_node("Sigmoid", ["o"], ["y"])]
    model = make_model(ns, [vi("x", [2, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 4])], opset=17)
    out, report = convert(model)
    onnx.checker.check_model(out, full_check=True)
    assert any("If/Loop/Scan" in text for _, text in report.messages)
    feeds = {"x": np.arange(8, dtype=F32).reshape(2, 4) - 4, "cond": np.array(True)}
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-2)


def test_bad_option():
    with pytest.raises(onnxopt.OptimizeError):
        onnxopt.get_pass("convert_fp16", op_block_list="TopK")
