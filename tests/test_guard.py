"""quantize_auto's guards: accuracy fallback, cost decisions (fake timings), held-out data, the report."""
from __future__ import annotations

import numpy as np
import onnx
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
    return [1.0] + [0.5] * (len(models) - 1)


# ------------------------------------------------------------------------------------------ accuracy

def test_unguarded_quantization_of_the_outlier_model_misses_the_tolerance_and_says_so():
    """With the guard off nothing stops a far-off result: optimize() must not return it silently."""
    model = outlier_mlp()
    with pytest.warns(RuntimeWarning, match="far from the original's"):
        q, report = run_auto(model, feeds(1), autotune=False, tolerance=None)
    assert any(k == "fidelity" and t.startswith("warning:") for k, t in report.messages)
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
        if len(key) > 1 and self.fid_key(key) not in self._fid_cache:
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


# ------------------------------------------------------------------------------ targets (issue 17)

needs_lib = pytest.mark.skipif(runtime.custom_ops_library() is None,
                               reason="auto means onnxruntime alone without the library")


def lowering(m):
    """fp32 / ours / qdq / mixed: which lowerings a timed model holds."""
    made = {o for n in m.graph.node for o in n.output if n.op_type == "DequantizeLinear"}
    ours = any(n.op_type in ("QConv", "QGemm") for n in m.graph.node)
    qdq = any(n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in made for n in m.graph.node)
    return {(False, False): "fp32", (True, False): "ours", (False, True): "qdq", (True, True): "mixed"}[(ours, qdq)]


def target_timer(alone, whole, log=None):
    """Single sites (one conv + activation): `alone(names)` = [fp32, ours]; whole models: `whole[kind]`."""
    def timer(models, feeds_):
        if len(models[0].graph.node) <= 3:
            return alone({n.name for n in models[0].graph.node})
        kinds = [lowering(m) for m in models]
        if log is not None:
            log.append(kinds)
        return [whole[k] for k in kinds]
    return timer


def site_rows(report):
    return {k: v for k, v in rows(report).items() if "too small" not in v["reason"]}


def run_targets(timer, **opts):
    from .test_quantize_chain import calib as chain_calib
    from .test_quantize_chain import chain_net
    opts.setdefault("tolerance", None)
    return run_auto(chain_net(5), chain_calib(n=8), timer=timer, target="auto", **opts)


@needs_lib
def test_auto_returns_qdq_when_our_ops_lose_per_node_but_qdq_pays():
    """issue 17: every site slower alone as a com.onnxopt op must not throw the QDQ model away."""
    log = []
    q, report = run_targets(target_timer(lambda names: [1.0, 2.0], {"fp32": 1.0, "ours": 1.5, "qdq": 0.4}, log),
                            tolerance=guard.DEFAULT_TOLERANCE)
    assert lowering(q) == "qdq" and log[0] == ["fp32", "qdq"]
    r = site_rows(report)
    assert all(x["quantized"] for x in r.values())
    assert all("com.onnxopt ops: cost: int8 0.50x of fp32 alone" in x["reason"] for x in r.values())
    assert all("onnxruntime QDQ: kept" in x["reason"] for x in r.values())
    assert any("onnxruntime QDQ 0.400 ms" in t and "fp32 1.000 ms" in t and t.endswith("onnxruntime QDQ wins")
               or "0.400 ms int8 (onnxruntime QDQ) vs 1.000 ms fp32" in t for _, t in report.messages)


@needs_lib
def test_auto_returns_our_ops_when_qdq_loses():
    q, report = run_targets(target_timer(lambda names: [1.0, 0.5], {"fp32": 1.0, "ours": 0.5, "qdq": 1.3}))
    assert lowering(q) == "ours"
    r = site_rows(report)
    assert all(x["quantized"] and "onnxruntime QDQ: kept" in x["reason"] for x in r.values())
    assert any("com.onnxopt ops 0.500 ms" in t and t.endswith("com.onnxopt ops wins") for _, t in report.messages)


@needs_lib
def test_auto_returns_fp32_when_no_target_pays():
    log = []
    q, report = run_targets(target_timer(lambda names: [1.0, 2.0], {"fp32": 1.0, "ours": 1.5, "qdq": 1.3}, log))
    assert lowering(q) == "fp32" and "nothing worth quantizing" in str(report)
    assert not any(x["quantized"] for x in site_rows(report).values())
    assert all("whole model" in x["reason"] for x in site_rows(report).values())
    assert len(log) <= 1 + 3 * 4  # the joint timing, then halving (5 sites: 3 steps), retimes bounded


@needs_lib
def test_auto_mixes_lowerings_where_both_pay():
    log = []
    alone = lambda names: [1.0, 2.0] if any(n.startswith("conv1") for n in names) else [1.0, 0.5]  # noqa: E731
    q, report = run_targets(target_timer(alone, {"fp32": 1.0, "ours": 0.6, "qdq": 0.7, "mixed": 0.3}, log))
    assert log[-1] == ["fp32", "ours"] or ["fp32", "ours", "qdq", "mixed"] in log
    assert lowering(q) == "mixed"
    r = site_rows(report)
    assert "com.onnxopt ops: cost" in r["conv1"]["reason"] and r["conv1"]["quantized"]
    x = np.random.default_rng(3).standard_normal((2, 8, 16, 16)).astype(np.float32)
    from .test_quantize_chain import chain_net
    got = runtime.InferenceSession(q).run(None, {"x": x})[0]
    assert cosine(verify.run(chain_net(5), {"x": x})[0], got) > 0.99


@needs_lib
@pytest.mark.parametrize("start", [0, 1])
def test_a_noisy_timer_whose_medians_cross_does_not_flip_the_target(start):
    """Our ops and QDQ within each other's spread: which median is lower changes from one timing to
    the next; the choice must not follow it (re-measured, then the tie rule)."""
    calls = [start]
    a, b = [5.0, 5.6, 4.7, 5.4, 4.9], [5.1, 4.6, 5.5, 4.8, 5.3]  # medians 5.0 and 5.1

    def timer(models, feeds_):
        if len(models[0].graph.node) <= 3:
            return [1.0, 0.5]
        calls[0] += 1
        first, second = (a, b) if calls[0] % 2 else (b, a)
        noisy = {"fp32": [10.0, 10.3, 9.8, 10.1, 9.9], "ours": first, "qdq": second}
        return [noisy[lowering(m)] for m in models]

    q, report = run_targets(timer)
    assert lowering(q) == "qdq"
    assert any("whole-model" in t for _, t in report.messages)


def test_guard_times_at_onnxruntimes_defaults_unless_told(monkeypatch):
    """issue 12 cause 4: the guard timed at 1 thread without spinning; it times at the deployment
    settings (default onnxruntime's) and the report says which."""
    from onnxopt import execution
    seen = []

    def fake(models, feeds_, settings=execution.ORT_DEFAULTS, **kw):
        seen.append(settings)
        return [[1.0]] + [[0.5]] * (len(models) - 1)

    monkeypatch.setattr(execution, "time_models", fake)
    _, report = run_auto(outlier_mlp(), feeds(1), tolerance=None)
    assert seen and set(seen) == {execution.Settings()}
    assert "timed at intra-op threads as onnxruntime picks, spinning as onnxruntime sets it" in str(report)
    seen.clear()
    _, report = run_auto(outlier_mlp(), feeds(1), tolerance=None, threads=1, spinning=False)
    assert set(seen) == {execution.Settings(1, False)} and "timed at 1 intra-op thread(s), spinning off" in str(report)


@pytest.mark.parametrize("target", ["onnxruntime", "auto"])
def test_opset_11_model_through_the_guard_gives_a_valid_model(target):
    """issue 12 cause 1: the guard raised onnxruntime's InvalidGraph ("Unrecognized attribute: axis for
    operator DequantizeLinear") on opset 11/12 models; the output must be valid at the model's opset."""
    from .test_quantize_chain import calib as chain_calib
    from .test_quantize_chain import chain_net
    model = chain_net(5)
    model.opset_import[0].version = 11
    q, report = run_auto(model, chain_calib(n=8), timer=pays, target=target)
    onnx.checker.check_model(q, full_check=True)
    assert [o.version for o in q.opset_import if o.domain == ""] == [11]
    assert any(r["quantized"] for r in report.quantization)
    x = np.random.default_rng(3).standard_normal((2, 8, 16, 16)).astype(np.float32)
    got = runtime.InferenceSession(q).run(None, {"x": x})[0]
    assert cosine(verify.run(model, {"x": x})[0], got) > 0.99


@needs_lib
def test_a_candidate_onnxruntime_refuses_is_dropped_with_its_reason(monkeypatch):
    """No guard step lets an onnxruntime error escape on a model onnxruntime runs: the QDQ candidate
    (made invalid here) is dropped, the report says why, our ops are returned."""
    from onnxopt.passes.quantize import static
    original = static.lower_static_ort

    def broken(em, site, *a):
        original(em, site, *a)
        em.graph.nodes[-1].attrs["not_an_attribute"] = 1  # onnxruntime: InvalidGraph

    monkeypatch.setattr(static, "lower_static_ort", broken)
    q, report = run_targets(target_timer(lambda names: [1.0, 0.5], {"fp32": 1.0, "ours": 0.5, "qdq": 0.3}),
                            tolerance=guard.DEFAULT_TOLERANCE)
    assert lowering(q) == "ours"
    assert any("onnxruntime QDQ dropped: onnxruntime failed on it" in t for _, t in report.messages)


@pytest.mark.parametrize("target", ["onnxopt", "onnxruntime", "auto"])
def test_a_model_with_external_data_quantizes(tmp_path, target):
    """The guard's sessions of candidates holding com.onnxopt ops were handed the in-process model,
    whose weights are still on disk behind onnxopt's markers: onnxruntime refused them ("Absolute path
    not allowed for external data location") and int8 raised on every torch dynamo export."""
    path = tmp_path / "m.onnx"
    onnx.save(outlier_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    q, report = run_auto(str(path), feeds(1), target=target, timer=pays)
    assert any(n.op_type in ("QGemm", "QConv", "DequantizeLinear") for n in q.graph.node)
    onnx.checker.check_model(q, full_check=True)
    x = feeds(9, n=1)[0]
    ref = verify.run(onnx.load(str(path)), x)[0]
    assert cosine(ref, verify.run(q, x)[0]) > 0.99


# ------------------------------------------------------------------- per-site dynamic activations

def scaled_mlp(seed=0, k=K, classes=CLASSES):
    """x -> mm1 -> relu -> mm2 (a classifier fitted on the toy task), no biases: y(c x) = c y(x), so
    the predicted class does not depend on the input's scale."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1")]
    feat = make_model(nodes, [vi("x", ["n", k])], [vi("r1", ["n", k])], [init("W1", w1)])
    labels = rng.integers(0, classes, 2000)
    f = verify.run(feat, {"x": (TEMPLATES[labels] + rng.standard_normal((2000, k))).astype(F32)})[0]
    w2 = np.linalg.solve(f.T @ f + np.eye(k), f.T @ np.eye(classes, dtype=F32)[labels]).astype(F32)
    nodes.append(helper.make_node("MatMul", ["r1", "W2"], ["y"], name="mm2"))
    return make_model(nodes, [vi("x", ["n", k])], [vi("y", ["n", classes])], [init("W1", w1), init("W2", w2)])


def scaled_feeds(seed, n):
    """One sample per feed, scaled by 10^[-3, 3]: one calibrated u8 range fits the loud samples and
    rounds the quiet ones to zero; quantizing each call's activations on their own range does not."""
    rng = np.random.default_rng(seed)
    return [{"x": samples(rng, 1) * F32(10.0 ** rng.uniform(-3, 3))} for _ in range(n)]


@pytest.mark.parametrize("target", ["onnxopt", "onnxruntime"])
def test_matmuls_static_ranges_fail_keep_int8_with_dynamic_activations(target):
    model = scaled_mlp()
    cal = scaled_feeds(1, 160)
    tol = {"cosine": 0.99, "top1": 0.95}
    q, report = run_auto(model, cal, autotune=False, tolerance=tol, target=target)
    r = rows(report)
    for n in ("mm1", "mm2"):  # static alone missed (unguarded check below); dynamic kept them in int8
        assert r[n]["quantized"] and r[n]["activations"] == "dynamic", r[n]
        assert "dynamic activations" in r[n]["reason"]
    ops = [n.op_type for n in q.graph.node]
    if target == "onnxopt":
        assert ops.count("QGemm") == 2
        assert all(len(n.input) <= 4 for n in q.graph.node if n.op_type == "QGemm")  # no x_scale: dynamic
    else:
        assert ops.count("DynamicQuantizeLinear") == 2 and "QuantizeLinear" not in ops
    assert "static ranges sent to fp32 keep int8 with dynamic activations" in str(report)
    fresh = scaled_feeds(2, 100)
    sess = onnxopt.InferenceSession(q)
    got = np.concatenate([sess.run(None, f)[0] for f in fresh])
    ref = np.concatenate([verify.run(model, f)[0] for f in fresh])
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
    # static u8 for both misses the tolerance on the same data: the guard had a reason to choose
    s, _ = run_auto(model, cal, autotune=False, tolerance=None, target=target)
    static = np.concatenate([onnxopt.InferenceSession(s).run(None, f)[0] for f in fresh])
    assert np.mean(static.argmax(1) == ref.argmax(1)) < 0.9


def test_dynamic_activations_do_not_rescue_a_per_channel_outlier():
    """mm2's outlier channel is in every row: dynamic per-row ranges fail too, so it stays fp32."""
    q, report = run_auto(outlier_mlp(), feeds(1), autotune=False)
    r = rows(report)
    assert not r["mm2"]["quantized"] and r["mm2"]["reason"].startswith("accuracy")
    assert "(static and dynamic)" in r["mm2"]["reason"]
    assert r["mm1"]["activations"] == "static" and r["mm3"]["activations"] == "static"


def test_every_matmul_goes_dynamic_when_one_rescued_site_is_not_enough():
    """A fake score: mm2 static fails; mm1 static fails too once mm2 is int8 in any form; both dynamic
    pass. The search keeps mm1 static and returns mm2; mm2 dynamic next to static mm1 still fails, so
    both go dynamic rather than either to fp32."""
    def modes(model):
        return {n.name.split("_QGemm")[0]: ("static" if len(n.input) > 4 else "dynamic")
                for n in model.graph.node if n.op_type == "QGemm"}

    def score(model):
        m = modes(model)
        bad = m.get("mm2") == "static" or (m.get("mm1") == "static" and "mm2" in m)
        return -1.0 if bad else 0.0

    q, report = run_auto(scaled_mlp(), scaled_feeds(1, 16), autotune=False, eval_fn=score, max_drop=0.5)
    r = rows(report)
    assert modes(q) == {"mm1": "dynamic", "mm2": "dynamic"}
    assert r["mm1"]["activations"] == r["mm2"]["activations"] == "dynamic"
    assert "static ones missed" in r["mm1"]["reason"] and "static u8 missed" in r["mm2"]["reason"]


def test_too_few_held_out_samples_to_trust_the_accuracy_verdict_are_said():
    """The corpus gave 8 calibration samples: the guard judged on 2 held-out ones, and int8 lost labels
    on other inputs without a word."""
    with pytest.warns(RuntimeWarning, match="only 2 held-out sample"):
        _, report = run_auto(outlier_mlp(), feeds(1, n=4, batch=2), timer=pays)
    assert any(t.startswith("warning: guard: only 2 held-out") for _, t in report.messages)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error", RuntimeWarning)
        run_auto(outlier_mlp(), feeds(1), timer=pays)  # 8 feeds of 16: enough held out, no warning
