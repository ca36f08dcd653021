"""The native custom-op library (libonnxopt_ops) in a plain onnxruntime session vs the numpy reference."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt import runtime

from .test_ortops_ref import (F32, assert_close_ref, qconv_model, qconv_ref, qgemm_model, qgemm_ref,
                              random_weights)

LIB = runtime.custom_ops_library()
needs_lib = pytest.mark.skipif(
    LIB is None, reason="libonnxopt_ops is not built (no onnxruntime headers at build time) or disabled")


def plain_session(model, threads=1, spinning=False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # before the library: it reads the setting at registration (no spinning: bigger parallel tasks)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, x, threads=1, spinning=False):
    return plain_session(model, threads, spinning).run(None, {"X": x})[0]


ACTS = [("none", {}), ("relu", {}), ("clip", {"clip_min": -0.5, "clip_max": 0.75})]


@needs_lib
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_qgemm_matches_reference(static, per_channel, with_bias, act):
    rng = np.random.default_rng(zlib.crc32(repr((static, per_channel, with_bias, act[0])).encode()))
    K, N = 72, 40
    w, ws = random_weights(rng, (K, N), per_channel)
    x = (rng.standard_normal((3, 5, K)) * 2).astype(F32)
    bias = rng.standard_normal(N).astype(F32) if with_bias else None
    xs, xz = (np.array(0.02, F32), np.array(131, np.uint8)) if static else (None, None)
    model = qgemm_model(w, ws, bias, xs, xz, x_shape=("b", "s", K), activation=act[0], **act[1])
    y = run(model, x)
    ref, tol = qgemm_ref(x, w, ws, bias, xs, xz, act=act[0], clip_min=act[1].get("clip_min", -np.inf),
                         clip_max=act[1].get("clip_max", np.inf))
    assert_close_ref(y, ref, tol)


@needs_lib
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 33), (2, 1, 4, 33), (1, 33), (0, 33)])
def test_qgemm_ranks_flatten_leading_dims(shape):
    rng = np.random.default_rng(3)
    w, ws = random_weights(rng, (33, 17), True)
    x = rng.standard_normal(shape).astype(F32)
    model = qgemm_model(w, ws, x_shape=tuple(f"d{i}" for i in range(len(shape) - 1)) + (33,))
    y = run(model, x)
    ref, tol = qgemm_ref(x, w, ws)
    assert y.shape == shape[:-1] + (17,)
    assert_close_ref(y, ref, tol)


@needs_lib
def test_qgemm_weight_zero_point_and_static_without_zero_point():
    rng = np.random.default_rng(4)
    w, ws = random_weights(rng, (64, 24), True)
    wz = rng.integers(-5, 6, 24).astype(np.int8)
    x = rng.uniform(0, 3, (9, 64)).astype(F32)  # non-negative: static zero point 0 fits
    model = qgemm_model(w, ws, None, np.array(0.015, F32), None, wz, x_shape=("m", 64))
    assert list(model.graph.node[0].input) == ["X", "W", "w_scale", "", "x_scale", "", "w_zero_point"]
    ref, tol = qgemm_ref(x, w, ws, None, np.array(0.015, F32), None, wz)
    assert_close_ref(run(model, x), ref, tol)


@needs_lib
def test_qgemm_integer_activation_and_empty_trailing_names():
    rng = np.random.default_rng(5)
    w, ws = random_weights(rng, (16, 8), False)
    x = rng.standard_normal((4, 16)).astype(F32)
    model = qgemm_model(w, ws, np.ones(8, F32), trailing=False, x_shape=("m", 16), activation=1)
    assert list(model.graph.node[0].input)[-1] == ""
    ref, tol = qgemm_ref(x, w, ws, np.ones(8, F32), act="relu")
    assert_close_ref(run(model, x), ref, tol)


@needs_lib
def test_qgemm_saturating_inputs_are_exact():
    # Extreme weights (-128/127) and activations that quantize to 0 and 255 in the same row.
    w = np.where(np.arange(128 * 32).reshape(128, 32) % 3 == 0, -128, 127).astype(np.int8)
    ws = np.array([0.01], F32)
    x = np.tile(np.array([-4.0, 4.0, 0.0, 1e-3], F32), (6, 32))
    ref, tol = qgemm_ref(x, w, ws)
    assert_close_ref(run(qgemm_model(w, ws, x_shape=("m", 128)), x), ref, tol)


CONVS = {
    "3x3_pad1": dict(shape=(8, 4, 3, 3), x=(2, 4, 9, 9), pads=[1, 1, 1, 1]),
    "1x1": dict(shape=(16, 8, 1, 1), x=(1, 8, 5, 7)),
    "groups2": dict(shape=(12, 3, 3, 3), x=(1, 6, 8, 8), group=2, pads=[1, 1, 1, 1]),
    "depthwise": dict(shape=(8, 1, 3, 3), x=(2, 8, 10, 10), group=8, pads=[1, 1, 1, 1]),
    "stride2": dict(shape=(8, 4, 3, 3), x=(1, 4, 11, 10), strides=[2, 2], pads=[1, 1, 1, 1]),
    "dilation2": dict(shape=(6, 4, 3, 3), x=(1, 4, 12, 11), dilations=[2, 2], pads=[2, 2, 2, 2]),
    "asym_pads": dict(shape=(5, 3, 3, 2), x=(1, 3, 7, 8), pads=[0, 2, 1, 0], strides=[1, 2]),
    "same_upper_s2": dict(shape=(8, 4, 3, 3), x=(1, 4, 9, 10), strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower": dict(shape=(4, 4, 2, 2), x=(1, 4, 6, 5), auto_pad="SAME_LOWER"),
    "valid_7x7_s2": dict(shape=(8, 3, 7, 7), x=(1, 3, 20, 19), strides=[2, 2], auto_pad="VALID"),
}


@needs_lib
@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_qconv_matches_reference(name, static):
    cfg = dict(CONVS[name])
    rng = np.random.default_rng(sum(map(ord, name)) + static)
    shape, xshape = cfg.pop("shape"), cfg.pop("x")
    per_channel = zlib.crc32(name.encode()) % 2 == 0 or name == "depthwise"
    w, ws = random_weights(rng, shape, per_channel)
    bias = rng.standard_normal(shape[0]).astype(F32) if static else None
    act = ["none", "relu", "clip"][len(name) % 3]
    clip = {"clip_min": -0.3, "clip_max": 0.6} if act == "clip" else {}
    xs, xz = (np.array(0.03, F32), np.array(120, np.uint8)) if static else (None, None)
    x = rng.standard_normal(xshape).astype(F32)
    model = qconv_model(w, ws, bias, xs, xz, activation=act, **clip, **cfg)
    y = run(model, x)
    ref, tol = qconv_ref(x, w, ws, bias, xs, xz, act=act, clip_min=clip.get("clip_min", -np.inf),
                         clip_max=clip.get("clip_max", np.inf), **cfg)
    assert_close_ref(y, ref, tol)


@needs_lib
def test_qconv_same_pads_follow_input_size():
    # SAME_UPPER with stride 2: the pads depend on H and W, which change between runs.
    rng = np.random.default_rng(6)
    w, ws = random_weights(rng, (4, 2, 3, 3), True)
    sess = plain_session(qconv_model(w, ws, strides=[2, 2], auto_pad="SAME_UPPER"))
    for hw in [(8, 8), (9, 7), (8, 8), (5, 6)]:
        x = rng.standard_normal((1, 2) + hw).astype(F32)
        ref, tol = qconv_ref(x, w, ws, strides=(2, 2), auto_pad="SAME_UPPER")
        assert_close_ref(sess.run(None, {"X": x})[0], ref, tol)


@needs_lib
def test_threads_do_not_change_results():
    rng = np.random.default_rng(7)
    w, ws = random_weights(rng, (256, 96), True)
    x = rng.standard_normal((64, 256)).astype(F32)
    model = qgemm_model(w, ws, x_shape=("m", 256))
    cw, cs = random_weights(rng, (16, 8, 3, 3), True)
    xc = rng.standard_normal((2, 8, 16, 16)).astype(F32)
    cmodel = qconv_model(cw, cs, pads=[1, 1, 1, 1])
    assert np.array_equal(run(model, x, 1), run(model, x, 2))
    assert np.array_equal(run(cmodel, xc, 1), run(cmodel, xc, 2))


@needs_lib
def test_spinning_setting_changes_the_split_not_the_results():
    """Without spinning only large calls go parallel; with it smaller ones do too: same numbers."""
    rng = np.random.default_rng(17)
    for shape, kw in (((64, 64, 3, 3), dict(pads=[1, 1, 1, 1])), ((48, 40, 1, 1), {})):
        cw, cs = random_weights(rng, shape, True)
        cmodel = qconv_model(cw, cs, **kw)
        xc = rng.standard_normal((1, shape[1], 72, 72)).astype(F32)  # 64x64x3x3: 191M MACs
        ref = run(cmodel, xc, 1)
        assert np.array_equal(run(cmodel, xc, 2, spinning=False), ref)
        assert np.array_equal(run(cmodel, xc, 2, spinning=True), ref)
    # static activation quantization without spinning: the image preparation and the compute tasks
    # run in one region (run_after): the direct kernel, the pixel-interleaved im2col of an RGB stem,
    # the padded-plane im2col of a strided conv, each with bias and an activation
    for shape, hw, kw in (((64, 64, 3, 3), 40, dict(pads=[1, 1, 1, 1])),
                          ((32, 3, 7, 7), 160, dict(pads=[3, 3, 3, 3], strides=[2, 2])),
                          ((64, 64, 3, 3), 66, dict(pads=[1, 1, 1, 1], strides=[2, 2]))):
        cw, cs = random_weights(rng, shape, True)
        bias = rng.standard_normal(shape[0]).astype(F32)
        cmodel = qconv_model(cw, cs, bias, x_scale=0.03, x_zp=120, activation="relu", **kw)
        xc = rng.standard_normal((1, shape[1], hw, hw)).astype(F32)
        ref = run(cmodel, xc, 1)
        for _ in range(3):  # the slots race for the prologue differently each time
            assert np.array_equal(run(cmodel, xc, 2, spinning=False), ref)
    w, ws = random_weights(rng, (768, 3072), True)
    model = qgemm_model(w, ws, x_shape=("m", 768))
    x = rng.standard_normal((128, 768)).astype(F32)  # 302M MACs: parallel either way
    ref = run(model, x, 1)
    assert np.array_equal(run(model, x, 2, spinning=False), ref)
    assert np.array_equal(run(model, x, 2, spinning=True), ref)


# ---- session-creation and run-time errors -------------------------------------------------------

def _non_constant_weight(model):
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.INT8, list(w.dims)))
    return model


@needs_lib
@pytest.mark.parametrize("op", ["QGemm", "QConv"])
def test_non_constant_weight_is_rejected_at_session_creation(op):
    rng = np.random.default_rng(8)
    if op == "QGemm":
        model = qgemm_model(*random_weights(rng, (8, 4), False), x_shape=("m", 8))
    else:
        model = qconv_model(*random_weights(rng, (4, 2, 3, 3), False))
    with pytest.raises(Exception, match="must be a constant initializer"):
        plain_session(_non_constant_weight(model))


@needs_lib
def test_initializer_that_is_also_a_graph_input_is_not_constant():
    rng = np.random.default_rng(9)
    model = qgemm_model(*random_weights(rng, (8, 4), False), x_shape=("m", 8))
    model.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.INT8, [8, 4]))
    with pytest.raises(Exception, match="must be a constant initializer"):
        plain_session(model)


@needs_lib
def test_bad_shapes_give_clear_errors():
    rng = np.random.default_rng(10)
    w, ws = random_weights(rng, (8, 4), False)
    model = qgemm_model(w, ws, x_shape=("m", 8))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "k"
    sess = plain_session(model)
    with pytest.raises(Exception, match="last dimension must be K = 8"):
        sess.run(None, {"X": np.zeros((2, 7), F32)})
    with pytest.raises(Exception, match=r"w_scale must have shape \[\], \[1\] or \[4\] \(N = 4\)"):
        plain_session(qgemm_model(w, np.ones(3, F32), x_shape=("m", 8)))
    with pytest.raises(Exception, match="activation must be"):
        plain_session(qgemm_model(w, ws, x_shape=("m", 8), activation="gelu"))
    cw, cs = random_weights(rng, (4, 2, 3, 3), False)
    cmodel = qconv_model(cw, cs)
    cmodel.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "c"
    csess = plain_session(cmodel)
    with pytest.raises(Exception, match="channels"):
        csess.run(None, {"X": np.zeros((1, 3, 5, 5), F32)})
    with pytest.raises(Exception, match="smaller than the dilated kernel"):
        csess.run(None, {"X": np.zeros((1, 2, 2, 5), F32)})


@needs_lib
@pytest.mark.parametrize("op", ["QGemm", "QConv"])
def test_attributes_of_the_wrong_type_are_rejected_at_session_creation(op):
    """A float activation used to read as absent ("none"); an int where a float is expected too."""
    rng = np.random.default_rng(12)
    if op == "QGemm":
        model = qgemm_model(*random_weights(rng, (8, 4), False), x_shape=("m", 8))
    else:
        model = qconv_model(*random_weights(rng, (4, 2, 3, 3), False))
    node = model.graph.node[0]
    for attr, match in ((onnx.helper.make_attribute("activation", 1.5), "activation must be a string .* or an int"),
                        (onnx.helper.make_attribute("clip_min", 0), "attribute clip_min must be a float")):
        del node.attribute[:]
        node.attribute.append(attr)
        with pytest.raises(Exception, match=match):
            plain_session(model)
    if op == "QConv":
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("group", 1.0))
        with pytest.raises(Exception, match="attribute group must be an int"):
            plain_session(model)


@needs_lib
@pytest.mark.parametrize("op", ["QGemm", "QConv"])
@pytest.mark.parametrize("which", ["w_scale", "bias"])
def test_scale_and_bias_with_the_right_count_but_wrong_shape_are_rejected(op, which):
    """[2, 4] has N = 8 elements but is not [N]: refused at creation (constant) and per call (fed)."""
    rng = np.random.default_rng(13)
    n = 8
    if op == "QGemm":
        w, s = random_weights(rng, (16, n), True)
        good = dict(w_scale=s, bias=np.zeros(n, F32))
        bad = dict(good, **{which: good[which].reshape(2, 4)})
        model, x = qgemm_model(w, bad["w_scale"], bias=bad["bias"], x_shape=("m", 16)), np.ones((2, 16), F32)
    else:
        w, s = random_weights(rng, (n, 2, 3, 3), True)
        good = dict(w_scale=s, bias=np.zeros(n, F32))
        bad = dict(good, **{which: good[which].reshape(2, 4)})
        model, x = qconv_model(w, bad["w_scale"], bias=bad["bias"]), np.ones((1, 2, 5, 5), F32)
    with pytest.raises(Exception, match=f"{which} must have shape"):
        plain_session(model)
    # the same tensor fed at run time (an initializer that is also a graph input is not constant)
    model.graph.input.append(onnx.helper.make_tensor_value_info(which, onnx.TensorProto.FLOAT, [2, 4]))
    sess = plain_session(model)
    with pytest.raises(Exception, match=f"{which} must have shape"):
        sess.run(None, {"X": x})


# ---- ONNX checker and shape inference ----------------------------------------------------------

def _output_dims(model):
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    t = inferred.graph.output[0].type.tensor_type
    vi = {v.name: v for v in inferred.graph.value_info}
    assert t.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return dims, vi


def test_checker_and_shape_inference_qgemm():
    rng = np.random.default_rng(11)
    w, ws = random_weights(rng, (32, 12), True)
    model = qgemm_model(w, ws, np.zeros(12, F32), np.array(0.1, F32), np.array(3, np.uint8),
                        np.zeros(12, np.int8), x_shape=("batch", 7, 32), activation="clip",
                        clip_min=0.0, clip_max=6.0)
    for d in model.graph.output[0].type.tensor_type.shape.dim:
        d.Clear()  # declared rank only: inference fills the dims
    onnx.checker.check_model(model, full_check=True)
    dims, _ = _output_dims(model)
    assert dims == ["batch", 7, 12]


@pytest.mark.parametrize("name", sorted(CONVS))
def test_checker_and_shape_inference_qconv(name):
    cfg = dict(CONVS[name])
    shape, xshape = cfg.pop("shape"), cfg.pop("x")
    w, ws = random_weights(np.random.default_rng(12), shape, True)
    model = qconv_model(w, ws, np.zeros(shape[0], F32), x_shape=(xshape[0], None, xshape[2], xshape[3]), **cfg)
    onnx.checker.check_model(model, full_check=True)
    ref, _ = qconv_ref(np.zeros(xshape, F32), w, ws, **cfg)
    assert _output_dims(model)[0] == list(ref.shape)


def test_shape_inference_keeps_symbolic_batch_and_rejects_mismatch():
    w, ws = random_weights(np.random.default_rng(13), (8, 4, 3, 3), False)
    model = qconv_model(w, ws, x_shape=("n", None, "h", "w"), pads=[1, 1, 1, 1])
    dims, _ = _output_dims(model)
    assert dims[:2] == ["n", 8]
    bad = qgemm_model(*random_weights(np.random.default_rng(14), (8, 4), False), x_shape=("m", 8))
    bad.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 9
    with pytest.raises(Exception, match="does not match W's K = 8"):
        onnx.shape_inference.infer_shapes(bad, strict_mode=True)


def test_schema_registration_is_idempotent():
    import importlib

    import onnxopt.schemas as schemas

    importlib.reload(schemas)
    schemas.register()
    s = onnx.defs.get_schema("QGemm", 1, "com.onnxopt")
    assert [i.name for i in s.inputs] == list(schemas.QGEMM_INPUTS)
    assert [i.name for i in onnx.defs.get_schema("QConv", 1, "com.onnxopt").inputs] == list(schemas.QCONV_INPUTS)


@needs_lib
def test_library_exports_only_the_entry_points_and_needs_no_libonnxruntime():
    import shutil
    import subprocess

    if not (shutil.which("nm") and shutil.which("readelf")):
        pytest.skip("binutils (nm, readelf) not installed")
    syms = subprocess.run(["nm", "-D", "--defined-only", LIB], capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in syms.splitlines() if line.split()[-2:-1] in (["T"], ["W"]))
    assert exported == ["RegisterCustomOps", "RegisterCustomOpsAltName"], exported
    dyn = subprocess.run(["readelf", "-d", LIB], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed and not any("onnxruntime" in line for line in needed), needed
