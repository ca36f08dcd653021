"""avoid_skip_layernorm: Add -> LayerNormalization becomes Sum -> LayerNormalization (bit-identical)
when onnxruntime's fused SkipLayerNormalization measures slower on this machine."""
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt.passes import ortfix

from .helpers import init, make_model, ops, vi

D = 64


def encoder_like(opset=17, d=D, rows=8, second_consumer=False):
    """x + y -> LayerNorm -> MatMul, + residual -> LayerNorm (two Add -> LN pairs)."""
    rng = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("Add", ["x", "y"], ["s1"]),
             onnx.helper.make_node("LayerNormalization", ["s1", "g", "b"], ["n1"], axis=-1, epsilon=1e-5),
             onnx.helper.make_node("MatMul", ["n1", "w"], ["h"]),
             onnx.helper.make_node("Add", ["h", "n1"], ["s2"]),
             onnx.helper.make_node("LayerNormalization", ["s2", "g", "b"], ["out"], axis=-1, epsilon=1e-5)]
    outputs = [vi("out", [1, rows, d])]
    if second_consumer:
        outputs.append(vi("s1", [1, rows, d]))
    return make_model(nodes, [vi("x", [1, rows, d]), vi("y", [1, rows, d])], outputs,
                      [init("g", rng.uniform(0.5, 1.5, d).astype(np.float32)),
                       init("b", rng.standard_normal(d).astype(np.float32)),
                       init("w", (rng.standard_normal((d, d)) / 8).astype(np.float32))], opset=opset)


def feeds(rows=8, d=D):
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((1, rows, d)).astype(np.float32),
            "y": rng.standard_normal((1, rows, d)).astype(np.float32)}


def ort_run(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    """Outputs and the op types onnxruntime runs after its own fusions."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = s.run(None, feeds())
        return outs, [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_rewrites_every_pair_bit_identically_and_keeps_onnxruntime_from_fusing():
    model = encoder_like()
    q, report = onnxopt.optimize(model, [onnxopt.get_pass("avoid_skip_layernorm", measure=False)],
                                 return_report=True)
    assert ops(q).count("Sum") == 2 and "Add" not in ops(q)
    assert [o.name for o in q.graph.output] == [o.name for o in model.graph.output]
    before, fused = ort_run(model)
    after, unfused = ort_run(q)
    assert "SkipLayerNormalization" in fused  # what the pass exists to avoid
    assert "SkipLayerNormalization" not in unfused and unfused.count("LayerNormalization") == 2
    ref = ort_run(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]  # Add and LayerNormalization as written
    assert np.array_equal(after[0], ref[0])  # the same additions, the same LayerNorm kernel
    np.testing.assert_allclose(before[0], ref[0], rtol=1e-4, atol=1e-4)  # (the fused kernel rounds its own way)
    onnx.checker.check_model(q, full_check=True)
    again = onnxopt.optimize(q, [onnxopt.get_pass("avoid_skip_layernorm", measure=False)])
    assert again.SerializeToString() == q.SerializeToString()  # idempotent


def test_the_decision_follows_the_measurement(monkeypatch):
    model = encoder_like(second_consumer=True)  # the Add's sum is also a graph output: still rewritten
    ortfix._DECISIONS.clear()
    monkeypatch.setattr(ortfix, "_time_pair", lambda d, rows, runs=200: (100.0, 90.0))  # fused barely slower
    q, report = onnxopt.optimize(model, ["avoid_skip_layernorm"], return_report=True)
    assert "Sum" not in ops(q) and any("left to onnxruntime" in t for _, t in report.messages)
    ortfix._DECISIONS.clear()
    seen = []

    def slow_fused(d, rows, runs=200):
        seen.append((d, rows))
        return 450.0, 60.0

    monkeypatch.setattr(ortfix, "_time_pair", slow_fused)
    q, report = onnxopt.optimize(model, ["avoid_skip_layernorm"], return_report=True)
    assert seen == [(D, 8)]  # the model's hidden size and row count, measured once
    assert ops(q).count("Sum") == 2 and any("2 Add -> LayerNormalization" in t for _, t in report.messages)
    np.testing.assert_array_equal(ort_run(q)[0][1], feeds()["x"] + feeds()["y"])
    ortfix._DECISIONS.clear()


def test_measure_really_times_onnxruntime():
    fused, unfused = ortfix._time_pair(D, 8, runs=20)
    assert fused > 0 and unfused > 0


def test_only_layernorms_fed_by_a_residual_add_are_touched():
    m = encoder_like()
    m.graph.node[0].op_type = "Mul"  # the first LayerNorm's input is no longer an Add
    q = onnxopt.optimize(m, [onnxopt.get_pass("avoid_skip_layernorm", measure=False)])
    assert ops(q).count("Sum") == 1 and ops(q).count("Mul") == 1
    m = encoder_like()
    m.graph.node[3].input[1] = "b"  # h + constant: a bias add (MatMul + bias fusions need it as Add)
    q = onnxopt.optimize(m, [onnxopt.get_pass("avoid_skip_layernorm", measure=False)])
    assert ops(q).count("Sum") == 1 and ops(q).count("Add") == 1


@pytest.mark.parametrize("bad", [dict(measure=1), dict(min_speedup=0.5), dict(min_speedup="2")])
def test_bad_options(bad):
    with pytest.raises(onnxopt.PassOptionError):
        onnxopt.get_pass("avoid_skip_layernorm", **bad)


def test_in_the_int8_preset_last():
    from onnxopt.passes import base
    assert [p.name for p in base.resolve(["int8"])][-1] == "avoid_skip_layernorm"
