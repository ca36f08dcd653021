"""onnxopt.runtime: library discovery, register_custom_ops, InferenceSession, threads, the fallback."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt import runtime

from .test_ortops_ref import F32, assert_close_ref, qconv_model, qconv_ref, qgemm_model, qgemm_ref, random_weights

LIB = runtime.custom_ops_library()
needs_lib = pytest.mark.skipif(LIB is None, reason="libonnxopt_ops is not built (no onnxruntime headers)")


def _have_fallback():
    try:
        import onnxruntime_extensions  # noqa: F401

        from onnxopt import kernels
        return all(hasattr(kernels, f) for f in ("pack_weights", "qgemm_f32", "pack_conv_weights", "qconv2d"))
    except Exception:
        return False


needs_fallback = pytest.mark.skipif(
    not _have_fallback(), reason="fallback needs onnxruntime-extensions and onnxopt.kernels")


def _models():
    """A few models covering both ops, optional inputs, activations and SAME padding."""
    rng = np.random.default_rng(21)
    w, ws = random_weights(rng, (48, 20), True)
    w2, ws2 = random_weights(rng, (48, 12), False)
    cw, cs = random_weights(rng, (6, 2, 3, 3), True)
    dw, ds = random_weights(rng, (4, 1, 3, 3), True)
    models = {
        "qgemm_dynamic": (qgemm_model(w, ws, rng.standard_normal(20).astype(F32), x_shape=("b", "s", 48),
                                      activation="relu"), rng.standard_normal((2, 3, 48)).astype(F32)),
        "qgemm_static_wzp": (qgemm_model(w2, ws2, None, np.array(0.05, F32), np.array(128, np.uint8),
                                         rng.integers(-3, 4, 12).astype(np.int8), x_shape=("m", 48),
                                         activation="clip", clip_min=-1.0, clip_max=1.0),
                             rng.standard_normal((5, 48)).astype(F32)),
        "qconv_same": (qconv_model(cw, cs, rng.standard_normal(6).astype(F32), strides=[2, 2],
                                   auto_pad="SAME_UPPER", group=2), rng.standard_normal((2, 4, 9, 8)).astype(F32)),
        "qconv_depthwise_static": (qconv_model(dw, ds, None, np.array(0.04, F32), np.array(100, np.uint8),
                                               group=4, pads=[1, 0, 1, 2], dilations=[2, 1]),
                                   rng.standard_normal((1, 4, 7, 7)).astype(F32)),
    }
    return models


# ---- discovery and registration --------------------------------------------------------------

def test_custom_ops_library_respects_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    assert runtime.custom_ops_library() is None
    monkeypatch.setenv(runtime.DISABLE_ENV, "0")
    fake = tmp_path / "libonnxopt_ops.so"
    fake.write_bytes(b"")
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(fake))
    assert runtime.custom_ops_library() == str(fake)
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "missing.so"))
    assert runtime.custom_ops_library() is None


@needs_lib
def test_library_sits_next_to_the_package():
    if os.environ.get(runtime.LIBRARY_ENV):
        pytest.skip("ONNXOPT_OPS_LIBRARY points elsewhere")
    assert Path(LIB).parent == Path(runtime.__file__).resolve().parent


@needs_lib
def test_register_custom_ops_is_idempotent_and_works_in_a_plain_session():
    so = ort.SessionOptions()
    assert runtime.register_custom_ops(so) is so
    runtime.register_custom_ops(so)  # a second registration of the same domain would fail in ORT
    model, x = _models()["qgemm_dynamic"]
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    assert y.shape == (2, 3, 20)
    assert isinstance(runtime.register_custom_ops(), ort.SessionOptions)


@needs_lib
def test_inference_session_accepts_path_bytes_and_proto(tmp_path):
    model, x = _models()["qconv_same"]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    outs = []
    for src in (model, model.SerializeToString(), str(path), path):
        sess = runtime.InferenceSession(src)
        assert sess.onnxopt_backend == "native"
        outs.append(sess.run(None, {"X": x})[0])
    for y in outs[1:]:
        assert np.array_equal(outs[0], y)
    ref, tol = qconv_ref(x, *_conv_args(model), strides=(2, 2), auto_pad="SAME_UPPER", group=2)
    assert_close_ref(outs[0], ref, tol)


def _conv_args(model):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits["W"], inits["w_scale"], inits.get("bias")


@needs_lib
def test_thread_count_reaches_the_library():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 3
    runtime.register_custom_ops(so)
    assert so.get_session_config_entry("onnxopt.intra_op_num_threads") == "3"
    model, x = _models()["qgemm_dynamic"]
    y3 = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    so1 = ort.SessionOptions()
    so1.intra_op_num_threads = 1
    assert np.array_equal(runtime.InferenceSession(model, so1).run(None, {"X": x})[0], y3)
    assert so1.get_session_config_entry("onnxopt.intra_op_num_threads") == "1"


@needs_lib
def test_session_keeps_onnxruntimes_threading_defaults_unless_the_user_sets_them():
    """issue 12 cause 3: InferenceSession registers the ops and changes nothing else (it used to turn
    intra-op spinning off: 0.7x of plain onnxruntime on small models)."""
    model, x = _models()["qgemm_dynamic"]
    sess = runtime.InferenceSession(model)
    so = sess.get_session_options()
    assert runtime._config(so, "session.intra_op.allow_spinning") is None
    assert so.intra_op_num_threads == 0 and runtime._config(so, "onnxopt.intra_op_num_threads") is None
    sess.run(None, {"X": x})
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    runtime.InferenceSession(model, so)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@needs_lib
def test_large_models_go_through_external_data(monkeypatch):
    rng = np.random.default_rng(23)
    model = qgemm_model(*random_weights(rng, (256, 64), True), x_shape=("m", 256))
    x = rng.standard_normal((3, 256)).astype(F32)
    expected = runtime.InferenceSession(model).run(None, {"X": x})[0]
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 100)
    made = []
    real_mkdtemp = runtime.tempfile.mkdtemp
    monkeypatch.setattr(runtime.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    before = model.SerializeToString()
    sess = runtime.InferenceSession(model)
    assert len(made) == 1 and any(p.endswith(".data") for p in os.listdir(made[0]))
    assert np.array_equal(sess.run(None, {"X": x})[0], expected)
    assert model.SerializeToString() == before  # the caller's proto is untouched
    del sess
    gc.collect()
    assert not os.path.exists(made[0])  # the temporary model goes with the session


def test_model_without_custom_ops_runs_without_either_backend(monkeypatch):
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    monkeypatch.setattr(runtime, "_fallback_instance", None)
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["X"], ["Y"])], "g",
                               [onnx.helper.make_tensor_value_info("X", 1, [2])],
                               [onnx.helper.make_tensor_value_info("Y", 1, [2])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert runtime.InferenceSession(m).run(None, {"X": np.array([-1, 2], F32)})[0].tolist() == [0, 2]


def test_missing_both_backends_names_both_fixes(monkeypatch):
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    monkeypatch.setattr(runtime, "_fallback_instance", None)
    model, _ = _models()["qgemm_dynamic"]
    with pytest.raises(runtime.CustomOpsUnavailableError,
                       match=r"libonnxopt_ops.*pip install 'onnxopt\[fallback\]' \(it adds onnxruntime-extensions\)"):
        runtime.InferenceSession(model)
    with pytest.raises(runtime.CustomOpsUnavailableError):
        runtime.register_custom_ops(ort.SessionOptions())


# ---- concurrency ---------------------------------------------------------------------------------

@needs_lib
@pytest.mark.parametrize("name", ["qgemm_dynamic", "qconv_same"])
def test_four_threads_share_one_session(name):
    model, x = _models()[name]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = runtime.InferenceSession(model, so)
    rng = np.random.default_rng(22)
    feeds = [(rng.standard_normal(x.shape) * (1 + i)).astype(F32) for i in range(8)]
    expected = [sess.run(None, {"X": f})[0] for f in feeds]
    results, errors = {}, []

    def worker(t):
        try:
            for rep in range(10):
                i = (t + rep) % len(feeds)
                results[(t, rep)] = (i, sess.run(None, {"X": feeds[i]})[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40
    for i, y in results.values():
        assert np.array_equal(y, expected[i])


# ---- fallback: onnxruntime-extensions + onnxopt.kernels ---------------------------------------------

@pytest.fixture(params=["default", "numba"])
def kernel_backend(request):
    """The fallback runs on whatever onnxopt.kernels uses (native pybind11 when built) and on numba."""
    from onnxopt import kernels

    before = kernels.get_backend()
    if request.param == "numba":
        kernels.set_backend("numba")
    yield request.param
    kernels.set_backend(before)


@needs_fallback
def test_fallback_matches_native_and_reference(monkeypatch, kernel_backend):
    models = _models()
    native = {}
    if LIB is not None:
        for name, (model, x) in models.items():
            native[name] = runtime.InferenceSession(model).run(None, {"X": x})[0]
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, (model, x) in models.items():
            sess = runtime.InferenceSession(model)
            assert sess.onnxopt_backend == "fallback"
            y = sess.run(None, {"X": x})[0]
            if name in native:
                assert np.array_equal(y, native[name]), name
            inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
            act = attrs.get("activation", b"none").decode()
            clip = dict(clip_min=attrs.get("clip_min", -np.inf), clip_max=attrs.get("clip_max", np.inf))
            common = (inits["W"], inits["w_scale"], inits.get("bias"), inits.get("x_scale"), inits.get("x_zero_point"))
            if name.startswith("qgemm"):
                ref, tol = qgemm_ref(x, *common, w_zp=inits.get("w_zero_point"), act=act, **clip)
            else:
                conv = {k: attrs[k] for k in ("strides", "pads", "dilations", "group") if k in attrs}
                if "auto_pad" in attrs:
                    conv["auto_pad"] = attrs["auto_pad"].decode()
                ref, tol = qconv_ref(x, *common, act=act, **clip, **conv)
            assert_close_ref(y, ref, tol)


@needs_fallback
def test_fallback_rejects_non_constant_weight(monkeypatch):
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    model, _ = _models()["qgemm_dynamic"]
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.INT8, list(w.dims)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="must be a constant initializer"):
            runtime.InferenceSession(model)


@needs_fallback
def test_fallback_warns_once_in_a_fresh_process(tmp_path):
    model, x = _models()["qgemm_dynamic"]
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import warnings, numpy as np\n"
        "warnings.simplefilter('always')\n"
        "from onnxopt import runtime\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        s = runtime.InferenceSession(r'%s')\n"
        "        y = s.run(None, {'X': np.load(r'%s')})[0]\n"
        "n = sum('onnxruntime-extensions' in str(i.message) for i in w)\n"
        "print('backend', s.onnxopt_backend, 'warnings', n)\n"
        "np.save(r'%s', y)\n" % (tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "y.npy"))
    env = dict(os.environ, **{runtime.DISABLE_ENV: "1", "ONNXOPT_KERNELS": "numba"})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(runtime.__file__).parents[1])] + sys.path)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backend fallback warnings 1" in out.stdout
    if LIB is not None:
        assert np.array_equal(np.load(tmp_path / "y.npy"), runtime.InferenceSession(model).run(None, {"X": x})[0])


@needs_fallback
def test_fallback_errors_surface_as_exceptions(monkeypatch):
    # onnxruntime-extensions would abort the process on an exception inside a Python op.
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    rng = np.random.default_rng(24)
    model = qgemm_model(*random_weights(rng, (8, 4), False), x_shape=("m", 8))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "k"
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sess = runtime.InferenceSession(model)
    with pytest.raises(ValueError, match="last dimension must be K = 8"):
        sess.run(None, {"X": np.zeros((2, 7), F32)})
    assert sess.run(None, {"X": np.zeros((2, 8), F32)})[0].shape == (2, 4)
