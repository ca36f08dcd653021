"""fold_constants and infer_shapes."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import ir
from onnxopt.errors import PassOptionError
from onnxopt.passes.base import PassContext, PassManager

from .helpers import assert_equivalent, init, make_model, ops, vi
from .test_cleanup import LOOP_FEEDS, if_model, loop_model, sub_ops

I64 = TensorProto.INT64


def run(model, *passes):
    return onnxopt.optimize(model, passes=list(passes))


def test_constant_subgraph_is_folded():
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Sqrt", ["ab"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])],
                   [init("a", np.arange(4, dtype=np.float32)), init("b", np.ones(4, np.float32))])
    out = run(m, "fold_constants")
    assert ops(out) == ["Mul"]
    s = next(t for t in out.graph.initializer if t.name == "s")
    np.testing.assert_allclose(onnx.numpy_helper.to_array(s), np.sqrt(np.arange(4) + 1.0), rtol=1e-6)
    assert_equivalent(m, out)


def test_shape_size_and_gather_of_static_dims_folded():
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),  # x is [n, 3, 4]: not fully static
             helper.make_node("Gather", ["sh", "i"], ["d"], axis=0),  # dims 1, 2 are static
             helper.make_node("ReduceProd", ["d"], ["p"], keepdims=1),
             helper.make_node("Concat", ["minus1", "p"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Size", ["w"], ["sz"]), helper.make_node("Cast", ["sz"], ["szf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["r", "szf"], ["y"])]
    m = make_model(nodes, [vi("x", ["n", 3, 4])], [vi("y", ["n", 12])],
                   [init("i", np.array([1, 2], np.int64)), init("minus1", np.array([-1], np.int64)),
                    init("w", np.ones((2, 3), np.float32))])
    out = run(m, "fold_constants")
    assert ops(out) == ["Reshape", "Mul"]
    target = next(t for t in out.graph.initializer if t.name == "target")
    assert onnx.numpy_helper.to_array(target).tolist() == [-1, 12]
    assert_equivalent(m, out)


def test_gather_of_dynamic_dim_not_folded():
    nodes = [helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Gather", ["sh", "i"], ["y"], axis=0)]
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", [], I64)], [init("i", np.array(0, np.int64))])
    out = run(m, "fold_constants")
    assert ops(out) == ["Shape", "Gather"]
    assert_equivalent(m, out)


def test_size_cap_refuses_growing_outputs():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["x", "big"], ["y"])]
    m = make_model(nodes, [vi("x", [512, 1024])], [vi("y", [512, 1024])], [init("shape", np.array([512, 1024], np.int64))])
    assert ops(run(m, "fold_constants")) == ["ConstantOfShape", "Add"]  # 2 MiB > 1 MiB default cap
    out = run(m, onnxopt.get_pass("fold_constants", max_output_bytes=4 << 20))
    assert ops(out) == ["Add"]
    assert_equivalent(m, out)


def test_large_output_folded_only_when_it_replaces_its_input():
    w = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)  # 1.4 MB > cap
    private = make_model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                          helper.make_node("MatMul", ["x", "wt"], ["y"])],
                         [vi("x", [2, 600])], [vi("y", [2, 600])], [init("w", w)])
    out = run(private, "fold_constants")
    assert ops(out) == ["MatMul"] and len(out.graph.initializer) == 1
    assert_equivalent(private, out)
    shared = make_model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                         helper.make_node("MatMul", ["x", "wt"], ["a"]), helper.make_node("MatMul", ["x", "w"], ["b"]),
                         helper.make_node("Add", ["a", "b"], ["y"])],
                        [vi("x", [2, 600])], [vi("y", [2, 600])], [init("w", w)])
    assert ops(run(shared, "fold_constants")).count("Transpose") == 1


def test_refuses_random_custom_and_graph_output_nodes():
    m = make_model([helper.make_node("RandomUniformLike", ["k"], ["r"]),
                    helper.make_node("Neg", ["k"], ["y"]),  # would fold, but is a graph output
                    helper.make_node("Foo", ["k"], ["f"], domain="custom.x"),
                    helper.make_node("Relu", ["x"], ["z"])],
                   [vi("x", [2])], [vi("y", [2]), vi("r", [2]), vi("f", [2]), vi("z", [2])],
                   [init("k", np.ones(2, np.float32))], extra_opsets=[("custom.x", 1)])
    out = run(m, "fold_constants")
    assert ops(out) == ["RandomUniformLike", "Neg", "Foo", "Relu"]


def test_fold_inside_if_branch_uses_outer_constants():
    then = [helper.make_node("Mul", ["k", "k"], ["kk"]), helper.make_node("Add", ["x", "kk"], ["t"])]
    other = [helper.make_node("Neg", ["k"], ["nk"]), helper.make_node("Add", ["x", "nk"], ["e"])]
    m = if_model(then, "t", other, "e", inits=[init("k", np.array([2.0, 3.0], np.float32))])
    out = run(m, "fold_constants")
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[0].attribute}
    assert branches == {"then_branch": ["Add"], "else_branch": ["Add"]}
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


def test_fold_inside_loop_body():
    body = [helper.make_node("Exp", ["k"], ["ek"]), helper.make_node("Mul", ["v", "ek"], ["v_out"])]
    m = loop_model(body, "v_out", [init("k", np.array([0.1, 0.2], np.float32))])
    out = run(m, "fold_constants")
    assert sorted(sub_ops(out)) == ["Identity", "Mul"]
    assert_equivalent(m, out, feeds=LOOP_FEEDS)


def test_bad_option_rejected():
    with pytest.raises(PassOptionError):
        onnxopt.get_pass("fold_constants", max_output_bytes=-1)


# ------------------------------------------------------------------------------------ infer_shapes

def test_infer_shapes_refreshes_intermediates_and_changes_no_nodes():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Relu", ["t"], ["y"])]
    m = make_model(nodes, [vi("x", ["n", 3])], [vi("y", [3, "n"])], value_info=[vi("t", [7, 7])])  # stale
    graph = ir.import_graph(m, infer_shapes=False)
    t = graph.nodes[0].outputs[0]
    assert list(t.shape) == [7, 7]
    ctx = PassContext(m)
    p = onnxopt.get_pass("infer_shapes")
    PassManager([p]).run(graph, ctx)
    assert list(t.shape) == [3, "n"]
    assert not any(r.changed for r in ctx.report.records)
    out = ir.export_model(graph, m)
    assert [o.name for o in out.graph.output] == ["y"]
    assert_equivalent(m, out)


def test_infer_shapes_reaches_subgraphs():
    then = [helper.make_node("Transpose", ["x2"], ["a"], perm=[1, 0]), helper.make_node("Relu", ["a"], ["t"])]
    other = [helper.make_node("Neg", ["x2"], ["e"])]
    then_g = helper.make_graph(then, "then", [], [vi("t", [3, 3])])
    else_g = helper.make_graph(other, "else", [], [vi("e", [3, 3])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], TensorProto.BOOL), vi("x2", [3, 3])], [vi("y", [3, 3])])
    graph = ir.import_graph(m, infer_shapes=False)
    inner = graph.nodes[0].attrs["then_branch"].nodes[0].outputs[0]
    inner.shape, inner.dtype = None, None
    PassManager([onnxopt.get_pass("infer_shapes")]).run(graph, PassContext(m))
    assert list(inner.shape) == [3, 3] and inner.dtype == np.float32
