"""numba backend: the same algorithms as csrc/kernels, bit for bit.

Integer work is exact (int32 accumulation; numba widens to int64 on the way, which equals
wrapping int32 arithmetic modulo 2**32 and is wrapped back before use). Every float operation is
done in float32 in the order given by the numerics contract in csrc/kernels/onnxopt_kernels.h, with
the comparisons spelled like the C++ (`y if y > lo else lo`), so results match the native backend
exactly. No fastmath (it would allow contraction into FMA and reassociation).

The functions without a leading underscore are the stable entry points (also used by the
custom-op fallback). They take and return plain numpy arrays; shapes/dtypes are documented per
function. Activation codes: 0 = none, 1 = relu, 2 = clip.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ACT_NONE, ACT_RELU, ACT_CLIP = 0, 1, 2
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F255 = np.float32(255.0)


@njit(cache=True)
def _wrap32(v):
    # int64 -> int32 with two's complement wrap-around (what the C++ uint32 arithmetic does)
    v = v & 0xFFFFFFFF
    if v >= 0x80000000:
        v -= 0x100000000
    return np.int32(v)


@njit(cache=True)
def _dynamic_params(lo, hi):
    if hi == lo:
        s = _F1
    else:
        s = np.float32(np.float32(hi - lo) / _F255)
    z = np.float32(np.rint(np.float32(np.float32(-lo) / s)))
    z = z if z > _F0 else _F0
    z = z if z < _F255 else _F255
    return s, z


@njit(cache=True)
def _quant_into(x, s, zf, q):
    for i in range(x.shape[0]):
        t = np.float32(np.float32(np.rint(np.float32(x[i] / s))) + zf)
        t = t if t > _F0 else _F0
        t = t if t < _F255 else _F255
        q[i] = np.uint8(np.int32(t))


@njit(cache=True)
def _minmax(x, lo, hi):
    for i in range(x.shape[0]):
        v = x[i]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi


@njit(cache=True)
def quantize_rows_dynamic(x):
    """x float32[M, K] -> (q uint8[M, K], scale float32[M], zp uint8[M]), per-row dynamic."""
    M, K = x.shape
    q = np.empty((M, K), np.uint8)
    sc = np.empty(M, np.float32)
    zp = np.empty(M, np.uint8)
    for m in range(M):
        lo, hi = _minmax(x[m], _F0, _F0)
        s, z = _dynamic_params(lo, hi)
        _quant_into(x[m], s, z, q[m])
        sc[m] = s
        zp[m] = np.uint8(np.int32(z))
    return q, sc, zp


@njit(cache=True)
def quantize_static(x, scale, zp):
    """x float32[n] (1-D), scale float32, zp int in [0, 255] -> uint8[n]."""
    q = np.empty(x.shape[0], np.uint8)
    _quant_into(x, np.float32(scale), np.float32(zp), q)
    return q


@njit(cache=True)
def pack_weights(w, w_zp):
    """w int8[K, N], w_zp int8[N] -> (b int32[K, N], colsum int32[N], wzp int32[N])."""
    K, N = w.shape
    b = np.empty((K, N), np.int32)
    colsum = np.zeros(N, np.int32)
    for k in range(K):
        for n in range(N):
            v = np.int32(w[k, n])
            b[k, n] = v
            colsum[n] += v
    wzp = np.empty(N, np.int32)
    for n in range(N):
        wzp[n] = np.int32(w_zp[n])
    return b, colsum, wzp


@njit(cache=True)
def _acc(a, b):
    M, K = a.shape
    N = b.shape[1]
    acc = np.zeros((M, N), np.int32)
    for m in range(M):
        for k in range(K):
            av = np.int32(a[m, k])
            if av != 0:
                for n in range(N):
                    acc[m, n] += av * b[k, n]
    return acc


@njit(cache=True)
def _output_stage(acc, K, rzp, rscale, rsum, colsum, wzp, w_scale, bias, has_bias, act, lo, hi,
                  requant, out_scale, out_zp, out_f, out_u8, transposed):
    """acc int32[M, N] -> out[m, n] (or out[n, m] when transposed)."""
    M, N = acc.shape
    lo = np.float32(lo)
    hi = np.float32(hi)
    osc = np.float32(out_scale)
    ozp = np.float32(out_zp)
    for m in range(M):
        for n in range(N):
            v = (np.int64(acc[m, n]) - np.int64(rzp[m]) * np.int64(colsum[n])
                 - np.int64(wzp[n]) * np.int64(rsum[m])
                 + np.int64(K) * np.int64(rzp[m]) * np.int64(wzp[n]))
            a = _wrap32(v)
            s = np.float32(rscale[m] * w_scale[n])
            y = np.float32(np.float32(a) * s)
            if has_bias:
                y = np.float32(y + bias[n])
            if act == 1:
                y = y if y > _F0 else _F0
            elif act == 2:
                y = y if y > lo else lo
                y = y if y < hi else hi
            if requant:
                t = np.float32(np.float32(np.rint(np.float32(y / osc))) + ozp)
                t = t if t > _F0 else _F0
                t = t if t < _F255 else _F255
                if transposed:
                    out_u8[n, m] = np.uint8(np.int32(t))
                else:
                    out_u8[m, n] = np.uint8(np.int32(t))
            else:
                if transposed:
                    out_f[n, m] = y
                else:
                    out_f[m, n] = y


@njit(cache=True)
def qgemm_u8_into(a, a_zp, a_scale, b, colsum, wzp, w_scale, bias, has_bias, act, lo, hi,
                  requant, out_scale, out_zp, out_f, out_u8):
    """u8 activations x packed weights with the fused output stage.

    a uint8[M, K]; a_zp int32[M]; a_scale float32[M] (expand per-tensor values first);
    (b, colsum, wzp) from pack_weights; w_scale float32[N]; bias float32[N] (ignored unless
    has_bias); act 0/1/2 with clip bounds lo/hi; requant selects out_u8 uint8[M, N] (with
    out_scale, out_zp) instead of out_f float32[M, N].
    """
    M, K = a.shape
    acc = _acc(a, b)
    rsum = np.zeros(M, np.int32)
    for m in range(M):
        s = 0
        for k in range(K):
            s += np.int32(a[m, k])
        rsum[m] = s
    _output_stage(acc, K, a_zp, a_scale, rsum, colsum, wzp, w_scale, bias, has_bias, act, lo, hi,
                  requant, out_scale, out_zp, out_f, out_u8, False)


@njit(cache=True)
def quantize_rows_static(x, scale, zp):
    """x float32[M, K] -> uint8[M, K] with a per-tensor scale / zero point."""
    M, K = x.shape
    q = np.empty((M, K), np.uint8)
    for m in range(M):
        _quant_into(x[m], np.float32(scale), np.float32(zp), q[m])
    return q


@njit(cache=True)
def qconv2d_into(x, w, group, sh, sw, pt, pl, pb, pr, dh, dw, static, x_scale, x_zp, w_scale, bias,
                 has_bias, act, lo, hi, out):
    """NCHW int8 conv. x float32[N, C, H, W]; w int8[M, C/group, kH, kW]; w_scale float32[M];
    bias float32[M]; out float32[N, M, OH, OW]. Activations quantized per tensor: static
    (x_scale, x_zp) when `static`, else dynamically per image."""
    N, C, H, W = x.shape
    M, Cg, kH, kW = w.shape
    Mg = M // group
    OH = out.shape[2]
    OW = out.shape[3]
    Hp = H + pt + pb
    Wp = W + pl + pr
    Kg = Cg * kH * kW
    P = OH * OW
    # weights as per-group int32 B[Kg, Mg] with column sums
    bs = np.empty((group, Kg, Mg), np.int32)
    cs = np.zeros((group, Mg), np.int32)
    for g in range(group):
        for j in range(Mg):
            oc = g * Mg + j
            k = 0
            for c in range(Cg):
                for i in range(kH):
                    for l in range(kW):
                        v = np.int32(w[oc, c, i, l])
                        bs[g, k, j] = v
                        cs[g, j] += v
                        k += 1
    zero_wzp = np.zeros(Mg, np.int32)
    out3 = out.reshape((N, M, P))
    xp = np.empty((C, Hp, Wp), np.uint8)
    for n in range(N):
        if static:
            s = np.float32(x_scale)
            z = np.float32(x_zp)
        else:
            lo_, hi_ = _F0, _F0
            for c in range(C):
                for h in range(H):
                    lo_, hi_ = _minmax(x[n, c, h], lo_, hi_)
            s, z = _dynamic_params(lo_, hi_)
        zq = np.uint8(np.int32(z))
        xp[:] = zq
        for c in range(C):
            for h in range(H):
                _quant_into(x[n, c, h], s, z, xp[c, pt + h, pl:pl + W])
        rzp = np.full(P, np.int32(z), np.int32)
        rsc = np.full(P, s, np.float32)
        rsum = np.zeros(P, np.int32)
        for g in range(group):
            a = np.empty((P, Kg), np.uint8)
            for oh in range(OH):
                for ow in range(OW):
                    r = oh * OW + ow
                    k = 0
                    for c in range(Cg):
                        for i in range(kH):
                            for l in range(kW):
                                a[r, k] = xp[g * Cg + c, oh * sh + i * dh, ow * sw + l * dw]
                                k += 1
            acc = _acc(a, bs[g])
            o = out3[n, g * Mg:(g + 1) * Mg]
            _output_stage(acc, Kg, rzp, rsc, rsum, cs[g], zero_wzp, w_scale[g * Mg:(g + 1) * Mg],
                          bias[g * Mg:(g + 1) * Mg], has_bias, act, lo, hi, False, 1.0, 0, o,
                          np.empty((0, 0), np.uint8), True)
