"""quantize_auto's guards: accuracy fallback, cost decisions (fake timings), held-out data, the report."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxopt
from onnxopt import runtime, verify
from onnxopt.errors import CalibrationError, PassOptionError
from onnxopt.passes.quantize import common, guard

from .helpers import init, make_model, vi

F32 = np.float32


K, CLASSES = 512, 8
TEMPLATES = np.random.default_rng(123).standard_normal((CLASSES, K)).astype(F32)


def samples(rng, n):
    """Inputs of a toy classification task: a class template plus noise."""
    return (TEMPLATES[rng.integers(0, CLASSES, n)] + rng.standard_normal((n, K))).astype(F32)


def outlier_mlp(seed=0, k=K, classes=CLASSES):
    """x -> mm1 -> relu -> mm2 -> relu -> mm3 (a classifier fitted on the toy task). Channel 0 of
    mm1's output is ~1000x the others and mm2 reads it with a tiny weight: one per-tensor u8 scale for
    mm2's input wipes out every other channel, so mm2 is the one sensitive node (mm1 and mm3 quantize
    well)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(F32)
    w1[:, 0] *= 1000.0
    w2 = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(F32)
    w2[0, :] *= 1e-3
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2")]
    inits = [init("W1", w1), init("W2", w2)]
    feat = make_model(nodes, [vi("x", ["n", k])], [vi("r2", ["n", k])], inits)
    labels = rng.integers(0, classes, 2000)
    f = verify.run(feat, {"x": (TEMPLATES[labels] + rng.standard_normal((2000, k))).astype(F32)})[0]
    w3 = np.linalg.solve(f.T @ f + np.eye(k), f.T @ np.eye(classes, dtype=F32)[labels]).astype(F32)
    nodes.append(helper.make_node("MatMul", ["r2", "W3"], ["y"], name="mm3"))
    return make_model(nodes, [vi("x", ["n", k])], [vi("y", ["n", classes])], inits + [init("W3", w3)])


def feeds(seed, n=8, batch=16):
    rng = np.random.default_rng(seed)
    return [{"x": samples(rng, batch)} for _ in range(n)]


def quantized_nodes(model):
    """Names of the original nodes that became int8 (QGemm/QConv are named after them)."""
    return sorted(n.name.split("_QGemm")[0].split("_QConv")[0] for n in model.graph.node
                  if n.op_type in ("QGemm", "QConv"))


def rows(report):
    return {r["node"]: r for r in report.quantization}


def run_auto(model, cal, **opts):
    opts.setdefault("target", "onnxopt")
    opts.setdefault("progress", False)
    opts.setdefault("tolerance", guard.DEFAULT_TOLERANCE)
    opts.setdefault("autotune", True)
    return onnxopt.optimize(model, ["default", onnxopt.get_pass("quantize_auto", **opts)], calibration=cal,
                            return_report=True)


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def pays(models, feeds):  # a fake timer: int8 twice as fast everywhere
    return [1.0, 0.5]


# ------------------------------------------------------------------------------------------ accuracy

def test_unguarded_quantization_of_the_outlier_model_misses_the_tolerance():
    model = outlier_mlp()
    q, _ = run_auto(model, feeds(1), autotune=False, tolerance=None)
    assert quantized_nodes(q) == ["mm1", "mm2", "mm3"]
    x = feeds(2, n=1, batch=256)[0]
    assert cosine(onnxopt.InferenceSession(q).run(None, x)[0], verify.run(model, x)[0]) < 0.995


@pytest.mark.parametrize("target", ["onnxopt", "onnxruntime"])
def test_sensitive_node_goes_back_to_fp32_and_the_model_meets_the_tolerance(target):
    model = outlier_mlp()
    q, report = run_auto(model, feeds(1), autotune=False, target=target)
    r = rows(report)
    assert not r["mm2"]["quantized"] and r["mm2"]["reason"].startswith("accuracy")
    assert r["mm1"]["quantized"] and r["mm3"]["quantized"]
    assert r["mm2"]["sqnr_db"] < min(r["mm1"]["sqnr_db"], r["mm3"]["sqnr_db"])
    if target == "onnxopt":
        assert quantized_nodes(q) == ["mm1", "mm3"]
    x = feeds(2, n=1, batch=256)[0]  # fresh data, never seen by the guard
    got = onnxopt.InferenceSession(q).run(None, x)[0]
    ref = verify.run(model, x)[0]
    assert cosine(got, ref) >= 0.995
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.97
    text = str(report)
    assert "mm2" in text and "kept 1 node(s) in fp32: mm2" in text
    if target == "onnxruntime":
        assert "onnxruntime fused" in text


def test_report_names_every_fallback_and_every_candidate():
    model = outlier_mlp()

    def timer(models, feeds):  # mm3 alone does not pay; everything else does
        names = {n.name for n in models[0].graph.node}
        return [1.0, 2.0] if names == {"mm3"} else [1.0, 0.5]

    q, report = run_auto(model, feeds(1), timer=timer)
    r = rows(report)
    assert set(r) == {"mm1", "mm2", "mm3"}
    assert r["mm3"]["reason"].startswith("cost") and r["mm3"]["ms_int8"] == 2.0
    assert r["mm2"]["reason"].startswith("accuracy")
    assert r["mm1"]["quantized"] and quantized_nodes(q) == ["mm1"]
    messages = " ".join(t for _, t in report.messages)
    for name, row in r.items():
        if not row["quantized"]:
            assert name in messages
    table = report.format()
    for name in r:
        assert name in table.split("reason", 1)[1]


def test_eval_fn_is_honoured():
    model = outlier_mlp()
    seen = []

    def eval_fn(m):  # a user metric that punishes quantizing mm3 (which the default tolerance accepts)
        seen.append(m)
        return 0.0 if "mm3" in quantized_nodes(m) else 1.0

    q, report = run_auto(model, feeds(1), autotune=False, eval_fn=eval_fn, max_drop=0.5)
    assert seen and all(hasattr(m, "graph") for m in seen)
    assert quantized_nodes(q) == ["mm1", "mm2"]  # eval_fn replaces the default tolerance mm2 misses
    assert not rows(report)["mm3"]["quantized"] and rows(report)["mm3"]["reason"].startswith("accuracy")
    assert eval_fn(q) == 1.0
    assert "eval_fn" in str(report)


def test_eval_fn_accepting_everything_keeps_every_node():
    q, report = run_auto(outlier_mlp(), feeds(1), autotune=False, eval_fn=lambda m: 1.0)
    assert quantized_nodes(q) == ["mm1", "mm2", "mm3"]


def test_deterministic_for_a_fixed_seed():
    model = outlier_mlp()
    a, ra = run_auto(model, feeds(1), timer=pays)
    b, rb = run_auto(model, feeds(1), timer=pays)
    assert a.SerializeToString() == b.SerializeToString()
    assert ra.quantization == rb.quantization
    assert ra.messages == rb.messages


# ------------------------------------------------------------------------------------------ cost

def test_cost_guard_keeps_fp32_where_int8_does_not_pay():
    model = outlier_mlp()

    def timer(models, feeds):
        whole = len(models[0].graph.node) > 2
        return [1.0, 0.5] if whole else [1.0, 1.02]  # no single op pays by 1.05x

    q, report = run_auto(model, feeds(1), timer=timer, tolerance=None)
    assert quantized_nodes(q) == []
    assert all(r["reason"].startswith("cost") for r in report.quantization)
    assert "nothing worth quantizing" in str(report)


def test_whole_model_slower_falls_back_to_the_optimized_fp32_model():
    model = outlier_mlp()
    calls = []

    def timer(models, feeds):
        whole = len(models[0].graph.node) > 2
        calls.append(whole)
        return [1.0, 1.3] if whole else [1.0, 0.5]  # every op pays alone, the whole model does not

    q, report = run_auto(model, feeds(1), timer=timer, tolerance=None)
    assert quantized_nodes(q) == [] and any(calls)
    assert [n.op_type for n in q.graph.node] == ["MatMul", "Relu", "MatMul", "Relu", "MatMul"]
    assert all("whole model" in r["reason"] for r in report.quantization)
    assert "nothing worth quantizing" in str(report)
    assert not any(o.domain == "com.onnxopt" for o in q.opset_import)


def test_whole_model_drops_the_least_gain_first():
    model = outlier_mlp()

    def timer(models, feeds):
        names = {n.name for n in models[0].graph.node}
        if len(names) > 2:  # whole model: fast enough only once mm1 is float
            return [1.0, 1.2 if any(n.op_type == "QGemm" and n.name.startswith("mm1") for n in models[1].graph.node)
                    else 0.5]
        return [1.0, 0.9] if names == {"mm1", "relu1"} else [1.0, 0.2]

    q, report = run_auto(model, feeds(1), timer=timer, tolerance=None)
    assert quantized_nodes(q) == ["mm2", "mm3"]
    assert "whole model" in rows(report)["mm1"]["reason"]
    assert "1.00 ms fp32" in str(report) or "fp32 = 2.00x" in str(report)


def test_tiny_model_comes_back_unquantized_with_a_report_saying_so():
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="tiny")], [vi("x", ["n", 8])],
                       [vi("y", ["n", 8])], [init("W", rng.standard_normal((8, 8)).astype(F32))])
    cal = [{"x": rng.standard_normal((4, 8)).astype(F32)} for _ in range(4)]
    q, report = run_auto(model, cal, tolerance=guard.DEFAULT_TOLERANCE, autotune=True)
    assert [n.op_type for n in q.graph.node] == ["MatMul"]
    assert "nothing worth quantizing" in str(report)
    assert rows(report)["tiny"]["reason"].startswith("MatMul too small") and not rows(report)["tiny"]["quantized"]


# ------------------------------------------------------------------------------------ held-out data

def test_split_feeds():
    f = feeds(0, n=8)
    fit, check = guard.split_feeds(f, 0.25)
    assert len(fit) == 6 and len(check) == 2 and check[-1] is f[-1]
    fit, check = guard.split_feeds(f[:2], 0.25)
    assert len(fit) == 1 and len(check) == 1
    fit, check = guard.split_feeds(f[:1], 0.25)  # one feed: its batch is split
    assert fit[0]["x"].shape[0] == 12 and check[0]["x"].shape[0] == 4
    np.testing.assert_array_equal(check[0]["x"], f[0]["x"][12:])
    with pytest.raises(CalibrationError, match="cannot be split"):
        guard.split_feeds([{"x": f[0]["x"][:1]}], 0.25)


def test_ranges_are_fitted_on_the_first_feeds_and_fidelity_judged_on_the_rest():
    model = outlier_mlp()
    cal = feeds(1, n=4)
    cal[-1] = {"x": cal[-1]["x"] * 10}  # the held-out feed is wider than anything fitted on
    q, report = run_auto(model, cal, autotune=False, tolerance={"cosine": 0.0, "top1": 0.0})
    mm1 = [n for n in q.graph.node if n.name.startswith("mm1")][0]
    vals = {t.name: t for t in q.graph.initializer}
    from onnx import numpy_helper
    x_scale = numpy_helper.to_array(vals[mm1.input[4]])
    fit = np.concatenate([c["x"] for c in cal[:3]])
    assert x_scale == common.activation_params(fit.min(), fit.max())[0]
    assert "1 held-out feed(s), 16 sample(s)" in str(report)


def test_bad_guard_options():
    for bad in ({"tolerance": {"cos": 0.9}}, {"tolerance": 1.5}, {"holdout": 0.9}, {"eval_fn": 3},
                {"timer": "fast"}, {"min_speedup": 0}):
        with pytest.raises(PassOptionError):
            onnxopt.get_pass("quantize_auto", **bad)
    p = onnxopt.get_pass("quantize_auto", tolerance=0.99, autotune=False)
    assert guard.tolerance_of(p.options) == {"cosine": 0.99}


def test_onnxruntime_target_is_timed_as_a_whole_model_only():
    """onnxruntime runs chains of QDQ ops in int8 NHWC regions: a lone op's time says nothing."""
    sizes = []

    def timer(models, feeds):
        sizes.append(len(models[0].graph.node))
        return [1.0, 0.5]

    q, report = run_auto(outlier_mlp(), feeds(1), timer=timer, target="onnxruntime")
    assert sizes and all(n == 5 for n in sizes)  # the whole (float) model every time
    assert {r["node"] for r in report.quantization if r["quantized"]} == {"mm1", "mm3"}
    assert "QuantizeLinear" in [n.op_type for n in q.graph.node]


# ------------------------------------------------------------------------- dynamic path (no data)

@pytest.mark.parametrize("speed,expect_int8", [(2.0, True), (0.8, False)])
def test_cost_guard_times_dynamic_quantization_without_calibration(speed, expect_int8):
    seen = []

    def timer(models, fds):
        seen.append([sorted({n.op_type for n in m.graph.node}) for m in models])
        assert fds[0]["x"].shape == (1, K)  # generated inputs: batch 1 for the symbolic dim
        return [1.0, 1.0 / speed]

    model = outlier_mlp()
    q, report = onnxopt.optimize(model, ["default", onnxopt.get_pass("quantize_auto", target="onnxopt",
                                                                     autotune=True, timer=timer)],
                                 return_report=True)
    assert len(seen) == 1 and "QGemm" not in seen[0][0] and "QGemm" in seen[0][1]  # fp32 vs int8
    assert (quantized_nodes(q) != []) == expect_int8
    note = [t for name, t in report.messages if "dynamic int8" in t]
    assert note and (("kept fp32" in note[0]) != expect_int8)


# ------------------------------------------------------------------------------------------ blocks

def residual_mlp(seed=0, k=K, classes=CLASSES):
    """x -> [A: a1 -> relu -> a2 -> relu, + x] -> [B: b1 -> relu -> b2 -> relu, + s1] -> head: two residual blocks and a
    classifier. Block A has outlier_mlp's construction (channel 0 of a1's output ~1000x the others, a2
    reads it with a tiny weight): a2 is the one sensitive node, a1 quantizes well."""
    rng = np.random.default_rng(seed)
    w = {n: (rng.standard_normal((k, k)) / np.sqrt(k)).astype(F32) for n in ("Wa1", "Wa2", "Wb1", "Wb2")}
    w["Wa1"][:, 0] *= 1000.0
    w["Wa2"][0, :] *= 1e-3
    w["Wa2"] *= 3.0  # the residual branch outweighs the skip
    nodes = [helper.make_node("MatMul", ["x", "Wa1"], ["ha"], name="a1"),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu_a"),
             helper.make_node("MatMul", ["ra", "Wa2"], ["ga"], name="a2"),
             helper.make_node("Relu", ["ga"], ["ya"], name="relu_a2"),  # keeps the Add out of a Gemm
             helper.make_node("Add", ["x", "ya"], ["s1"], name="add_a"),
             helper.make_node("MatMul", ["s1", "Wb1"], ["hb"], name="b1"),
             helper.make_node("Relu", ["hb"], ["rb"], name="relu_b"),
             helper.make_node("MatMul", ["rb", "Wb2"], ["gb"], name="b2"),
             helper.make_node("Relu", ["gb"], ["yb"], name="relu_b2"),
             helper.make_node("Add", ["s1", "yb"], ["s2"], name="add_b")]
    inits = [init(n, v) for n, v in w.items()]
    feat = make_model(nodes, [vi("x", ["n", k])], [vi("s2", ["n", k])], inits)
    labels = rng.integers(0, classes, 2000)
    f = verify.run(feat, {"x": (TEMPLATES[labels] + rng.standard_normal((2000, k))).astype(F32)})[0]
    wh = np.linalg.solve(f.T @ f + np.eye(k), f.T @ np.eye(classes, dtype=F32)[labels]).astype(F32)
    nodes.append(helper.make_node("MatMul", ["s2", "Wh"], ["y"], name="head"))
    return make_model(nodes, [vi("x", ["n", k])], [vi("y", ["n", classes])], inits + [init("Wh", wh)])


def test_guard_returns_the_sensitive_block_then_readmits_its_insensitive_node(monkeypatch):
    model = residual_mlp()
    q, _ = run_auto(model, feeds(1), autotune=False, tolerance=None)
    x = feeds(2, n=1, batch=256)[0]  # fresh data, never seen by the guard
    assert cosine(onnxopt.InferenceSession(q).run(None, x)[0], verify.run(model, x)[0]) < 0.995

    trials = []  # the fp32 set of every distinct end-to-end evaluation of a model with > 1 site quantized
    evaluate = guard.Guard.evaluate

    def spy(self, names):
        key = frozenset(names)
        if len(key) > 1 and key not in self._fid_cache:
            trials.append(frozenset(self.sites) - key)
        return evaluate(self, names)

    monkeypatch.setattr(guard.Guard, "evaluate", spy)
    q, report = run_auto(model, feeds(1), autotune=False)
    r = rows(report)
    assert set(r) == {"a1", "a2", "b1", "b2", "head"}
    assert r["a1"]["block"] == r["a2"]["block"] == "a1, a2" and r["b1"]["block"] == r["b2"]["block"] == "b1, b2"
    assert "block" not in r["head"]
    assert r["a2"]["sqnr_db"] < min(r[n]["sqnr_db"] for n in ("a1", "b1", "b2", "head"))
    # the whole block went back first, then a1 came back: only the sensitive node stays fp32
    assert trials[0] == frozenset() and frozenset({"a1", "a2"}) in trials and frozenset({"a2"}) in trials
    assert trials.index(frozenset({"a1", "a2"})) < trials.index(frozenset({"a2"}))
    assert len(trials) <= 1 + 2 * 3 + 2  # all quantized, the block search, one try per node of the block
    assert not r["a2"]["quantized"] and r["a2"]["reason"].startswith("accuracy (block a1, a2")
    assert r["a1"]["quantized"] and r["a1"]["reason"].startswith("int8, within tolerance")
    assert "accuracy (block a1, a2): re-admitted" in r["a1"]["reason"]
    assert all(r[n]["quantized"] and "block" not in r[n]["reason"] for n in ("b1", "b2", "head"))
    assert quantized_nodes(q) == ["a1", "b1", "b2", "head"]
    got = onnxopt.InferenceSession(q).run(None, x)[0]
    assert cosine(got, verify.run(model, x)[0]) >= 0.995
    text = str(report)
    assert "accuracy by block: returned 1 block(s) to fp32 worst first (a1, a2)" in text
    assert "re-admitted to int8: a1" in text and "kept 1 node(s) in fp32: a2" in text
    q2, report2 = run_auto(model, feeds(1), autotune=False)
    assert q2.SerializeToString() == q.SerializeToString() and report2.quantization == report.quantization


def test_a_plain_chain_has_no_blocks():
    """outlier_mlp has no residual join: every site is its own block and no block decision is reported."""
    _, report = run_auto(outlier_mlp(), feeds(1), autotune=False)
    assert not any("block" in r for r in report.quantization)
    assert "by block" not in str(report)


@pytest.mark.parametrize("chained_faster", [True, False])
def test_conv_slower_alone_is_readmitted_when_the_chain_pays(chained_faster):
    """A conv that loses alone (float in, float out) can pay between uint8 neighbours: the guard times
    the whole model, with the preset's residual/chain rewrites, with and without it."""
    from .test_quantize_chain import calib as chain_calib
    from .test_quantize_chain import chain_net
    model = chain_net(5)
    seen = []

    def timer(models, feeds_):
        qconvs = [sum(n.op_type == "QConv" for n in m.graph.node) for m in models]
        if len(models[0].graph.node) <= 3:  # one site alone: conv1 loses, the others pay
            names = {n.name for n in models[0].graph.node}
            return [1.0, 2.0] if any(n.startswith("conv1") for n in names) else [1.0, 0.5]
        if all(qconvs):  # without conv1 / with every conv (chained)
            seen.append(qconvs)
            return [1.0, 0.5] if chained_faster else [0.5, 1.0]
        return [1.0, 0.5]  # fp32 against int8

    q, report = run_auto(model, chain_calib(n=8), timer=timer, tolerance=None)
    r = rows(report)
    assert seen and seen[0][1] == seen[0][0] + 1  # conv1 is the only difference
    if chained_faster:
        assert r["conv1"]["quantized"] and "slower alone" in r["conv1"]["reason"]
        assert any("re-admitted" in t for _, t in report.messages)
    else:
        assert not r["conv1"]["quantized"] and r["conv1"]["reason"].startswith("cost")


def test_whole_model_timing_sees_the_residual_fusion():
    """The guard times whole models as the preset will produce them: the residual Add (+Relu) already
    inside the QConv."""
    from .test_quantize_residual import calib as res_calib
    from .test_quantize_residual import residual_net
    timed = []

    def timer(models, feeds_):
        timed.extend(m for m in models if any(n.op_type == "QConv" for n in m.graph.node))
        return [1.0] + [0.5] * (len(models) - 1)

    run_auto(residual_net("relu"), res_calib(), timer=timer, tolerance=None, min_macs=0)
    whole = [m for m in timed if sum(n.op_type == "QConv" for n in m.graph.node) >= 2]
    assert whole and all("Add" not in {n.op_type for n in m.graph.node} for m in whole)


@pytest.mark.skipif(runtime.custom_ops_library() is None, reason="auto means onnxruntime without the library")
@pytest.mark.parametrize("chain_wins", [True, False])
def test_target_auto_times_our_ops_with_the_cost_rejected_convs_too(chain_wins):
    """target="auto" gives the QDQ candidate the convs the cost step sent back; our ops get the same
    set as a uint8 chain in the same timed run, and the faster of the three lowerings is kept."""
    from .test_quantize_chain import calib as chain_calib
    from .test_quantize_chain import chain_net
    model = chain_net(5)
    calls = []

    def timer(models, feeds_):
        if len(models[0].graph.node) <= 3:  # one site alone: conv1 loses, the others pay
            names = {n.name for n in models[0].graph.node}
            return [1.0, 2.0] if any(n.startswith("conv1") for n in names) else [1.0, 0.5]
        if len(models) == 4:  # fp32, ours without conv1, ours with it, onnxruntime QDQ with it
            calls.append([sum(n.op_type == "QConv" for n in m.graph.node) for m in models])
            return [1.0, 0.5, 0.3, 0.4] if chain_wins else [1.0, 0.5, 0.6, 0.4]
        if len(models) == 2 and all(any(n.op_type == "QConv" for n in m.graph.node) for m in models):
            return [0.5, 0.5]  # readmit_chained: no gain, conv1 stays fp32 there
        return [1.0, 0.5]

    q, report = run_auto(model, chain_calib(n=8), timer=timer, target="auto", tolerance=None)
    assert len(calls) == 1 and calls[0][2] == calls[0][1] + 1 and calls[0][3] == 0
    r = rows(report)
    ops = [n.op_type for n in q.graph.node]
    if chain_wins:  # ours with conv1 (0.3) beats QDQ (0.4)
        assert ops.count("QConv") == calls[0][2] and r["conv1"]["quantized"]
        assert "uint8 chain" in r["conv1"]["reason"]
    else:  # QDQ (0.4) beats ours (0.5 / 0.6)
        assert "QConv" not in ops and r["conv1"]["quantized"]
        assert any("target auto: onnxruntime QDQ" in t for _, t in report.messages)


@pytest.mark.skipif(runtime.custom_ops_library() is None, reason="auto means onnxruntime without the library")
@pytest.mark.parametrize("ort_faster", [True, False])
def test_target_auto_takes_the_faster_backend(ort_faster):
    """target="auto" (the int8 preset's): the kept sites are lowered both ways and timed whole;
    onnxruntime's QDQ is taken only when faster (and within the tolerance)."""
    from .test_quantize_chain import calib as chain_calib
    from .test_quantize_chain import chain_net
    model = chain_net(4)
    calls = []

    def timer(models, feeds_):
        if len(models) == 3:  # fp32, com.onnxopt ops, onnxruntime QDQ
            calls.append([sorted({n.op_type for n in m.graph.node}) for m in models])
            return [1.0, 0.5, 0.3] if ort_faster else [1.0, 0.5, 0.6]
        return [1.0, 0.5]

    q, report = run_auto(model, chain_calib(n=8), timer=timer, target="auto")
    assert len(calls) == 1
    fp32_ops, ours_ops, theirs_ops = calls[0]
    assert "QConv" in ours_ops and "QConv" not in theirs_ops and "DequantizeLinear" in theirs_ops
    # ours is timed as the preset will produce it: one uint8 chain (QuantizeLinear -> QConvs -> DequantizeLinear)
    assert "QuantizeLinear" in ours_ops and "DequantizeLinear" in ours_ops
    ops = {n.op_type for n in q.graph.node}
    if ort_faster:
        assert "QConv" not in ops and "QuantizeLinear" in ops
        assert any("target auto: onnxruntime QDQ" in t for _, t in report.messages)
    else:
        assert "QConv" in ops
        assert any(t.endswith(": com.onnxopt") for _, t in report.messages)
    x = np.random.default_rng(3).standard_normal((2, 8, 16, 16)).astype(np.float32)
    ref = verify.run(model, {"x": x})[0]
    got = runtime.InferenceSession(q).run(None, {"x": x})[0]
    assert cosine(ref, got) > 0.99
