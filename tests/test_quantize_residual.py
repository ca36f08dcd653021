"""fuse_qconv_residual: Add(QConv, shortcut) [+ Relu/Clip] folded into the QConv, exactly."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt import runtime
from onnxopt.passes.quantize.common import DOMAIN

from .helpers import init, make_model, vi

F32 = np.float32
pytestmark = pytest.mark.skipif(runtime.custom_ops_library() is None, reason="native custom-op library not built")


def residual_net(tail="relu", shortcut_shape=None, seed=0, extra_consumer=False, downsample=False):
    """x -> Conv(3x3) -> Relu -> Conv(3x3) -> Add(., shortcut) -> tail; shortcut = x (or a 1x1 conv)."""
    rng = np.random.default_rng(seed)
    C = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1])]
    inits = [init("w1", (rng.standard_normal((C, C, 3, 3)) * 0.2).astype(F32)), init("b1", rng.standard_normal(C).astype(F32)),
             init("w2", (rng.standard_normal((C, C, 3, 3)) * 0.2).astype(F32)), init("b2", rng.standard_normal(C).astype(F32))]
    short = "x"
    if downsample:
        nodes.append(helper.make_node("Conv", ["x", "wd"], ["sc"], "down"))
        inits.append(init("wd", (rng.standard_normal((C, C, 1, 1)) * 0.3).astype(F32)))
        short = "sc"
    if shortcut_shape is not None:
        nodes.append(helper.make_node("ReduceMean", ["x"], ["xm"], "mean", axes=[2, 3], keepdims=1))
        short = "xm"
    nodes.append(helper.make_node("Add", ["c2", short], ["s"], "add"))
    outputs = [vi("y", ["b", C, 10, 10])]
    if tail == "relu":
        nodes.append(helper.make_node("Relu", ["s"], ["y"], "relu2"))
    elif tail == "clip":
        nodes.append(helper.make_node("Clip", ["s", "lo", "hi"], ["y"], "clip2"))
        inits += [init("lo", np.array(-0.5, F32)), init("hi", np.array(2.0, F32))]
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["y"], "out"))
    if extra_consumer:
        nodes.append(helper.make_node("Sigmoid", ["c2"], ["z"], "side"))
        outputs.append(vi("z", ["b", C, 10, 10]))
    return make_model(nodes, [vi("x", ["b", C, 10, 10])], outputs, inits, opset=17)


def calib(seed=1, n=6):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8, 10, 10)).astype(F32)} for _ in range(n)]


def quantized(model):
    return onnxopt.optimize(model, ["default", onnxopt.get_pass("quantize_static", target="onnxopt", min_macs=0)],
                            calibration=calib())


def qconvs(model):
    return [n for n in model.graph.node if n.op_type == "QConv" and n.domain == DOMAIN]


def act_of(node):
    for a in node.attribute:
        if a.name == "activation":
            return helper.get_attribute_value(a).decode()
    return "none"


def run(model, x):
    return runtime.InferenceSession(model).run(None, {"x": x})


@pytest.mark.parametrize("tail", ["relu", "clip", "none"])
def test_residual_and_activation_fused_bit_exact(tail):
    q = quantized(residual_net(tail))
    fused, report = onnxopt.optimize(q, ["fuse_qconv_residual"], return_report=True)
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert "Add" not in ops and "Relu" not in ops[-1:] and "Clip" not in ops
    conv = [n for n in qconvs(fused) if len(n.input) > 6 and n.input[6]]
    assert len(conv) == 1 and conv[0].input[6] == "x" and conv[0].output[0] == "y"
    assert act_of(conv[0]) == tail
    assert any("1 residual" in text for _, text in report.messages)
    x = np.random.default_rng(5).standard_normal((3, 8, 10, 10)).astype(F32)
    a, b = run(q, x)[0], run(fused, x)[0]
    assert a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))
    assert [o.name for o in fused.graph.output] == ["y"]


def test_opset10_clip_attributes_are_the_fused_bounds():
    """Clip before opset 11 carries min/max as attributes: those are the bounds fused into the QConv
    (they were read as +-inf from the absent inputs, and the clip was lost)."""
    m = residual_net("relu")
    tail = next(n for n in m.graph.node if n.name == "relu2")
    tail.op_type = "Clip"
    tail.attribute.extend([helper.make_attribute("min", -0.5), helper.make_attribute("max", 2.0)])
    m.opset_import[0].version = 10
    q = quantized(m)
    fused = onnxopt.optimize(q, ["fuse_qconv_residual"])
    conv = [n for n in qconvs(fused) if len(n.input) > 6 and n.input[6]]
    assert len(conv) == 1 and act_of(conv[0]) == "clip"
    attrs = {a.name: helper.get_attribute_value(a) for a in conv[0].attribute}
    assert (attrs["clip_min"], attrs["clip_max"]) == (-0.5, 2.0)
    x = np.random.default_rng(5).standard_normal((3, 8, 10, 10)).astype(F32)
    a, b = run(q, x)[0], run(fused, x)[0]
    assert np.array_equal(a.view(np.int32), b.view(np.int32)) and b.max() <= 2.0


def test_both_inputs_qconv_downsample_shortcut():
    q = quantized(residual_net("relu", downsample=True))
    assert len(qconvs(q)) == 3
    fused = onnxopt.optimize(q, ["fuse_qconv_residual"])
    x = np.random.default_rng(6).standard_normal((1, 8, 10, 10)).astype(F32)
    assert np.array_equal(run(q, x)[0], run(fused, x)[0])
    assert [n.op_type for n in fused.graph.node].count("QConv") == 3
    assert "Add" not in [n.op_type for n in fused.graph.node]


def test_refusals_broadcast_shared_output_and_idempotent():
    for model in (residual_net("relu", shortcut_shape="broadcast"), residual_net("relu", extra_consumer=True)):
        q = quantized(model)
        fused, report = onnxopt.optimize(q, ["fuse_qconv_residual"], return_report=True)
        assert [n.op_type for n in fused.graph.node] == [n.op_type for n in q.graph.node]
    q = quantized(residual_net("relu"))
    once = onnxopt.optimize(q, ["fuse_qconv_residual"])
    twice = onnxopt.optimize(once, ["fuse_qconv_residual"])
    assert [(n.op_type, list(n.input)) for n in twice.graph.node] == [(n.op_type, list(n.input)) for n in once.graph.node]


def test_int8_preset_fuses_and_fallback_agrees(monkeypatch):
    model = residual_net("relu")
    from onnxopt.passes import base
    assert "fuse_qconv_residual" in [p.name for p in base.resolve(["int8"])]
    q = onnxopt.optimize(model, ["default", onnxopt.get_pass("quantize_auto", tolerance=None, autotune=False,
                                                             min_macs=0), "fuse_qconv_residual"],
                         calibration=calib())
    assert "Add" not in [n.op_type for n in q.graph.node]
    x = np.random.default_rng(7).standard_normal((2, 8, 10, 10)).astype(F32)
    native = run(q, x)[0]
    ref = onnxopt.verify.run(model, {"x": x})[0]
    assert np.max(np.abs(native - ref)) < 0.1 * np.max(np.abs(ref))
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")  # the Python fallback on the numba kernels
    assert runtime.custom_ops_library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "correct but slow", once per process
        fb = run(q, x)[0]
    assert np.array_equal(native.view(np.int32), fb.view(np.int32))


def test_residual_shape_mismatch_is_a_clear_error():
    q = onnxopt.optimize(quantized(residual_net("relu")), ["fuse_qconv_residual"])
    conv = [n for n in qconvs(q) if len(n.input) > 6][0]
    # feed the residual from a graph input of the wrong spatial size
    conv.input[6] = "r_bad"
    q.graph.input.append(vi("r_bad", [1, 8, 9, 9]))
    with pytest.raises(Exception, match="residual must have the output's shape"):
        onnx.shape_inference.infer_shapes(q, check_type=True, strict_mode=True)
    sess = runtime.InferenceSession(q.SerializeToString())  # ORT does not run our Python inference
    with pytest.raises(Exception, match="residual must have the output's shape"):
        sess.run(None, {"x": np.zeros((1, 8, 10, 10), F32), "r_bad": np.zeros((1, 8, 9, 9), F32)})
