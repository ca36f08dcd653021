"""Cleanup passes: each rewrites a minimal model, refuses when a condition fails, keeps ORT outputs."""
import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxopt

from .helpers import assert_equivalent, init, make_model, ops, vi

I64 = TensorProto.INT64


def run(model, *passes):
    return onnxopt.optimize(model, passes=list(passes))


def all_ops(model):
    """Op types of every graph (main and subgraphs)."""
    out = []

    def walk(g):
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return out


def sub_ops(model, node_index=0, attr="body"):
    node = model.graph.node[node_index]
    g = next(a.g for a in node.attribute if a.name == attr)
    return [n.op_type for n in g.node]


def if_model(then_nodes, then_out, else_nodes, else_out, outer_nodes=(), inits=(), out_shape=(2,)):
    then = helper.make_graph(then_nodes, "then", [], [vi(then_out, list(out_shape))])
    other = helper.make_graph(else_nodes, "else", [], [vi(else_out, list(out_shape))])
    nodes = list(outer_nodes) + [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [vi("c", [], TensorProto.BOOL), vi("x", [2])], [vi("y", list(out_shape))], inits)


def loop_model(body_nodes, body_out, inits=()):
    """Loop of 3 trips carrying a [2] float; the body computes `body_out` from carried `v`."""
    body = helper.make_graph(
        list(body_nodes) + [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [vi("i", [], I64), vi("cond_in", [], TensorProto.BOOL), vi("v", [2])],
        [vi("cond_out", [], TensorProto.BOOL), vi(body_out, [2])])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    return make_model(nodes, [vi("n", [], I64), vi("x", [2])], [vi("y", [2])], inits)


LOOP_FEEDS = {"n": np.array(3, np.int64), "x": np.array([0.5, -1.0], np.float32)}


# ------------------------------------------------------------------------------------ constants

def test_constant_nodes_become_initializers():
    nodes = [helper.make_node("Constant", [], ["a"], value_floats=[1.0, 2.0]),
             helper.make_node("Constant", [], ["b"], value=helper.make_tensor("bv", TensorProto.FLOAT, [2], [3, 4])),
             helper.make_node("Constant", [], ["k"], value_int=2),
             helper.make_node("Add", ["x", "a"], ["t"]),
             helper.make_node("Mul", ["t", "b"], ["u"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["u", "kf"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])])
    out = run(m, "constant_to_initializer")
    assert "Constant" not in ops(out)
    assert {"a", "b", "k"} <= {t.name for t in out.graph.initializer}
    assert_equivalent(m, out)


def test_constant_on_graph_output_is_kept():
    m = make_model([helper.make_node("Constant", [], ["y"], value_floats=[1.0, 2.0]),
                    helper.make_node("Relu", ["x"], ["z"])], [vi("x", [2])], [vi("y", [2]), vi("z", [2])])
    out = run(m, "constant_to_initializer")
    assert ops(out).count("Constant") == 1
    assert_equivalent(m, out)


def test_constant_inside_if_branch():
    then = [helper.make_node("Constant", [], ["k"], value_floats=[2.0, 3.0]), helper.make_node("Mul", ["x", "k"], ["t"])]
    other = [helper.make_node("Neg", ["x"], ["e"])]
    m = if_model(then, "t", other, "e")
    out = run(m, "constant_to_initializer")
    assert "Constant" not in all_ops(out)
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


# ------------------------------------------------------------------------------------- identity

def test_identity_on_initializers_and_chains_removed():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Identity", ["w0"], ["w1"]), helper.make_node("Identity", ["w1"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Identity", ["t"], ["y"])]
    m = make_model(nodes, [vi("x", [4, 2])], [vi("y", [4, 3])], [init("w0", w)])
    out = run(m, "eliminate_identity")
    assert ops(out) == ["MatMul"]
    assert list(out.graph.node[0].input) == ["x", "w0"] and list(out.graph.node[0].output) == ["y"]
    assert_equivalent(m, out)


def test_identity_between_graph_boundaries_is_kept():
    nodes = [helper.make_node("Identity", ["x"], ["y"]),  # input -> output: must stay
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Identity", ["r"], ["z"])]  # r and z both outputs: both names stay
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("r", [2]), vi("z", [2])])
    out = run(m, "eliminate_identity")
    assert ops(out).count("Identity") == 2
    assert_equivalent(m, out)


def test_identity_in_if_branches():
    # then: Identity chain over an outer tensor ending at the branch output -> one Identity must stay
    then = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["t"])]
    other = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Identity", ["n"], ["e"])]
    m = if_model(then, "t", other, "e")
    out = run(m, "eliminate_identity")
    node = out.graph.node[0]
    branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
    assert branches == {"then_branch": ["Identity"], "else_branch": ["Neg"]}
    else_g = next(a.g for a in node.attribute if a.name == "else_branch")
    assert else_g.output[0].name == "e" and else_g.node[0].output[0] == "e"
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


def test_identity_in_loop_body():
    body = [helper.make_node("Identity", ["k0"], ["k"]), helper.make_node("Mul", ["v", "k"], ["m"]),
            helper.make_node("Identity", ["m"], ["v_out"])]
    m = loop_model(body, "v_out", [init("k0", np.array([2.0, 3.0], np.float32))])
    out = run(m, "eliminate_identity")
    # cond_in -> cond_out Identity connects two body boundaries: it stays; the others go
    assert sorted(sub_ops(out)) == ["Identity", "Mul"]
    assert_equivalent(m, out, feeds=LOOP_FEEDS)


# -------------------------------------------------------------------------------------- dropout

def test_dropout_removed_opset12_and_opset10():
    m12 = make_model([helper.make_node("Dropout", ["x", "r"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
                     [vi("x", [3])], [vi("y", [3])], [init("r", np.array(0.3, np.float32))])
    m10 = make_model([helper.make_node("Dropout", ["x"], ["t", "mask"], ratio=0.5),
                      helper.make_node("Relu", ["t"], ["y"])], [vi("x", [3])], [vi("y", [3])], opset=10)
    for m in (m12, m10):
        out = run(m, "eliminate_dropout")
        assert ops(out) == ["Relu"]
        assert_equivalent(m, out)


def test_dropout_kept_in_training_or_when_mask_used():
    train = make_model([helper.make_node("Dropout", ["x", "", "training"], ["y"])],
                       [vi("x", [3]), vi("training", [], TensorProto.BOOL)], [vi("y", [3])])
    assert ops(run(train, "eliminate_dropout")) == ["Dropout"]
    mask = make_model([helper.make_node("Dropout", ["x"], ["y", "m"])], [vi("x", [3])],
                      [vi("y", [3]), vi("m", [3], TensorProto.BOOL)])
    assert ops(run(mask, "eliminate_dropout")) == ["Dropout"]


# ------------------------------------------------------------------------------------------ nop

def test_nops_removed():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 1]),
             helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
             helper.make_node("Pad", ["b", "pads"], ["c"]),
             helper.make_node("Slice", ["c", "starts", "ends"], ["d"]),
             helper.make_node("Expand", ["d", "shape"], ["e"]),
             helper.make_node("Concat", ["e"], ["f"], axis=0),
             helper.make_node("Reshape", ["f", "shape"], ["g"]),
             helper.make_node("Squeeze", ["g"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    inits = [init("pads", np.zeros(4, np.int64)), init("starts", np.array([0, 0], np.int64)),
             init("ends", np.array([2**62, 3], np.int64)), init("shape", np.array([2, 3], np.int64))]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)
    out = run(m, "eliminate_nop")
    assert ops(out) == ["Relu"]
    assert_equivalent(m, out)


def test_nops_kept_when_not_provably_identity():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0]),
             helper.make_node("Slice", ["a", "starts", "ends", "axes", "steps"], ["b"]),  # reverses
             helper.make_node("Reshape", ["b", "shape"], ["c"]),  # unknown dims: not provable
             helper.make_node("Pad", ["c", "pads"], ["y"])]
    inits = [init("starts", np.array([-1], np.int64)), init("ends", np.array([-2**62], np.int64)),
             init("axes", np.array([0], np.int64)), init("steps", np.array([-1], np.int64)),
             init("shape", np.array([-1, 0], np.int64)), init("pads", np.array([0, 1, 0, 0], np.int64))]
    m = make_model(nodes, [vi("x", ["n", "m"])], [vi("y", ["p", "q"])], inits)
    out = run(m, "eliminate_nop")
    assert ops(out) == ["Transpose", "Slice", "Reshape", "Pad"]
    assert_equivalent(m, out, feeds={"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_nop_on_graph_output_keeps_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[0])]
    m = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    out = run(m, "eliminate_nop")
    assert ops(out) == ["Relu"] and out.graph.node[0].output[0] == "y"
    assert_equivalent(m, out)


def test_nop_in_loop_body():
    body = [helper.make_node("Cast", ["v"], ["c"], to=TensorProto.FLOAT), helper.make_node("Neg", ["c"], ["ng"]),
            helper.make_node("Concat", ["ng"], ["v_out"], axis=0)]
    m = loop_model(body, "v_out")
    out = run(m, "eliminate_nop")
    assert sorted(sub_ops(out)) == ["Identity", "Neg"]
    assert_equivalent(m, out, feeds=LOOP_FEEDS)


# ------------------------------------------------------------------------------------ dead code

def _dead_model():
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Exp", ["x"], ["dead1"]), helper.make_node("Add", ["dead1", "w"], ["dead2"]),
             helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln", "mean", "inv"], axis=-1),
             helper.make_node("Neg", ["ln"], ["z"])]
    return make_model(nodes, [vi("x", [2, 3]), vi("unused", [1])], [vi("y", [2, 3]), vi("z", [2, 3])],
                      [init("w", np.ones(3, np.float32)), init("g", np.ones(3, np.float32)),
                       init("b", np.zeros(3, np.float32)), init("lonely", np.ones(7, np.float32))])


def test_dead_code_removed_inputs_kept():
    m = _dead_model()
    out = run(m, "eliminate_dead_code")
    assert ops(out) == ["Relu", "LayerNormalization", "Neg"]
    ln = out.graph.node[1]
    assert list(ln.output) == ["ln"]  # unused Mean/InvStdDev outputs dropped
    assert {t.name for t in out.graph.initializer} == {"g", "b"}
    assert [i.name for i in out.graph.input] == ["x", "unused"]
    assert_equivalent(m, out)


def test_dead_code_keeps_outer_tensor_used_only_in_subgraph():
    then = [helper.make_node("Add", ["x", "outer"], ["t"]), helper.make_node("Exp", ["x"], ["junk"])]
    other = [helper.make_node("Neg", ["x"], ["e"])]
    m = if_model(then, "t", other, "e", outer_nodes=[helper.make_node("Sin", ["x"], ["outer"]),
                                                     helper.make_node("Cos", ["x"], ["gone"])])
    out = run(m, "eliminate_dead_code")
    assert ops(out) == ["Sin", "If"]
    assert sub_ops(out, 0 + 1, "then_branch") == ["Add"]
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


def test_dead_code_in_loop_body():
    body = [helper.make_node("Exp", ["v"], ["junk"]), helper.make_node("Neg", ["v"], ["v_out"])]
    m = loop_model(body, "v_out")
    out = run(m, "eliminate_dead_code")
    assert sorted(sub_ops(out)) == ["Identity", "Neg"]
    assert_equivalent(m, out, feeds=LOOP_FEEDS)


# ------------------------------------------------------------------------- duplicate initializers

def test_duplicate_initializers_merged():
    big = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("MatMul", ["x", "w3"], ["c"]), helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Add", ["s", "c"], ["t"]), helper.make_node("Add", ["t", "k1"], ["u"]),
             helper.make_node("Cast", ["k2"], ["k2f"], to=TensorProto.FLOAT), helper.make_node("Add", ["u", "k2f"], ["y"])]
    other = big.copy()
    other[63, 63] += 1  # differs only in the last element
    inits = [init("w1", big), init("w2", big.copy()), init("w3", other),
             init("k1", np.ones(64, np.float32)), init("k2", np.ones(64, np.int64))]  # same bytes? no: dtype differs
    m = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], inits)
    out = run(m, "merge_duplicate_initializers")
    names = sorted(t.name for t in out.graph.initializer)
    assert names == ["k1", "k2", "w1", "w3"]
    assert_equivalent(m, out)


def test_duplicate_initializers_merged_inside_if():
    then = [helper.make_node("Add", ["x", "k1"], ["a"]), helper.make_node("Mul", ["a", "k2"], ["t"])]
    other = [helper.make_node("Neg", ["x"], ["e"])]
    then_g = helper.make_graph(then, "then", [], [vi("t", [2])],
                               [init("k1", np.array([2.0, 3.0], np.float32)), init("k2", np.array([2.0, 3.0], np.float32))])
    else_g = helper.make_graph(other, "else", [], [vi("e", [2])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    out = run(m, "merge_duplicate_initializers")
    g = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [t.name for t in g.initializer] == ["k1"]
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)})


def _initializer_copies(model):
    """name -> number of graphs (main and bodies) holding an initializer of that name."""
    counts = {}

    def walk(g):
        for t in g.initializer:
            counts[t.name] = counts.get(t.name, 0) + 1
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return counts


def test_weight_read_in_both_branches_is_stored_once():
    """An outer weight read only inside an If's branches was written into each branch on export:
    the model grew by one copy per reading graph."""
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [vi("t", [2, 32])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["e0"]), helper.make_node("Neg", ["e0"], ["e"])],
                               "else", [], [vi("e", [2, 32])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], TensorProto.BOOL), vi("x", [2, 32])], [vi("y", [2, 32])], [init("w", w)])
    out = onnxopt.optimize(m)
    assert _initializer_copies(out) == {"w": 1}
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.ones((2, 32), np.float32)})


def test_equal_weights_in_sibling_branches_become_one():
    """Equal constants of two branches (folding gives each branch its own copy of a weight derived
    from a shared one) are one tensor, stored once in the graph enclosing both branches."""
    w = np.random.default_rng(2).standard_normal((32, 32)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["t"])], "then", [], [vi("t", [2, 32])],
                               [init("wt", w)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "we"], ["e0"]), helper.make_node("Neg", ["e0"], ["e"])],
                               "else", [], [vi("e", [2, 32])], [init("we", w.copy())])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], TensorProto.BOOL), vi("x", [2, 32])], [vi("y", [2, 32])])
    out = onnxopt.optimize(m)
    copies = _initializer_copies(out)
    assert sum(copies.values()) == 1 and [t.name for t in out.graph.initializer] == list(copies)
    onnx.checker.check_model(out, full_check=True)
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.ones((2, 32), np.float32)})


# ---------------------------------------------------------------------------------------- CSE

def test_cse_merges_equal_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Transpose", ["a"], ["ta"], perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["tb"], perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["tc"], perm=[0, 1]),  # different attrs: kept
             helper.make_node("Add", ["ta", "tb"], ["s"]), helper.make_node("Transpose", ["s"], ["st"], perm=[1, 0]),
             helper.make_node("Add", ["st", "tc"], ["y"])]
    m = make_model(nodes, [vi("x", [3, 3])], [vi("y", [3, 3])])
    out = run(m, "eliminate_common_subexpressions")
    assert sorted(ops(out)) == sorted(["Relu", "Transpose", "Transpose", "Add", "Transpose", "Add"])
    assert_equivalent(m, out)


def test_cse_refuses_random_ops_and_keeps_output_names():
    rand = make_model([helper.make_node("RandomUniformLike", ["x"], ["a"]), helper.make_node("RandomUniformLike", ["x"], ["b"]),
                       helper.make_node("Add", ["a", "b"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    assert ops(run(rand, "eliminate_common_subexpressions")).count("RandomUniformLike") == 2
    # the duplicate computes a graph output: the survivor takes the output name
    outs = make_model([helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Exp", ["x"], ["y"]),
                       helper.make_node("Neg", ["a"], ["z"])], [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    out = run(outs, "eliminate_common_subexpressions")
    assert ops(out) == ["Exp", "Neg"] and list(out.graph.node[0].output) == ["y"]
    assert_equivalent(outs, out)
    # both are graph outputs: nothing to merge
    both = make_model([helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Exp", ["x"], ["y"])],
                      [vi("x", [3])], [vi("a", [3]), vi("y", [3])])
    assert ops(run(both, "eliminate_common_subexpressions")) == ["Exp", "Exp"]


def test_cse_in_loop_body():
    body = [helper.make_node("Sin", ["v"], ["a"]), helper.make_node("Sin", ["v"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["v_out"])]
    m = loop_model(body, "v_out")
    out = run(m, "eliminate_common_subexpressions")
    assert sub_ops(out).count("Sin") == 1
    assert_equivalent(m, out, feeds=LOOP_FEEDS)


# ---------------------------------------------------------------------- consecutive layout fusions

def test_transposes_cancel_and_compose():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[1, 2, 0]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[2, 0, 1]),  # cancels
             helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[1, 0, 2])]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [4, 2, 3])])
    out = run(m, "fuse_consecutive_transposes")
    assert ops(out) == ["Transpose"]
    assert_equivalent(m, out)


def test_transpose_fusion_keeps_intermediate_output():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0]), helper.make_node("Transpose", ["a"], ["y"], perm=[1, 0])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("a", [3, 2]), vi("y", [2, 3])])
    out = run(m, "fuse_consecutive_transposes")
    assert ops(out).count("Transpose") >= 1 and [o.name for o in out.graph.output] == ["a", "y"]
    assert_equivalent(m, out)


def test_reshape_chains_fused():
    nodes = [helper.make_node("Flatten", ["x"], ["a"], axis=1), helper.make_node("Reshape", ["a", "s1"], ["b"]),
             helper.make_node("Reshape", ["b", "s2"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [6, 4])],
                   [init("s1", np.array([4, -1], np.int64)), init("s2", np.array([6, 4], np.int64))])
    out = run(m, "fuse_consecutive_reshapes")
    assert ops(out) == ["Reshape"]
    assert_equivalent(m, out)


def test_reshape_with_zero_dim_not_fused():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["b"]), helper.make_node("Reshape", ["b", "s2"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", ["p", "q"])],
                   [init("s1", np.array([4, 6], np.int64)), init("s2", np.array([0, -1], np.int64))])
    out = run(m, "fuse_consecutive_reshapes")
    assert ops(out) == ["Reshape", "Reshape"]
    assert_equivalent(m, out)


def test_squeeze_unsqueeze_cancel_and_merge():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax0"], ["a"]), helper.make_node("Squeeze", ["a", "ax0"], ["b"]),
             helper.make_node("Unsqueeze", ["b", "ax1"], ["c"]), helper.make_node("Unsqueeze", ["c", "axm"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [1, 2, 1, 3, 1])],
                   [init("ax0", np.array([0], np.int64)), init("ax1", np.array([1], np.int64)),
                    init("axm", np.array([0, -1], np.int64))])
    out = run(m, "fuse_consecutive_squeeze_unsqueeze")
    assert ops(out) == ["Unsqueeze"]
    assert_equivalent(m, out)


def test_squeeze_unsqueeze_different_axes_kept_opset11():
    nodes = [helper.make_node("Unsqueeze", ["x"], ["a"], axes=[0]), helper.make_node("Squeeze", ["a"], ["y"], axes=[2])]
    m = make_model(nodes, [vi("x", [2, 1])], [vi("y", [1, 2])], opset=11)
    out = run(m, "fuse_consecutive_squeeze_unsqueeze")
    assert ops(out) == ["Unsqueeze", "Squeeze"]
    assert_equivalent(m, out)


# --------------------------------------------------------------------------------- default preset

def test_default_pipeline_on_if_and_loop():
    then = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Transpose", ["a"], ["b"], perm=[0]),
            helper.make_node("Relu", ["b"], ["t"])]
    other = [helper.make_node("Constant", [], ["k"], value_floats=[1.0, 1.0]), helper.make_node("Add", ["x", "k"], ["e"])]
    then_g = helper.make_graph(then, "then", [], [vi("t", [2])])
    else_g = helper.make_graph(other, "else", [], [vi("e", [2])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Dropout", ["v"], ["d"]),
         helper.make_node("Mul", ["d", "w"], ["v_out"])], "body",
        [vi("i", [], I64), vi("cond_in", [], TensorProto.BOOL), vi("v", [2])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [2])])
    nodes = [helper.make_node("If", ["c"], ["p"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["n", "", "p"], ["y"], body=body)]
    m = make_model(nodes, [vi("c", [], TensorProto.BOOL), vi("x", [2]), vi("n", [], I64)], [vi("y", [2])],
                   [init("w", np.array([0.5, 2.0], np.float32))])
    out = onnxopt.optimize(m)
    assert sorted(all_ops(out)) == sorted(["If", "Loop", "Relu", "Add", "Identity", "Mul"])
    for c in (True, False):
        assert_equivalent(m, out, feeds={"c": np.array(c), "x": np.array([1.0, -2.0], np.float32),
                                         "n": np.array(2, np.int64)})


def test_dead_if_takes_its_outer_inputs_along():
    """Run the pass alone (no manager cleanup): a dead If's subgraph reads must not keep producers alive."""
    from onnxopt import ir
    from onnxopt.passes.base import PassContext

    then = [helper.make_node("Add", ["x", "outer"], ["t"])]
    other = [helper.make_node("Neg", ["x"], ["e"])]
    then_g = helper.make_graph(then, "then", [], [vi("t", [2])])
    else_g = helper.make_graph(other, "else", [], [vi("e", [2])])
    nodes = [helper.make_node("Sin", ["x"], ["outer"]),
             helper.make_node("If", ["c"], ["unused"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["x"], ["y"])]
    m = make_model(nodes, [vi("c", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    graph = ir.import_graph(m)
    ctx = PassContext(m)
    ctx.root = graph
    assert onnxopt.get_pass("eliminate_dead_code").run(graph, ctx)
    assert [n.op for n in graph.nodes] == ["Relu"]
