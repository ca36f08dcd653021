"""optimize()/save() contracts, the registry, the pass manager and verify=True."""
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxopt
from onnxopt import verify
from onnxopt.ir import replace_uses


from .helpers import assert_equivalent, init, make_model, vi


def _mlp():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    nodes = [helper.make_node("Identity", ["w0"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["t"]),
             helper.make_node("Relu", ["t"], ["y"])]
    return make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 4])], [init("w0", w)])


class DropIdentity(onnxopt.Pass):
    """Test pass: bypass Identity nodes (not on graph outputs)."""
    name = "test_drop_identity"

    def run(self, graph, ctx):
        changed = False
        for node in graph.nodes:
            if node.op == "Identity" and node.outputs[0] not in graph.outputs:
                src, out = node.inputs[0], node.outputs[0]
                replace_uses(out, src)
                node.outputs.clear()
                changed = True
        return changed


class BreakConstants(onnxopt.Pass):
    """Test pass: doubles every float initializer (wrong on purpose)."""
    name = "test_break_constants"

    def run(self, graph, ctx):
        changed = False
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and not getattr(t, "_broken", False):
                t.values = t.values * 2
                t._broken = True
                changed = True
        return changed


def test_input_modelproto_is_not_mutated():
    m = _mlp()
    before = m.SerializeToString()
    out = onnxopt.optimize(m, passes=[DropIdentity()])
    assert m.SerializeToString() == before
    assert "Identity" not in [n.op_type for n in out.graph.node]
    assert_equivalent(m, out)


def test_accepts_path_bytes_and_proto(tmp_path):
    m = _mlp()
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    outs = [onnxopt.optimize(x, passes=[DropIdentity()]) for x in (str(p), p, m.SerializeToString(), m)]
    assert len({o.SerializeToString() for o in outs}) == 1


def test_report_records_time_and_node_delta():
    out, report = onnxopt.optimize(_mlp(), passes=[DropIdentity()], return_report=True)
    rec = [r for r in report.records if r.name == "test_drop_identity"]
    assert rec[0].changed and rec[0].node_delta == -1 and rec[0].seconds >= 0
    assert rec[-1].changed is False  # fixed point reached: a second round changed nothing
    assert report.nodes_before == 3 and report.nodes_after == 2
    assert "test_drop_identity" in report.format()


def test_fixed_point_cap():
    class AlwaysChanges(onnxopt.Pass):
        name = "test_always"

        def run(self, graph, ctx):
            return True

    _, report = onnxopt.optimize(_mlp(), passes=[AlwaysChanges()], max_iterations=3, return_report=True)
    assert len(report.records) == 3


def test_non_exact_pass_runs_once():
    class Approx(onnxopt.Pass):
        name = "test_approx"
        exact = False

        def run(self, graph, ctx):
            return True

    _, report = onnxopt.optimize(_mlp(), passes=[Approx()], return_report=True)
    assert len(report.records) == 1


def test_registry_get_pass_options_and_errors():
    class WithOptions(onnxopt.Pass):
        """Test pass with an option."""
        name = "test_with_options"
        options = {"ratio": 0.5}

        def validate_options(self):
            if not 0 <= self.options["ratio"] <= 1:
                raise onnxopt.PassOptionError("ratio must be in [0, 1]")

        def run(self, graph, ctx):
            return False

    onnxopt.register_pass(WithOptions, replace=True)
    assert "test_with_options" in onnxopt.list_passes()
    assert onnxopt.get_pass("test_with_options", ratio=0.3).options["ratio"] == 0.3
    with pytest.raises(onnxopt.PassOptionError, match="no option"):
        onnxopt.get_pass("test_with_options", bogus=1)
    with pytest.raises(onnxopt.PassOptionError, match="ratio"):
        onnxopt.get_pass("test_with_options", ratio=3)
    with pytest.raises(onnxopt.UnknownPassError, match="did you mean"):
        onnxopt.get_pass("test_with_optoins")
    with pytest.raises(onnxopt.UnknownPassError):
        onnxopt.optimize(_mlp(), passes=["default", "no_such_pass"])
    # a configured pass object mixes with names and presets
    out = onnxopt.optimize(_mlp(), passes=["default", onnxopt.get_pass("test_with_options", ratio=0.1)])
    onnx.checker.check_model(out)


def test_duplicate_registration_is_refused():
    class A(onnxopt.Pass):
        name = "test_dup"

        def run(self, graph, ctx):
            return False

    class B(A):
        pass

    onnxopt.register_pass(A, replace=True)
    with pytest.raises(onnxopt.PassOptionError, match="already registered"):
        onnxopt.register_pass(B)


def test_needs_calibration_is_enforced():
    class NeedsData(onnxopt.Pass):
        name = "test_needs_data"
        exact = False
        needs_calibration = True

        def run(self, graph, ctx):
            return False

    with pytest.raises(onnxopt.CalibrationError, match="test_needs_data"):
        onnxopt.optimize(_mlp(), passes=[NeedsData()])


def test_verify_names_the_pass_that_broke_the_outputs():
    with pytest.raises(onnxopt.VerificationError) as err:
        onnxopt.optimize(_mlp(), passes=[DropIdentity(), BreakConstants()], verify=True)
    assert err.value.pass_name == "test_break_constants"
    assert "test_break_constants" in str(err.value)
    assert err.value.max_abs_diff > 0


def test_verify_passes_on_a_correct_pipeline():
    out, report = onnxopt.optimize(_mlp(), passes=[DropIdentity()], verify=True, return_report=True)
    assert ("verify", "outputs match the original") in report.messages


def test_passes_recurse_into_subgraphs():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["t_out"])],
                               "then", [], [vi("t_out", [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["b"]), helper.make_node("Abs", ["b"], ["e_out"])],
                               "else", [], [vi("e_out", [2])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("c", [], onnx.TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    out = onnxopt.optimize(m, passes=[DropIdentity()])
    branches = [a.g for a in out.graph.node[0].attribute]
    assert all("Identity" not in [n.op_type for n in g.node] for g in branches)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": np.array([1.0, -2.0], np.float32)}
        assert verify.compare(verify.run(m, feeds), verify.run(out, feeds)) is None


def test_model_metadata_survives():
    m = _mlp()
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.domain = "org.example"
    m.model_version = 7
    onnx.helper.set_model_props(m, {"author": "me", "license": "x"})
    m.opset_import.append(helper.make_opsetid("com.example", 3))
    out = onnxopt.optimize(m, passes=[DropIdentity()])
    assert (out.doc_string, out.graph.doc_string, out.domain, out.model_version) == \
        ("model doc", "graph doc", "org.example", 7)
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "x"}
    assert {(o.domain, o.version) for o in out.opset_import} >= {("", 17), ("com.example", 3)}
    assert out.ir_version == m.ir_version


def test_local_functions_survive():
    fn = helper.make_function("custom", "AddOne", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["one"], value_float=1.0),
                               helper.make_node("Add", ["a", "one"], ["b"])],
                              [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("AddOne", ["x"], ["y"], domain="custom")]
    graph = helper.make_graph(nodes, "g", [vi("x", [2])], [vi("y", [2])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                          functions=[fn])
    out = onnxopt.optimize(m)
    assert [f.name for f in out.functions] == ["AddOne"]
    assert_equivalent(m, out)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = onnxopt.optimize(_mlp())
    path = tmp_path / "o.onnx"
    onnxopt.save(out, path)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]
    assert onnx.load(path).SerializeToString() == out.SerializeToString()


class DoubleWeights(BreakConstants):
    """Test pass: an approximate pass (doubles the weights)."""
    name = "test_double_weights"
    exact = False


def test_approximate_passes_get_a_fidelity_figure():
    out, report = onnxopt.optimize(_mlp(), passes=[DropIdentity(), DoubleWeights()], return_report=True)
    assert report.fidelity is not None and report.fidelity["cosine"] > 0.99  # doubling keeps direction
    assert report.fidelity["max_abs_diff"] > 0
    assert any(name == "fidelity" for name, _ in report.messages)
    _, exact_report = onnxopt.optimize(_mlp(), passes=[DropIdentity()], return_report=True)
    assert exact_report.fidelity is None  # exact pipelines are not re-run unless asked
