"""onnxopt.kernels: bit-exact against an int32 numpy reference on every ISA path of this machine,
and native == numba bit for bit. No timing assertions."""

import os
import subprocess
import sys

import numpy as np
import pytest

import onnxopt.kernels as K

F32 = np.float32
NATIVE = K.info()["native_available"]
ISAS = ["scalar", "avx2", "avx512vnni", "amx"]


def _isa_params():
    detected = K.info().get("detected_isa") if NATIVE else None
    out = []
    for isa in ISAS:
        if not NATIVE:
            reason = "native module not built"
        elif ISAS.index(isa) > ISAS.index(detected):
            reason = f"CPU lacks {isa} (detected {detected})"
        else:
            reason = None
        out.append(pytest.param(isa, marks=pytest.mark.skip(reason=reason)) if reason else isa)
    return out


ISA_PARAMS = _isa_params()


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    if a.dtype == np.float32:
        return np.array_equal(a.view(np.int32), b.view(np.int32))
    return np.array_equal(a, b)


def assert_bits(a, b):
    assert bits_equal(a, b), f"max diff {np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))}"


# ---------------------------------------------------------------------------------- reference
def wrap32(v):
    return ((v.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def ref_output_stage(acc, a_scale, w_scale, bias, act, clip, out_scale, out_zp):
    s = (np.asarray(a_scale, F32).reshape(-1, 1) * np.asarray(w_scale, F32).reshape(1, -1)).astype(F32)
    y = wrap32(acc).astype(F32) * s
    if bias is not None:
        y = y + np.asarray(bias, F32)
    if act == "relu":
        y = np.where(y > 0, y, F32(0))
    elif act == "clip":
        lo, hi = F32(clip[0]), F32(clip[1])
        y = np.where(y > lo, y, lo)
        y = np.where(y < hi, y, hi)
    y = y.astype(F32)
    if out_scale is None:
        return y
    t = np.rint(y / F32(out_scale)) + F32(out_zp)
    t = np.where(t > 0, t, F32(0))
    t = np.where(t < 255, t, F32(255))
    return t.astype(np.uint8)


def ref_qgemm(a, a_zp, a_scale, w, w_zp, w_scale, bias=None, act="none", clip=None, out_scale=None, out_zp=0):
    M = a.shape[0]
    azp = np.broadcast_to(np.asarray(a_zp, np.int64).reshape(-1), (M,))
    asc = np.broadcast_to(np.asarray(a_scale, F32).reshape(-1), (M,))
    wzp = np.zeros(w.shape[1], np.int64) if w_zp is None else np.asarray(w_zp, np.int64)
    acc = (a.astype(np.int64) - azp[:, None]) @ (w.astype(np.int64) - wzp[None, :])
    return ref_output_stage(acc, asc, np.broadcast_to(np.asarray(w_scale, F32), (w.shape[1],)), bias, act, clip,
                            out_scale, out_zp)


def ref_dynamic_params(lo, hi):
    lo, hi = F32(min(F32(0), lo)), F32(max(F32(0), hi))
    s = F32(1) if hi == lo else F32((hi - lo) / F32(255))
    z = np.rint(F32(-lo / s))
    z = F32(min(max(z, F32(0)), F32(255)))
    return s, z


def ref_quant(x, s, z):
    t = np.rint(np.asarray(x, F32) / F32(s)) + F32(z)
    t = np.where(t > 0, t, F32(0))
    t = np.where(t < 255, t, F32(255))
    return t.astype(np.uint8)


def ref_quant_rows(x):
    q = np.empty(x.shape, np.uint8)
    sc = np.empty(x.shape[0], F32)
    zp = np.empty(x.shape[0], np.uint8)
    for m in range(x.shape[0]):
        lo = x[m].min() if x.shape[1] else F32(0)
        hi = x[m].max() if x.shape[1] else F32(0)
        s, z = ref_dynamic_params(lo, hi)
        q[m], sc[m], zp[m] = ref_quant(x[m], s, z), s, np.uint8(z)
    return q, sc, zp


def ref_qconv(x, w, w_scale, bias, group, strides, pads, dil, act="none", clip=None, x_scale=None, x_zp=0):
    N, C, H, W = x.shape
    M, Cg, kH, kW = w.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dil, pads
    OH = (H + pt + pb - dh * (kH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (kW - 1) - 1) // sw + 1
    Mg = M // group
    ws = np.broadcast_to(np.asarray(w_scale, F32), (M,))
    out = np.empty((N, M, OH, OW), F32)
    for n in range(N):
        if x_scale is None:
            s, z = ref_dynamic_params(x[n].min(), x[n].max())
        else:
            s, z = F32(x_scale), F32(x_zp)
        xq = np.full((C, H + pt + pb, W + pl + pr), np.uint8(z), np.uint8)
        xq[:, pt:pt + H, pl:pl + W] = ref_quant(x[n], s, z)
        for g in range(group):
            cols = []
            for c in range(Cg):
                for i in range(kH):
                    for j in range(kW):
                        h0, w0 = i * dh, j * dw
                        cols.append(xq[g * Cg + c, h0:h0 + sh * (OH - 1) + 1:sh, w0:w0 + sw * (OW - 1) + 1:sw].reshape(-1))
            a = np.stack(cols, axis=1).astype(np.int64) - np.int64(z)  # [P, Kg]
            wg = w[g * Mg:(g + 1) * Mg].reshape(Mg, -1).astype(np.int64).T  # [Kg, Mg]
            y = ref_output_stage(a @ wg, np.full(a.shape[0], s, F32), ws[g * Mg:(g + 1) * Mg],
                                 None if bias is None else bias[g * Mg:(g + 1) * Mg], act, clip, None, 0)
            out[n, g * Mg:(g + 1) * Mg] = y.T.reshape(Mg, OH, OW)
    return out


# ---------------------------------------------------------------------------------- cases
GEMM_SHAPES = [(1, 1, 1), (1, 5, 1), (1, 1, 17), (3, 1, 5), (7, 13, 29), (6, 64, 64), (13, 67, 130),
               (2, 300, 33), (5, 129, 16), (19, 1031, 47), (1, 768, 80),
               # K a multiple of 64: full micro-tiles read A in place, the ragged rest is copied
               (70, 128, 40), (33, 64, 17), (64, 192, 70)]

# (activation, clip, bias, per-column w_scale, w_zp, per-row a, requant)
CONFIGS = [
    ("none", None, False, False, False, False, False),
    ("none", None, True, True, False, True, False),
    ("relu", None, True, True, True, True, False),
    ("clip", (-0.75, 0.5), True, False, True, False, False),
    ("none", None, True, True, True, True, True),
    ("relu", None, False, False, False, False, True),
    ("clip", (-3.0, 2.0), True, True, False, True, True),
]


def make_gemm_case(rng, M, Kd, N, cfg):
    act, clip, has_bias, per_col, has_wzp, per_row, requant = cfg
    a = rng.integers(0, 256, (M, Kd)).astype(np.uint8)
    w = rng.integers(-128, 128, (Kd, N)).astype(np.int8)
    w_zp = rng.integers(-3, 4, N).astype(np.int8) if has_wzp else None
    a_zp = rng.integers(0, 256, M).astype(np.uint8) if per_row else np.uint8(rng.integers(0, 256))
    a_scale = (rng.random(M) * 0.01 + 1e-4).astype(F32) if per_row else F32(0.003)
    w_scale = (rng.random(N) * 0.01 + 1e-4).astype(F32) if per_col else F32(0.0021)
    bias = rng.standard_normal(N).astype(F32) if has_bias else None
    out = (F32(0.05), 117) if requant else (None, 0)
    return dict(a=a, a_zp=a_zp, a_scale=a_scale, w=w, w_zp=w_zp, w_scale=w_scale, bias=bias, act=act, clip=clip,
                out_scale=out[0], out_zp=out[1])


def run_qgemm(c, pw, backend=None, threads=None):
    return K.qgemm_u8(c["a"], c["a_zp"], c["a_scale"], pw, c["w_scale"], c["bias"], c["act"], c["clip"],
                      c["out_scale"], c["out_zp"], backend=backend, threads=threads)


def ref_of(c):
    return ref_qgemm(c["a"], c["a_zp"], c["a_scale"], c["w"], c["w_zp"], c["w_scale"], c["bias"], c["act"],
                     c["clip"], c["out_scale"], c["out_zp"])


# ---------------------------------------------------------------------------------- tests
def test_info_reports_backend_and_isa():
    i = K.info()
    assert i["backend"] in ("native", "numba")
    if NATIVE:
        assert i["isa"] in ISAS and i["detected_isa"] in ISAS
        assert ISAS.index(i["isa"]) <= ISAS.index(i["detected_isa"])


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qgemm_u8_bit_exact(isa, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    for cfg in CONFIGS:
        c = make_gemm_case(rng, *shape, cfg)
        pw = K.pack_weights(c["w"], c["w_zp"], isa=isa)
        assert pw.native().isa == isa
        assert_bits(run_qgemm(c, pw, backend="native"), ref_of(c))


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_qgemm_extremes_no_saturation(isa):
    # 255 * -128 + 255 * -128 overflows int16: the AVX2 vpmaddubsw trap. Large K makes totals big.
    for wv in (-128, 127, -127):
        for Kd in (64, 1027, 4096):
            a = np.full((5, Kd), 255, np.uint8)
            a[1] = 0
            a[2, ::2] = 0
            w = np.full((Kd, 33), wv, np.int8)
            w[:, 1::3] = -128
            w[:, 2::3] = 127
            c = dict(a=a, a_zp=np.uint8(0), a_scale=F32(1), w=w, w_zp=None, w_scale=F32(1), bias=None, act="none",
                     clip=None, out_scale=None, out_zp=0)
            pw = K.pack_weights(w, isa=isa)
            got = run_qgemm(c, pw, backend="native")
            exact = a.astype(np.int64) @ w.astype(np.int64)
            assert np.array_equal(got, exact.astype(F32))
            assert_bits(got, ref_of(c))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("static", [False, True])
def test_qgemm_f32_bit_exact(isa, static):
    rng = np.random.default_rng(7)
    for (M, Kd, N) in [(1, 1, 1), (4, 37, 19), (9, 300, 70), (1, 768, 64), (17, 130, 129)]:
        x = (rng.standard_normal((M, Kd)) * 3).astype(F32)
        if M > 2:
            x[1] = np.abs(x[1])  # all-positive row: lo = 0
            x[2] = 0.0           # all-zero row: scale = 1
        w = rng.integers(-128, 128, (Kd, N)).astype(np.int8)
        w_zp = rng.integers(-2, 3, N).astype(np.int8)
        ws = (rng.random(N) * 0.01).astype(F32)
        bias = rng.standard_normal(N).astype(F32)
        pw = K.pack_weights(w, w_zp, isa=isa)
        for act, clip in (("none", None), ("relu", None), ("clip", (-1.0, 1.5))):
            if static:
                xs, xz = F32(0.05), 131
                q = ref_quant(x, xs, xz)
                ref = ref_qgemm(q, xz, xs, w, w_zp, ws, bias, act, clip)
            else:
                q, sc, zp = ref_quant_rows(x)
                ref = ref_qgemm(q, zp, sc, w, w_zp, ws, bias, act, clip)
                xs = xz = None
            got = K.qgemm_f32(x, pw, ws, bias, act, clip, x_scale=xs, x_zp=xz, backend="native")
            assert_bits(got, ref)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_quantize_near_ties(isa):
    # x within a few ulps of (n + 0.5) * s: the AVX-512 path multiplies by 1/s and must fall back to
    # the division exactly where that could round differently; also huge/tiny scales and specials.
    rng = np.random.default_rng(31)
    for s in (F32(0.37), F32(1 / 3), F32(0.0123457), F32(7.1e-3), F32(1.0), F32(3e-20), F32(2e19), F32(1e-30),
              F32(1e30), F32(0.999999), np.nextafter(F32(0.1), F32(1))):
        n = rng.integers(-300, 300, 4000).astype(F32)
        x = ((n + F32(0.5)) * s).astype(F32)
        steps = rng.integers(-3, 4, x.size)
        x = np.array([v if k == 0 else (np.nextafter(v, F32(np.inf) if k > 0 else F32(-np.inf)) if abs(k) == 1 else
                      np.nextafter(np.nextafter(v, F32(np.copysign(np.inf, k))), F32(np.copysign(np.inf, k))))
                      for v, k in zip(x, steps)], F32)
        # products near and beyond the int32 range (the fast path converts x / s to int32), NaN
        big = np.array([2.0 ** 31 - 128, 2.0 ** 31, -(2.0 ** 31), -(2.0 ** 31) - 256, 2.0 ** 30, 2047.5, -2047.5,
                        1e12, -1e12], np.float64) * np.float64(s)
        x = np.concatenate([x, (rng.standard_normal(997) * 100 * s).astype(F32),
                            np.array([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, np.inf, -np.inf, np.nan], F32),
                            np.clip(big, -3e38, 3e38).astype(F32)])
        for z in (0, 128, 255):
            assert_bits(K.quantize_static(x, s, z, isa=isa), ref_quant(x, s, z))
    x = (rng.standard_normal((5, 1001)) * 3).astype(F32)
    x[1] = np.round(x[1] * 8) / 8  # many exact ties after scaling by powers of two
    q, sc, zp = K.quantize_rows_dynamic(x, isa=isa)
    rq, rsc, rzp = ref_quant_rows(x)
    assert_bits(q, rq)
    for m in range(x.shape[0]):  # exact half-integers of each row's own scale
        xt = ((np.arange(-200, 200, dtype=F32) + F32(0.5)) * sc[m]).astype(F32)
        assert_bits(K.quantize_static(xt, sc[m], zp[m], isa=isa), ref_quant(xt, sc[m], zp[m]))

@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_quantize_bit_exact(isa):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 77)) * 2).astype(F32)
    x[0] = 0
    x[1] = np.abs(x[1]) + 1
    x[2] = -np.abs(x[2]) - 1
    x[3, :8] = [0.5, 1.5, 2.5, -0.5, -1.5, 254.5, 300.0, -300.0]  # ties to even and saturation
    x[3, 8:] = 0
    q, sc, zp = K.quantize_rows_dynamic(x, isa=isa)
    rq, rsc, rzp = ref_quant_rows(x)
    assert_bits(q, rq)
    assert_bits(sc, rsc)
    assert_bits(zp, rzp)
    for s, z in ((F32(1.0), 0), (F32(1.0), 128), (F32(0.37), 3)):
        assert_bits(K.quantize_static(x, s, z, isa=isa), ref_quant(x, s, z))


CONV_CASES = [
    # C, M, group, k, strides, pads (t, l, b, r), dilations, H, W
    dict(C=4, M=6, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=9, W=11),
    dict(C=6, M=4, group=2, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=10, W=9),
    dict(C=8, M=8, group=8, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=7, W=13),  # depthwise
    dict(C=4, M=8, group=4, k=(3, 3), strides=(2, 2), pads=(0, 1, 2, 1), dil=(1, 1), H=11, W=8),  # dw x2
    dict(C=8, M=8, group=8, k=(5, 5), strides=(3, 1), pads=(2, 0, 1, 3), dil=(2, 1), H=14, W=9),  # dw stride 3
    dict(C=3, M=5, group=1, k=(3, 2), strides=(1, 2), pads=(0, 1, 2, 1), dil=(2, 2), H=12, W=10),
    dict(C=16, M=20, group=1, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=5, W=7),  # 1x1 direct
    dict(C=16, M=17, group=1, k=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), H=6, W=7),
    dict(C=12, M=6, group=3, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=4, W=4),
    dict(C=33, M=70, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=8, W=8),
    # direct (implicit GEMM) path: >64 channels (two AMX channel blocks), ragged M, dilation, 1x1 wide C
    dict(C=70, M=40, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=6, W=9),
    dict(C=10, M=9, group=1, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), H=7, W=19),
    dict(C=130, M=33, group=1, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=3, W=17),
    dict(C=8, M=6, group=2, k=(2, 3), strides=(1, 1), pads=(0, 2, 1, 0), dil=(1, 1), H=5, W=6),
    # depthwise vpdpbusd path: rows wider than a vector with tails, row blocks with remainders,
    # channel multiplier, stride 2, kW = 4, height dilation
    dict(C=6, M=12, group=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=11, W=37),
    dict(C=5, M=5, group=5, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=13, W=45),
    dict(C=3, M=3, group=3, k=(4, 4), strides=(1, 1), pads=(2, 1, 1, 2), dil=(1, 1), H=9, W=20),
    dict(C=4, M=4, group=4, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 1), H=8, W=21),
    # 1x1 strided convs on the direct path over the subsampled image: >64 channels, uneven strides,
    # grouped
    dict(C=70, M=40, group=1, k=(1, 1), strides=(2, 3), pads=(0, 0, 0, 0), dil=(1, 1), H=13, W=17),
    dict(C=12, M=8, group=2, k=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), H=9, W=9),
    # stride 2 with few input channels: space-to-depth onto the direct kernel (odd/even sizes,
    # odd and even kernels, asymmetric pads, the 16-channel limit) and just past it
    dict(C=3, M=32, group=1, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=17, W=16),
    dict(C=3, M=20, group=1, k=(7, 7), strides=(2, 2), pads=(3, 3, 3, 3), dil=(1, 1), H=23, W=20),
    dict(C=5, M=9, group=1, k=(2, 2), strides=(2, 2), pads=(0, 1, 1, 0), dil=(1, 1), H=9, W=12),
    dict(C=16, M=33, group=1, k=(5, 4), strides=(2, 2), pads=(2, 0, 1, 3), dil=(1, 1), H=13, W=11),
    dict(C=17, M=8, group=1, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=9, W=9),
    # im2col from the pixel-interleaved image (<= 4 channels, group 1, kW <= 7; height dilation
    # and strides allowed): kernel rows of 12 and 24 bytes, a 3-channel 7x7 stem above
    dict(C=2, M=7, group=1, k=(5, 3), strides=(2, 1), pads=(2, 1, 0, 1), dil=(2, 1), H=15, W=11),
    dict(C=4, M=18, group=1, k=(2, 6), strides=(1, 3), pads=(0, 2, 1, 3), dil=(1, 1), H=7, W=20),
    # AMX direct kernel with 17..63 channels per group (one zero-padded 64-channel block)
    dict(C=24, M=19, group=1, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=9, W=10),
    dict(C=48, M=34, group=2, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), H=8, W=9),
    # images large enough for the direct kernel on AVX512-VNNI (direct_pays: at least 85% of its
    # computed pixels are outputs; the small images above take the im2col GEMM with weights
    # repacked from the direct layout): ragged M, dilation, groups, strided 1x1
    dict(C=70, M=40, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=15, W=30),
    dict(C=10, M=9, group=1, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), H=13, W=44),
    dict(C=130, M=33, group=1, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=9, W=16),
    dict(C=70, M=40, group=1, k=(1, 1), strides=(2, 3), pads=(0, 0, 0, 0), dil=(1, 1), H=29, W=49),
    dict(C=8, M=6, group=2, k=(2, 3), strides=(1, 1), pads=(0, 2, 1, 0), dil=(1, 1), H=12, W=44),
    dict(C=20, M=17, group=1, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), H=10, W=8),  # 48 + 32 pixels
]


def make_conv_case(rng, cs, N=2):
    x = (rng.standard_normal((N, cs["C"], cs["H"], cs["W"])) * 2).astype(F32)
    w = rng.integers(-128, 128, (cs["M"], cs["C"] // cs["group"]) + cs["k"]).astype(np.int8)
    ws = (rng.random(cs["M"]) * 0.01).astype(F32)
    bias = rng.standard_normal(cs["M"]).astype(F32)
    return x, w, ws, bias


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_qconv2d_bit_exact(isa, ci):
    cs = CONV_CASES[ci]
    rng = np.random.default_rng(100 + ci)
    x, w, ws, bias = make_conv_case(rng, cs)
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], isa=isa)
    for act, clip, b, xs, per_ch in (("none", None, None, None, True), ("relu", None, bias, None, False),
                                     ("clip", (-0.5, 0.8), bias, 0.04, True)):
        wsc = ws if per_ch else ws[0]
        got = K.qconv2d(x, pc, wsc, b, act, clip, x_scale=xs, x_zp=None if xs is None else 120, backend="native")
        ref = ref_qconv(x, w, wsc, b, cs["group"], cs["strides"], cs["pads"], cs["dil"], act, clip, xs, 120)
        assert_bits(got, ref)


AVX2_PARAM = [p for p in ISA_PARAMS if (p if isinstance(p, str) else p.values[0]) == "avx2"]


@pytest.mark.parametrize("isa", AVX2_PARAM)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qgemm_avx2_u8_kernel_bit_exact(isa, shape):
    # 7-bit weights: no k-pair can saturate vpmaddubsw, so pack_weights picks the u8 kernel
    rng = np.random.default_rng(7 + hash(shape) % 2**31)
    for cfg in CONFIGS:
        c = make_gemm_case(rng, *shape, cfg)
        c["w"] = rng.integers(-64, 64, c["w"].shape).astype(np.int8)
        pw = K.pack_weights(c["w"], c["w_zp"], isa=isa)
        assert pw.native().kernel == "avx2-u8"
        assert_bits(run_qgemm(c, pw, backend="native"), ref_of(c))


@pytest.mark.parametrize("isa", AVX2_PARAM)
def test_avx2_kernel_choice_at_the_int16_boundary(isa):
    # k-pairs summing to +-128 (255 * 128 = 32640 fits int16) keep the u8 kernel; one pair past it
    # anywhere (odd K: the last row pairs with a zero) selects the widened kernel; both exact with
    # all activations at 255 (and at 0 / 255 alternating)
    Kd, N = 33, 19
    a = np.full((7, Kd), 255, np.uint8)
    a[1] = 0
    a[2, ::2] = 0
    for pair, kernel in (((127, 1), "avx2-u8"), ((-128, 0), "avx2-u8"), ((-64, -64), "avx2-u8"),
                         ((100, 28), "avx2-u8"), ((127, 2), "avx2-s16"), ((-128, -1), "avx2-s16"),
                         ((-65, -64), "avx2-s16")):
        w = np.zeros((Kd, N), np.int8)
        w[0:32:2, :] = pair[0]
        w[1:32:2, :] = pair[1]
        w[32, :] = -128  # pairs with the zero padding
        w[:, 3] = np.resize(np.array([64, -64, 63, -63], np.int8), Kd)
        pw = K.pack_weights(w, isa=isa)
        assert pw.native().kernel == kernel, pair
        got = K.qgemm_u8(a, np.uint8(0), F32(1), pw, F32(1))
        assert np.array_equal(got, (a.astype(np.int64) @ w.astype(np.int64)).astype(F32)), pair
    w = np.zeros((Kd, N), np.int8)
    w[0:32:2, :], w[1:32:2, :] = 64, 64
    w[4, 7], w[5, 7] = 127, 2  # one column, one pair past the bound
    assert K.pack_weights(w, isa=isa).native().kernel == "avx2-s16"


@pytest.mark.parametrize("isa", AVX2_PARAM)
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_qconv2d_avx2_u8_kernel_bit_exact(isa, ci):
    cs = CONV_CASES[ci]
    rng = np.random.default_rng(300 + ci)
    x, w, ws, bias = make_conv_case(rng, cs)
    w = rng.integers(-64, 64, w.shape).astype(np.int8)
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], isa=isa)
    for act, clip, b, xs in (("none", None, None, None), ("clip", (-0.5, 0.8), bias, 0.04)):
        got = K.qconv2d(x, pc, ws, b, act, clip, x_scale=xs, x_zp=None if xs is None else 120, backend="native")
        ref = ref_qconv(x, w, ws, b, cs["group"], cs["strides"], cs["pads"], cs["dil"], act, clip, xs, 120)
        assert_bits(got, ref)


def ref_residual(y, r, act, clip):
    v = (y + r).astype(F32)
    if act == "relu":
        return np.where(v > 0, v, F32(0))
    if act == "clip":
        v = np.where(v > F32(clip[0]), v, F32(clip[0]))
        return np.where(v < F32(clip[1]), v, F32(clip[1]))
    return v


def make_residual(rng, shape):
    r = (rng.standard_normal(shape) * 3).astype(F32)
    flat = r.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[2::13] = 1e30
    flat[3::17] = -np.inf
    return r


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_qconv2d_residual_bit_exact(isa, ci):
    """The fused residual: act(conv + bias + residual) on every path (direct, depthwise, im2col, 1x1)."""
    cs = CONV_CASES[ci]
    rng = np.random.default_rng(300 + ci)
    x, w, ws, bias = make_conv_case(rng, cs)
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], isa=isa)
    for act, clip, b, xs in (("relu", None, bias, None), ("clip", (-0.5, 0.8), None, 0.04), ("none", None, bias, 0.1)):
        pre = ref_qconv(x, w, ws, b, cs["group"], cs["strides"], cs["pads"], cs["dil"], "none", None, xs, 120)
        r = make_residual(rng, pre.shape)
        r.reshape(-1)[4::19] = -pre.reshape(-1)[4::19]  # exact cancellation: +0 / -0 through the activation
        got = K.qconv2d(x, pc, ws, b, act, clip, x_scale=xs, x_zp=None if xs is None else 120, backend="native",
                        residual=r)
        assert_bits(got, ref_residual(pre, r, act, clip))
        assert_bits(K.qconv2d(x, pc, ws, b, act, clip, x_scale=xs, x_zp=None if xs is None else 120,
                              backend="numba", residual=r), got)


def ref_requant(y, s, z):
    t = np.rint(y / F32(s)) + F32(z)
    t = np.where(t > 0, t, F32(0))
    return np.where(t < 255, t, F32(255)).astype(np.uint8)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_qconv2d_u8_in_out_bit_exact(isa, ci):
    """u8 activations in and out: the float path on the dequantized input, then requantized."""
    cs = CONV_CASES[ci]
    rng = np.random.default_rng(400 + ci)
    _, w, ws, bias = make_conv_case(rng, cs)
    x = rng.integers(0, 256, (2, cs["C"], cs["H"], cs["W"])).astype(np.uint8)
    x.reshape(-1)[::5] = 0
    x.reshape(-1)[1::7] = 255
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], isa=isa)
    for act, clip, b, xs, xz, yk, yz, res in (("relu", None, bias, 0.05, 128, 240, 0, False),
                                              ("clip", (-0.5, 0.8), None, 0.02, 3, 30, 120, False),
                                              ("none", None, bias, 0.1, 250, 120, 128, True)):
        xf = (x.astype(F32) - F32(xz)) * F32(xs)
        pre = ref_qconv(xf, w, ws, b, cs["group"], cs["strides"], cs["pads"], cs["dil"], "none" if res else act,
                        clip, xs, xz)
        r = make_residual(rng, pre.shape) if res else None
        if res:
            r.reshape(-1)[2::13] = 1.0  # no inf here: keep the requantized values informative
            r.reshape(-1)[3::17] = -2.0
        yf = ref_residual(pre, r, act, clip) if res else pre
        ys = F32(max(np.percentile(np.abs(pre), 90), 1e-3) / yk)  # output scale that spans the data
        ref = ref_requant(yf, ys, yz)
        assert np.count_nonzero((ref > 0) & (ref < 255)) >= ref.size // 10  # saturation does not hide everything
        got = K.qconv2d(x, pc, ws, b, act, clip, x_scale=xs, x_zp=xz, y_scale=ys, y_zp=yz, backend="native",
                        residual=r)
        assert got.dtype == np.uint8
        assert_bits(got, ref)
        assert_bits(K.qconv2d(x, pc, ws, b, act, clip, x_scale=xs, x_zp=xz, y_scale=ys, y_zp=yz, backend="numba",
                              residual=r), got)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_qconv2d_u8_activation_folded_at_ties(isa):
    """The AVX-512 output stages fold Relu/Clip into the requantization's clamp; exact also when a
    clip bound or an output lands exactly on a rounding tie (power-of-two output scale: y / s is
    exact) and for a Clip whose bounds are crossed (lo > hi gives q(hi) everywhere)."""
    rng = np.random.default_rng(77)
    ys = F32(2.0 ** -6)
    for ci in (0, 3, 6, 9, 13, 19, 25):  # direct, depthwise, 1x1, AMX blocks, im2col paths
        cs = CONV_CASES[ci]
        _, w, ws, bias = make_conv_case(rng, cs)
        ws = np.full_like(ws, F32(2.0 ** -9))  # products on a grid of 2^-9 * 2^-7: many exact ties
        x = rng.integers(0, 256, (2, cs["C"], cs["H"], cs["W"])).astype(np.uint8)
        pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], isa=isa)
        for act, clip, yz in (("clip", (F32(2.5) * ys, F32(200.5) * ys), 5), ("relu", None, 251),
                              ("clip", (F32(-3.5) * ys, F32(-0.5) * ys), 9), ("clip", (F32(1.0), F32(0.5)), 0)):
            xf = (x.astype(F32) - F32(3)) * F32(2.0 ** -7)
            yf = ref_qconv(xf, w, ws, None, cs["group"], cs["strides"], cs["pads"], cs["dil"], act, clip,
                           F32(2.0 ** -7), 3)
            got = K.qconv2d(x, pc, ws, None, act, clip, x_scale=F32(2.0 ** -7), x_zp=3, y_scale=ys, y_zp=yz,
                            backend="native")
            assert_bits(got, ref_requant(yf, ys, yz))


def test_qconv2d_u8_threads_and_argument_checks():
    rng = np.random.default_rng(13)
    for cs in (dict(C=64, M=96, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=30, W=30),
               dict(C=32, M=64, group=1, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=40, W=40),
               dict(C=96, M=96, group=96, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=20, W=20)):
        _, w, ws, bias = make_conv_case(rng, cs, N=1)
        x = rng.integers(0, 256, (1, cs["C"], cs["H"], cs["W"])).astype(np.uint8)
        pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"])
        one = K.qconv2d(x, pc, ws, bias, "relu", x_scale=0.02, x_zp=100, y_scale=0.05, y_zp=7, threads=1)
        if NATIVE:
            assert_bits(K.qconv2d(x, pc, ws, bias, "relu", x_scale=0.02, x_zp=100, y_scale=0.05, y_zp=7, threads=2), one)
    with pytest.raises(ValueError, match="y_scale"):
        K.qconv2d(x, pc, ws, bias, x_scale=0.02, x_zp=100)
    with pytest.raises(ValueError, match="uint8 x"):
        K.qconv2d(x.astype(F32), pc, ws, bias, x_scale=0.02, x_zp=100, y_scale=0.1)


def test_qconv2d_residual_threads_and_shape_check():
    rng = np.random.default_rng(12)
    # a direct-path conv big enough to be split into pixel x channel tasks, and a strided (im2col) one
    for cs in (dict(C=64, M=96, group=1, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), H=30, W=30),
               dict(C=32, M=64, group=1, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), H=40, W=40)):
        x, w, ws, bias = make_conv_case(rng, cs, N=1)
        pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"])
        pre = K.qconv2d(x, pc, ws, bias)
        r = make_residual(rng, pre.shape)
        one = K.qconv2d(x, pc, ws, bias, "relu", residual=r, threads=1)
        assert_bits(one, ref_residual(pre, r, "relu", None))
        if NATIVE:
            assert_bits(K.qconv2d(x, pc, ws, bias, "relu", residual=r, threads=2), one)
        with pytest.raises(ValueError, match="residual"):
            K.qconv2d(x, pc, ws, bias, "relu", residual=r[:, :-1])


def test_threads_do_not_change_results():
    if not NATIVE:
        pytest.skip("native module not built")
    rng = np.random.default_rng(11)
    # the last two are big enough (> 2 x 2^23 MACs) to be split into tasks by rows / by columns
    for (M, Kd, N) in [(1, 300, 200), (16, 64, 700), (100, 129, 70), (200, 700, 300), (33, 2048, 1000)]:
        c = make_gemm_case(rng, M, Kd, N, CONFIGS[2])
        pw = K.pack_weights(c["w"], c["w_zp"])
        assert_bits(run_qgemm(c, pw, threads=2), run_qgemm(c, pw, threads=1))
        x = rng.standard_normal((M, Kd)).astype(F32)
        assert_bits(K.qgemm_f32(x, pw, c["w_scale"], threads=2), K.qgemm_f32(x, pw, c["w_scale"], threads=1))
    x, w, ws, bias = make_conv_case(rng, CONV_CASES[0])
    for g in (1, 2):
        pc = K.pack_conv_weights(w[:, :4 // g], g, (1, 1), (1, 1, 1, 1))
        assert_bits(K.qconv2d(x, pc, ws, bias, threads=2), K.qconv2d(x, pc, ws, bias, threads=1))


# ---------------------------------------------------------------------------------- native vs numba
needs_native = pytest.mark.skipif(not NATIVE, reason="native module not built")


@needs_native
@pytest.mark.parametrize("shape", [(1, 5, 1), (7, 13, 29), (13, 67, 130), (5, 1031, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_native_numba_agree_gemm(shape):
    rng = np.random.default_rng(5)
    for cfg in CONFIGS:
        c = make_gemm_case(rng, *shape, cfg)
        pw = K.pack_weights(c["w"], c["w_zp"])
        assert_bits(run_qgemm(c, pw, backend="native"), run_qgemm(c, pw, backend="numba"))
        x = (rng.standard_normal(c["a"].shape) * 4).astype(F32)
        for xs, xz in ((None, None), (0.03, 77)):
            args = (x, pw, c["w_scale"], c["bias"], c["act"], c["clip"], xs, xz)
            assert_bits(K.qgemm_f32(*args, backend="native"), K.qgemm_f32(*args, backend="numba"))


@needs_native
def test_native_numba_agree_quantize():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((5, 53)) * 10).astype(F32)
    x[0] = 0
    for a, b in zip(K.quantize_rows_dynamic(x, backend="native"), K.quantize_rows_dynamic(x, backend="numba")):
        assert_bits(a, b)
    assert_bits(K.quantize_static(x, 0.1, 9, backend="native"), K.quantize_static(x, 0.1, 9, backend="numba"))


@needs_native
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_native_numba_agree_conv(ci):
    cs = CONV_CASES[ci]
    rng = np.random.default_rng(200 + ci)
    x, w, ws, bias = make_conv_case(rng, cs)
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"])
    for act, clip, b, xs in (("relu", None, bias, None), ("clip", (-0.5, 0.8), None, 0.04)):
        args = (x, pc, ws, b, act, clip, xs, None if xs is None else 99)
        assert_bits(K.qconv2d(*args, backend="native"), K.qconv2d(*args, backend="numba"))


def test_numba_matches_reference():
    rng = np.random.default_rng(21)
    c = make_gemm_case(rng, 9, 70, 33, CONFIGS[4])
    pw = K.pack_weights(c["w"], c["w_zp"], backend="numba")
    assert_bits(run_qgemm(c, pw, backend="numba"), ref_of(c))
    cs = CONV_CASES[3]
    x, w, ws, bias = make_conv_case(rng, cs)
    pc = K.pack_conv_weights(w, cs["group"], cs["strides"], cs["pads"], cs["dil"], backend="numba")
    assert_bits(K.qconv2d(x, pc, ws, bias, "relu", backend="numba"),
                ref_qconv(x, w, ws, bias, cs["group"], cs["strides"], cs["pads"], cs["dil"], "relu"))


# ---------------------------------------------------------------------------------- errors / env
@needs_native
def test_bad_arguments_raise():
    w = np.ones((4, 3), np.int8)
    with pytest.raises(ValueError):
        K.pack_weights(w, isa="sse9")
    with pytest.raises(ValueError):
        K.pack_weights(w.astype(np.float32))
    pw = K.pack_weights(w)
    with pytest.raises(ValueError):
        K.qgemm_u8(np.ones((2, 5), np.uint8), 0, 1.0, pw, 1.0)
    with pytest.raises(ValueError):
        K.qgemm_f32(np.ones((2, 4), np.float32), pw, np.ones(2, np.float32))
    with pytest.raises(ValueError):
        K.qgemm_f32(np.ones((2, 4), np.float32), pw, 1.0, activation="gelu")
    with pytest.raises(ValueError):
        K.qgemm_f32(np.ones((2, 4), np.float32), pw, 1.0, activation="clip")
    with pytest.raises(ValueError):
        K.set_backend("cuda")
    pc = K.pack_conv_weights(np.ones((2, 1, 3, 3), np.int8))
    with pytest.raises(ValueError):
        K.qconv2d(np.ones((1, 1, 2, 2), np.float32), pc, 1.0)  # smaller than the kernel


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_env_forces_isa(isa):
    code = "import onnxopt.kernels as K; i = K.info(); print(i['isa'], i['detected_isa'])"
    env = dict(os.environ, ONNXOPT_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    active, detected = out.split()
    expect = isa if ISAS.index(isa) <= ISAS.index(detected) else detected  # capped at the CPU
    assert active == expect


def test_env_forces_numba_backend():
    code = "import onnxopt.kernels as K; print(K.info()['backend'])"
    env = dict(os.environ, ONNXOPT_KERNELS="numba")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "numba"


# ---------------------------------------------------------------------------------- code generation
# tools/check_codegen.py counts vpdpbusd / vpmaddwd, loop-carried zmm moves and stack stores in the
# built library's dot-product loops: GCC 12 once put two moves around every vpdpbusd and spilled
# accumulators inside the k-loop (half the speed on Zen 4) while clang did not.
_TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
needs_objdump = pytest.mark.skipif(__import__("shutil").which("objdump") is None, reason="objdump not installed")


def _check_codegen():
    sys.path.insert(0, _TOOLS)
    try:
        import check_codegen
    finally:
        sys.path.remove(_TOOLS)
    return check_codegen


@needs_native
@needs_objdump
def test_hot_loops_have_no_accumulator_moves_or_spills():
    import onnxopt._kernels as native

    if not native.info()["release_codegen"]:
        pytest.skip("sanitized or unoptimized build: its loops are not the shipped code")

    cg = _check_codegen()
    found = cg.loops(cg._objdump(native.__file__))
    big = [lp for lp in found if lp["dots"] >= 16]  # GEMM and direct-conv micro-tiles
    assert big, "no GEMM micro-kernel loop found in the built module"
    assert max(lp["dots"] for lp in found) >= 24  # the 6x4 GEMM tile / 8x3 direct-conv tile
    assert all(lp["spills"] == 0 for lp in found), [lp for lp in found if lp["spills"]]
    assert all(lp["moves"] == 0 for lp in big), [lp for lp in big if lp["moves"]]
    assert all(lp["moves"] <= 0.25 * lp["dots"] for lp in found)


_BAD_LOOP = """
0000000000001000 <kernel>:
    1000:	vmovdqa64 (%rcx),%zmm4
    1006:	vpbroadcastd (%rdx),%zmm0
    100c:	vmovdqa32 %zmm31,%zmm6
    1012:	vpdpbusd %zmm4,%zmm0,%zmm6
    1018:	vmovdqa32 %zmm6,0x3c8(%rsp)
    1020:	vmovdqa64 %zmm6,%zmm31
    1026:	vmovdqa32 %zmm12,%zmm7
    102c:	vpdpbusd 0x40(%rsp),%zmm0,%zmm7
    1032:	cmp    %esi,%edi
    1034:	jg     1000 <kernel+0x0>
    103a:	ret
"""


def test_codegen_check_flags_moves_and_spills():
    cg = _check_codegen()
    (lp,) = cg.loops(cg.parse_objdump(_BAD_LOOP))
    # zmm31 -> zmm6 copies the loop-carried accumulator (zmm31 is written back in the loop); the
    # copy of zmm12 (never written in the loop) is an initialisation, not counted
    assert (lp["dots"], lp["moves"], lp["spills"], lp["reloads"]) == (2, 2, 1, 1)
