"""RewriteRule: user-written rules, commutative matching, refusals in the report, exclusivity of the
matched values, graph outputs, subgraphs, `_as` node bindings and DAG patterns."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxopt

from .helpers import assert_equivalent, init, make_model, ops, vi

RNG = np.random.default_rng(1)


# The README's "write your own pass" example.
def pattern(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def condition(ctx, x, w, b):
    if not (ctx.is_constant(w) and ctx.rank(x) == 2):
        return ctx.refuse("Gemm wants a 2-D input and a constant weight")
    return True


def replacement(op, x, w, b):
    return op.Gemm(x, w, b)


RULE = onnxopt.RewriteRule("test_user_matmul_add_to_gemm", pattern, replacement, condition)


def mm_add(x_shape=(4, 3), bias_first=False, extra_outputs=(), extra_nodes=()):
    add_in = ["b", "t"] if bias_first else ["t", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", add_in, ["y"])] + list(extra_nodes)
    outs = [vi("y", list(x_shape[:-1]) + [5])] + list(extra_outputs)
    return make_model(nodes, [vi("x", list(x_shape))], outs,
                      [init("w", RNG.standard_normal((3, 5)).astype(np.float32)),
                       init("b", RNG.standard_normal(5).astype(np.float32))])


def run(model, rule=RULE):
    return onnxopt.optimize(model, passes=[rule], return_report=True)


def test_user_rule_by_object_and_by_registered_name():
    m = mm_add()
    out, _ = run(m)
    assert ops(out) == ["Gemm"]
    assert_equivalent(m, out)
    onnxopt.register_pass(RULE, replace=True)
    out2 = onnxopt.optimize(m, passes=["test_user_matmul_add_to_gemm"])
    assert ops(out2) == ["Gemm"]
    assert RULE.kind == "fusion" and RULE.exact


def test_commutative_add_matches_either_input_order():
    out, _ = run(mm_add(bias_first=True))
    assert ops(out) == ["Gemm"]
    assert list(out.graph.node[0].input) == ["x", "w", "b"]


def test_condition_refusal_is_recorded_in_the_report():
    m = mm_add(x_shape=(2, 4, 3))
    out, report = run(m)
    assert ops(out) == ["MatMul", "Add"]
    assert ("test_user_matmul_add_to_gemm", "refused 1x: Gemm wants a 2-D input and a constant weight") \
        in report.messages


@pytest.mark.parametrize("how", ["graph_output", "other_consumer"])
def test_intermediate_value_used_elsewhere_blocks_the_match(how):
    if how == "graph_output":
        m = mm_add(extra_outputs=[vi("t", [4, 5])])
    else:
        m = mm_add(extra_nodes=[helper.make_node("Relu", ["t"], ["r"])], extra_outputs=[vi("r", [4, 5])])
    out, report = run(m)
    assert "MatMul" in ops(out) and "Gemm" not in ops(out)
    assert report.messages == []  # not a refusal: the pattern simply does not match


def test_graph_output_at_the_root_keeps_its_name_dtype_and_shape():
    m = mm_add()
    out, _ = run(m)
    assert out.graph.node[0].output[0] == "y"
    assert out.graph.output[0] == m.graph.output[0]


def test_rule_rewrites_inside_if_and_loop_bodies_not_across_scopes():
    w = init("w", RNG.standard_normal((3, 3)).astype(np.float32))
    b = init("b", RNG.standard_normal(3).astype(np.float32))
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t1"]),
                              helper.make_node("Add", ["t1", "b"], ["o1"])], "then", [], [vi("o1", [2, 3])], [w, b])
    # else: the MatMul lives in the outer graph; a rule never matches across the scope boundary
    other = helper.make_graph([helper.make_node("Add", ["outer_t", "b2"], ["o2"])], "else", [], [vi("o2", [2, 3])],
                              [init("b2", np.ones(3, np.float32))])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("MatMul", ["v", "w3"], ["t3"]),
         helper.make_node("Add", ["b3", "t3"], ["v_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("v", [2, 3])],
        [vi("c_out", [], TensorProto.BOOL), vi("v_out", [2, 3])],
        [init("w3", RNG.standard_normal((3, 3)).astype(np.float32) / 2), init("b3", np.ones(3, np.float32))])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["outer_t"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trip", "", "y"], ["z"], body=body)]
    m = make_model(nodes, [vi("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [vi("z", [2, 3])],
                   [init("w0", np.eye(3, dtype=np.float32)), init("trip", np.array(2, np.int64))])
    out, _ = run(m)
    graphs = {a.name: helper.get_attribute_value(a) for n in out.graph.node for a in n.attribute if a.g.name}
    assert [n.op_type for n in graphs["then_branch"].node] == ["Gemm"]
    assert [n.op_type for n in graphs["else_branch"].node] == ["Add"]
    assert [n.op_type for n in graphs["body"].node] == ["Identity", "Gemm"]
    assert ops(out) == ["MatMul", "If", "Loop"]
    assert [i.name for i in graphs["body"].input] == ["i", "c_in", "v"]
    for cond in (True, False):
        assert_equivalent(m, out, feeds={"x": RNG.standard_normal((2, 3)).astype(np.float32), "cond": np.array(cond)})


def test_as_binds_nodes_and_pattern_attributes_must_match():
    def pat(op, x):
        return op.Transpose(op.Transpose(x, _as="first"), _as="second")

    def rep(op, x, first, second):
        p1, p2 = first.attrs["perm"], second.attrs["perm"]
        return op.Transpose(x, perm=[p1[i] for i in p2])

    rule = onnxopt.RewriteRule("test_merge_transposes", pat, rep)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1])]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [3, 2, 4])])
    out, _ = run(m, rule)
    assert ops(out) == ["Transpose"]
    assert list(helper.get_attribute_value(out.graph.node[0].attribute[0])) == [1, 0, 2]
    assert_equivalent(m, out)

    only_swap = onnxopt.RewriteRule("test_drop_double_swap", lambda op, x: op.Transpose(op.Transpose(x, perm=[1, 0]),
                                                                                         perm=[1, 0]),
                                    lambda op, x: op.Identity(x))
    out, _ = run(m, only_swap)
    assert ops(out) == ["Transpose", "Transpose"]  # perms differ from the pattern's
    swap = make_model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                       helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, _ = run(swap, only_swap)
    assert ops(out) == ["Identity"]


def test_a_pattern_node_used_twice_matches_one_graph_node():
    def pat(op, x, y):
        d = op.Sub(x, y)
        return op.Mul(d, d)

    rule = onnxopt.RewriteRule("test_square_diff", pat, lambda op, x, y: op.Pow(op.Sub(x, y), np.float32(2)))
    one = make_model([helper.make_node("Sub", ["x", "y"], ["d"]), helper.make_node("Mul", ["d", "d"], ["z"])],
                     [vi("x", [3]), vi("y", [3])], [vi("z", [3])])
    out, _ = run(one, rule)
    assert ops(out) == ["Sub", "Pow"]
    assert_equivalent(one, out)
    two = make_model([helper.make_node("Sub", ["x", "y"], ["d1"]), helper.make_node("Sub", ["x", "y"], ["d2"]),
                      helper.make_node("Mul", ["d1", "d2"], ["z"])], [vi("x", [3]), vi("y", [3])], [vi("z", [3])])
    out, _ = run(two, rule)
    assert ops(out) == ["Sub", "Sub", "Mul"]


def test_replacement_returning_none_declines_and_existing_tensor_rewires():
    declined = onnxopt.RewriteRule("test_decline", pattern, lambda op, x, w, b: None)
    out, _ = run(mm_add(), declined)
    assert ops(out) == ["MatMul", "Add"]

    def mul_one(op, x, one):
        return op.Mul(x, one)

    def is_one(ctx, one):
        return ctx.is_constant(one) and np.all(ctx.value(one) == 1) or ctx.refuse("not one")

    drop = onnxopt.RewriteRule("test_drop_mul_one", mul_one, lambda op, x: x, is_one)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "c"], ["m"]),
             helper.make_node("Neg", ["m"], ["y"]), helper.make_node("Mul", ["c", "y"], ["z"])]
    m = make_model(nodes, [vi("x", [3])], [vi("z", [3])], [init("c", np.ones(3, np.float32))])
    out, _ = run(m, drop)
    # the inner Mul goes; the root Mul makes a graph output, whose name an existing tensor cannot take
    assert ops(out) == ["Relu", "Neg", "Mul"]
    assert_equivalent(m, out)
