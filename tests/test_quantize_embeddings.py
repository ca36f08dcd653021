"""quantize_embeddings: int8 Gather tables with a float32 scale per row.

Error bound used throughout: with s[v] = max|T[v]| / 127 and q = rint(T[v] / s[v]), the rounding moves
each element by at most s[v] / 2. Float32 adds two relative roundings of at most 2^-24 on values of at
most 127 s[v] (the quotient T / s before rint, the product q * s in onnxruntime's Mul), i.e. at most
254 * 2^-24 * s[v] < 2e-5 * s[v]; no element is clipped, since |T[v]| / s[v] <= 127 up to that same
rounding. So every gathered element is within s[v] * (0.5 + 2e-5) of the float one, which is what
`assert_within_half_step` checks (an Add of two gathered rows: the sum of both bounds).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.passes import base

from .helpers import check_valid, init, make_model, vi

F32 = np.float32
SLACK = 2e-5  # float32 rounding, in units of s[v] (see the module docstring)


# ------------------------------------------------------------------------------------ references

def ref_rows(table):
    """The documented numerics, written independently of the pass: per-row symmetric int8."""
    t = np.asarray(table, F32)
    s = (np.abs(t).max(axis=1) / F32(127)).astype(F32)
    s[s == 0] = 1
    q = np.clip(np.rint(t / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_within_half_step(ref, got, step):
    """|got - ref| <= step * (0.5 + SLACK) elementwise, `step` broadcasting against the outputs."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    bound = np.asarray(step, np.float64) * (0.5 + SLACK)
    assert np.all(err <= bound), f"max excess {float(np.max(err - bound)):.3g}"


def gather_model(table, ids_dtype=TensorProto.INT64, ids_shape=("b", "s"), extra_nodes=(), outputs=None,
                 inputs=(), initializers=(), ir_version=None):
    v, d = table.shape
    nodes = [helper.make_node("Gather", ["T", "ids"], ["y"], name="emb")] + list(extra_nodes)
    outs = outputs or [vi("y", list(ids_shape) + [d])]
    return make_model(nodes, [vi("ids", list(ids_shape), ids_dtype)] + list(inputs), outs,
                      [init("T", table)] + list(initializers), ir_version=ir_version)


def rand_table(v, d, seed=0, scale=0.05):
    return (np.random.default_rng(seed).standard_normal((v, d)) * scale).astype(F32)


def changed(report, name="quantize_embeddings"):
    return any(r.changed for r in report.records if r.name == name)


# ------------------------------------------------------------------------------------------ tests

def test_known_answer_scales_and_table():
    # hand-checked rows: ties at .5 (rint rounds half to even), an all-zero row (scale 1), a row whose
    # largest magnitude is negative (s = 2), and a row of tiny values.
    table = np.zeros((4, 8), F32)
    table[0] = [127, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -127]
    table[2] = [-254, 1, 3, -3, 0, 2, 127, -1]  # s = 2: 1/2, 3/2, -3/2 are ties
    table[3] = [1e-3, -1e-3, 5e-4, 0, 0, 0, 0, 0]
    out, report = onnxopt.optimize(gather_model(table, ids_shape=("n",)),
                                   [onnxopt.get_pass("quantize_embeddings", min_elements=0)], return_report=True)
    assert sorted(n.op_type for n in out.graph.node) == ["Cast", "Gather", "Gather", "Mul"]
    vals = inits(out)
    (q,) = [a for a in vals.values() if a.dtype == np.int8]
    (s,) = [a for a in vals.values() if a.dtype == np.float32]
    assert q.shape == (4, 8) and s.shape == (4, 1)
    assert np.array_equal(s[:, 0], np.array([1, 1, 2, F32(1e-3) / F32(127)], F32))
    assert q[0].tolist() == [127, 0, 2, 2, -2, 0, 126, -127]
    assert q[1].tolist() == [0] * 8
    assert q[2].tolist() == [-127, 0, 2, -2, 0, 1, 64, 0]  # 127/2 = 63.5 -> 64, -1/2 -> -0
    # in float32, 1e-3 / s = 127.00001 (the rounding slack of the bound) and 5e-4 / s = 63.500004
    assert q[3].tolist() == [127, -127, 64, 0, 0, 0, 0, 0]
    ref_q, ref_s = ref_rows(table)
    assert np.array_equal(q, ref_q) and np.array_equal(s[:, 0], ref_s)
    check_valid(gather_model(table, ids_shape=("n",)), out)
    # wiring: y = Mul(Cast(Gather(Q, ids), FLOAT), Gather(S, ids))
    by_out = {o: n for n in out.graph.node for o in n.output}
    mul = by_out["y"]
    assert mul.op_type == "Mul"
    cast, scale = by_out[mul.input[0]], by_out[mul.input[1]]
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
    rows = by_out[cast.input[0]]
    assert rows.op_type == "Gather" and vals[rows.input[0]].dtype == np.int8 and rows.input[1] == "ids"
    assert scale.op_type == "Gather" and vals[scale.input[0]].shape == (4, 1) and scale.input[1] == "ids"
    assert "quantized 1 embedding table" in str(report)


def test_large_table_default_threshold_matches_reference_and_runs_close():
    table = rand_table(600, 128)  # 76800 elements >= 65536
    table[17] = 0  # an all-zero row stays exactly zero
    model = gather_model(table)
    out = onnxopt.optimize(model, ["quantize_embeddings"])
    check_valid(model, out)
    ref_q, ref_s = ref_rows(table)
    vals = inits(out)
    (q,) = [a for a in vals.values() if a.dtype == np.int8]
    (s,) = [a for a in vals.values() if a.dtype == np.float32]
    assert np.array_equal(q, ref_q) and np.array_equal(s, ref_s[:, None])
    assert "T" not in vals  # the float table is gone
    ids = np.random.default_rng(1).integers(-600, 600, (3, 50))  # negative indices count from the end
    ids[0, :3] = [17, 0, -1]
    (ref,), (got,) = run(model, {"ids": ids}), run(out, {"ids": ids})
    assert got.shape == ref.shape and got.dtype == np.float32
    assert_within_half_step(ref, got, ref_s[ids][..., None])
    assert np.all(got[0, 0] == 0)


@pytest.mark.parametrize("ids_dtype,ids_shape", [(TensorProto.INT32, ["n"]), (TensorProto.INT64, []),
                                                 (TensorProto.INT32, [2, 3, 4])])
def test_any_int_indices(ids_dtype, ids_shape):
    table = rand_table(520, 128, seed=2)
    model = gather_model(table, ids_dtype=ids_dtype, ids_shape=ids_shape)
    out = onnxopt.optimize(model, ["quantize_embeddings"])
    check_valid(model, out)
    np_dtype = np.int32 if ids_dtype == TensorProto.INT32 else np.int64
    shape = [5 if isinstance(d, str) else d for d in ids_shape]
    ids = np.asarray(np.random.default_rng(3).integers(0, 520, shape), np_dtype)
    (ref,), (got,) = run(model, {"ids": ids}), run(out, {"ids": ids})
    assert got.shape == ref.shape == tuple(shape) + (128,)
    assert_within_half_step(ref, got, ref_rows(table)[1][ids][..., None])


def test_word_plus_position_embeddings_through_layernorm():
    """The BERT embedding block: word + position rows added, then LayerNorm; both tables quantized."""
    word, pos = rand_table(1000, 96, seed=4), rand_table(700, 96, seed=5, scale=0.02)
    gamma, beta = np.ones(96, F32), np.zeros(96, F32)
    nodes = [helper.make_node("Gather", ["P", "pos"], ["p"]), helper.make_node("Add", ["y", "p"], ["e"]),
             helper.make_node("LayerNormalization", ["e", "g", "b"], ["z"], axis=-1, epsilon=1e-12)]
    model = gather_model(word, extra_nodes=nodes, inputs=[vi("pos", ["b", "s"], TensorProto.INT64)],
                         outputs=[vi("e", ["b", "s", 96]), vi("z", ["b", "s", 96])],
                         initializers=[init("P", pos), init("g", gamma), init("b", beta)])
    out = onnxopt.optimize(model, ["quantize_embeddings"])
    check_valid(model, out)
    assert sum(a.dtype == np.int8 for a in inits(out).values()) == 2
    rng = np.random.default_rng(6)
    feeds = {"ids": rng.integers(0, 1000, (2, 40)), "pos": np.tile(np.arange(40), (2, 1))}
    (e0, z0), (e1, z1) = run(model, feeds), run(out, feeds)
    step = ref_rows(word)[1][feeds["ids"]][..., None] + ref_rows(pos)[1][feeds["pos"]][..., None]
    assert_within_half_step(e0, e1, step)  # the sum's error is at most the sum of both bounds
    cos = float(np.sum(z0 * z1) / (np.linalg.norm(z0) * np.linalg.norm(z1)))
    assert cos > 0.9999


def test_small_and_unsuitable_tables_untouched():
    small = rand_table(255, 256)  # 65280 elements < 65536
    model = gather_model(small)
    out, report = onnxopt.optimize(model, ["quantize_embeddings"], return_report=True)
    assert not changed(report) and [n.op_type for n in out.graph.node] == ["Gather"]
    assert "smaller than min_elements" in str(report)
    # one column: int8 plus a float scale per row would not be smaller (also: the pass's own scale tables)
    column = rand_table(70000, 1)
    out, report = onnxopt.optimize(gather_model(column), ["quantize_embeddings"], return_report=True)
    assert not changed(report) and "one column" in str(report)
    # Gather along axis 1, a 3-D table, a float64 table
    t = rand_table(600, 128)
    m = make_model([helper.make_node("Gather", ["T", "ids"], ["y"], axis=1)], [vi("ids", ["n"], TensorProto.INT64)],
                   [vi("y", [600, "n"])], [init("T", t)])
    out, report = onnxopt.optimize(m, ["quantize_embeddings"], return_report=True)
    assert not changed(report) and "axis 1" in str(report)
    t3 = rand_table(600, 128).reshape(600, 2, 64)
    m = make_model([helper.make_node("Gather", ["T", "ids"], ["y"])], [vi("ids", ["n"], TensorProto.INT64)],
                   [vi("y", ["n", 2, 64])], [init("T", t3)])
    assert not changed(onnxopt.optimize(m, ["quantize_embeddings"], return_report=True)[1])
    m = make_model([helper.make_node("Gather", ["T", "ids"], ["y"])], [vi("ids", ["n"], TensorProto.INT64)],
                   [vi("y", ["n", 128], TensorProto.DOUBLE)], [init("T", t.astype(np.float64))])
    assert not changed(onnxopt.optimize(m, ["quantize_embeddings"], return_report=True)[1])


def test_min_elements_option():
    t = rand_table(100, 32)
    out = onnxopt.optimize(gather_model(t), [onnxopt.get_pass("quantize_embeddings", min_elements=3200)])
    assert any(a.dtype == np.int8 for a in inits(out).values())
    out = onnxopt.optimize(gather_model(t), [onnxopt.get_pass("quantize_embeddings", min_elements=3201)])
    assert [n.op_type for n in out.graph.node] == ["Gather"]
    with pytest.raises(onnxopt.PassOptionError):
        onnxopt.get_pass("quantize_embeddings", min_elements=-1)
    with pytest.raises(onnxopt.PassOptionError):
        onnxopt.get_pass("quantize_embeddings", exclude="T")
    out = onnxopt.optimize(gather_model(rand_table(600, 128)), [onnxopt.get_pass("quantize_embeddings", exclude=["T"])])
    assert [n.op_type for n in out.graph.node] == ["Gather"]


def test_table_shared_by_several_gathers_is_quantized_once():
    table = rand_table(600, 128, seed=7)
    nodes = [helper.make_node("Gather", ["T", "ids2"], ["y2"], name="emb2")]
    model = gather_model(table, extra_nodes=nodes, inputs=[vi("ids2", ["n"], TensorProto.INT32)],
                         outputs=[vi("y", ["b", "s", 128]), vi("y2", ["n", 128])])
    out, report = onnxopt.optimize(model, ["quantize_embeddings"], return_report=True)
    check_valid(model, out)
    vals = inits(out)
    assert sorted((a.dtype.name, a.shape) for a in vals.values()) == [("float32", (600, 1)), ("int8", (600, 128))]
    assert sorted(n.op_type for n in out.graph.node) == ["Cast"] * 2 + ["Gather"] * 4 + ["Mul"] * 2
    assert "(2 Gathers)" in str(report)
    rng = np.random.default_rng(8)
    feeds = {"ids": rng.integers(0, 600, (2, 9)), "ids2": rng.integers(0, 600, 11).astype(np.int32)}
    s = ref_rows(table)[1]
    for r, g, ids in zip(run(model, feeds), run(out, feeds), (feeds["ids"], feeds["ids2"])):
        assert_within_half_step(r, g, s[ids][..., None])


def tied_model(v=600, d=128, seed=9):
    """A tied LM head: the embedding table is gathered and also multiplies the hidden state (Gemm transB)."""
    table = rand_table(v, d, seed=seed)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "T"], ["logits"], transB=1)]
    model = make_model(nodes, [vi("ids", ["n"], TensorProto.INT64)], [vi("logits", ["n", v])], [init("T", table)])
    return model, table


def test_tied_table_left_alone_by_itself():
    model, _ = tied_model()
    out, report = onnxopt.optimize(model, ["quantize_embeddings"], return_report=True)
    assert not changed(report)
    assert [n.op_type for n in out.graph.node] == ["Gather", "Relu", "Gemm"]
    assert "also read by Gemm" in str(report)
    # a table also read through a Transpose (the other way exporters tie an LM head) stays too (the default
    # preset's fold_constants would untie this small one: Transpose(T) becomes an initializer of its own)
    table = rand_table(600, 128, seed=10)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["h"]), helper.make_node("Transpose", ["T"], ["Tt"]),
             helper.make_node("MatMul", ["h", "Tt"], ["logits"])]
    m = make_model(nodes, [vi("ids", ["n"], TensorProto.INT64)], [vi("logits", ["n", 600])], [init("T", table)])
    out, report = onnxopt.optimize(m, ["quantize_embeddings"], return_report=True)
    assert not changed(report) and "also read by Transpose" in str(report)
    assert inits(out)["T"].dtype == np.float32


def test_tied_table_after_the_gemm_got_its_own_int8_copy():
    """After quantize_dynamic the Gemm reads its own int8 weight, the float table feeds Gathers only and
    is quantized: no float32 [V, D] table remains. The outputs stay close."""
    model, table = tied_model()
    passes = ["default", onnxopt.get_pass("quantize_dynamic", target="onnxruntime"), "quantize_embeddings"]
    out, report = onnxopt.optimize(model, passes, return_report=True)
    check_valid(model, out)
    assert changed(report, "quantize_dynamic") and changed(report)
    big_float = [n for n, a in inits(out).items() if a.dtype == np.float32 and a.size >= 600 * 128]
    assert big_float == []
    assert sorted(a.shape for a in inits(out).values() if a.dtype == np.int8) == [(128, 600), (600, 128)]
    ids = np.random.default_rng(11).integers(0, 600, 32)
    (ref,), (got,) = run(model, {"ids": ids}), run(out, {"ids": ids})
    cos = float(np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.999, cos


def test_graph_input_table_left_alone():
    """An initializer also listed as a graph input (IR >= 4) is a default the caller may override."""
    table = rand_table(600, 128, seed=12)
    model = gather_model(table, inputs=[vi("T", [600, 128])])
    assert model.ir_version >= 4
    out, report = onnxopt.optimize(model, ["quantize_embeddings"], return_report=True)
    assert not changed(report)
    assert [n.op_type for n in out.graph.node] == ["Gather"]
    assert "T" in inits(out) and "T" in [i.name for i in out.graph.input]
    other = np.ones((600, 128), F32)
    ids = np.array([[0, 5]])
    assert np.array_equal(run(out, {"ids": ids, "T": other})[0], other[ids])


def test_table_behind_constant_and_identity_with_default():
    """An exporter's Constant -> Identity table: the default preset makes it an initializer first."""
    table = rand_table(600, 128, seed=13)
    const = helper.make_node("Constant", [], ["Tc"], value=numpy_helper.from_array(table, "Tc"))
    nodes = [const, helper.make_node("Identity", ["Tc"], ["T"]), helper.make_node("Gather", ["T", "ids"], ["y"])]
    model = make_model(nodes, [vi("ids", ["n"], TensorProto.INT64)], [vi("y", ["n", 128])])
    out, report = onnxopt.optimize(model, ["default", "quantize_embeddings"], return_report=True)
    check_valid(model, out)
    assert changed(report) and not [a for a in inits(out).values() if a.dtype == np.float32 and a.size > 600]
    ids = np.arange(0, 600, 7)
    assert_within_half_step(run(model, {"ids": ids})[0], run(out, {"ids": ids})[0], ref_rows(table)[1][ids][:, None])


def test_gathers_inside_if_branches():
    """Gathers of an outer-scope table in both branches of an If and in the main graph: one table for all."""
    table = rand_table(600, 128, seed=14)
    then_g = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["y_then"])], "then", [],
                               [vi("y_then", [3, 128])])
    else_g = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["g_else"]),
                                helper.make_node("Neg", ["g_else"], ["y_else"])], "else", [], [vi("y_else", [3, 128])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Gather", ["T", "ids"], ["z"])]
    model = make_model(nodes, [vi("c", [], TensorProto.BOOL), vi("ids", [3], TensorProto.INT64)],
                       [vi("y", [3, 128]), vi("z", [3, 128])], [init("T", table)])
    out, report = onnxopt.optimize(model, ["quantize_embeddings"], return_report=True)
    check_valid(model, out)
    assert "(3 Gathers)" in str(report)
    bodies = [a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute]
    assert all("Mul" in [n.op_type for n in b.node] for b in bodies)
    s = ref_rows(table)[1]
    ids = np.array([0, 599, -2])
    for c in (True, False):
        feeds = {"c": np.array(c), "ids": ids}
        for r, g in zip(run(model, feeds), run(out, feeds)):
            assert_within_half_step(r, g, s[ids][:, None])


def test_idempotent():
    model = gather_model(rand_table(70000, 2, seed=15))  # a scale table of 70000 rows: still not re-quantized
    once = onnxopt.optimize(model, ["quantize_embeddings"])
    twice, report = onnxopt.optimize(once, ["quantize_embeddings"], return_report=True)
    assert not changed(report)
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()
    big = onnxopt.optimize(gather_model(rand_table(600, 128)), ["quantize_embeddings"])
    again, report = onnxopt.optimize(big, ["quantize_embeddings"], return_report=True)
    assert not changed(report) and again.graph.SerializeToString() == big.graph.SerializeToString()


def test_int8_preset_runs_it_after_quantize_auto():
    presets = onnxopt.list_presets()
    assert presets["int8"].index("quantize_auto") < presets["int8"].index("quantize_embeddings")
    # word + position embeddings and a LayerNorm: quantize_auto finds nothing, the tables still shrink
    word, pos = rand_table(2000, 64, seed=16), rand_table(1100, 64, seed=17)
    nodes = [helper.make_node("Gather", ["P", "pos"], ["p"]), helper.make_node("Add", ["y", "p"], ["e"]),
             helper.make_node("LayerNormalization", ["e", "g", "b"], ["z"], axis=-1)]
    model = gather_model(word, extra_nodes=nodes, inputs=[vi("pos", ["b", "s"], TensorProto.INT64)],
                         outputs=[vi("z", ["b", "s", 64])],
                         initializers=[init("P", pos), init("g", np.ones(64, F32)), init("b", np.zeros(64, F32))])
    rng = np.random.default_rng(18)
    calibration = [{"ids": rng.integers(0, 2000, (2, 16)), "pos": np.tile(np.arange(16), (2, 1))} for _ in range(4)]
    for calib in (None, calibration):
        out, report = onnxopt.optimize(model, ["int8"], calibration=calib, return_report=True)
        check_valid(model, out)
        assert changed(report)
        assert sorted(a.shape for a in inits(out).values() if a.dtype == np.int8) == [(1100, 64), (2000, 64)]
        assert onnxopt.ir.model_size(out) < 0.3 * onnxopt.ir.model_size(model)
        assert report.fidelity is not None and report.fidelity["cosine"] > 0.9999  # judged against the original


def test_registered_like_the_other_quantize_passes():
    p = onnxopt.get_pass("quantize_embeddings")
    assert (p.kind, p.exact, p.idempotent) == ("quantize", False, True)
    assert p.options == {"min_elements": 65536, "exclude": ()}
    assert "quantize_embeddings" in base.list_passes()
