"""import_qdq: a QAT / fake-quant model (QuantizeLinear -> DequantizeLinear pairs, as both torch
exporters write them) becomes QConv/QGemm that keep the trained int8 weights, weight scales and
activation scales/zero points exactly. With `target="onnxruntime"` the model stays QDQ (onnxruntime
fuses that itself) and only what stops onnxruntime's fusion is cleaned away.

Why the rewrite keeps the fake-quant semantics: a quantized op's input is `DQ(q) = (q - z) * s` (q
u8/s8, per-tensor s, z). QConv/QGemm re-quantize their float input with the same s and z, and
`rint(((q - z) * s) / s) = q - z` exactly for |q - z| <= 255, so the integers the kernel multiplies
are the model's own. When the DQ reads a plain QuantizeLinear with the same s and z, the op reads the
Q's float input instead (same integers: `clamp(rint(x / s) + z)` is QuantizeLinear), and the Q/DQ
pair dies. s8 activations become u8 with z + 128 (`q_s8 + 128 = q_u8`, the +128 cancels in q - z;
u8 x s8 is the fast kernel path). Weights are `DQ(int8 initializer, per-channel scale, zero point)`
(or `DQ(Q(float initializer))`, quantized here exactly as QuantizeLinear does): the int8 values and
scales go into QConv/QGemm unchanged. What differs from the QDQ model is float rounding only: the
kernel computes `float(acc) * (x_scale * w_scale)` where onnxruntime's float Conv sums products of
dequantized values, so a value landing within rounding of a tie of the next QuantizeLinear may move
one step of that Q's scale.

Per-channel affine nodes after the op (BatchNormalization, Mul/Div/Add/Sub by per-channel constants:
what torch's ConvBn QAT modules export, `Conv -> Div(scale factor) -> Add(bias) -> BatchNormalization`)
fold into the weight scale and the float bias, `w_scale' = w_scale * k`, `bias' = bias * k + c`, so
the int8 weights stay bit-exact; a following Relu/Clip becomes the op's activation. A multiplier that
is not positive and finite leaves the chain as float nodes after the op.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Pass, PassContext, PassOptionError, Refusal, register_pass
from ..fusion import _is_const
from .common import DOMAIN, TARGETS, Emitter, _bias_vector, _clip_bounds, _sole_consumer, resolve_target

F32 = np.float32
SUPPORTED = ("Conv", "MatMul", "Gemm")
# Data movement that commutes with per-tensor fake quantization (the torch exporter puts a Flatten
# between the activation's DQ and a Linear's Gemm).
MOVES = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _default(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def _producer(t: gs.Tensor) -> Optional[gs.Node]:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _dtype(t: gs.Tensor):
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def _const(ctx: PassContext, t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    if t is None or t.is_empty() or not _is_const(ctx, t):
        return None
    v = ctx.value(t)
    return None if v is None else np.asarray(v)


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    return a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def _qdq_params(ctx: PassContext, node: gs.Node) -> "Tuple[np.ndarray, np.ndarray] | Refusal":
    """(scale float32, zero point) of a Q or DQ node; the zero point's dtype is the integer type."""
    if int(node.attrs.get("block_size", 0) or 0):
        return Refusal(f"{node.op}: blocked quantization")
    scale = _const(ctx, node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None or scale.dtype != F32:
        return Refusal(f"{node.op}: scale is not a float32 constant")
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        zp = _const(ctx, node.inputs[2])
        if zp is None:
            return Refusal(f"{node.op}: zero point is not a constant")
    else:  # no zero point: 0 of the integer input's type (uint8 for QuantizeLinear)
        dt = _dtype(node.inputs[0]) if node.op == "DequantizeLinear" else np.dtype(np.uint8)
        zp = np.zeros(scale.shape, dt if dt is not None else np.uint8)
    if zp.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)) or zp.shape != scale.shape:
        return Refusal(f"{node.op}: only u8/s8 with a zero point shaped like the scale")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return Refusal(f"{node.op}: scale not positive and finite")
    return scale, zp


def quantize_like_onnx(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear of a float constant: saturate(rint(x / scale) + zp), float32 division, half to even."""
    x = np.asarray(x, F32)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = -1
    s, z = scale.reshape(shape or ()), zp.astype(np.int32).reshape(shape or ())
    info = np.iinfo(zp.dtype)
    q = np.rint((x / s).astype(F32)).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(zp.dtype)


class Weight:
    """A weight `DQ(q, scale, zp)` with q an int8 constant (or `Q(float constant)`), per tensor or per `axis`."""

    def __init__(self, q, scale, zp, axis):
        self.q, self.scale, self.zp, self.axis = q, scale, zp, axis


def weight_of(ctx: PassContext, t: gs.Tensor) -> "Weight | Refusal":
    dq = _producer(t)
    if dq is None or dq.op != "DequantizeLinear" or not _default(dq):
        return Refusal("weight is not a DequantizeLinear output")
    params = _qdq_params(ctx, dq)
    if isinstance(params, Refusal):
        return params
    scale, zp = params
    if zp.dtype != np.int8:
        return Refusal("weight is not int8")
    src = dq.inputs[0]
    q = _const(ctx, src)
    axis = int(dq.attrs.get("axis", 1))
    if q is None:
        qn = _producer(src)
        if qn is None or qn.op != "QuantizeLinear" or not _default(qn):
            return Refusal("weight's DequantizeLinear does not read a constant")
        w = _const(ctx, qn.inputs[0])
        qparams = _qdq_params(ctx, qn)
        if w is None or w.dtype != F32 or isinstance(qparams, Refusal):
            return Refusal("weight's QuantizeLinear does not read a float32 constant")
        if not (_same(qparams[0], scale) and _same(qparams[1], zp)) or \
                (scale.size > 1 and int(qn.attrs.get("axis", 1)) % w.ndim != axis % w.ndim):
            return Refusal("weight's Q and DQ disagree")
        if int(qn.attrs.get("saturate", 1)) != 1:
            return Refusal("weight's QuantizeLinear has saturate=0")
        q = quantize_like_onnx(w, scale, zp, axis)
    if q.dtype != np.int8:
        return Refusal("weight is not int8")
    if scale.size > 1:
        axis %= q.ndim
        if scale.ndim != 1 or q.shape[axis] != scale.size:
            return Refusal("weight scale does not match the weight's axis")
    return Weight(q, scale.reshape(-1), zp.reshape(-1), axis if scale.size > 1 else None)


def activation_of(ctx: PassContext, t: gs.Tensor, allow_moves: bool):
    """(tensor to read, x_scale, u8 x_zero_point) for an op input `DQ(q)` (perhaps behind Flatten and
    the like), or a Refusal. The tensor is the Q's float input when that Q matches the DQ exactly."""
    cur, moved = t, False
    while True:
        p = _producer(cur)
        if p is None or not _default(p):
            return Refusal("input is not dequantized")
        if p.op == "DequantizeLinear":
            break
        if not (allow_moves and p.op in MOVES and p.inputs):
            return Refusal(f"input comes from {p.op}, not a DequantizeLinear")
        cur, moved = p.inputs[0], True
    params = _qdq_params(ctx, p)
    if isinstance(params, Refusal):
        return params
    scale, zp = params
    if scale.size != 1:
        return Refusal("activation quantized per channel")
    s = F32(scale.reshape(()))
    z = int(zp.reshape(())) + (128 if zp.dtype == np.int8 else 0)
    read = t
    qn = _producer(p.inputs[0])
    if not moved and qn is not None and qn.op == "QuantizeLinear" and _default(qn) and _dtype(qn.inputs[0]) == F32 \
            and int(qn.attrs.get("saturate", 1)) == 1:
        qp = _qdq_params(ctx, qn)
        if not isinstance(qp, Refusal) and _same(qp[0], scale) and _same(qp[1], zp):
            read = qn.inputs[0]
    return read, s, np.uint8(z)


def _bias_of(ctx: PassContext, t: Optional[gs.Tensor], n: int) -> "Optional[np.ndarray] | Refusal":
    """Float bias vector from a float constant or DQ(int32 constant, scale[, zp])."""
    if t is None or t.is_empty():
        return None
    v = _const(ctx, t)
    if v is not None:
        vec = _bias_vector(v.reshape(-1) if v.size == n else v, n, 1, 0)
        return vec if vec is not None else Refusal("bias is not a per-channel vector")
    dq = _producer(t)
    if dq is not None and dq.op == "DequantizeLinear" and _default(dq):
        b, s = _const(ctx, dq.inputs[0]), _const(ctx, dq.inputs[1])
        z = _const(ctx, dq.inputs[2]) if len(dq.inputs) > 2 and not dq.inputs[2].is_empty() else np.zeros(1, np.int32)
        if b is not None and s is not None and z is not None and b.dtype == np.int32 and s.dtype == F32:
            f = ((b.astype(np.int64) - z.astype(np.int64).reshape(-1)).astype(F32) * s.reshape(-1)).astype(F32)
            if f.size == n:
                return f.reshape(n)
    return Refusal("bias is neither a float constant nor DequantizeLinear of an int32 constant")


def affine_chain(ctx: PassContext, graph: gs.Graph, out: gs.Tensor, n: int, rank: int, axis: int):
    """Per-channel affine nodes after `out`: (multiplier [n] float64, addend [n] float64, nodes, last tensor).

    The result after the chain is `y * mult + add` per channel, y the op's output."""
    mult, add, nodes = np.ones(n), np.zeros(n), []
    while True:
        nxt = _sole_consumer(out, graph)
        if nxt is None or not _default(nxt) or len(nxt.outputs) != 1:
            break
        if nxt.op in ("Mul", "Div", "Add", "Sub") and len(nxt.inputs) == 2:
            if nxt.inputs[0] is out:
                other = nxt.inputs[1]
            elif nxt.inputs[1] is out and nxt.op in ("Mul", "Add"):
                other = nxt.inputs[0]
            else:
                break
            v = _const(ctx, other)
            vec = _bias_vector(v, n, rank, axis) if v is not None else None
            if vec is None:
                break
            vec = vec.astype(np.float64)
            if nxt.op == "Mul":
                mult, add = mult * vec, add * vec
            elif nxt.op == "Div":
                if not np.all(vec != 0):
                    break
                mult, add = mult / vec, add / vec
            elif nxt.op == "Add":
                add = add + vec
            else:
                add = add - vec
        elif nxt.op == "BatchNormalization" and len(nxt.inputs) == 5 and not int(nxt.attrs.get("training_mode", 0)):
            vals = [_const(ctx, i) for i in nxt.inputs[1:]]
            if any(v is None or v.size != n or v.dtype != F32 for v in vals):
                break
            gamma, beta, mean, var = (v.reshape(n).astype(np.float64) for v in vals)
            k = gamma / np.sqrt(var + float(nxt.attrs.get("epsilon", 1e-5)))
            mult, add = mult * k, (add - mean) * k + beta
        else:
            break
        nodes.append(nxt)
        out = nxt.outputs[0]
    return mult, add, nodes, out


def _activation_after(ctx: PassContext, graph: gs.Graph, out: gs.Tensor):
    nxt = _sole_consumer(out, graph)
    if nxt is None or not _default(nxt) or nxt.op not in ("Relu", "Clip"):
        return None
    bounds = (0.0, np.inf) if nxt.op == "Relu" else _clip_bounds(ctx, nxt)
    if bounds is None or not bounds[0] <= bounds[1]:
        return None
    return nxt, ("relu" if nxt.op == "Relu" else "clip"), bounds


@register_pass
class ImportQDQ(Pass):
    """QAT / fake-quant QDQ around Conv/MatMul/Gemm -> QConv/QGemm with the trained scales kept exactly."""

    name = "import_qdq"
    kind = "quantize"
    exact = False  # exact up to float rounding w.r.t. the QDQ model, not w.r.t. a float model
    idempotent = True  # what it emits has no DequantizeLinear weight left
    supported_ops = SUPPORTED
    options = {"target": "auto", "op_types": SUPPORTED, "exclude": ()}

    def validate_options(self) -> None:
        if self.options["target"] not in TARGETS:
            raise PassOptionError(f"{self.name}: target must be one of {', '.join(TARGETS)}, "
                                  f"got {self.options['target']!r}")
        ops = self.options["op_types"]
        if isinstance(ops, str) or not set(ops) <= set(SUPPORTED):
            raise PassOptionError(f"{self.name}: op_types must be a list of {', '.join(SUPPORTED)}, got {ops!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        target = resolve_target(self.options["target"])
        em = Emitter(graph, ctx, "qat")
        refusals: Counter = Counter()
        exclude = set(self.options["exclude"])
        done = 0
        for node in list(graph.nodes):
            if node.op not in self.options["op_types"] or not _default(node) or len(node.outputs) != 1 \
                    or len(node.inputs) < 2:
                continue
            if node.name in exclude:
                refusals["excluded by option"] += 1
                continue
            if target == "onnxopt":
                why = self._lower(em, graph, ctx, node)
            elif node.op == "Conv":
                why = self._clean_conv(em, graph, ctx, node)
            else:
                continue  # onnxruntime already fuses QDQ MatMul/Gemm as exported
            if isinstance(why, Refusal):
                if str(why):  # a non-empty reason: a QDQ site we could not take
                    refusals[f"{node.op}: {why}"] += 1
                continue
            done += int(bool(why))
        for reason, n in sorted(refusals.items()):
            ctx.note(f"left {n} node(s) as QDQ: {reason}")
        if done:
            ctx.note(f"imported {done} QDQ node(s) ({target} target)")
        return done > 0

    # --------------------------------------------------------------------------- onnxopt target
    def _lower(self, em: Emitter, graph: gs.Graph, ctx: PassContext, node: gs.Node):
        w = weight_of(ctx, node.inputs[1])
        if isinstance(w, Refusal):
            return Refusal("") if str(w).startswith("weight is not a Deq") else w  # a float op: not ours
        x_t = node.inputs[0]
        if node.op == "Conv":
            if w.q.ndim != 4 or (x_t.shape is not None and len(x_t.shape) != 4):
                return Refusal("only 2-D convolutions")
            if w.axis not in (None, 0):
                return Refusal("weight not quantized per output channel")
            if np.any(w.zp != 0):
                return Refusal("QConv takes no weight zero point")
            q, scale, zp, n, rank, ch_axis = w.q, w.scale, w.zp, w.q.shape[0], 4, 1
            alpha, beta = 1.0, 1.0
            bias_t = node.inputs[2] if len(node.inputs) > 2 else None
        else:
            if w.q.ndim != 2:
                return Refusal("weight is not 2-D")
            trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
            if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or (x_t.shape is not None and len(x_t.shape) != 2)):
                return Refusal("Gemm with transA or a non-2-D input")
            if node.op == "MatMul" and (x_t.shape is None or len(x_t.shape) < 2):
                return Refusal("MatMul input rank unknown or < 2")
            col_axis = 0 if trans else 1
            if w.axis not in (None, col_axis):
                return Refusal("weight not quantized per output column")
            q = np.ascontiguousarray(w.q.T) if trans else w.q
            scale, zp, n, rank, ch_axis = w.scale, w.zp, q.shape[1], 2, 1
            rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else (2 if node.op == "Gemm" else None)
            alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
            beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            bias_t = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
            ch_axis = -1
        act = activation_of(ctx, x_t, allow_moves=node.op != "Conv")
        if isinstance(act, Refusal):
            return act
        x_read, x_scale, x_zp = act
        bias = _bias_of(ctx, bias_t, n)
        if isinstance(bias, Refusal):
            return bias
        out = node.outputs[0]
        mult, add, chain, last = (affine_chain(ctx, graph, out, n, rank, ch_axis) if rank is not None
                                  else (np.ones(n), np.zeros(n), [], out))
        if chain and not (np.all(np.isfinite(mult)) and np.all(mult > 0) and np.all(np.isfinite(add))):
            mult, add, chain, last = np.ones(n), np.zeros(n), [], out  # leave the chain in float
        w_scale = scale.astype(F32)
        if scale.size == 1 and chain:
            w_scale = np.full(n, w_scale[0], F32)
        if alpha != 1.0 or chain:
            w_scale = (w_scale.astype(np.float64) * alpha * mult).astype(F32)
        b = None
        if bias is not None or chain:
            b64 = (bias.astype(np.float64) * beta if bias is not None else np.zeros(n))
            b = (b64 * mult + add).astype(F32)
        if not np.all(np.isfinite(w_scale)) or (b is not None and not np.all(np.isfinite(b))):
            return Refusal("folded scales overflow float32")
        activation, clip, act_node = "none", (-np.inf, np.inf), None
        a = _activation_after(ctx, graph, last)
        if a is not None:
            act_node, activation, clip = a
        base = node.name or node.op
        inputs = [x_read, em.const(f"{base}_wq", q), em.const(f"{base}_wscale", w_scale),
                  em.const("bias", b) if b is not None else None,
                  em.const("x_scale", np.asarray(x_scale, F32).reshape(())),
                  em.const("x_zero_point", np.asarray(x_zp, np.uint8).reshape(()))]
        if node.op != "Conv" and np.any(zp != 0):
            inputs.append(em.const("w_zero_point", np.broadcast_to(zp, (n,)).astype(np.int8)))
        attrs = {"activation": activation}
        if activation == "clip":
            attrs["clip_min"], attrs["clip_max"] = float(clip[0]), float(clip[1])
        if node.op == "Conv":
            for k in ("strides", "pads", "dilations", "group", "auto_pad", "kernel_shape"):
                if k in node.attrs:
                    v = node.attrs[k]
                    attrs[k] = v if not isinstance(v, (list, tuple)) else [int(i) for i in v]
        op = "QConv" if node.op == "Conv" else "QGemm"
        new = em.node(op, inputs, [], f"{base}_{op}", domain=DOMAIN, **attrs)
        final = act_node.outputs[0] if act_node is not None else last
        for old in [node, *chain] + ([act_node] if act_node is not None else []):
            old.outputs.clear()
        new.outputs.append(final)
        ctx.require_domain(DOMAIN, 1)
        return True

    # ------------------------------------------------------------------------ onnxruntime target
    def _clean_conv(self, em: Emitter, graph: gs.Graph, ctx: PassContext, node: gs.Node):
        """Keep QDQ; fold a per-channel affine chain (BatchNormalization, Div/Mul/Add/Sub) into the
        weight's DQ scale and give the Conv the int32 DQ bias onnxruntime's QLinearConv fusion needs."""
        w = weight_of(ctx, node.inputs[1])
        if isinstance(w, Refusal):
            return Refusal("")
        if w.q.ndim != 4 or w.axis not in (None, 0) or np.any(w.zp != 0):
            return Refusal("")
        act = activation_of(ctx, node.inputs[0], allow_moves=False)
        n = w.q.shape[0]
        bias_t = node.inputs[2] if len(node.inputs) > 2 else None
        bias = _bias_of(ctx, bias_t, n)
        if isinstance(bias, Refusal):
            return bias
        out = node.outputs[0]
        mult, add, chain, last = affine_chain(ctx, graph, out, n, 4, 1)
        if chain and not (np.all(np.isfinite(mult)) and np.all(mult > 0) and np.all(np.isfinite(add))):
            chain = []
        float_bias = bias_t is not None and not bias_t.is_empty() and _const(ctx, bias_t) is not None
        if not chain and not (float_bias and not isinstance(act, Refusal)):
            return Refusal("")  # nothing to clean
        if not chain:
            mult, add = np.ones(n), np.zeros(n)
        w_scale = (np.broadcast_to(w.scale, (n,)).astype(np.float64) * mult).astype(F32)
        b = ((bias.astype(np.float64) if bias is not None else np.zeros(n)) * mult + add).astype(F32)
        bq = bscale = None
        if not isinstance(act, Refusal):
            bscale = (np.float64(act[1]) * w_scale.astype(np.float64)).astype(F32)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                bq = np.rint(b.astype(np.float64) / bscale.astype(np.float64))
            if not (np.all(np.isfinite(bq)) and np.abs(bq).max(initial=0) < 2**31 - 1):
                bq = None  # a float bias: correct, but onnxruntime will not fuse this Conv
        if not chain and bq is None:
            return Refusal("")  # nothing that would change
        base = node.name or node.op
        if not chain:
            wd = node.inputs[1]
        else:
            wd = em.var(f"{base}_w_dq", F32, list(w.q.shape))
            em.node("DequantizeLinear", [em.const(f"{base}_wq", w.q), em.const(f"{base}_wscale", w_scale),
                                         em.const("w_zp", np.zeros(n, np.int8))], [wd], f"{base}_wDQ", axis=0)
        bias_in = em.const("bias", b)
        if bq is not None:
            bias_in = em.var(f"{base}_b_dq", F32, [n])
            em.node("DequantizeLinear", [em.const("bias_q", bq.astype(np.int32)), em.const("bias_scale", bscale)],
                    [bias_in], f"{base}_bDQ", axis=0)
        conv = em.node("Conv", [node.inputs[0], wd, bias_in], [], f"{base}_conv", **dict(node.attrs))
        for old in [node, *chain]:
            old.outputs.clear()
        conv.outputs.append(last)
        return True
