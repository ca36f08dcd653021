"""Fusion passes: each rewrite happens on a minimal model with the same numbers through onnxruntime,
is refused when its condition fails (with the reason in the report), and works inside If/Loop bodies."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.passes import fusion

from .helpers import assert_equivalent, init, make_model, ops, vi

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def run(model, name):
    out, report = onnxopt.optimize(model, passes=[name], return_report=True)
    return out, report


def messages(report):
    return " | ".join(text for _, text in report.messages)


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_input(model, node, i):
    return weights(model)[node.input[i]]


def branch_ops(model, attr="then_branch"):
    node = next(n for n in model.graph.node if n.op_type in ("If", "Loop"))
    return [n.op_type for n in helper.get_attribute_value(next(a for a in node.attribute if a.name == attr)).node]


def in_if(nodes, inputs, outputs, inits=(), opset=17):
    """The same nodes in both branches of an If (tensor names suffixed per branch); outer inputs are
    read from the enclosing scope; `cond` picks the branch."""
    outer = {v.name for v in inputs}

    def branch(suffix):
        def ren(n):
            return n if n in outer or not n else n + suffix
        bn = []
        for i, n in enumerate(nodes):
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{n.name or n.op_type}{i}{suffix}"
            c.input[:] = [ren(i) for i in n.input]
            c.output[:] = [ren(o) for o in n.output]
            bn.append(c)
        binits = []
        for t in inits:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = t.name + suffix
            binits.append(c)
        bouts = []
        for o in outputs:
            c = onnx.ValueInfoProto()
            c.CopyFrom(o)
            c.name = o.name + suffix
            bouts.append(c)
        return helper.make_graph(bn, "branch" + suffix, [], bouts, binits)

    node = helper.make_node("If", ["cond"], [o.name for o in outputs], then_branch=branch("_t"),
                            else_branch=branch("_e"))
    return make_model([node], list(inputs) + [vi("cond", [], TensorProto.BOOL)], outputs, opset=opset)


def both_branches(model, optimized):
    for cond in (True, False):
        feeds = {"cond": np.array(cond)}
        for v in model.graph.input:
            if v.name != "cond":
                shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
                feeds[v.name] = rand(*shape)
        assert_equivalent(model, optimized, feeds=feeds)


# ----------------------------------------------------------------------------------- fold_batchnorm

def bn_nodes(src, out="y", training=False):
    outs = [out] + (["rm", "rv"] if training else [])
    kw = {"training_mode": 1} if training else {}
    return [helper.make_node("BatchNormalization", [src, "g", "be", "mu", "var"], outs, epsilon=1e-3, **kw)]


def bn_inits(m):
    return [init("g", rand(m)), init("be", rand(m)), init("mu", rand(m)),
            init("var", np.abs(rand(m)) + 0.5)]


def bn_scale(m_model, m):
    w = weights(m_model)
    s = w["g"].astype(np.float64) / np.sqrt(w["var"].astype(np.float64) + 1e-3)
    return s, w["be"] - w["mu"] * s


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv(bias):
    ins = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", ins, ["c"], group=2, pads=[1, 1, 1, 1])] + bn_nodes("c")
    inits = [init("w", rand(6, 2, 3, 3))] + ([init("b", rand(6))] if bias else []) + bn_inits(6)
    m = make_model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 5, 5])], inits)
    out, _ = run(m, "fold_batchnorm")
    assert ops(out) == ["Conv"]
    conv = out.graph.node[0]
    s, shift = bn_scale(m, 6)
    w0 = weights(m)
    np.testing.assert_allclose(node_input(out, conv, 1), w0["w"] * s[:, None, None, None], rtol=1e-6)
    b0 = w0["b"] if bias else 0.0
    np.testing.assert_allclose(node_input(out, conv, 2), b0 * s + shift, rtol=1e-5, atol=1e-6)
    assert helper.get_attribute_value(conv.attribute[[a.name for a in conv.attribute].index("group")]) == 2
    assert_equivalent(m, out)


def test_fold_batchnorm_into_grouped_conv_transpose():
    # ConvTranspose weight is [C, M/group, k, k]; with group=2, C=4, M=6, output channel of
    # W[c, j] is (c // 2) * 3 + j.
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2])] + bn_nodes("c")
    inits = [init("w", rand(4, 3, 3, 3)), init("b", rand(6))] + bn_inits(6)
    m = make_model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 6, 7, 7])], inits)
    out, _ = run(m, "fold_batchnorm")
    assert ops(out) == ["ConvTranspose"]
    s, _ = bn_scale(m, 6)
    w0 = weights(m)["w"]
    want = np.stack([w0[c] * s[(c // 2) * 3:(c // 2) * 3 + 3, None, None] for c in range(4)])
    np.testing.assert_allclose(node_input(out, out.graph.node[0], 1), want, rtol=1e-6)
    assert_equivalent(m, out)


@pytest.mark.parametrize("trans_b,with_c", [(1, True), (0, False), (0, True)])
def test_fold_batchnorm_into_gemm(trans_b, with_c):
    w = rand(5, 3) if trans_b else rand(3, 5)
    ins = ["x", "w", "c0"] if with_c else ["x", "w"]
    nodes = [helper.make_node("Gemm", ins, ["c"], transB=trans_b, alpha=0.7, beta=1.3)] + bn_nodes("c")
    inits = [init("w", w)] + ([init("c0", rand(1, 5))] if with_c else []) + bn_inits(5)
    m = make_model(nodes, [vi("x", [4, 3])], [vi("y", [4, 5])], inits)
    out, _ = run(m, "fold_batchnorm")
    assert ops(out) == ["Gemm"]
    assert_equivalent(m, out)


def test_fold_batchnorm_turns_2d_matmul_into_gemm():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["c"])] + bn_nodes("c")
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 5])], [init("w", rand(3, 5))] + bn_inits(5))
    out, _ = run(m, "fold_batchnorm")
    assert ops(out) == ["Gemm"]
    s, shift = bn_scale(m, 5)
    np.testing.assert_allclose(node_input(out, out.graph.node[0], 1), weights(m)["w"] * s, rtol=1e-6)
    np.testing.assert_allclose(node_input(out, out.graph.node[0], 2), shift, rtol=1e-5, atol=1e-6)
    assert_equivalent(m, out)


def test_fold_batchnorm_refuses_3d_matmul():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["c"])] + bn_nodes("c")
    m = make_model(nodes, [vi("x", [2, 5, 3])], [vi("y", [2, 5, 5])], [init("w", rand(3, 5))] + bn_inits(5))
    out, report = run(m, "fold_batchnorm")
    assert ops(out) == ["MatMul", "BatchNormalization"]
    assert "2-D input" in messages(report)


def test_fold_batchnorm_refuses_shared_weight():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Conv", ["x", "w"], ["y2"])] + bn_nodes("c")
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 2, 2]), vi("y2", [1, 3, 2, 2])],
                   [init("w", rand(3, 2, 3, 3))] + bn_inits(3))
    out, report = run(m, "fold_batchnorm")
    assert "BatchNormalization" in ops(out)
    assert "shared" in messages(report)


def test_fold_batchnorm_refuses_graph_input_weight():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])] + bn_nodes("c")
    m = make_model(nodes, [vi("x", [1, 2, 4, 4]), vi("w", [3, 2, 3, 3])], [vi("y", [1, 3, 2, 2])], bn_inits(3))
    out, report = run(m, "fold_batchnorm")
    assert ops(out) == ["Conv", "BatchNormalization"]
    assert "not a constant initializer" in messages(report)


def test_fold_batchnorm_refuses_training_mode():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])] + bn_nodes("c", training=True)
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 2, 2])], [init("w", rand(3, 2, 3, 3))] + bn_inits(3),
                   opset=15)
    out, report = run(m, "fold_batchnorm")
    assert ops(out) == ["Conv", "BatchNormalization"]
    assert "training mode" in messages(report)


@pytest.mark.parametrize("ir_version,folds", [(3, True), (7, False)])
def test_fold_batchnorm_overridable_initializer(ir_version, folds):
    # An initializer listed as a graph input can be fed by the caller from IR 4 on (onnxruntime
    # treats it as a default value); in IR 3 every initializer is listed and stays constant.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])] + bn_nodes("c")
    inits = [init("w", rand(3, 2, 3, 3))] + bn_inits(3)
    extra = [vi("w", [3, 2, 3, 3])] + ([vi(t.name, list(t.dims)) for t in inits[1:]] if ir_version < 4 else [])
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])] + extra, [vi("y", [1, 3, 2, 2])], inits, opset=8,
                   ir_version=ir_version)
    out, report = run(m, "fold_batchnorm")
    assert ("BatchNormalization" not in ops(out)) == folds
    if not folds:
        assert "'w' is not a constant initializer" in messages(report)


def test_fold_batchnorm_inside_if():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"])] + bn_nodes("c")
    m = in_if(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 2, 2])],
              [init("w", rand(3, 2, 3, 3)), init("b", rand(3))] + bn_inits(3))
    out, _ = run(m, "fold_batchnorm")
    assert branch_ops(out, "then_branch") == ["Conv"] and branch_ops(out, "else_branch") == ["Conv"]
    both_branches(m, out)


# -------------------------------------------------------------------------------- fold_conv_mul_add

def conv_mul_add_model(mul_shape=(3, 1, 1), add_shape=(1, 3, 1, 1), bias=True):
    ins = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", ins, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["k", "c"], ["m"]),  # constant first: commutative match
             helper.make_node("Add", ["m", "a"], ["y"])]
    inits = [init("w", rand(3, 2, 3, 3)), init("k", rand(*mul_shape)), init("a", rand(*add_shape))]
    inits += [init("b", rand(3))] if bias else []
    return make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3, 4, 4])], inits)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_mul_add_folds_the_chain_in_one_run(bias):
    m = conv_mul_add_model(bias=bias)
    out, report = run(m, "fold_conv_mul_add")
    assert ops(out) == ["Conv"]
    recs = [r for r in report.records if r.name == "fold_conv_mul_add"]
    assert recs[0].changed and not recs[1].changed  # idempotent: the whole chain in the first run
    w0 = weights(m)
    k = w0["k"].reshape(-1)
    np.testing.assert_allclose(node_input(out, out.graph.node[0], 1), w0["w"] * k[:, None, None, None], rtol=1e-6)
    b0 = w0["b"] if bias else 0.0
    np.testing.assert_allclose(node_input(out, out.graph.node[0], 2), b0 * k + w0["a"].reshape(-1), rtol=1e-5)
    assert_equivalent(m, out)


def test_fold_conv_mul_add_scalar():
    m = conv_mul_add_model(mul_shape=(), add_shape=(1,))
    out, _ = run(m, "fold_conv_mul_add")
    assert ops(out) == ["Conv"]
    assert_equivalent(m, out)


def test_fold_conv_mul_add_refuses_non_channel_operand():
    m = conv_mul_add_model(mul_shape=(1, 1, 4, 4), add_shape=(3, 4, 1))
    out, report = run(m, "fold_conv_mul_add")
    assert ops(out) == ["Conv", "Mul", "Add"]
    assert "not per output channel" in messages(report)


def test_fold_conv_mul_add_refuses_graph_input_operand():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 2, 4, 4]), vi("k", [3, 1, 1])], [vi("y", [1, 3, 2, 2])],
                   [init("w", rand(3, 2, 3, 3))])
    out, report = run(m, "fold_conv_mul_add")
    assert ops(out) == ["Conv", "Mul"]
    assert "'k' is not a constant initializer" in messages(report)


def test_fold_conv_mul_add_inside_loop():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("Mul", ["c", "k"], ["m"]),
         helper.make_node("Add", ["m", "a"], ["s"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL)],
        [vi("cond_out", [], TensorProto.BOOL), vi("s", [1, 3, 2, 2])],
        [init("w", rand(3, 2, 3, 3)), init("k", rand(3, 1, 1)), init("a", rand(3, 1, 1))])
    loop = helper.make_node("Loop", ["trip", ""], ["y"], body=body)
    m = make_model([loop], [vi("x", [1, 2, 4, 4])], [vi("y", [2, 1, 3, 2, 2])],
                   [init("trip", np.array(2, np.int64))])
    out, _ = run(m, "fold_conv_mul_add")
    assert branch_ops(out, "body") == ["Identity", "Conv"]
    assert_equivalent(m, out)


# -------------------------------------------------------------------------- fuse_matmul_add_to_gemm

@pytest.mark.parametrize("bias_shape,bias_first", [((5,), False), ((1, 5), True), ((4, 5), False)])
def test_fuse_matmul_add_to_gemm(bias_shape, bias_first):
    add_in = ["b", "t"] if bias_first else ["t", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", add_in, ["y"])]
    m = make_model(nodes, [vi("x", [4, 3])], [vi("y", [4, 5])], [init("w", rand(3, 5)), init("b", rand(*bias_shape))])
    out, _ = run(m, "fuse_matmul_add_to_gemm")
    assert ops(out) == ["Gemm"]
    assert out.graph.output[0].name == "y"
    assert_equivalent(m, out)


def test_fuse_matmul_add_to_gemm_leaves_3d():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    m = make_model(nodes, [vi("x", ["b", "s", 3])], [vi("y", ["b", "s", 5])],
                   [init("w", rand(3, 5)), init("b", rand(5))])
    out, report = run(m, "fuse_matmul_add_to_gemm")
    assert ops(out) == ["MatMul", "Add"]
    assert ("fuse_matmul_add_to_gemm", "refused 1x: MatMul input rank 3 is not 2; MatMul+Add of higher rank "
                               "stays (onnxruntime fuses it itself)") in report.messages


def test_fuse_matmul_add_to_gemm_refuses_growing_bias():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    m = make_model(nodes, [vi("x", [4, 3])], [vi("y", [2, 4, 5])], [init("w", rand(3, 5)), init("b", rand(2, 1, 5))])
    out, report = run(m, "fuse_matmul_add_to_gemm")
    assert ops(out) == ["MatMul", "Add"]
    assert "not broadcastable" in messages(report)


def test_fuse_matmul_add_to_gemm_inside_loop():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v", "w"], ["t"]),
         helper.make_node("Add", ["t", "b"], ["v_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v", [2, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [2, 4])],
        [init("w", rand(4, 4) / 2), init("b", rand(4))])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)
    m = make_model([loop], [vi("x", [2, 4])], [vi("y", [2, 4])], [init("trip", np.array(3, np.int64))])
    out, _ = run(m, "fuse_matmul_add_to_gemm")
    assert branch_ops(out, "body") == ["Identity", "Gemm"]
    assert_equivalent(m, out)


# ------------------------------------------------------------------------------ fuse_pad_into_conv

def pad_model(consumer="Conv", pads=(0, 0, 1, 2, 0, 0, 2, 1), value=None, opset=13, mode=None, axes=None,
              conv_attrs=None, x_shape=(1, 2, 5, 5)):
    conv_attrs = dict(conv_attrs or {})
    inits = [init("p", np.array(pads, np.int64))]
    pad_in = ["x", "p"]
    if value is not None:
        inits.append(init("v", np.array(value, np.float32)))
        pad_in.append("v")
    if axes is not None:
        if value is None:
            pad_in.append("")
        inits.append(init("ax", np.array(axes, np.int64)))
        pad_in.append("ax")
    kw = {"mode": mode} if mode else {}
    if opset < 11:
        pad_node = helper.make_node("Pad", ["x"], ["xp"], pads=list(pads), value=float(value or 0.0), **kw)
        inits = []
    else:
        pad_node = helper.make_node("Pad", pad_in, ["xp"], **kw)
    if consumer == "Conv":
        inits.append(init("w", rand(3, 2, 3, 3)))
        node = helper.make_node("Conv", ["xp", "w"], ["y"], **conv_attrs)
    else:
        node = helper.make_node(consumer, ["xp"], ["y"], kernel_shape=[3, 3], **conv_attrs)
    return make_model([pad_node, node], [vi("x", list(x_shape))], [vi("y", ["n", "c", "h", "w"])], inits, opset=opset)


def test_fuse_pad_into_conv_adds_to_existing_pads():
    m = pad_model(conv_attrs={"pads": [1, 0, 0, 1]})
    out, _ = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["Conv"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["pads"] == [2, 2, 2, 2]
    assert_equivalent(m, out)


def test_fuse_pad_into_conv_attribute_form_opset10():
    m = pad_model(opset=10)
    out, _ = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["Conv"]
    assert_equivalent(m, out)


def test_fuse_pad_into_conv_with_axes_opset18():
    m = pad_model(pads=(1, 2, 2, 1), axes=[-2, 3], opset=18, value=0.0)
    out, _ = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["Conv"]
    assert_equivalent(m, out)


@pytest.mark.parametrize("kw,reason", [
    ({"pads": (0, 1, 1, 1, 0, 0, 1, 1)}, "batch or channel"),
    ({"mode": "reflect"}, "not 'constant'"),
    ({"value": 1.5}, "is not 0"),
    ({"pads": (0, 0, -1, 0, 0, 0, 0, 0)}, "negative"),
    ({"conv_attrs": {"auto_pad": "SAME_UPPER"}}, "auto_pad"),
])
def test_fuse_pad_into_conv_refusals(kw, reason):
    m = pad_model(**kw)
    out, report = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["Pad", "Conv"]
    assert reason in messages(report)


def test_fuse_pad_into_average_pool_counts_the_padding():
    m = pad_model("AveragePool")
    out, _ = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["AveragePool"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["count_include_pad"] == 1
    assert_equivalent(m, out)


def test_fuse_pad_into_average_pool_refuses_uncounted_own_pads():
    m = pad_model("AveragePool", conv_attrs={"pads": [1, 1, 1, 1]})
    out, report = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["Pad", "AveragePool"]
    assert "count_include_pad=0" in messages(report)


def test_fuse_pad_into_max_pool_needs_lowest_value():
    m = pad_model("MaxPool", value=-np.inf, pads=(0, 0, 1, 1, 0, 0, 2, 1))
    out, _ = run(m, "fuse_pad_into_conv")
    assert ops(out) == ["MaxPool"]
    assert_equivalent(m, out)
    m0 = pad_model("MaxPool", value=0.0)
    out0, report = run(m0, "fuse_pad_into_conv")
    assert ops(out0) == ["Pad", "MaxPool"]
    assert "not the lowest value" in messages(report)


def test_fuse_pad_into_conv_inside_if():
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])]
    m = in_if(nodes, [vi("x", [1, 2, 5, 5])], [vi("y", [1, 3, 5, 5])],
              [init("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("w", rand(3, 2, 3, 3))], opset=13)
    out, _ = run(m, "fuse_pad_into_conv")
    assert branch_ops(out, "then_branch") == ["Conv"] and branch_ops(out, "else_branch") == ["Conv"]
    both_branches(m, out)


# ------------------------------------------------------------------------ fuse_layer_normalization

def ln_nodes(opset, square="pow", normalize="div", affine=2, out="y"):
    def rmean(src, dst, axes_name):
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, axes_name], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[-1])

    nodes = [rmean("x", "mean", "ax"), helper.make_node("Sub", ["x", "mean"], ["d"])]
    nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "pow"
                 else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += [rmean("sq", "var", "ax"), helper.make_node("Add", ["var", "eps"], ["ve"]),
              helper.make_node("Sqrt", ["ve"], ["std"])]
    if normalize == "div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["r"]), helper.make_node("Mul", ["d", "r"], ["n"])]
    if affine == 0:
        nodes[-1].output[0] = out
    if affine >= 1:
        nodes.append(helper.make_node("Mul", ["n", "gamma"], ["yg" if affine == 2 else out]))
    if affine == 2:
        nodes.append(helper.make_node("Add", ["beta", "yg"], [out]))
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32)),
             init("gamma", rand(8)), init("beta", rand(8))]
    if opset >= 18:
        inits.append(init("ax", np.array([-1], np.int64)))
    return nodes, inits


def ln_model(opset=17, **kw):
    nodes, inits = ln_nodes(opset, **kw)
    return make_model(nodes, [vi("x", ["b", 3, 8])], [vi("y", ["b", 3, 8])], inits, opset=opset)


@pytest.mark.parametrize("opset,square,normalize,affine", [
    (17, "pow", "div", 2), (18, "mul", "div", 2), (18, "pow", "reciprocal", 2), (17, "mul", "div", 1),
    (18, "pow", "div", 0), (17, "pow", "reciprocal", 0), (18, "mul", "reciprocal", 1)])
def test_fuse_layer_normalization(opset, square, normalize, affine):
    m = ln_model(opset, square=square, normalize=normalize, affine=affine)
    out, _ = run(m, "fuse_layer_normalization")
    assert ops(out) == ["LayerNormalization"]
    node = out.graph.node[0]
    assert len(node.input) == (3 if affine == 2 else 2)
    if affine == 0:
        np.testing.assert_array_equal(node_input(out, node, 1), np.ones(8, np.float32))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and abs(attrs["epsilon"] - 1e-5) < 1e-10
    assert_equivalent(m, out)


def test_fuse_layer_normalization_without_affine_feeding_two_consumers():
    nodes, inits = ln_nodes(18, affine=0, out="n")
    nodes += [helper.make_node("Mul", ["n", "gamma"], ["y1"]), helper.make_node("Relu", ["n"], ["y2"])]
    m = make_model(nodes, [vi("x", [2, 3, 8])], [vi("y1", [2, 3, 8]), vi("y2", [2, 3, 8])], inits, opset=18)
    out, report = run(m, "fuse_layer_normalization")
    assert ops(out) == ["LayerNormalization", "Mul", "Relu"]
    assert report.messages == []
    assert_equivalent(m, out)


def test_fuse_layer_normalization_needs_opset_17():
    m = ln_model(16)
    out, report = run(m, "fuse_layer_normalization")
    assert "LayerNormalization" not in ops(out)
    assert "needs opset 17" in messages(report)


def test_fuse_layer_normalization_refuses_other_axis_and_shared_intermediate():
    nodes, inits = ln_nodes(17)
    nodes[0] = helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1])
    nodes[3] = helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1])
    m = make_model(nodes, [vi("x", [2, 3, 8])], [vi("y", [2, 3, 8])], inits)
    out, report = run(m, "fuse_layer_normalization")
    assert "LayerNormalization" not in ops(out)
    assert "last axis" in messages(report)
    nodes, inits = ln_nodes(17)  # the centered value d is also a graph output
    m = make_model(nodes, [vi("x", [2, 3, 8])], [vi("y", [2, 3, 8]), vi("d", [2, 3, 8])], inits)
    out, _ = run(m, "fuse_layer_normalization")
    assert "LayerNormalization" not in ops(out)


def test_fuse_layer_normalization_inside_if():
    nodes, inits = ln_nodes(17)
    m = in_if(nodes, [vi("x", [2, 3, 8])], [vi("y", [2, 3, 8])], inits)
    out, _ = run(m, "fuse_layer_normalization")
    assert branch_ops(out, "then_branch") == ["LayerNormalization"]
    assert branch_ops(out, "else_branch") == ["LayerNormalization"]
    both_branches(m, out)


# -------------------------------------------------------------------------------------- fuse_gelu

def gelu_erf_nodes(assoc, variant):
    scale = helper.make_node("Div", ["x", "k"], ["u"]) if variant == "div" else helper.make_node("Mul", ["k", "x"], ["u"])
    nodes = [scale, helper.make_node("Erf", ["u"], ["e"]), helper.make_node("Add", ["one", "e"], ["h"])]
    if assoc == 0:  # TorchScript exporter: (x * h) * 0.5
        nodes += [helper.make_node("Mul", ["x", "h"], ["xh"]), helper.make_node("Mul", ["xh", "half"], ["y"])]
    elif assoc == 1:  # HF BERT: (x * 0.5) * h
        nodes += [helper.make_node("Mul", ["half", "x"], ["xh"]), helper.make_node("Mul", ["xh", "h"], ["y"])]
    else:  # x * (h * 0.5)
        nodes += [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Mul", ["hh", "x"], ["y"])]
    k = np.sqrt(2.0) if variant == "div" else 1 / np.sqrt(2.0)
    inits = [init("k", np.array(k, np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(0.5, np.float32))]
    return nodes, inits


def gelu_tanh_nodes(cube):
    if cube == "pow":
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"])]
    nodes += [helper.make_node("Mul", ["kappa", "x3"], ["kx3"]), helper.make_node("Add", ["x", "kx3"], ["in0"]),
              helper.make_node("Mul", ["beta", "in0"], ["in1"]), helper.make_node("Tanh", ["in1"], ["t"]),
              helper.make_node("Add", ["one", "t"], ["h"]), helper.make_node("Mul", ["x", "h"], ["xh"]),
              helper.make_node("Mul", ["half", "xh"], ["y"])]
    inits = [init("kappa", np.array(0.044715, np.float32)), init("beta", np.array(np.sqrt(2 / np.pi), np.float32)),
             init("one", np.array(1.0, np.float32)), init("half", np.array(0.5, np.float32))]
    if cube == "pow":
        inits.append(init("three", np.array(3.0, np.float32)))
    return nodes, inits


def gelu_model(nodes, inits, opset=20):
    return make_model(nodes, [vi("x", ["n", 6])], [vi("y", ["n", 6])], inits, opset=opset)


@pytest.mark.parametrize("assoc", [0, 1, 2])
@pytest.mark.parametrize("variant", ["div", "mul"])
def test_fuse_gelu_erf_forms(assoc, variant):
    m = gelu_model(*gelu_erf_nodes(assoc, variant))
    out, _ = run(m, "fuse_gelu")
    assert ops(out) == ["Gelu"]
    assert not out.graph.node[0].attribute  # exact form: approximate="none"
    assert_equivalent(m, out)


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_fuse_gelu_tanh_form(cube):
    m = gelu_model(*gelu_tanh_nodes(cube))
    out, _ = run(m, "fuse_gelu")
    assert ops(out) == ["Gelu"]
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == b"tanh"
    assert_equivalent(m, out)


def test_fuse_gelu_needs_opset_20():
    m = gelu_model(*gelu_erf_nodes(0, "div"), opset=19)
    out, report = run(m, "fuse_gelu")
    assert "Gelu" not in ops(out)
    assert "needs opset 20" in messages(report)


def test_fuse_gelu_refuses_wrong_constant():
    nodes, inits = gelu_erf_nodes(1, "div")
    inits[2] = init("half", np.array(0.6, np.float32))
    out, report = run(gelu_model(nodes, inits), "fuse_gelu")
    assert "Gelu" not in ops(out)
    assert "'half' = 0.6" in messages(report)


def test_fuse_gelu_inside_if():
    nodes, inits = gelu_erf_nodes(1, "div")
    m = in_if(nodes, [vi("x", [2, 6])], [vi("y", [2, 6])], inits, opset=20)
    out, _ = run(m, "fuse_gelu")
    assert branch_ops(out, "then_branch") == ["Gelu"] and branch_ops(out, "else_branch") == ["Gelu"]
    both_branches(m, out)


# ------------------------------------------------------------------------------------------ preset

def test_default_lists_every_fusion_in_the_preset_order():
    assert fusion.DEFAULT == ["fuse_pad_into_conv", "fuse_matmul_add_to_gemm", "fold_batchnorm", "fold_conv_mul_add",
                              "fuse_layer_normalization", "fuse_gelu"]
    preset = onnxopt.list_presets()["default"]
    assert [p for p in preset if p in fusion.DEFAULT] == fusion.DEFAULT
    for name in fusion.DEFAULT:
        p = onnxopt.get_pass(name)
        assert p.kind == "fusion" and p.exact and p.idempotent and p.doc()


def test_default_pipeline_fuses_a_small_cnn_and_transformer_block():
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["c"])]
    nodes += bn_nodes("c", out="bn")
    nodes += [helper.make_node("Mul", ["bn", "k"], ["y"])]
    inits = [init("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("w", rand(3, 2, 3, 3)),
             init("k", rand(3, 1, 1))] + bn_inits(3)
    m = make_model(nodes, [vi("x", [1, 2, 5, 5])], [vi("y", [1, 3, 5, 5])], inits, opset=13)
    out = onnxopt.optimize(m)
    assert ops(out) == ["Conv"]
    assert_equivalent(m, out)


def test_fold_batchnorm_in_if_with_outer_scope_weights_and_fp16():
    # weights and BN parameters are main-graph initializers read from inside the branch
    then = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"])] + bn_nodes("c", out="yt"), "then", [],
                             [vi("yt", [1, 3, 2, 2], TensorProto.FLOAT16)])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w2"], ["ye"])], "else", [],
                              [vi("ye", [1, 3, 2, 2], TensorProto.FLOAT16)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    inits = [init("w", rand(3, 2, 3, 3).astype(np.float16)), init("w2", rand(3, 2, 3, 3).astype(np.float16))]
    inits += [init(t.name, numpy_helper.to_array(t).astype(np.float16)) for t in bn_inits(3)]
    m = make_model([node], [vi("x", [1, 2, 4, 4], TensorProto.FLOAT16), vi("cond", [], TensorProto.BOOL)],
                   [vi("y", [1, 3, 2, 2], TensorProto.FLOAT16)], inits)
    out, _ = run(m, "fold_batchnorm")
    assert branch_ops(out, "then_branch") == ["Conv"]
    for cond in (True, False):
        feeds = {"x": rand(1, 2, 4, 4).astype(np.float16), "cond": np.array(cond)}
        assert_equivalent(m, out, feeds=feeds, rtol=1e-2, atol=1e-2)
