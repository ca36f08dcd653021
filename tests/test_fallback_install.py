"""The path a user without the native custom-op library meets: `pip install 'onnxopt[fallback]'`,
com.onnxopt ops run through onnxruntime-extensions on onnxopt.kernels.

tools/test.sh also runs this file in a fresh virtual environment that has only the wheel and its
`fallback` extra, with ONNXOPT_DISABLE_NATIVE_OPS=1: there a missing or broken extra fails here.
"""
import numpy as np
import pytest

import onnxopt
from onnxopt import runtime

from .test_ortops_ref import F32, assert_close_ref, qconv_model, qconv_ref, qgemm_model, qgemm_ref, random_weights


@pytest.fixture
def without_native_ops(monkeypatch):
    # (the fallback instance is kept: it registers its ops with onnxruntime-extensions once per process)
    monkeypatch.setenv(runtime.DISABLE_ENV, "1")
    assert runtime.custom_ops_library() is None


def test_the_fallback_extra_is_installed():
    import onnxruntime_extensions  # noqa: F401  (what the `fallback` extra brings)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fallback says it is slow
def test_int8_ops_run_on_the_fallback(without_native_ops):
    rng = np.random.default_rng(5)
    w, s = random_weights(rng, (32, 16), True)
    x = rng.standard_normal((3, 32)).astype(F32)
    sess = onnxopt.InferenceSession(qgemm_model(w, s, x_shape=("m", 32)))
    assert sess.onnxopt_backend == "fallback"
    assert_close_ref(sess.run(None, {"X": x})[0], *qgemm_ref(x, w, s))
    cw, cs = random_weights(rng, (4, 3, 3, 3), True)
    cx = rng.standard_normal((1, 3, 8, 8)).astype(F32)
    cy = onnxopt.InferenceSession(qconv_model(cw, cs, pads=[1, 1, 1, 1])).run(None, {"X": cx})[0]
    assert_close_ref(cy, *qconv_ref(cx, cw, cs, pads=(1, 1, 1, 1)))


def test_without_the_extra_the_error_says_how_to_get_it(without_native_ops, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    monkeypatch.setattr(runtime, "_fallback_instance", None)  # a new one fails at its import: registers nothing
    rng = np.random.default_rng(6)
    with pytest.raises(onnxopt.CustomOpsUnavailableError, match=r"pip install 'onnxopt\[fallback\]'"):
        onnxopt.InferenceSession(qgemm_model(*random_weights(rng, (8, 4), False), x_shape=("m", 8)))
