"""onnxopt int8 kernels: one Python face, two bit-identical backends.

Backends
    ``native``  the pybind11 module ``onnxopt._kernels`` (C++; AVX512-VNNI / AVX2 / scalar chosen
                from CPUID, ``ONNXOPT_ISA=scalar|avx2|avx512vnni`` caps it; GIL released).
    ``numba``   the same algorithms in numba (``onnxopt.kernels.numba_backend``).
The default is native when it imports, else numba; ``ONNXOPT_KERNELS=native|numba`` forces one,
``set_backend()`` changes it, and every function takes ``backend=`` for one call.

Numerics (identical in both backends; see csrc/kernels/onnxopt_kernels.h): u8 activations with a
zero point, s8 weights with an optional per-column zero point, int32 accumulation, then
``y = float(acc) * (a_scale * w_scale) (+ bias) -> none|relu|clip`` in float32 without FMA, and
optionally ``q = clamp(rint(y / out_scale) + out_zp, 0, 255)``. Dynamic quantization of float
activations is per row for GEMMs and per image for convolutions.

Threads (native): ``threads=None`` uses the module default, which is 1 (serial) unless changed with
``set_num_threads(n)`` (``n <= 0``: all hardware threads). numba kernels are serial.

Typical use::

    pw = pack_weights(w_int8)                       # w[K, N], once
    y = qgemm_f32(x_f32, pw, w_scale, bias, activation="relu")
"""

from __future__ import annotations

import importlib
import os
import time

import numpy as np

__all__ = [
    "info", "set_backend", "get_backend", "set_num_threads", "warmup",
    "PackedWeights", "PackedConv", "pack_weights", "pack_conv_weights",
    "qgemm_u8", "qgemm_f32", "qconv2d", "quantize_rows_dynamic", "quantize_static",
]

_ACTS = {"none": 0, "relu": 1, "clip": 2}

try:  # the native module is optional
    _native = importlib.import_module("onnxopt._kernels")
    _native_error = None
except ImportError as e:  # pragma: no cover - depends on the build
    _native = None
    _native_error = str(e)

_nb = None  # numba backend module, imported lazily (numba import costs ~0.5 s)
_numba_warmup_s = None


def _numba():
    global _nb
    if _nb is None:
        from . import numba_backend
        _nb = numba_backend
    return _nb


def _default_backend():
    env = os.environ.get("ONNXOPT_KERNELS", "").strip().lower()
    if env in ("native", "numba"):
        if env == "native" and _native is None:
            raise ImportError(f"ONNXOPT_KERNELS=native but onnxopt._kernels is not importable: {_native_error}")
        return env
    return "native" if _native is not None else "numba"


_backend = _default_backend()


def set_backend(name: str) -> None:
    """Select the default backend: "native" or "numba"."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    return _backend


def _check_backend(name):
    if name is None:
        return _backend
    if name not in ("native", "numba"):
        raise ValueError(f"unknown kernels backend {name!r} (native, numba)")
    if name == "native" and _native is None:
        raise RuntimeError(f"native kernels are not available: {_native_error}")
    return name


def set_num_threads(n: int) -> None:
    """Default thread count of native calls (1 = serial, the initial value; <= 0 = all cores)."""
    if _native is not None:
        _native.set_num_threads(int(n))


def warmup() -> float:
    """Compile (or load from cache) every numba kernel on tiny inputs; returns and records seconds."""
    global _numba_warmup_s
    t0 = time.perf_counter()
    w = np.ones((3, 2), np.int8)
    pw = pack_weights(w)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    qgemm_f32(x, pw, 0.5, backend="numba")
    qgemm_f32(x, pw, np.float32(0.5), x_scale=0.1, x_zp=3, backend="numba")
    qgemm_u8(np.ones((2, 3), np.uint8), 1, 0.5, pw, 0.5, out_scale=0.1, backend="numba")
    pc = pack_conv_weights(np.ones((2, 1, 1, 1), np.int8), group=1)
    qconv2d(np.ones((1, 1, 2, 2), np.float32), pc, 0.5, backend="numba")
    quantize_static(x, 0.1, 3, backend="numba")
    _numba_warmup_s = time.perf_counter() - t0
    return _numba_warmup_s


def info() -> dict:
    """Backend in use, native availability, detected and active ISA, numba warm-up seconds."""
    d = {"backend": _backend, "native_available": _native is not None,
         "numba_warmup_s": _numba_warmup_s}
    if _native is not None:
        ni = _native.info()
        d.update(isa=ni["active_isa"], detected_isa=ni["detected_isa"],
                 requested_isa=ni["requested_isa"], default_threads=ni["default_threads"])
    else:
        d.update(isa=None, native_error=_native_error)
    return d


# -------------------------------------------------------------------------------------------------
class PackedWeights:
    """Weights w int8[K, N] (+ optional zero point per column) packed once per backend, lazily."""

    def __init__(self, w, w_zp=None, isa=None):
        w = np.ascontiguousarray(w)
        if w.dtype != np.int8 or w.ndim != 2:
            raise ValueError(f"weights must be int8[K, N], got {w.dtype}{list(w.shape)}")
        self.K, self.N = w.shape
        self.w = w
        zp = np.zeros(self.N, np.int8) if w_zp is None else np.asarray(w_zp)
        if zp.dtype != np.int8:
            raise ValueError("w_zp must be int8")
        self.w_zp = np.ascontiguousarray(np.broadcast_to(zp.reshape(-1), (self.N,)))
        self.isa = isa
        self._native = None
        self._numba = None

    def native(self):
        if self._native is None:
            self._native = _native.pack_weights(self.w, self.w_zp, self.isa)
        return self._native

    def numba(self):
        if self._numba is None:
            self._numba = _numba().pack_weights(self.w, self.w_zp)
        return self._numba

    def __repr__(self):
        return f"<PackedWeights K={self.K} N={self.N} isa={self.isa or 'auto'}>"


def pack_weights(w, w_zp=None, isa=None, backend=None) -> PackedWeights:
    """Pack int8 weights w[K, N] for the GEMMs. w_zp: int8 scalar or [N]. isa: force the native
    micro-kernel ("scalar", "avx2", "avx512vnni"; ValueError if the CPU lacks it)."""
    pw = PackedWeights(w, w_zp, isa)
    if _check_backend(backend) == "native":
        pw.native()
    return pw


def _f32_vec(v, n, what):
    a = np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
    if a.size not in (1, n):
        raise ValueError(f"{what} must be a scalar or have {n} entries, got {a.size}")
    return a


def _act(activation, clip):
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
    if activation == "clip":
        if clip is None:
            raise ValueError('activation="clip" needs clip=(lo, hi)')
        return activation, float(np.float32(clip[0])), float(np.float32(clip[1]))
    return activation, 0.0, 0.0


def _numba_gemm(a_u8, a_zp, a_scale, pw, w_scale, bias, activation, lo, hi, out_scale, out_zp):
    M = a_u8.shape[0]
    N = pw.N
    b, colsum, wzp = pw.numba()
    ws = np.broadcast_to(w_scale, (N,)).astype(np.float32)
    bb = np.zeros(N, np.float32) if bias is None else bias
    requant = out_scale is not None
    out_f = np.empty((0, 0) if requant else (M, N), np.float32)
    out_u = np.empty((M, N) if requant else (0, 0), np.uint8)
    _numba().qgemm_u8_into(a_u8, a_zp, a_scale, b, colsum, wzp, ws, bb, bias is not None,
                           _ACTS[activation], np.float32(lo), np.float32(hi), requant,
                           np.float32(out_scale if requant else 1.0), int(out_zp), out_f, out_u)
    return out_u if requant else out_f


def qgemm_u8(a, a_zp, a_scale, packed: PackedWeights, w_scale, bias=None, activation="none",
             clip=None, out_scale=None, out_zp=0, backend=None, threads=None):
    """C = output_stage((a - a_zp) x (w - w_zp)) for u8 activations a[M, K].

    a_zp (uint8) and a_scale (float32): per tensor (scalar) or per row ([M]). w_scale: scalar or
    [N]. bias: None or float32[N]. activation: "none" | "relu" | "clip" (with clip=(lo, hi)).
    out_scale=None gives float32[M, N]; a float gives requantized uint8[M, N] with out_zp.
    """
    a = np.ascontiguousarray(a)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != packed.K:
        raise ValueError(f"a must be uint8[M, {packed.K}], got {a.dtype}{list(a.shape)}")
    M = a.shape[0]
    zp = np.ascontiguousarray(np.asarray(a_zp, dtype=np.uint8).reshape(-1))
    sc = _f32_vec(a_scale, M, "a_scale")
    if zp.size not in (1, M):
        raise ValueError(f"a_zp must be a scalar or have {M} entries, got {zp.size}")
    ws = _f32_vec(w_scale, packed.N, "w_scale")
    b = None if bias is None else _f32_vec(bias, packed.N, "bias")
    if b is not None and b.size != packed.N:
        raise ValueError("bias must have N entries")
    activation, lo, hi = _act(activation, clip)
    if _check_backend(backend) == "native":
        if zp.size != sc.size:  # native takes both per tensor or both per row
            zp, sc = np.broadcast_to(zp, (M,)).copy(), np.broadcast_to(sc, (M,)).copy()
        return _native.qgemm(a, zp, sc, packed.native(), ws, b, activation, lo, hi,
                             None if out_scale is None else float(np.float32(out_scale)), int(out_zp), threads)
    zp32 = np.broadcast_to(zp.astype(np.int32), (M,)).copy()
    sc32 = np.broadcast_to(sc, (M,)).copy()
    return _numba_gemm(a, zp32, sc32, packed, ws, b, activation, lo, hi, out_scale, out_zp)


def qgemm_f32(x, packed: PackedWeights, w_scale, bias=None, activation="none", clip=None,
              x_scale=None, x_zp=None, backend=None, threads=None):
    """float32 x[M, K] quantized to u8 on the fly and multiplied by packed int8 weights.

    Dynamic per-row quantization unless x_scale (per-tensor static scale, with x_zp, default 0)
    is given. Float32 output [M, N]; bias / activation / clip / w_scale as in qgemm_u8.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != packed.K:
        raise ValueError(f"x must be float32[M, {packed.K}], got {list(x.shape)}")
    ws = _f32_vec(w_scale, packed.N, "w_scale")
    b = None if bias is None else _f32_vec(bias, packed.N, "bias")
    if b is not None and b.size != packed.N:
        raise ValueError("bias must have N entries")
    activation, lo, hi = _act(activation, clip)
    zp = 0 if x_zp is None else int(x_zp)
    if _check_backend(backend) == "native":
        return _native.qgemm_f32(x, packed.native(), ws, b, activation, lo, hi,
                                 None if x_scale is None else float(np.float32(x_scale)), zp, threads)
    nb = _numba()
    M = x.shape[0]
    if x_scale is None:
        q, sc, zps = nb.quantize_rows_dynamic(x)
        zp32, sc32 = zps.astype(np.int32), sc
    else:
        q = nb.quantize_rows_static(x, np.float32(x_scale), zp)
        zp32 = np.full(M, zp, np.int32)
        sc32 = np.full(M, np.float32(x_scale), np.float32)
    return _numba_gemm(q, zp32, sc32, packed, ws, b, activation, lo, hi, None, 0)


def quantize_rows_dynamic(x, backend=None, isa=None):
    """float32 x[M, K] -> (q uint8[M, K], scale float32[M], zp uint8[M]) with the per-row rule."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("x must be 2-D")
    if _check_backend(backend) == "native":
        return _native.quantize_rows_dynamic(x, isa)
    return _numba().quantize_rows_dynamic(x)


def quantize_static(x, scale, zp, backend=None, isa=None):
    """float32 array -> uint8 array of the same shape: clamp(rint(x / scale) + zp, 0, 255)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _check_backend(backend) == "native":
        return _native.quantize_static(x, float(np.float32(scale)), int(zp), isa)
    return _numba().quantize_static(x.reshape(-1), np.float32(scale), int(zp)).reshape(x.shape)


# -------------------------------------------------------------------------------------------------
class PackedConv:
    """Conv weights w int8[M, C/group, kH, kW] with the conv geometry, packed per backend lazily."""

    def __init__(self, w, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), isa=None):
        w = np.ascontiguousarray(w)
        if w.dtype != np.int8 or w.ndim != 4:
            raise ValueError(f"conv weights must be int8[M, C/group, kH, kW], got {w.dtype}{list(w.shape)}")
        self.w = w
        self.group = int(group)
        self.M = w.shape[0]
        self.C = w.shape[1] * self.group
        if self.group <= 0 or self.M % self.group:
            raise ValueError(f"M={self.M} is not divisible by group={group}")
        self.strides = tuple(int(s) for s in strides)
        self.pads = tuple(int(p) for p in pads)  # top, left, bottom, right
        self.dilations = tuple(int(d) for d in dilations)
        if len(self.strides) != 2 or len(self.pads) != 4 or len(self.dilations) != 2:
            raise ValueError("strides/dilations need 2 entries, pads 4 (top, left, bottom, right)")
        if min(self.strides + self.dilations) < 1 or min(self.pads) < 0:
            raise ValueError("strides/dilations must be >= 1 and pads >= 0")
        self.isa = isa
        self._native = None

    def native(self):
        if self._native is None:
            self._native = _native.pack_conv_weights(self.w, self.C, self.group, list(self.strides),
                                                     list(self.pads), list(self.dilations), self.isa)
        return self._native

    def out_shape(self, x_shape):
        N, _, H, W = x_shape
        kH, kW = self.w.shape[2:]
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilations, self.pads
        OH = (H + pt + pb - dh * (kH - 1) - 1) // sh + 1
        OW = (W + pl + pr - dw * (kW - 1) - 1) // sw + 1
        return N, self.M, OH, OW


def pack_conv_weights(w, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), isa=None,
                      backend=None) -> PackedConv:
    """Pack NCHW conv weights w int8[M, C/group, kH, kW]; pads are (top, left, bottom, right)."""
    pc = PackedConv(w, group, strides, pads, dilations, isa)
    if _check_backend(backend) == "native":
        pc.native()
    return pc


def residual_activation(y, residual, activation, lo, hi):
    """act(y + residual) in place, float32, with the kernels' comparison semantics (NaN -> bound)."""
    v = y + residual
    if activation == "relu":
        v = np.where(v > 0, v, np.float32(0))
    elif activation == "clip":
        v = np.where(v > np.float32(lo), v, np.float32(lo))
        v = np.where(v < np.float32(hi), v, np.float32(hi))
    y[...] = v
    return y


def requantize(y, scale, zp):
    """u8 = clamp(rint(y / scale) + zp, 0, 255) in float32 (NaN -> 0), the kernels' output requantization."""
    t = np.rint(y / np.float32(scale)) + np.float32(zp)
    t = np.where(t > 0, t, np.float32(0))
    t = np.where(t < 255, t, np.float32(255))
    return t.astype(np.uint8)


def qconv2d(x, packed: PackedConv, w_scale, bias=None, activation="none", clip=None,
            x_scale=None, x_zp=None, backend=None, threads=None, residual=None, y_scale=None, y_zp=None):
    """int8 conv of float32 x[N, C, H, W] -> float32[N, M, OH, OW], or of uint8 x -> uint8.

    Float x: activations are quantized per tensor, statically with x_scale/x_zp, else dynamically
    per image. uint8 x: already quantized with (x_scale, x_zp), both required; the output is
    requantized to uint8 with (y_scale, y_zp): bit-identical to the float path on the dequantized
    input followed by `requantize`.
    w_scale: scalar or per output channel [M]; bias None or [M]; activation as in qgemm_u8.
    residual: None or float32[N, M, OH, OW], added after the bias and before the activation.
    """
    u8 = np.asarray(x).dtype == np.uint8
    if u8:
        x = np.ascontiguousarray(x)
        if x_scale is None or y_scale is None:
            raise ValueError("uint8 x needs x_scale (and x_zp) and y_scale (and y_zp): input and output quantization")
    else:
        if y_scale is not None:
            raise ValueError("y_scale (a uint8 output) needs a uint8 x")
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != packed.C:
        raise ValueError(f"x must be [N, {packed.C}, H, W], got {list(x.shape)}")
    N, M, OH, OW = packed.out_shape(x.shape)
    if OH <= 0 or OW <= 0:
        raise ValueError("input is smaller than the kernel")
    ws = _f32_vec(w_scale, M, "w_scale")
    b = None if bias is None else _f32_vec(bias, M, "bias")
    if b is not None and b.size != M:
        raise ValueError("bias must have M entries")
    activation, lo, hi = _act(activation, clip)
    zp = 0 if x_zp is None else int(x_zp)
    if residual is not None:
        residual = np.ascontiguousarray(residual, dtype=np.float32)
        if residual.shape != (N, M, OH, OW):
            raise ValueError(f"residual must have the output's shape {[N, M, OH, OW]}, got {list(residual.shape)}")
    if _check_backend(backend) == "native":
        if u8:
            return _native.qconv2d_u8(x, packed.native(), ws, b, activation, lo, hi, float(np.float32(x_scale)), zp,
                                      float(np.float32(y_scale)), 0 if y_zp is None else int(y_zp), threads, residual)
        return _native.qconv2d_f32(x, packed.native(), ws, b, activation, lo, hi,
                                   None if x_scale is None else float(np.float32(x_scale)), zp, threads,
                                   residual)
    if u8:  # the exact round trip: dequantized values quantize back to the same integers
        y = qconv2d((x.astype(np.float32) - np.float32(zp)) * np.float32(x_scale), packed, ws, b, activation,
                    clip, x_scale, zp, backend="numba", residual=residual)
        return requantize(y, y_scale, 0 if y_zp is None else int(y_zp))
    out = np.empty((N, M, OH, OW), np.float32)
    final = activation
    if residual is not None:
        activation = "none"
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = packed.strides, packed.dilations, packed.pads
    _numba().qconv2d_into(x, packed.w, packed.group, sh, sw, pt, pl, pb, pr, dh, dw,
                          x_scale is not None, np.float32(1.0 if x_scale is None else x_scale), zp,
                          np.broadcast_to(ws, (M,)).astype(np.float32),
                          np.zeros(M, np.float32) if b is None else b, b is not None,
                          _ACTS[activation], np.float32(lo), np.float32(hi), out)
    if residual is not None:
        residual_activation(out, residual, final, lo, hi)
    return out
