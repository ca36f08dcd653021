"""numpy reference for com.onnxopt QGemm / QConv (passes.md, "Custom operators") and model builders.

The reference follows the documented numerics step by step in float32: activation quantization
(dynamic per row / per image, or static), the int32 accumulation (exact, computed in int64), then the
float epilogue acc * (x_scale * w_scale) + bias and the activation. Also checks itself below.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnxopt.schemas  # noqa: F401  (registers the com.onnxopt schemas)

F32 = np.float32
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.onnxopt", 1)]


# ---- reference numerics -----------------------------------------------------------------------

def quantize_dynamic(x2d):
    """Per row: lo = min(0, min x), hi = max(0, max x), scale = (hi - lo) / 255 (1 if hi == lo)."""
    x2d = np.asarray(x2d, F32)
    lo = np.minimum(F32(0), x2d.min(axis=1)).astype(F32)
    hi = np.maximum(F32(0), x2d.max(axis=1)).astype(F32)
    scale = np.where(hi == lo, F32(1), (hi - lo) / F32(255)).astype(F32)
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(F32)
    q = np.clip(np.rint(x2d / scale[:, None]) + zp[:, None], 0, 255).astype(np.uint8)
    return q, scale, zp.astype(np.uint8)


def quantize_static(x, scale, zp):
    q = np.clip(np.rint(np.asarray(x, F32) / F32(scale)) + F32(zp), 0, 255)
    return q.astype(np.uint8)


def epilogue(acc, a_scale, w_scale, bias, act, lo, hi):
    """acc int [rows, cols]; a_scale [rows] or scalar; w_scale [cols] or [1]. Returns (y, tol)."""
    sc = (np.asarray(a_scale, F32).reshape(-1, 1) * np.asarray(w_scale, F32).reshape(1, -1)).astype(F32)
    prod = (acc.astype(F32) * sc).astype(F32)
    y = prod
    mag = np.abs(prod)
    if bias is not None:
        y = (y + np.asarray(bias, F32).reshape(1, -1)).astype(F32)
        mag = mag + np.abs(np.asarray(bias, F32)).reshape(1, -1)
    if act == "relu":
        y = np.maximum(y, F32(0))
    elif act == "clip":
        y = np.minimum(np.maximum(y, F32(lo)), F32(hi))
    # The kernels are meant to be bit exact; allow 2 ulp of the largest term for a reordered epilogue.
    return y, 2 * np.spacing(mag.astype(F32))


def qgemm_ref(x, w, w_scale, bias=None, x_scale=None, x_zp=None, w_zp=None, act="none",
              clip_min=-np.inf, clip_max=np.inf):
    K, N = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x_scale is None:
        q, a_scale, a_zp = quantize_dynamic(x2)
        a_zp = a_zp.astype(np.int64)[:, None]
    else:
        zp = 0 if x_zp is None else int(np.asarray(x_zp).reshape(()))
        q = quantize_static(x2, F32(np.asarray(x_scale).reshape(())), zp)
        a_scale = np.full(x2.shape[0], np.asarray(x_scale, F32).reshape(()), F32)
        a_zp = zp
    wz = np.zeros(N, np.int64) if w_zp is None else np.asarray(w_zp, np.int64)
    acc = (q.astype(np.int64) - a_zp) @ (w.astype(np.int64) - wz[None, :])
    assert np.abs(acc).max(initial=0) < 2**31
    y, tol = epilogue(acc, a_scale, w_scale, bias, act, clip_min, clip_max)
    return y.reshape(*lead, N), tol.reshape(*lead, N)


def conv_pads(H, W, kh, kw, strides, dilations, pads, auto_pad):
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in ((H, kh, strides[0], dilations[0]), (W, kw, strides[1], dilations[1])):
            o = -(-size // s)
            total = max(0, (o - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return [out[0][0], out[1][0], out[0][1], out[1][1]]
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    return list(pads)


def qconv_ref(x, w, w_scale, bias=None, x_scale=None, x_zp=None, act="none", clip_min=-np.inf,
              clip_max=np.inf, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), group=1,
              auto_pad="NOTSET"):
    N, C, H, W = x.shape
    M, cg, kh, kw = w.shape
    pt, pl, pb, pr = conv_pads(H, W, kh, kw, strides, dilations, pads, auto_pad)
    sh, sw = strides
    dh, dw = dilations
    OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    ys, tols = [], []
    mg = M // group
    for n in range(N):
        img = x[n].reshape(1, -1)
        if x_scale is None:
            q, s, z = quantize_dynamic(img)
            s, z = s[0], int(z[0])
        else:
            z = 0 if x_zp is None else int(np.asarray(x_zp).reshape(()))
            s = F32(np.asarray(x_scale).reshape(()))
            q = quantize_static(img, s, z)
        qc = q.reshape(C, H, W).astype(np.int64) - z  # padding contributes (zp - zp) = 0
        qp = np.zeros((C, H + pt + pb, W + pl + pr), np.int64)
        qp[:, pt:pt + H, pl:pl + W] = qc
        acc = np.zeros((M, OH, OW), np.int64)
        for g in range(group):
            wg = w[g * mg:(g + 1) * mg].astype(np.int64)  # [mg, cg, kh, kw]
            for i in range(kh):
                for j in range(kw):
                    patch = qp[g * cg:(g + 1) * cg, i * dh: i * dh + sh * (OH - 1) + 1: sh,
                               j * dw: j * dw + sw * (OW - 1) + 1: sw]  # [cg, OH, OW]
                    acc[g * mg:(g + 1) * mg] += np.einsum("mc,chw->mhw", wg[:, :, i, j], patch)
        y, tol = epilogue(acc.reshape(M, -1).T, np.full(OH * OW, s, F32), w_scale, bias, act,
                          clip_min, clip_max)
        ys.append(y.T.reshape(M, OH, OW))
        tols.append(tol.T.reshape(M, OH, OW))
    return np.stack(ys), np.stack(tols)


def assert_close_ref(y, ref, tol):
    assert y.shape == ref.shape, (y.shape, ref.shape)
    bad = np.abs(y.astype(np.float64) - ref) > tol
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(f"{bad.sum()} of {bad.size} values differ; first at {tuple(i)}: "
                             f"got {y[tuple(i)]!r}, reference {ref[tuple(i)]!r}")


# ---- model builders ---------------------------------------------------------------------------

def _inputs_and_inits(x_name, x_shape, tensors, trailing):
    """tensors: list of (name, array or None) for inputs 1..; None = omitted optional input."""
    names, inits = [x_name], []
    for name, arr in tensors:
        if arr is None:
            names.append("")
        else:
            names.append(name)
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
    while trailing and names[-1] == "":
        names.pop()
    return names, inits


def qgemm_model(w, w_scale, bias=None, x_scale=None, x_zp=None, w_zp=None, x_shape=("m", None),
                name="qgemm0", trailing=True, **attrs):
    K, N = w.shape
    x_shape = list(x_shape[:-1]) + [K]
    names, inits = _inputs_and_inits("X", x_shape, [
        ("W", w.astype(np.int8)), ("w_scale", np.asarray(w_scale, F32)),
        ("bias", None if bias is None else np.asarray(bias, F32)),
        ("x_scale", None if x_scale is None else np.asarray(x_scale, F32)),
        ("x_zero_point", None if x_zp is None else np.asarray(x_zp, np.uint8)),
        ("w_zero_point", None if w_zp is None else np.asarray(w_zp, np.int8))], trailing)
    node = helper.make_node("QGemm", names, ["Y"], domain="com.onnxopt", name=name, **attrs)
    y_shape = list(x_shape[:-1]) + [N]
    g = helper.make_graph([node], "qgemm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)], initializer=inits)
    return helper.make_model(g, opset_imports=OPSET)


def qconv_model(w, w_scale, bias=None, x_scale=None, x_zp=None, x_shape=("n", None, "h", "w"),
                name="qconv0", **attrs):
    M, cg, kh, kw = w.shape
    group = attrs.get("group", 1)
    x_shape = [x_shape[0], cg * group, x_shape[2], x_shape[3]]
    names, inits = _inputs_and_inits("X", x_shape, [
        ("W", w.astype(np.int8)), ("w_scale", np.asarray(w_scale, F32)),
        ("bias", None if bias is None else np.asarray(bias, F32)),
        ("x_scale", None if x_scale is None else np.asarray(x_scale, F32)),
        ("x_zero_point", None if x_zp is None else np.asarray(x_zp, np.uint8))], True)
    node = helper.make_node("QConv", names, ["Y"], domain="com.onnxopt", name=name, **attrs)
    g = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)], initializer=inits)
    return helper.make_model(g, opset_imports=OPSET)


def random_weights(rng, shape, per_channel):
    w = rng.integers(-128, 128, shape).astype(np.int8)
    n = shape[0] if len(shape) == 4 else shape[1]
    scale = (rng.uniform(0.002, 0.02, n) if per_channel else rng.uniform(0.002, 0.02, 1)).astype(F32)
    return w, scale


# ---- the reference checks itself against plain float math ---------------------------------------

def test_reference_qgemm_tracks_float_matmul():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(F32)
    w, s = random_weights(rng, (64, 16), True)
    y, _ = qgemm_ref(x, w, s)
    exact = x.astype(np.float64) @ (w.astype(np.float64) * s)
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()


def test_reference_qconv_tracks_float_conv():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 7, 6)).astype(F32)
    w, s = random_weights(rng, (6, 2, 3, 3), True)
    y, _ = qconv_ref(x, w, s, group=2, pads=(1, 0, 2, 1), strides=(2, 1))
    wf = w.astype(np.float64) * s[:, None, None, None]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 2), (0, 1)))
    ref = np.zeros_like(y, dtype=np.float64)
    for m in range(6):
        g = m // 3
        for oh in range(y.shape[2]):
            for ow in range(y.shape[3]):
                ref[0, m, oh, ow] = (xp[0, 2 * g:2 * g + 2, 2 * oh:2 * oh + 3, ow:ow + 3] * wf[m]).sum()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
