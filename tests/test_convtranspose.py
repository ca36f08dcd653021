"""convtranspose_to_conv: ConvTranspose as Conv + DepthToSpace + Slice (sub-pixel), equal to onnxruntime's
ConvTranspose over a grid of kernels, strides, pads, output_padding/output_shape/auto_pad and groups,
without growing the multiply-adds beyond the ceil(k/s) rounding; its refusals; subgraphs; idempotence;
and int8 quantization of ConvTranspose by the quantizers (the int8 preset's guard decides per site)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt import verify
from onnxopt.passes import base

from .helpers import assert_equivalent, init, make_model, ops, vi
from .test_fusion import both_branches, in_if

F32 = np.float32
PASS = "convtranspose_to_conv"


def ct_model(c=3, m=4, k=(3, 3), hw=(5, 7), n=2, bias=True, group=1, act=None, seed=0, dynamic=False, **attrs):
    """x [n, c, H, W] -> ConvTranspose (name "up") [-> act] -> y; the output shape is onnxruntime's."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    inits = [init("w", rng.standard_normal((c, m // group, kh, kw)).astype(F32))]
    ins = ["x", "w"]
    if bias:
        inits.append(init("b", rng.standard_normal(m).astype(F32)))
        ins.append("b")
    nodes = [helper.make_node("ConvTranspose", ins, ["t" if act else "y"], name="up", group=group, **attrs)]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["t"], ["y"], name="act"))
    elif act == "Clip":
        inits += [init("lo", np.array(-0.5, F32)), init("hi", np.array(0.75, F32))]
        nodes.append(helper.make_node("Clip", ["t", "lo", "hi"], ["y"], name="act"))
    xshape = [n, c, "h", "w"] if dynamic else [n, c, *hw]
    graph = helper.make_graph(nodes, "g", [vi("x", ["batch", c] + xshape[2:] if dynamic else xshape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = verify.run(model, {"x": np.zeros((n, c, *hw), F32)})[0]  # onnxruntime says what the output is
    model.graph.output[0].CopyFrom(vi("y", ["batch", m, "oh", "ow"] if dynamic else list(y.shape)))
    onnx.checker.check_model(model)
    return model, y.shape


def feeds_for(model, shape, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(F32)}


def rewrite(model):
    out, report = onnxopt.optimize(model, [PASS], return_report=True)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def messages(report):
    return " | ".join(text for _, text in report.messages)


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def the_conv(model):
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1, ops(model)
    conv = convs[0]
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[conv.input[1]]
    return conv, w


def conv_rows(conv, w, size, axis):
    """Output length of the rewritten Conv along a spatial axis (stride 1)."""
    pads, dil = attr(conv, "pads"), attr(conv, "dilations", [1, 1])
    return size + pads[axis] + pads[axis + 2] - (w.shape[2 + axis] - 1) * dil[axis]


def check_rewrite(model, shape, out_shape, k, s, pads, n=2, c=3, m=4, group=1):
    """Equal to the ConvTranspose, and the Conv does no more than the ConvTranspose with its kernel
    rounded up to a multiple of the stride, over at most one extra row/column of phases per axis."""
    out, report = rewrite(model)
    assert "ConvTranspose" not in ops(out), messages(report)
    assert_equivalent(model, out, feeds=feeds_for(model, shape))
    conv, w = the_conv(out)
    assert attr(conv, "strides") == [1, 1] and attr(conv, "group", 1) == group
    assert w.shape[0] == m * s[0] * s[1] and w.shape[1] == c // group
    phase_rows = []
    for axis in (0, 1):
        assert w.shape[2 + axis] <= math.ceil(k[axis] / s[axis])  # no zero insertion: the kernel shrinks
        rows = conv_rows(conv, w, shape[2 + axis], axis)
        if max(pads[axis], pads[axis + 2]) < k[axis]:
            assert rows <= math.ceil(out_shape[2 + axis] / s[axis]) + 1
        phase_rows.append(rows)
    if max(pads) < min(k):
        macs = n * phase_rows[0] * phase_rows[1] * int(np.prod(w.shape))
        bound = n * m * (c // group) * (s[0] * math.ceil(k[0] / s[0])) * (s[1] * math.ceil(k[1] / s[1])) \
            * (math.ceil(out_shape[2] / s[0]) + 1) * (math.ceil(out_shape[3] / s[1]) + 1)
        assert macs <= bound
    expect = "DepthToSpace" if s[0] == s[1] > 1 else "Transpose" if s != (1, 1) else None
    if expect:
        assert expect in ops(out)
    else:
        assert "DepthToSpace" not in ops(out) and "Transpose" not in ops(out)
    return out, report


# --------------------------------------------------------------------------------------------- grid

PADS = [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 1), (0, 1, 2, 0)]  # [top, left, bottom, right]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_equal_to_onnxruntime_over_kernels_strides_pads_and_output_padding(k, s):
    cases = 0
    for i, (pads, op) in enumerate(itertools.product(PADS, range(s))):
        shape = (2, 3, 5, 7)
        kk = (k, max(1, k - 1))  # non-square kernel on a non-square input
        full = [(shape[2 + a] - 1) * s + op + kk[a] for a in (0, 1)]
        if any(full[a] - pads[a] - pads[a + 2] < 1 for a in (0, 1)):
            continue
        model, y = ct_model(k=kk, hw=shape[2:], bias=i % 2 == 0, strides=[s, s], pads=list(pads),
                            output_padding=[op, op], seed=i)
        check_rewrite(model, shape, y, kk, (s, s), pads)
        cases += 1
    assert cases >= len(PADS)


@pytest.mark.parametrize("s", [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_unequal_strides_interleave_with_reshape_and_transpose(s):
    for i, (k, pads) in enumerate([((3, 4), (1, 0, 1, 2)), ((2, 5), (0, 0, 0, 0)), ((4, 3), (1, 1, 1, 1))]):
        model, y = ct_model(k=k, hw=(4, 6), strides=list(s), pads=list(pads), seed=i,
                            output_padding=[s[0] - 1, 0])
        check_rewrite(model, (2, 3, 4, 6), y, k, s, pads)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("s,k", [(2, 3), (2, 4), (3, 5), (1, 3)])
def test_output_shape_picks_the_crop_like_onnxruntime(auto_pad, s, k):
    hw = (5, 6)
    for cut in range(0, k):
        full = [(v - 1) * s + k for v in hw]
        target = [f - cut for f in full]
        if min(target) < 1:
            continue
        extra = {"pads": [3, 0, 1, 2]} if auto_pad == "NOTSET" else {}  # ignored with output_shape
        model, y = ct_model(k=(k, k), hw=hw, strides=[s, s], output_shape=target, auto_pad=auto_pad, seed=cut,
                            **extra)
        assert list(y[2:]) == target
        check_rewrite(model, (2, 3, *hw), y, (k, k), (s, s), (0, 0, 0, 0))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("s,k,op", [(2, 3, 0), (2, 4, 1), (3, 5, 2), (1, 2, 0), (2, 2, 0)])
def test_auto_pad(auto_pad, s, k, op):
    model, y = ct_model(k=(k, k), hw=(5, 4), strides=[s, s], auto_pad=auto_pad, output_padding=[op, op])
    if auto_pad != "VALID":
        assert list(y[2:]) == [5 * s, 4 * s]
    check_rewrite(model, (2, 3, 5, 4), y, (k, k), (s, s), (0, 0, 0, 0))


@pytest.mark.parametrize("group,c,m", [(2, 4, 6), (3, 3, 3), (4, 4, 8)])
def test_groups_stay_grouped(group, c, m):
    for s in (1, 2):
        model, y = ct_model(c=c, m=m, group=group, k=(3, 3), strides=[s, s], pads=[1, 1, 1, 1],
                            output_padding=[s - 1, s - 1])
        check_rewrite(model, (2, c, 5, 7), y, (3, 3), (s, s), (1, 1, 1, 1), c=c, m=m, group=group)


def test_dilation_with_stride_one_is_a_dilated_conv():
    model, y = ct_model(k=(3, 2), dilations=[2, 3], pads=[1, 0, 2, 1])
    out, _ = check_rewrite(model, (2, 3, 5, 7), y, (3, 2), (1, 1), (1, 0, 2, 1))
    conv, w = the_conv(out)
    assert attr(conv, "dilations") == [2, 3] and w.shape[2:] == (3, 2)
    # stride 2 on one axis, dilation on the other: still one plain Conv per axis rule
    model, y = ct_model(k=(3, 3), strides=[2, 1], dilations=[1, 2], pads=[1, 1, 1, 1])
    check_rewrite(model, (2, 3, 5, 7), y, (3, 3), (2, 1), (1, 1, 1, 1))


@pytest.mark.parametrize("k,s,pads,op", [(4, 2, (1, 1, 1, 1), 0), (3, 2, (1, 1, 1, 1), 1), (5, 3, (2, 1, 0, 2), 1),
                                         (3, 1, (1, 1, 1, 1), 0)])
def test_symbolic_batch_and_spatial_sizes(k, s, pads, op):
    model, _ = ct_model(k=(k, k), dynamic=True, strides=[s, s], pads=list(pads), output_padding=[op, op])
    out, _ = rewrite(model)
    assert "ConvTranspose" not in ops(out)
    for shape in [(1, 3, 4, 9), (3, 3, 6, 2)]:
        assert_equivalent(model, out, feeds=feeds_for(model, shape))


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_a_following_activation_moves_before_the_interleaving(act):
    model, y = ct_model(k=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1], act=act)
    out, _ = check_rewrite(model, (2, 3, 5, 7), y, (4, 4), (2, 2), (1, 1, 1, 1))
    assert ops(out) == ["Conv", act, "DepthToSpace", "Slice"]


def test_the_benchmark_layers_and_their_multiply_adds():
    """64->32 channels on 56x56: 4x4 s2 p1 needs one extra row/column of phases (57x57 Conv outputs
    for 112x112); 3x3 s2 p1 op1 is a 2x2 kernel with no border and no Slice (16/9 the ConvTranspose's
    multiply-adds: its zero taps)."""
    cases = [((4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1]), ["Conv", "DepthToSpace", "Slice"], (57, 57), 1.04),
             ((3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), ["Conv", "DepthToSpace"],
              (56, 56), 16 / 9 + 1e-9)]
    for k, attrs, want, rows, growth in cases:
        model, y = ct_model(c=64, m=32, k=k, hw=(56, 56), n=1, **attrs)
        assert list(y) == [1, 32, 112, 112]
        out, _ = rewrite(model)
        assert ops(out) == want
        assert_equivalent(model, out, feeds=feeds_for(model, (1, 64, 56, 56)))
        conv, w = the_conv(out)
        assert (conv_rows(conv, w, 56, 0), conv_rows(conv, w, 56, 1)) == rows
        macs = rows[0] * rows[1] * int(np.prod(w.shape))
        assert macs <= growth * 56 * 56 * 64 * 32 * k[0] * k[1]


# ------------------------------------------------------------------------------------------ refusals

def test_refuses_a_weight_that_is_not_a_constant():
    w = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(F32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])
    model = make_model([node], [vi("x", [1, 3, 4, 4]), vi("w", [3, 4, 3, 3])], [vi("y", [1, 4, 9, 9])])
    out, report = rewrite(model)
    assert ops(out) == ["ConvTranspose"]
    assert "up: weight is not a constant initializer" in messages(report)
    assert_equivalent(model, out, feeds={"x": np.ones((1, 3, 4, 4), F32), "w": w})


def test_refuses_a_weight_that_is_also_a_graph_input():
    w = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(F32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])
    model = make_model([node], [vi("x", [1, 3, 4, 4]), vi("w", [3, 4, 3, 3])], [vi("y", [1, 4, 9, 9])],
                       [init("w", w)])  # IR >= 4: the initializer is a default the caller may override
    out, report = rewrite(model)
    assert ops(out) == ["ConvTranspose"] and "w" in [i.name for i in out.graph.input]
    assert "up: weight is not a constant initializer" in messages(report)


@pytest.mark.parametrize("attrs,dynamic,reason", [
    (dict(strides=[2, 2], dilations=[2, 1]), False, "dilation with stride > 1"),
    (dict(strides=[2, 3]), True, "unequal strides with an input of unknown spatial size"),
    (dict(strides=[2, 2], output_shape=[8, 12]), True, "output_shape with an input of unknown spatial size"),
    (dict(strides=[3, 3], auto_pad="SAME_UPPER"), False,
     "auto_pad=SAME_UPPER with input size * stride larger than the full output"),
    (dict(strides=[2, 2], output_shape=[12, 15]), False, "output_shape larger than the full output"),
])
def test_refusals_are_reported(attrs, dynamic, reason):
    k = (1, 1) if attrs.get("auto_pad") else (3, 3)
    model, _ = ct_model(k=k, dynamic=dynamic, **attrs)
    out, report = rewrite(model)
    assert ops(out) == ["ConvTranspose"]
    assert f"refused 1x: up: {reason}" in messages(report)


def test_refuses_opset_below_11():
    model, _ = ct_model(k=(3, 3), strides=[2, 2])
    model.opset_import[0].version = 10
    out, report = rewrite(model)
    assert ops(out) == ["ConvTranspose"] and "opset 10 < 11" in messages(report)


# ----------------------------------------------------------------------------------- graph handling

def test_inside_if_branches():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["t"], ["y"])]
    inits = [init("w", rng.standard_normal((3, 4, 4, 4)).astype(F32)), init("b", rng.standard_normal(4).astype(F32))]
    model = in_if(nodes, [vi("x", [2, 3, 5, 6])], [vi("y", [2, 4, 10, 12])], inits)
    out, _ = rewrite(model)
    for branch in ("then_branch", "else_branch"):
        body = helper.get_attribute_value(next(a for a in out.graph.node[0].attribute if a.name == branch))
        assert [n.op_type for n in body.node] == ["Conv", "Relu", "DepthToSpace", "Slice"]
    both_branches(model, out)


def test_idempotent_and_keeps_names_and_other_readers_of_the_weight():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 3, 3, 3)).astype(F32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="up", strides=[2, 2], pads=[1, 1, 0, 0]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", ["n", 3, 5, 5])], [vi("t", ["n", 3, 10, 10]), vi("c", ["n", 3, 5, 5])],
                       [init("w", w)])
    out, report = rewrite(model)
    assert "ConvTranspose" not in ops(out) and ops(out).count("Conv") == 2
    assert "w" in [t.name for t in out.graph.initializer]  # the other Conv still reads it
    assert_equivalent(model, out, feeds=feeds_for(model, (2, 3, 5, 5)))
    again, report2 = onnxopt.optimize(out, [PASS], return_report=True)
    assert not any(r.changed for r in report2.records)
    assert again.graph.SerializeToString() == out.graph.SerializeToString()


def test_registered_as_an_exact_lowering_outside_the_presets():
    p = onnxopt.get_pass(PASS)
    assert (p.kind, p.exact, p.idempotent) == ("lowering", True, True)
    presets = onnxopt.list_presets()
    assert PASS not in presets["default"] and PASS not in presets["int8"]
    auto = [q for q in base.resolve(["int8"]) if q.name == "quantize_auto"][0]
    assert "ConvTranspose" in auto.options["op_types"]


# ----------------------------------------------------------------------------------------------- int8

def decoder(seed=0):
    """x [n, 16, 14, 14] -> Conv 3x3 + Relu -> ConvTranspose 4x4 s2 p1 (32->16) + Relu (up1) ->
    ConvTranspose 3x3 s2 p1 op1 (16->8, up2) -> y [n, 8, 56, 56]."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(F32)

    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="enc", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="enc_relu"),
             helper.make_node("ConvTranspose", ["r0", "w1", "b1"], ["u1"], name="up1", strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["u1"], ["r1"], name="up1_relu"),
             helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["y"], name="up2", strides=[2, 2],
                              pads=[1, 1, 1, 1], output_padding=[1, 1])]
    inits = [init("w0", w(32, 16, 3, 3)), init("b0", 0.1 * rng.standard_normal(32).astype(F32)),
             init("w1", w(32, 16, 4, 4) * 2), init("b1", 0.1 * rng.standard_normal(16).astype(F32)),
             init("w2", w(16, 8, 3, 3) * 2), init("b2", 0.1 * rng.standard_normal(8).astype(F32))]
    return make_model(nodes, [vi("x", ["n", 16, 14, 14])], [vi("y", ["n", 8, 56, 56])], inits)


def calibration(n=8, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 16, 14, 14)).astype(F32)} for _ in range(n)]


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def int8_preset(timer):
    """The int8 preset, with quantize_auto's timing replaced by `timer` (deterministic decisions)."""
    return [onnxopt.get_pass(p.name, **{**p.options, "timer": timer, "progress": False})
            if p.name == "quantize_auto" else p for p in base.resolve(["int8"])]


def model_ms(model):
    """Fake cost: fp32 convs 1 ms each; int8 convs 0.5 ms, except those of ConvTranspose up2 (2 ms)."""
    cost = 0.0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            cost += 1.0
        elif n.op_type == "QConv":
            cost += 2.0 if n.name.startswith("up2") else 0.5
    return cost


def test_int8_preset_quantizes_a_decoder():
    model = decoder()
    out, report = onnxopt.optimize(model, int8_preset(lambda models, feeds: [1.0] + [0.5] * (len(models) - 1)),
                                   calibration=calibration(), return_report=True)
    onnx.checker.check_model(out, full_check=True)
    assert "ConvTranspose" not in ops(out) and "Conv" not in ops(out)
    qconv = [n for n in out.graph.node if n.op_type == "QConv"]
    assert len(qconv) == 3 and all(n.domain == "com.onnxopt" for n in qconv)
    assert ops(out).count("DepthToSpace") == 2
    up1 = next(n for n in qconv if n.name.startswith("up1"))
    assert attr(up1, "activation").decode() == "relu"  # the Relu after the ConvTranspose folded in
    rows = {r["node"]: r for r in report.quantization}
    assert rows["up1"]["op"] == rows["up2"]["op"] == "ConvTranspose" and rows["up2"]["quantized"]
    x = {"x": np.random.default_rng(9).standard_normal((3, 16, 14, 14)).astype(F32)}
    got = onnxopt.InferenceSession(out).run(None, x)[0]
    ref = verify.run(model, x)[0]
    assert got.shape == ref.shape and cosine(got, ref) > 0.99


def test_a_convtranspose_the_guard_keeps_in_fp32_stays_a_convtranspose():
    model = decoder()
    out, report = onnxopt.optimize(model, int8_preset(lambda models, feeds: [model_ms(m) for m in models]),
                                   calibration=calibration(), return_report=True)
    rows = {r["node"]: r for r in report.quantization}
    assert rows["up1"]["quantized"] and rows["enc"]["quantized"]
    assert not rows["up2"]["quantized"] and rows["up2"]["reason"].startswith("cost")
    assert ops(out).count("ConvTranspose") == 1 and "Conv" not in ops(out)  # up2 untouched, not a float Conv
    assert next(n for n in out.graph.node if n.op_type == "ConvTranspose").name == "up2"
    x = {"x": np.random.default_rng(9).standard_normal((2, 16, 14, 14)).astype(F32)}
    assert cosine(onnxopt.InferenceSession(out).run(None, x)[0], verify.run(model, x)[0]) > 0.99


def test_int8_preset_with_real_timings_never_leaves_a_float_rewrite():
    model = decoder()
    out, report = onnxopt.optimize(model, ["int8"], calibration=calibration(), return_report=True)
    onnx.checker.check_model(out, full_check=True)
    rows = {r["node"]: r for r in report.quantization}
    for name in ("up1", "up2"):
        kept = [n for n in out.graph.node if n.name == name]
        assert (rows[name]["quantized"] and not kept) or (not rows[name]["quantized"] and kept[0].op_type ==
                                                           "ConvTranspose"), rows[name]
    # a Conv left is onnxruntime QDQ's (its weight dequantized) or enc kept in fp32, never a float rewrite
    dq = {o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in dq for n in convs) or (rows["enc"]["quantized"] is False and len(convs) == 1)
    x = {"x": np.random.default_rng(9).standard_normal((2, 16, 14, 14)).astype(F32)}
    assert cosine(onnxopt.InferenceSession(out).run(None, x)[0], verify.run(model, x)[0]) > 0.99


def test_quantize_static_quantizes_convtranspose_unless_told_otherwise():
    model = decoder()
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_static", progress=False, target="onnxopt")],
                         calibration=calibration())
    assert ops(q).count("QConv") == 3 and "ConvTranspose" not in ops(q)
    q, report = onnxopt.optimize(model, [onnxopt.get_pass("quantize_static", progress=False, target="onnxopt",
                                                          op_types=("Conv",))],
                                 calibration=calibration(), return_report=True)
    assert ops(q).count("ConvTranspose") == 2
    q, report = onnxopt.optimize(model, [onnxopt.get_pass("quantize_static", progress=False, target="onnxruntime")],
                                 calibration=calibration(), return_report=True)
    assert ops(q).count("ConvTranspose") == 2
    assert "left 2 node(s) in float: ConvTranspose is quantized for the onnxopt target only" in messages(report)


def test_the_pass_then_quantize_static_for_onnxruntime():
    """With the float rewrite first, the onnxruntime target quantizes the Conv as QDQ (which onnxruntime
    fuses into QLinearConv)."""
    model = decoder()
    q = onnxopt.optimize(model, [PASS, onnxopt.get_pass("quantize_static", progress=False, target="onnxruntime")],
                         calibration=calibration())
    onnx.checker.check_model(q, full_check=True)
    assert "ConvTranspose" not in ops(q) and ops(q).count("DequantizeLinear") >= 6
    x = {"x": np.random.default_rng(9).standard_normal((2, 16, 14, 14)).astype(F32)}
    assert cosine(verify.run(q, x)[0], verify.run(model, x)[0]) > 0.99


@pytest.mark.parametrize("cfg,want", [
    (dict(k=(3, 3), strides=[1, 1], pads=[1, 1, 1, 1]), ["QConv"]),
    (dict(k=(4, 3), strides=[2, 3], pads=[1, 0, 1, 1]), ["QConv", "Reshape", "Transpose", "Reshape", "Slice"]),
    (dict(k=(3, 3), strides=[2, 2], group=2, c=4, m=6, pads=[1, 1, 1, 1]), ["QConv", "DepthToSpace", "Slice"]),
    (dict(k=(2, 2), strides=[2, 2]), ["QConv", "DepthToSpace"]),
    (dict(k=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER", act="Relu"), ["QConv", "DepthToSpace"]),
    (dict(k=(3, 3), strides=[1, 1], dilations=[2, 2], act="Clip"), ["QConv"]),
])
def test_quantize_static_lowers_every_form_of_the_rewrite(cfg, want):
    cfg = {"c": 8, "m": 8, **cfg}
    model, _ = ct_model(hw=(9, 10), **cfg)
    rng = np.random.default_rng(6)
    cal = [{"x": rng.standard_normal((2, cfg["c"], 9, 10)).astype(F32)} for _ in range(4)]
    q = onnxopt.optimize(model, [onnxopt.get_pass("quantize_static", progress=False, target="onnxopt", min_macs=0)],
                         calibration=cal)
    onnx.checker.check_model(q, full_check=True)
    assert ops(q) == want
    if cfg.get("act"):
        assert attr(the_qconv(q), "activation").decode() == cfg["act"].lower()
    got = onnxopt.InferenceSession(q).run(None, cal[0])[0]
    ref = verify.run(model, cal[0])[0]
    assert got.shape == ref.shape and cosine(got, ref) > 0.999


def the_qconv(model):
    return next(n for n in model.graph.node if n.op_type == "QConv")
