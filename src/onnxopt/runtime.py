"""Running models that use onnxopt's custom ops (domain ``com.onnxopt``) in onnxruntime.

Two backends, one contract (passes.md, "Custom operators"):

* native: ``libonnxopt_ops.so`` next to this module, registered with
  ``SessionOptions.register_custom_ops_library``; weights packed once per session, ORT's thread pool.
* fallback, when the library is absent or ``ONNXOPT_DISABLE_NATIVE_OPS=1``: onnxruntime-extensions'
  Python custom ops calling the kernels of :mod:`onnxopt.kernels` (numba). Same numbers, much
  slower; the model's com.onnxopt nodes are rewritten into a private domain first, so only
  :class:`InferenceSession` can run them this way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
import warnings
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import ir

DOMAIN = "com.onnxopt"
DISABLE_ENV = "ONNXOPT_DISABLE_NATIVE_OPS"
LIBRARY_ENV = "ONNXOPT_OPS_LIBRARY"  # explicit path of libonnxopt_ops (e.g. a build tree's)
_LIB_NAME = {"win32": "onnxopt_ops.dll", "darwin": "libonnxopt_ops.dylib"}.get(sys.platform, "libonnxopt_ops.so")
_REGISTERED_KEY = "onnxopt.custom_ops"  # session config entry marking options we already set up
_THREADS_KEY = "onnxopt.intra_op_num_threads"  # read by libonnxopt_ops at registration
_PROTO_LIMIT = 1_800_000_000  # protobuf refuses messages over 2 GiB; stay clear of it

_FALLBACK_DOMAIN = "com.onnxopt.fallback"
_OP_INPUTS = {  # input name -> element type, in the ops' input order
    "QGemm": (("X", np.float32), ("W", np.int8), ("w_scale", np.float32), ("bias", np.float32),
              ("x_scale", np.float32), ("x_zero_point", np.uint8), ("w_zero_point", np.int8)),
    "QConv": (("X", np.float32), ("W", np.int8), ("w_scale", np.float32), ("bias", np.float32),
              ("x_scale", np.float32), ("x_zero_point", np.uint8), ("residual", np.float32),
              ("y_scale", np.float32), ("y_zero_point", np.uint8)),
}
# Python fallback ops: fixed input/output types, so QConv on uint8 activations is its own op.
_FALLBACK_OPS = {
    "QGemm": (_OP_INPUTS["QGemm"], np.float32),
    "QConv": (_OP_INPUTS["QConv"], np.float32),
    "QConvU8": ((("X", np.uint8),) + _OP_INPUTS["QConv"][1:], np.uint8),
}


class CustomOpsUnavailableError(RuntimeError):
    """Neither the native custom-op library nor onnxruntime-extensions is available."""


def custom_ops_library() -> str | None:
    """Path of the native custom-op library, or None (not built, or disabled by the environment).

    ``ONNXOPT_DISABLE_NATIVE_OPS=1`` hides it; ``ONNXOPT_OPS_LIBRARY=/path/libonnxopt_ops.so`` points
    at another build; by default it is the one installed next to this module.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    override = os.environ.get(LIBRARY_ENV)
    path = Path(override) if override else Path(__file__).resolve().with_name(_LIB_NAME)
    return str(path) if path.is_file() else None


def _config(so: ort.SessionOptions, key: str) -> str | None:
    try:
        return so.get_session_config_entry(key)
    except Exception:  # onnxruntime raises for a key that was never set
        return None


def register_custom_ops(sess_options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Make ``sess_options`` able to run the com.onnxopt ops and return it (a new one if None).

    Registers the native library; without it, onnxruntime-extensions' library and the Python ops
    (which then only run models prepared by :class:`InferenceSession`). Registering twice is a no-op.
    Set ``intra_op_num_threads`` before calling: the native ops size their work split from it.
    """
    so = ort.SessionOptions() if sess_options is None else sess_options
    if _config(so, _REGISTERED_KEY):
        return so
    lib = custom_ops_library()
    if lib is not None:
        if _config(so, _THREADS_KEY) is None and so.intra_op_num_threads > 0:
            so.add_session_config_entry(_THREADS_KEY, str(so.intra_op_num_threads))
        so.register_custom_ops_library(lib)
        so.add_session_config_entry(_REGISTERED_KEY, "native")
    else:
        so.register_custom_ops_library(_fallback().library_path())
        so.add_session_config_entry(_REGISTERED_KEY, "fallback")
    return so


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    """True if any node of the model (subgraphs included) is in domain com.onnxopt."""
    return any(n.domain == DOMAIN for n in ir.walk_nodes(model.graph))


class InferenceSession(ort.InferenceSession):
    """``onnxruntime.InferenceSession`` that can run com.onnxopt ops.

    ``model`` is a path, serialized bytes or an ``onnx.ModelProto`` (models over ~1.8 GB go through a
    temporary file with external data). The custom ops are registered in ``sess_options`` (a new
    SessionOptions if None) and ``providers`` defaults to the CPU provider; nothing else of
    onnxruntime's defaults changes (thread count, spinning: users compare against plain onnxruntime).
    The native ops read the thread count and spinning from the options when they are registered.
    """

    def __init__(self, model, sess_options=None, providers=None, **kw):
        so = ort.SessionOptions() if sess_options is None else sess_options
        providers = ["CPUExecutionProvider"] if providers is None else providers
        self._onnxopt_fallback_id = None
        self.onnxopt_backend = "none"

        if custom_ops_library() is not None:
            register_custom_ops(so)
            self.onnxopt_backend = "native"
            src = model if isinstance(model, (str, os.PathLike, bytes)) else self._serialize(model)
        else:
            proto = _load(model)
            if uses_custom_ops(proto):
                fb = _fallback()
                proto, self._onnxopt_fallback_id, keys = fb.rewrite(proto)
                register_custom_ops(so)
                self.onnxopt_backend = "fallback"
                weakref.finalize(self, fb.forget, self._onnxopt_fallback_id, keys)
                src = self._serialize(proto)
            else:
                src = model if isinstance(model, (str, os.PathLike, bytes)) else self._serialize(proto)
        if isinstance(src, os.PathLike):
            src = os.fspath(src)
        super().__init__(src, sess_options=so, providers=providers, **kw)

    def run(self, output_names, input_feed, run_options=None):
        if self._onnxopt_fallback_id is None:
            return super().run(output_names, input_feed, run_options)
        fb = _fallback()
        try:
            out = super().run(output_names, input_feed, run_options)
        except Exception as ort_error:
            errors = fb.take_errors(self._onnxopt_fallback_id)
            if errors:
                raise errors[0] from ort_error
            raise
        errors = fb.take_errors(self._onnxopt_fallback_id)
        if errors:
            raise errors[0]
        return out

    def _serialize(self, proto: onnx.ModelProto):
        if proto.ByteSize() < _PROTO_LIMIT:
            return proto.SerializeToString()
        tmp = tempfile.mkdtemp(prefix="onnxopt-model-")
        weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
        path = os.path.join(tmp, "model.onnx")
        proto = _deepcopy(proto)  # saving with external data rewrites the tensors in place
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return path


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    return onnx.load_model(os.fspath(model))


# ---- fallback: onnxruntime-extensions Python ops over onnxopt.kernels ----------------------------

_fallback_lock = threading.Lock()
_fallback_instance = None


def _fallback():
    global _fallback_instance
    with _fallback_lock:
        if _fallback_instance is None:
            _fallback_instance = _Fallback()
        return _fallback_instance


class _Fallback:
    """Rewrites com.onnxopt nodes into fully-specified Python ops and runs them on onnxopt.kernels.

    onnxruntime-extensions' Python ops take a fixed list of required inputs and scalar attributes, so
    each node becomes ``com.onnxopt.fallback::QGemm`` / ``::QConv`` with every input present (absent
    optional ones replaced by empty tensors) and its attributes in one JSON string attribute. The
    packed weights are cached per node and dropped with the session.
    """

    def __init__(self):
        try:
            import onnxruntime_extensions as ortx
        except ImportError:
            raise CustomOpsUnavailableError(
                "onnxopt's com.onnxopt ops need either the native library libonnxopt_ops "
                "(build onnxopt with onnxruntime headers: ONNXOPT_ORT_INCLUDE_DIR or "
                "tools/fetch_ort_headers.sh; unset ONNXOPT_DISABLE_NATIVE_OPS) or the slow Python "
                "fallback: pip install 'onnxopt[fallback]' (it adds onnxruntime-extensions)") from None
        try:
            from onnxopt import kernels
            for fn in ("pack_weights", "qgemm_f32", "pack_conv_weights", "qconv2d"):
                getattr(kernels, fn)
        except (ImportError, AttributeError) as e:
            raise CustomOpsUnavailableError(
                f"onnxopt's Python fallback for the com.onnxopt ops needs onnxopt.kernels ({e})") from None

        self._ortx = ortx
        self._kernels = kernels
        self._packed = {}  # node key -> packed weights
        self._errors = {}  # session id -> exceptions raised inside the Python ops
        self._lock = threading.Lock()
        self._warned = False
        for op in _FALLBACK_OPS:
            self._declare(op)

    def library_path(self) -> str:
        return self._ortx.get_library_path()

    def _declare(self, op):
        P = self._ortx.PyCustomOpDef
        dt = {np.float32: P.dt_float, np.int8: P.dt_int8, np.uint8: P.dt_uint8}
        body = self._qgemm if op == "QGemm" else self._qconv
        inputs, out = _FALLBACK_OPS[op]
        self._ortx.onnx_op(op_type=f"{_FALLBACK_DOMAIN}::{op}",
                           inputs=[dt[t] for _, t in inputs], outputs=[dt[out]],
                           attrs={"spec": P.dt_string})(body)

    def forget(self, session_id, keys):
        with self._lock:
            self._errors.pop(session_id, None)
            for k in keys:
                self._packed.pop(k, None)

    def take_errors(self, session_id):
        with self._lock:
            return self._errors.pop(session_id, [])

    # -- model rewrite --
    def rewrite(self, model: onnx.ModelProto):
        if not self._warned:
            self._warned = True
            warnings.warn(
                "onnxopt: the native custom-op library is not available; com.onnxopt ops run through "
                "onnxruntime-extensions' Python ops on the numba kernels (correct but slow)",
                RuntimeWarning, stacklevel=3)
        model = _deepcopy(model)
        session = uuid.uuid4().hex
        keys = []
        empties = {}
        self._types = _elem_types(model)
        self._rewrite_graph(model.graph, set(), session, keys, empties, model.graph)
        for name, (dtype, _) in empties.items():
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((0,), dtype), name))
        if not any(o.domain == _FALLBACK_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(_FALLBACK_DOMAIN, 1))
        return model, session, keys

    def _rewrite_graph(self, graph, outer_constants, session, keys, empties, main):
        inputs = {i.name for i in graph.input}
        constants = (set(outer_constants) - inputs) | {t.name for t in graph.initializer if t.name not in inputs}
        constants |= {o for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                      for o in n.output}
        for idx, node in enumerate(graph.node):
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for g in subs:
                    self._rewrite_graph(g, constants, session, keys, empties, main)
            if node.domain != DOMAIN:
                continue
            if node.op_type not in _OP_INPUTS:
                raise ValueError(f"onnxopt: unknown op {DOMAIN}::{node.op_type} (known: {sorted(_OP_INPUTS)})")
            where = f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node"
            spec_inputs = _OP_INPUTS[node.op_type]
            if len(node.input) > len(spec_inputs):
                raise ValueError(f"onnxopt {where}: {len(node.input)} inputs, at most {len(spec_inputs)}")
            names = list(node.input) + [""] * (len(spec_inputs) - len(node.input))
            for i in (0, 1, 2):
                if not names[i]:
                    raise ValueError(f"onnxopt {where}: input {i} ({spec_inputs[i][0]}) is required")
            if names[1] not in constants:
                raise ValueError(
                    f"onnxopt {where}: the weight W (input 1) must be a constant initializer so it can be "
                    "packed once at session creation; it is computed or fed at run time here")
            if node.op_type == "QGemm" and names[6] and names[6] not in constants:
                raise ValueError(f"onnxopt {where}: w_zero_point (input 6) must be a constant initializer")
            present = [bool(n) for n in names]
            for i, (iname, dtype) in enumerate(spec_inputs):
                if not names[i]:
                    names[i] = f"onnxopt_fallback_empty_{np.dtype(dtype).name}"
                    empties[names[i]] = (dtype, None)
            spec = {"op": node.op_type, "where": where, "key": f"{session}/{len(keys)}", "present": present}
            for a in node.attribute:
                v = onnx.helper.get_attribute_value(a)
                spec[a.name] = v.decode() if isinstance(v, bytes) else (list(v) if not np.isscalar(v) else v)
            keys.append(spec["key"])
            fb_op = node.op_type
            if fb_op == "QConv" and self._types.get(node.input[0]) == onnx.TensorProto.UINT8:
                fb_op = "QConvU8"
            new = onnx.helper.make_node(fb_op, names, list(node.output), name=node.name,
                                        domain=_FALLBACK_DOMAIN, spec=json.dumps(spec))
            graph.node[idx].CopyFrom(new)

    # -- the Python ops --
    def _cached(self, key, make):
        with self._lock:
            v = self._packed.get(key)
        if v is None:
            v = make()
            with self._lock:
                v = self._packed.setdefault(key, v)
        return v

    # onnxruntime-extensions aborts the process when a Python op raises, so the ops never do: the
    # error is parked under the session's id, an empty tensor goes out, and InferenceSession.run
    # raises the parked error once ORT returns.
    def _guarded(self, run, spec, *args, out_dtype=np.float32):
        spec = json.loads(spec)
        try:
            return run(self, spec, *args)
        except BaseException as e:  # noqa: BLE001 - must not cross into onnxruntime-extensions
            with self._lock:
                self._errors.setdefault(spec["key"].split("/")[0], []).append(e)
            return np.zeros((0,), out_dtype)

    def _qgemm(self, x, w, w_scale, bias, x_scale, x_zp, w_zp, spec):
        return self._guarded(_run_qgemm, spec, x, w, w_scale, bias, x_scale, x_zp, w_zp)

    def _qconv(self, x, w, w_scale, bias, x_scale, x_zp, residual, y_scale, y_zp, spec):
        return self._guarded(_run_qconv, spec, x, w, w_scale, bias, x_scale, x_zp, residual, y_scale, y_zp,
                             out_dtype=np.uint8 if x.dtype == np.uint8 else np.float32)


def _elem_types(model):
    """Tensor name -> element type over every graph of the model (after shape inference, which our
    schemas take part in), for choosing a fallback op by its input type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the types are a hint; unknown means float
        inferred = model
    types = {}
    for g in _graphs(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
    return types


def _graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _deepcopy(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _present(spec, i, arr):
    return arr if spec["present"][i] else None


def _epilogue_args(spec):
    act = spec.get("activation", "none")
    act = {0: "none", 1: "relu", 2: "clip"}.get(act, act)
    if act != "clip":
        return dict(activation=act)
    return dict(activation=act, clip=(float(spec.get("clip_min", -np.inf)), float(spec.get("clip_max", np.inf))))


def _static_args(spec, x_scale, x_zp):
    if not spec["present"][4]:
        return {}
    zp = int(x_zp.reshape(-1)[0]) if spec["present"][5] else 0
    return dict(x_scale=float(x_scale.reshape(-1)[0]), x_zp=zp)


def _run_qgemm(fb, spec, x, w, w_scale, bias, x_scale, x_zp, w_zp):
    k = fb._kernels
    K, N = w.shape
    if x.ndim < 2 or x.shape[-1] != K:
        raise ValueError(f"onnxopt {spec['where']}: X's last dimension must be K = {K}, got shape {list(x.shape)}")
    packed = fb._cached(spec["key"], lambda: k.pack_weights(
        np.ascontiguousarray(w), None if not spec["present"][6] else np.ascontiguousarray(w_zp)))
    x2 = np.ascontiguousarray(x.reshape(-1, K), dtype=np.float32)
    if x2.shape[0] == 0:
        return np.zeros(x.shape[:-1] + (N,), np.float32)
    y = k.qgemm_f32(x2, packed, np.ascontiguousarray(w_scale.reshape(-1), dtype=np.float32),
                    bias=_present(spec, 3, bias), **_epilogue_args(spec), **_static_args(spec, x_scale, x_zp))
    return np.asarray(y, np.float32).reshape(x.shape[:-1] + (N,))


def _run_qconv(fb, spec, x, w, w_scale, bias, x_scale, x_zp, residual, y_scale, y_zp):
    k = fb._kernels
    M, cg, kh, kw = w.shape
    group = int(spec.get("group", 1))
    if x.ndim != 4 or x.shape[1] != cg * group:
        raise ValueError(f"onnxopt {spec['where']}: X must be NCHW with {cg * group} channels, got {list(x.shape)}")
    strides = [int(v) for v in spec.get("strides", [1, 1])]
    dil = [int(v) for v in spec.get("dilations", [1, 1])]
    pads = _conv_pads(x.shape[2], x.shape[3], kh, kw, strides, dil,
                      [int(v) for v in spec.get("pads", [0, 0, 0, 0])], spec.get("auto_pad", "NOTSET"))
    packed = fb._cached((spec["key"], tuple(pads)), lambda: k.pack_conv_weights(
        np.ascontiguousarray(w), group=group, strides=strides, pads=pads, dilations=dil))
    y = k.qconv2d(np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32), packed,
                      np.ascontiguousarray(w_scale.reshape(-1), dtype=np.float32), bias=_present(spec, 3, bias),
                      residual=_present(spec, 6, residual), **_epilogue_args(spec),
                      **_static_args(spec, x_scale, x_zp), **_output_args(spec, x, y_scale, y_zp))
    return np.asarray(y, np.uint8 if x.dtype == np.uint8 else np.float32)


def _output_args(spec, x, y_scale, y_zp):
    if not spec["present"][7]:
        if x.dtype == np.uint8:
            raise ValueError(f"onnxopt {spec['where']}: a uint8 X gives a uint8 Y, which needs y_scale")
        return {}
    if x.dtype != np.uint8:
        raise ValueError(f"onnxopt {spec['where']}: y_scale is only for a uint8 X")
    zp = int(y_zp.reshape(-1)[0]) if spec["present"][8] else 0
    return dict(y_scale=float(y_scale.reshape(-1)[0]), y_zp=zp)


def _conv_pads(H, W, kh, kw, strides, dil, pads, auto_pad):
    """[top, left, bottom, right] as the native op computes them (SAME_*: the odd pad at the end for
    UPPER, at the beginning for LOWER)."""
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return pads
    out = []
    for size, k, s, d in ((H, kh, strides[0], dil[0]), (W, kw, strides[1], dil[1])):
        total = max(0, (-(-size // s) - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]
