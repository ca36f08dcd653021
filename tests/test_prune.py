"""Pruning passes.

prune_channels: the dependency groups (residual Add, depthwise, SE Mul, Concat, Flatten→Gemm) on
small models; every pruned model is checked against a reference built by slicing the original
weights by hand with numpy (same keep sets, chosen here from the weight norms) and run through
onnxruntime, and, where the pruned channels' outgoing weights are exactly zero, against the
original model itself. prune_magnitude: the achieved sparsity and the N:M pattern.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import verify
from onnxopt.errors import PassOptionError
from onnxopt.passes import prune

from .helpers import init, make_model, vi

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def run(model, name="prune_channels", **options):
    return onnxopt.optimize(model, passes=[onnxopt.get_pass(name, **options)], return_report=True)


def channels(model, **options):
    opts = dict(ratio=0.25, min_channels=1, multiple_of=1)
    opts.update(options)
    return run(model, **opts)


def notes(report):
    return " | ".join(text for _, text in report.messages)


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_weight(model, node_name, i=1):
    node = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[node.input[i]]


def check_valid(original, pruned, feeds=None):
    """Valid, runnable, same output names/dtypes/shapes; returns (original outputs, pruned outputs)."""
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
    assert [o.type.tensor_type.elem_type for o in pruned.graph.output] == \
        [o.type.tensor_type.elem_type for o in original.graph.output]
    feeds = feeds or verify.make_feeds(original, seed=1)
    ref, got = verify.run(original, feeds), verify.run(pruned, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    assert [r.dtype for r in ref] == [g.dtype for g in got]
    return ref, got, feeds


def keep_of(ws, n_keep, out_axis=0):
    """The n_keep channels of largest summed l1 norm over the weights `ws` (reference selection)."""
    score = sum(np.abs(np.moveaxis(w, out_axis, 0)).reshape(w.shape[out_axis], -1).sum(1) for w in ws)
    return np.sort(np.argsort(-score, kind="stable")[:n_keep])


def conv(name, x, w, b, y, **attrs):
    return helper.make_node("Conv", [x, w, b], [y], name=name, **attrs)


# ------------------------------------------------------------------------------ ResNet-style block
#   x ─ convA ─ Relu ─ convB ─ BN ─┐
#   └──────────── convS ───────────Add ─ Relu ─ convC ─ y        (B and S: one group; C feeds y)

def resnet_block(p):
    nodes = [
        conv("convA", "x", "wA", "bA", "a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        conv("convB", "ar", "wB", "bB", "b", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["b", "g", "beta", "mu", "var"], ["bn"], name="bn"),
        conv("convS", "x", "wS", "bS", "s"),
        helper.make_node("Add", ["bn", "s"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["sr"]),
        conv("convC", "sr", "wC", "bC", "y"),
    ]
    inits = [init(k, v) for k, v in p.items()]
    return make_model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 4, 6, 6])], inits)


def resnet_params(zero_outgoing=False):
    p = {"wA": rand(16, 8, 3, 3), "bA": rand(16), "wB": rand(16, 16, 3, 3), "bB": rand(16),
         "g": rand(16), "beta": rand(16), "mu": rand(16), "var": np.abs(rand(16)) + 0.5,
         "wS": rand(16, 8, 1, 1), "bS": rand(16), "wC": rand(4, 16, 1, 1), "bC": rand(4)}
    if zero_outgoing:  # channels 1, 5, 9, 13 of A and 2, 6, 10, 14 of B/S: tiny weights, nothing reads them
        pa, pb = [1, 5, 9, 13], [2, 6, 10, 14]
        p["wA"][pa] *= 1e-3
        p["wB"][:, pa] = 0
        p["wB"][pb] *= 1e-3
        p["wS"][pb] *= 1e-3
        p["wC"][:, pb] = 0
    return p


def slice_resnet(p, ka, kbs):
    q = dict(p)
    q["wA"], q["bA"] = p["wA"][ka], p["bA"][ka]
    q["wB"] = p["wB"][kbs][:, ka]
    for k in ("bB", "g", "beta", "mu", "var", "bS"):
        q[k] = p[k][kbs]
    q["wS"] = p["wS"][kbs]
    q["wC"] = p["wC"][:, kbs]
    return q


def test_resnet_block_prunes_residual_members_as_one_group_like_hand_sliced_weights():
    p = resnet_params()
    model = resnet_block(p)
    pruned, report = channels(model)
    ref, got, feeds = check_valid(model, pruned)
    ka = keep_of([p["wA"]], 12)
    kbs = keep_of([p["wB"], p["wS"]], 12)  # summed norm over the group
    np.testing.assert_array_equal(node_weight(pruned, "convA"), p["wA"][ka])
    np.testing.assert_array_equal(node_weight(pruned, "convB"), p["wB"][kbs][:, ka])
    np.testing.assert_array_equal(node_weight(pruned, "convS"), p["wS"][kbs])
    np.testing.assert_array_equal(node_weight(pruned, "convC"), p["wC"][:, kbs])
    np.testing.assert_array_equal(node_weight(pruned, "bn", 3), p["mu"][kbs])
    reference = verify.run(resnet_block(slice_resnet(p, ka, kbs)), feeds)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    assert np.abs(got[0] - ref[0]).max() > 1e-3  # (real pruning changes the output)
    assert "convC alone: channels reach graph output 'y'" in notes(report)
    assert "16 -> 12" in notes(report)


def test_resnet_block_pruning_unread_channels_is_exact():
    p = resnet_params(zero_outgoing=True)
    model = resnet_block(p)
    pruned, _ = channels(model)
    ref, got, _ = check_valid(model, pruned)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(node_weight(pruned, "convC"), np.delete(p["wC"], [2, 6, 10, 14], axis=1))
    np.testing.assert_array_equal(node_weight(pruned, "convB"),
                                  np.delete(np.delete(p["wB"], [2, 6, 10, 14], 0), [1, 5, 9, 13], 1))


def test_residual_members_get_the_same_kept_set_even_when_their_own_norms_disagree():
    p = resnet_params()
    p["wB"][:4] *= 10  # B alone would keep 0..3; S alone would drop them
    p["wS"][:4] *= 1e-4
    pruned, _ = channels(resnet_block(p))
    kbs = keep_of([p["wB"], p["wS"]], 12)
    np.testing.assert_array_equal(node_weight(pruned, "convB")[:, 0, 0, 0], p["wB"][kbs][:, keep_of([p["wA"]], 12)][:, 0, 0, 0])
    np.testing.assert_array_equal(node_weight(pruned, "convS"), p["wS"][kbs])


def test_dependency_groups_of_the_resnet_block():
    from onnxopt import ir
    from onnxopt.passes.base import PassContext

    model = resnet_block(resnet_params())
    graph = ir.import_graph(model)
    ctx = PassContext(model)
    ctx.root = graph
    groups = prune.ChannelAnalysis(graph, ctx).groups()
    members = sorted(sorted(n.name for n in g.producers) for g in groups)
    assert members == [["convA"], ["convB", "convS"], ["convC"]]
    blocked = {tuple(sorted(n.name for n in g.producers)): g.blocked for g in groups}
    assert blocked[("convA",)] == [] and blocked[("convB", "convS")] == []
    assert "graph output 'y'" in blocked[("convC",)][0]


def test_ratio_zero_is_the_identity():
    model = resnet_block(resnet_params())
    pruned, report = run(model, ratio=0.0)
    assert not report.records[0].changed
    assert weights(pruned) == {} or all(np.array_equal(weights(pruned)[k], v) for k, v in weights(model).items())
    assert [n.SerializeToString() for n in pruned.graph.node] == [n.SerializeToString() for n in model.graph.node]


def test_per_layer_ratio_and_channel_rounding():
    p = resnet_params()
    pruned, report = channels(resnet_block(p), ratio=0.0, per_layer={"convB": 0.5})
    assert node_weight(pruned, "convA").shape == (16, 8, 3, 3)
    assert node_weight(pruned, "convS").shape == (8, 8, 1, 1)
    assert node_weight(pruned, "convB").shape == (8, 16, 3, 3)
    pruned, _ = run(resnet_block(p), ratio=0.5)  # defaults: min_channels=8, multiple_of=8
    assert node_weight(pruned, "convA").shape[0] == 8
    pruned, report = run(resnet_block(p), ratio=0.3)  # 16 -> 11 -> rounded up to 16: nothing to do
    assert not report.records[0].changed
    p_ = prune.PruneChannels(ratio=0.3, min_channels=8, multiple_of=8)
    assert [p_.channels_to_keep(n, 0.3) for n in (4, 8, 16, 64, 256, 2048)] == [4, 8, 16, 48, 184, 1440]
    assert p_.channels_to_keep(19, 0.0) == 19
    assert prune.PruneChannels(min_channels=12, multiple_of=8).channels_to_keep(16, 0.5) == 16


# --------------------------------------------------------------------------- MobileNet-style block
#   x ─ pw1 ─ Clip ─ dw (depthwise) ─ BN ─ Clip ─┬──────────────────────── Mul ─ pw2 ─ Add(x) ─ y
#                                                └ GAP ─ se1 ─ Relu ─ se2 ─ HardSigmoid ┘
# pw1 and se2 join through the SE Mul; dw follows pw1; pw2 is added to the input x: left alone.

def mobilenet_block(p):
    nodes = [
        conv("pw1", "x", "w1", "b1", "h1"),
        helper.make_node("Clip", ["h1", "lo", "hi"], ["c1"]),
        conv("dw", "c1", "wd", "bd", "d", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["d", "g", "beta", "mu", "var"], ["dn"], name="bn"),
        helper.make_node("Clip", ["dn", "lo", "hi"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gp"]),
        conv("se1", "gp", "ws1", "bs1", "s1"),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        conv("se2", "s1r", "ws2", "bs2", "s2"),
        helper.make_node("HardSigmoid", ["s2"], ["gate"]),
        helper.make_node("Mul", ["c2", "gate"], ["scaled"], name="se_mul"),
        conv("pw2", "scaled", "w2", "b2", "p2"),
        helper.make_node("Add", ["p2", "x"], ["y"], name="residual"),
    ]
    inits = [init(k, v) for k, v in p.items()]
    return make_model(nodes, [vi("x", [1, 8, 5, 5])], [vi("y", [1, 8, 5, 5])], inits)


def mobilenet_params():
    return {"w1": rand(16, 8, 1, 1), "b1": rand(16), "lo": np.float32(0), "hi": np.float32(6),
            "wd": rand(16, 1, 3, 3), "bd": rand(16), "g": rand(16), "beta": rand(16), "mu": rand(16),
            "var": np.abs(rand(16)) + 0.5, "ws1": rand(8, 16, 1, 1), "bs1": rand(8), "ws2": rand(16, 8, 1, 1),
            "bs2": rand(16), "w2": rand(8, 16, 1, 1), "b2": rand(8)}


def test_mobilenet_block_depthwise_follows_its_input_and_se_mul_joins_groups():
    p = mobilenet_params()
    model = mobilenet_block(p)
    pruned, report = channels(model)
    _, got, feeds = check_valid(model, pruned)
    k = keep_of([p["w1"], p["ws2"]], 12)  # pw1 + se2 (joined by the SE Mul)
    ks1 = keep_of([p["ws1"]], 6)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 12
    q = dict(p)
    q["w1"], q["b1"], q["wd"], q["bd"] = p["w1"][k], p["b1"][k], p["wd"][k], p["bd"][k]
    for n in ("g", "beta", "mu", "var"):
        q[n] = p[n][k]
    q["ws1"], q["bs1"] = p["ws1"][ks1][:, k], p["bs1"][ks1]
    q["ws2"], q["bs2"] = p["ws2"][k][:, ks1], p["bs2"][k]
    q["w2"] = p["w2"][:, k]

    def hand_sliced(params):
        m = mobilenet_block(params)
        for n in m.graph.node:
            if n.name == "dw":
                next(a for a in n.attribute if a.name == "group").i = 12
        return m

    reference = verify.run(hand_sliced(q), feeds)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    assert "pw2 alone" in notes(report) and "'x'" in notes(report)
    assert node_weight(pruned, "pw2").shape == (8, 12, 1, 1)


# ------------------------------------------------------------------------------------------ Concat

def concat_model(p):
    nodes = [
        conv("convA", "x", "wA", "bA", "a"),
        helper.make_node("Relu", ["a"], ["ar"]),
        conv("convB", "x", "wB", "bB", "b"),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Concat", ["ar", "x", "br"], ["cat"], axis=1),
        conv("convC", "cat", "wC", "bC", "y"),
    ]
    inits = [init(k, v) for k, v in p.items()]
    return make_model(nodes, [vi("x", [1, 8, 4, 4])], [vi("y", [1, 4, 4, 4])], inits)


def test_concat_offsets():
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(8, 8, 1, 1), "bB": rand(8),
         "wC": rand(4, 32, 1, 1), "bC": rand(4)}
    model = concat_model(p)
    pruned, _ = channels(model, ratio=0.5)
    _, got, feeds = check_valid(model, pruned)
    ka, kb = keep_of([p["wA"]], 8), keep_of([p["wB"]], 4)
    cols = np.concatenate([ka, np.arange(16, 24), 24 + kb])  # x's 8 channels stay
    np.testing.assert_array_equal(node_weight(pruned, "convC"), p["wC"][:, cols])
    q = dict(p, wA=p["wA"][ka], bA=p["bA"][ka], wB=p["wB"][kb], bB=p["bB"][kb], wC=p["wC"][:, cols])
    np.testing.assert_allclose(got[0], verify.run(concat_model(q), feeds)[0], rtol=1e-5, atol=1e-5)


def test_concat_reaching_an_untraceable_op_blocks_its_members():
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(8, 8, 1, 1), "bB": rand(8)}
    nodes = [conv("convA", "x", "wA", "bA", "a"), conv("convB", "x", "wB", "bB", "b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 3, 1], name="tr")]
    model = make_model(nodes, [vi("x", [1, 8, 4, 4])], [vi("y", [1, 4, 4, 24])], [init(k, v) for k, v in p.items()])
    pruned, report = channels(model)
    assert not report.records[0].changed
    assert "convA" in notes(report) and "tr: Transpose is not channel-traceable" in notes(report)


# ----------------------------------------------------------------------------------- Flatten → Gemm

def flatten_model(p, head="Gemm"):
    nodes = [conv("convA", "x", "wA", "bA", "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("MaxPool", ["ar"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["mp"], ["f"], axis=1)]
    if head == "Gemm":
        nodes.append(helper.make_node("Gemm", ["f", "wF", "bF"], ["h"], name="fc1", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["f", "wF"], ["hm"], name="fc1"))
        nodes.append(helper.make_node("Add", ["hm", "bF"], ["h"], name="fc1_add"))
    nodes += [helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("Gemm", ["hr", "wG", "bG"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vi("x", [2, 4, 6, 6])], [vi("y", [2, 5])], [init(k, v) for k, v in p.items()])


@pytest.mark.parametrize("head", ["Gemm", "MatMul"])
def test_flatten_gemm_feature_blocks(head):
    p = {"wA": rand(16, 4, 3, 3), "bA": rand(16), "wF": rand(12, 144) if head == "Gemm" else rand(144, 12),
         "bF": rand(12), "wG": rand(5, 12), "bG": rand(5)}
    model = flatten_model(p, head)
    pruned, report = channels(model, ratio=0.5)
    _, got, feeds = check_valid(model, pruned)
    ka = keep_of([p["wA"]], 8)
    kf = keep_of([p["wF"]], 6, out_axis=0 if head == "Gemm" else 1)
    feats = (ka[:, None] * 9 + np.arange(9)).ravel()  # each channel owns 3x3 consecutive features
    if head == "Gemm":
        wF = p["wF"][kf][:, feats]
    else:
        wF = p["wF"][feats][:, kf]
    np.testing.assert_array_equal(node_weight(pruned, "fc1"), wF)
    q = dict(p, wA=p["wA"][ka], bA=p["bA"][ka], wF=wF, bF=p["bF"][kf], wG=p["wG"][:, kf])
    np.testing.assert_allclose(got[0], verify.run(flatten_model(q, head), feeds)[0], rtol=1e-5, atol=1e-5)
    assert "fc2 alone: channels reach graph output 'y'" in notes(report)


# ------------------------------------------------------------------------------ left alone, reported

@pytest.mark.parametrize("case, reason", [
    ("output", "graph output 'a'"),
    ("reshape", "Reshape to hard-coded sizes"),
    ("split", "Split is not channel-traceable"),
    ("softmax", "Softmax over the channel axis"),
    ("slice", "Slice is not channel-traceable"),
    ("add_input", "whose channels cannot be pruned"),
])
def test_untraceable_consumers_leave_the_layer_alone_and_say_why(case, reason):
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(4, 16, 1, 1), "bB": rand(4)}
    nodes = [conv("convA", "x", "wA", "bA", "a"), helper.make_node("Relu", ["a"], ["ar"])]
    outputs = [vi("y", [1, 16, 4, 4])]
    extra = []
    if case == "output":
        nodes.append(conv("convB", "ar", "wB", "bB", "y"))
        outputs = [vi("y", [1, 4, 4, 4])]
        outputs.append(vi("a", [1, 16, 4, 4]))
    elif case == "reshape":
        extra = [init("shape", np.array([1, 256], np.int64))]
        nodes.append(helper.make_node("Reshape", ["ar", "shape"], ["y"], name="rs"))
        outputs = [vi("y", [1, 256])]
    elif case == "split":
        nodes.append(helper.make_node("Split", ["ar"], ["y", "z"], axis=1, num_outputs=2, name="sp"))
        outputs = [vi("y", [1, 8, 4, 4]), vi("z", [1, 8, 4, 4])]
    elif case == "softmax":
        nodes.append(helper.make_node("Softmax", ["ar"], ["y"], axis=1, name="sm"))
    elif case == "slice":
        extra = [init(n, np.array([v], np.int64)) for n, v in (("st", 0), ("en", 8), ("ax", 1))]
        nodes.append(helper.make_node("Slice", ["ar", "st", "en", "ax"], ["y"], name="sl"))
        outputs = [vi("y", [1, 8, 4, 4])]
    elif case == "add_input":
        nodes.append(helper.make_node("Add", ["ar", "x16"], ["y"], name="add"))
    inputs = [vi("x", [1, 8, 4, 4])] + ([vi("x16", [1, 16, 4, 4])] if case == "add_input" else [])
    model = make_model(nodes, inputs, outputs, [init(k, v) for k, v in p.items()] + extra, opset=18)
    pruned, report = channels(model)
    assert "left convA alone" in notes(report) and reason in notes(report), notes(report)
    assert node_weight(pruned, "convA").shape == (16, 8, 1, 1)
    check_valid(model, pruned)


def test_overridable_and_computed_weights_are_not_pruned():
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(4, 16, 1, 1), "bB": rand(4)}
    nodes = [conv("convA", "x", "wA", "bA", "a"), conv("convB", "a", "wB", "bB", "y")]
    model = make_model(nodes, [vi("x", [1, 8, 4, 4]), vi("wA", [16, 8, 1, 1])], [vi("y", [1, 4, 4, 4])],
                       [init(k, v) for k, v in p.items()])
    pruned, report = channels(model)
    assert not report.records[0].changed


def test_option_errors():
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(criterion="l3"), dict(min_channels=0),
                dict(per_layer={"a": 2}), dict(multiple_of=0)):
        with pytest.raises(PassOptionError):
            onnxopt.get_pass("prune_channels", **bad)
    p = onnxopt.get_pass("prune_channels")
    assert (p.kind, p.exact, p.idempotent, p.recurse_subgraphs) == ("prune", False, False, False)
    assert "prune_channels" not in onnxopt.passes.list_presets()["default"]


def test_l2_criterion_picks_by_l2_norm():
    w = np.ones((16, 8, 1, 1), np.float32)
    w[0] = 0.0
    w[0, 0] = 7.0  # l1 7 < 8 but l2 7 > sqrt(8): kept by l2 only
    p = {"wA": w, "bA": rand(16), "wB": rand(4, 16, 1, 1), "bB": rand(4)}
    model = make_model([conv("convA", "x", "wA", "bA", "a"), conv("convB", "a", "wB", "bB", "y")],
                       [vi("x", [1, 8, 4, 4])], [vi("y", [1, 4, 4, 4])], [init(k, v) for k, v in p.items()])
    l1, _ = channels(model, ratio=1 / 16)
    l2, _ = channels(model, ratio=1 / 16, criterion="l2")
    assert node_weight(l1, "convA")[0, 0, 0, 0] == 1.0  # channel 0 dropped
    assert node_weight(l2, "convA")[0, 0, 0, 0] == 7.0


# ---------------------------------------------------------------------------------- prune_magnitude

def magnitude_model():
    p = {"wA": rand(16, 8, 3, 3), "bA": rand(16), "wT": rand(16, 8, 2, 2), "wG": rand(12, 128), "bG": rand(12),
         "wM": rand(12, 8)}
    nodes = [conv("convA", "x", "wA", "bA", "a", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["a", "wT"], ["t"], name="convT", strides=[2, 2]),
             helper.make_node("Flatten", ["t"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "wG", "bG"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "wM"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", [1, 8, 2, 2])], [vi("y", [1, 8])], [init(k, v) for k, v in p.items()]), p


LAYERS = {"convA": ("wA", 1), "convT": ("wT", 0), "gemm": ("wG", 1), "mm": ("wM", 0)}  # weight, reduction axis


def test_magnitude_layer_scope_hits_the_requested_sparsity_per_layer():
    model, p = magnitude_model()
    out, report = run(model, "prune_magnitude", sparsity=0.6)
    check_valid(model, out)
    for layer, (w, _) in LAYERS.items():
        got = node_weight(out, layer)
        assert np.count_nonzero(got == 0) == round(0.6 * got.size), layer
        kept = got != 0
        np.testing.assert_array_equal(got[kept], p[w][kept])  # survivors untouched
        assert np.abs(p[w][~kept]).max() <= np.abs(p[w][kept]).min()  # the smallest went
        assert f"{layer}: {round(0.6 * got.size) / got.size:.1%} of {got.size} weights zero" in notes(report)
    bias = node_weight(out, "convA", 2)
    assert np.count_nonzero(bias == 0) == 0


def test_magnitude_global_scope_uses_one_threshold():
    model, p = magnitude_model()
    p["wM"] *= 100  # large weights: the global threshold spares this layer
    model = make_model(model.graph.node, model.graph.input, model.graph.output, [init(k, v) for k, v in p.items()])
    out, report = run(model, "prune_magnitude", sparsity=0.5, scope="global")
    got = {layer: node_weight(out, layer) for layer in LAYERS}
    total = sum(g.size for g in got.values())
    zeros = sum(np.count_nonzero(g == 0) for g in got.values())
    assert zeros == round(0.5 * total)
    dropped = max(np.abs(p[LAYERS[l][0]][g == 0]).max(initial=0) for l, g in got.items())
    kept = min(np.abs(g[g != 0]).min() for g in got.values())
    assert dropped <= kept
    assert np.count_nonzero(got["mm"] == 0) == 0
    assert "50.0% of" in notes(report)


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_magnitude_n_m_pattern_holds_in_every_group(pattern, n, m):
    model, p = magnitude_model()
    out, report = run(model, "prune_magnitude", pattern=pattern)
    check_valid(model, out)
    for layer, (w, axis) in LAYERS.items():
        got = np.moveaxis(node_weight(out, layer), axis, -1)
        orig = np.moveaxis(p[w], axis, -1)
        if got.shape[-1] % m:
            assert f"{layer}: reduction dim" in notes(report)
            continue
        g = got.reshape(-1, m)
        o = np.abs(orig.reshape(-1, m))
        assert (np.count_nonzero(g, axis=1) == n).all(), layer
        # the kept ones are the n largest of their group
        assert (np.where(g != 0, o, np.inf).min(axis=1) >= np.where(g == 0, o, -np.inf).max(axis=1)).all()


def test_magnitude_zero_sparsity_and_options():
    model, _ = magnitude_model()
    out, report = run(model, "prune_magnitude", sparsity=0.0)
    assert not report.records[0].changed
    for bad in (dict(sparsity=1.0), dict(scope="net"), dict(pattern="4:2"), dict(pattern="2-4")):
        with pytest.raises(PassOptionError):
            onnxopt.get_pass("prune_magnitude", **bad)
    out2, report2 = run(run(model, "prune_magnitude", sparsity=0.5)[0], "prune_magnitude", sparsity=0.5)
    assert not report2.records[0].changed  # idempotent


def test_magnitude_leaves_overridable_weights_alone():
    model, p = magnitude_model()
    model.graph.input.append(vi("wM", [12, 8]))
    out, report = run(model, "prune_magnitude", sparsity=0.5)
    np.testing.assert_array_equal(weights(out)["wM"], p["wM"])
    assert np.count_nonzero(node_weight(out, "gemm") == 0) == round(0.5 * p["wG"].size)


def test_channels_read_inside_a_subgraph_are_left_alone_and_subgraph_layers_reported():
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(16, 16, 1, 1), "bB": rand(16)}
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["t"])], "then", [], [vi("t", [1, 16, 4, 4])])
    else_g = helper.make_graph([conv("convB", "a", "wB", "bB", "e")], "else", [], [vi("e", [1, 16, 4, 4])])
    nodes = [conv("convA", "x", "wA", "bA", "a"),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    model = make_model(nodes, [vi("x", [1, 8, 4, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 16, 4, 4])],
                       [init(k, v) for k, v in p.items()])
    pruned, report = channels(model)
    assert not report.records[0].changed
    assert "left convA alone: 'a' is read inside a subgraph" in notes(report)
    assert "convB: inside an If/Loop/Scan body" in notes(report)


# ---------------------------------------------- ConvTranspose, per-channel constants, Pad, Reduce

def passthrough_model(p):
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wT"], ["t"], name="convT", strides=[2, 2]),
        helper.make_node("Mul", ["t", "sc"], ["tm"], name="mul"),
        helper.make_node("Add", ["sh", "tm"], ["ta"], name="add"),
        helper.make_node("Pad", ["ta", "pads"], ["tp"], name="pad", mode="reflect"),
        helper.make_node("LeakyRelu", ["tp"], ["tl"], alpha=0.1),
        conv("convC", "tl", "wC", "bC", "c"),
        helper.make_node("PRelu", ["c", "slope"], ["cp"]),
        helper.make_node("ReduceMean", ["cp", "axes"], ["r"], keepdims=0, name="mean"),
        helper.make_node("Gemm", ["r", "wG", "bG"], ["g"], name="gemmG"),
        helper.make_node("Relu", ["g"], ["gr"]),
        helper.make_node("Gemm", ["gr", "wH", "bH"], ["y"], name="gemmH", transB=1),
    ]
    inits = [init(k, v) for k, v in p.items()]
    return make_model(nodes, [vi("x", [2, 4, 5, 5])], [vi("y", [2, 3])], inits, opset=18)


def test_convtranspose_constants_pad_and_reduce_like_hand_sliced_weights():
    p = {"wT": rand(4, 16, 2, 2), "sc": rand(16, 1, 1), "sh": rand(1, 16, 1, 1),
         "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "wC": rand(16, 16, 3, 3), "bC": rand(16),
         "slope": np.abs(rand(16, 1, 1)), "axes": np.array([2, 3], np.int64), "wG": rand(16, 6), "bG": rand(6),
         "wH": rand(3, 6), "bH": rand(3)}
    model = passthrough_model(p)
    pruned, report = channels(model)
    _, got, feeds = check_valid(model, pruned)
    kt, kc, kg = keep_of([p["wT"]], 12, out_axis=1), keep_of([p["wC"]], 12), keep_of([p["wG"]], 4, out_axis=1)
    q = dict(p, wT=p["wT"][:, kt], sc=p["sc"][kt], sh=p["sh"][:, kt], wC=p["wC"][kc][:, kt], bC=p["bC"][kc],
             slope=p["slope"][kc], wG=p["wG"][kc][:, kg], bG=p["bG"][kg], wH=p["wH"][:, kg])
    np.testing.assert_array_equal(node_weight(pruned, "gemmG"), q["wG"])
    np.testing.assert_allclose(got[0], verify.run(passthrough_model(q), feeds)[0], rtol=1e-5, atol=1e-5)
    assert "gemmH alone" in notes(report)


@pytest.mark.parametrize("training", [None, False, True])
def test_dropout_passes_channels_through_unless_training(training):
    p = {"wA": rand(16, 8, 1, 1), "bA": rand(16), "wB": rand(4, 16, 1, 1), "bB": rand(4)}
    extra, drop_inputs = [], ["a"]
    if training is not None:
        extra = [init("r", np.float32(0.5)), init("tm", np.array(training))]
        drop_inputs = ["a", "r", "tm"]
    nodes = [conv("convA", "x", "wA", "bA", "a"), helper.make_node("Dropout", drop_inputs, ["d"], name="drop"),
             conv("convB", "d", "wB", "bB", "y")]
    model = make_model(nodes, [vi("x", [1, 8, 4, 4])], [vi("y", [1, 4, 4, 4])],
                       [init(k, v) for k, v in p.items()] + extra)
    pruned, report = channels(model)
    if training:
        assert "left convA alone: drop: Dropout in training mode" in notes(report)
        assert node_weight(pruned, "convA").shape[0] == 16
    else:
        assert node_weight(pruned, "convA").shape[0] == 12
        assert node_weight(pruned, "convB").shape[1] == 12
        check_valid(model, pruned)


def test_layers_that_are_not_prunable_are_reported():
    p = {"wB": rand(4, 16, 1, 1), "wG": rand(16, 2, 1, 1)}
    nodes = [conv("convA", "x", "wA", "", "a"), helper.make_node("Identity", ["wB"], ["wBi"]),
             conv("convB", "a", "wBi", "", "b"), conv("grouped", "b", "wG", "", "y", group=2)]
    model = make_model(nodes, [vi("x", [1, 8, 4, 4]), vi("wA", [16, 8, 1, 1])], [vi("y", [1, 16, 4, 4])],
                       [init(k, v) for k, v in p.items()])
    pruned, report = channels(model)
    text = notes(report)
    assert "2 layer(s) not prunable, weight is not a constant initializer: convA, convB" in text
    assert "1 layer(s) not prunable, grouped Conv: grouped" in text
