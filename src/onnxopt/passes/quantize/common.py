"""What the quantization passes share: the numerics of weights and activation ranges, finding a
quantizable site (MatMul/Gemm/Conv with the bias and activation that follow it) and the two lowerings
(com.onnxopt QGemm/QConv, or standard ONNX that onnxruntime fuses into its own integer kernels).

Numerics follow passes.md, "Custom operators": weights are s8, symmetric, one scale per output channel
(`scale = max|w| / 127` in float32, `q = clamp(rint(w / scale), -127, 127)`, round half to even);
activations are u8 with a zero point (`scale = (hi - lo) / 255` over a range widened to hold 0,
`zp = clamp(rint(-lo / scale), 0, 255)`).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..base import PassContext, PassOptionError, Refusal
from ..fusion import _is_const

if TYPE_CHECKING:
    from .. import convtranspose

F32 = np.float32
DOMAIN = "com.onnxopt"
TARGETS = ("auto", "onnxopt", "onnxruntime")


# ------------------------------------------------------------------------------------------ numerics

def quantize_weight(w: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel s8 quantization of float `w` along `axis` (the output channel).

    Returns (q int8 with w's shape, scale float32 [channels]). A channel of zeros gets scale 1.
    """
    w = np.asarray(w, F32)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.max(np.abs(w), axis=other) if other else np.abs(w)
    scale = (amax.astype(F32) / F32(127)).astype(F32)
    scale = np.where(scale > 0, scale, F32(1)).astype(F32)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def activation_params(lo: float, hi: float) -> Tuple[np.float32, np.uint8]:
    """u8 asymmetric (scale, zero point) for the range [lo, hi], widened to contain 0."""
    lo, hi = F32(min(float(lo), 0.0)), F32(max(float(hi), 0.0))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    if hi == lo:
        return F32(1), np.uint8(0)
    scale = F32((hi - lo) / F32(255))
    if scale <= 0 or not np.isfinite(scale):  # a range so small its scale underflows
        return F32(1), np.uint8(0)
    zp = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zp


def resolve_target(target: str) -> str:
    if target != "auto":
        return target
    from ... import runtime  # the library's presence decides; no kernels are imported

    return "onnxopt" if runtime.custom_ops_library() is not None else "onnxruntime"


def check_common_options(p) -> None:
    if p.options["target"] not in TARGETS:
        raise PassOptionError(f"{p.name}: target must be one of {', '.join(TARGETS)}, got {p.options['target']!r}")
    if int(p.options["min_macs"]) < 0:
        raise PassOptionError(f"{p.name}: min_macs must be >= 0")
    ops = p.options["op_types"]
    if isinstance(ops, str) or not set(ops) <= set(p.supported_ops):
        raise PassOptionError(f"{p.name}: op_types must be a list of {', '.join(p.supported_ops)}, got {ops!r}")


# --------------------------------------------------------------------------------------------- sites

@dataclasses.dataclass
class Site:
    """A float MatMul/Gemm/Conv with constant weights, plus the bias Add and activation after it.

    `weight` is [K, N] for MatMul/Gemm (Gemm's transB and alpha applied) and [M, C/g, kH, kW] for
    Conv; `bias` is [N] / [M] or None. `nodes` are the graph nodes the site replaces, `out` the tensor
    its result must land in (the last node's output), `pre_act` the tensor before the activation.

    A ConvTranspose site (kind "conv", `upsample` set) is quantized through convtranspose_to_conv's
    rewrite: `weight` and `bias` are those of the equivalent stride-1 Conv ([M*sH*sW, C/g, uH, uW]),
    and lowering emits QConv with the plan's attributes followed by its DepthToSpace/Slice. The site
    still roots at the ConvTranspose, so whatever stays float stays a ConvTranspose.
    """

    node: gs.Node
    kind: str  # "gemm" | "conv"
    x: gs.Tensor
    weight_tensor: gs.Tensor
    weight: np.ndarray
    bias: Optional[np.ndarray]
    nodes: List[gs.Node]
    out: gs.Tensor
    activation: str = "none"
    clip: Tuple[float, float] = (-np.inf, np.inf)
    act_node: Optional[gs.Node] = None
    macs: int = 0
    transposed: bool = False  # weight was transposed from the graph's layout
    upsample: Optional["convtranspose.Plan"] = None  # a ConvTranspose site (see above)

    @property
    def channels(self) -> int:
        return self.weight.shape[1] if self.kind == "gemm" else self.weight.shape[0]


def set_optional_input(node: gs.Node, i: int, t: gs.Tensor) -> None:
    """Put t at input position i, padding skipped optional inputs with empty names."""
    while len(node.inputs) < i:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == i:
        node.inputs.append(t)
    else:
        node.inputs[i] = t


def _float32(t: gs.Tensor) -> bool:
    d = t.dtype
    try:
        return d is not None and np.dtype(d) == np.float32
    except TypeError:
        return False


def _sole_consumer(t: gs.Tensor, graph: gs.Graph) -> Optional[gs.Node]:
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _const_operand(ctx: PassContext, node: gs.Node, t: gs.Tensor) -> Optional[np.ndarray]:
    others = [i for i in node.inputs if i is not t]
    if len(node.inputs) != 2 or len(others) != 1 or not _is_const(ctx, others[0]):
        return None
    return ctx.value(others[0])


def _bias_vector(v: np.ndarray, n: int, out_rank: Optional[int], per_channel_axis: int) -> Optional[np.ndarray]:
    """`v` as an [n] vector when adding it to the output only adds along the channel axis."""
    if v.dtype != np.float32:
        return None
    if v.size == 1:
        if out_rank is not None and v.ndim > out_rank:
            return None
        return np.full(n, v.reshape(()), F32)
    if out_rank is None or v.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - v.ndim) + tuple(v.shape)
    want = [1] * out_rank
    want[per_channel_axis % out_rank] = n
    if list(shape) != want:
        return None
    return v.reshape(n).astype(F32)


def _clip_bounds(ctx: PassContext, node: gs.Node) -> Optional[Tuple[float, float]]:
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) > i and not node.inputs[i].is_empty():
            t = node.inputs[i]
            if not _is_const(ctx, t):
                return None
            v = ctx.value(t)
            if v is None or v.size != 1:
                return None
            bounds.append(float(v.reshape(())))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


def find_site(node: gs.Node, graph: gs.Graph, ctx: PassContext, *, fold_bias: bool = True,
              fold_activation: bool = True) -> "Site | Refusal":
    """The quantizable site rooted at `node`, or a Refusal saying why there is none."""
    op = node.op
    if (node.domain or "") not in ("", "ai.onnx"):
        return Refusal("not a default-domain op")
    if op not in ("MatMul", "Gemm", "Conv", "ConvTranspose") or len(node.inputs) < 2:
        return Refusal(f"{op} is not quantized")
    x, w_t = node.inputs[0], node.inputs[1]
    if not _is_const(ctx, w_t):
        return Refusal(f"{op}: weight is not a constant initializer")
    if not _float32(x) or np.dtype(w_t.dtype) != np.float32:
        return Refusal(f"{op}: only float32 is quantized")
    w_shape = tuple(w_t.shape)
    x_shape = x.shape
    transposed = False
    bias = None
    upsample = None
    if op == "ConvTranspose":
        from .. import convtranspose

        b_t = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        upsample = convtranspose.plan(ctx, node, x, w_t, b_t)
        if isinstance(upsample, Refusal):
            return Refusal(f"ConvTranspose: {upsample}")
        wv = ctx.value(w_t)
        if wv is None:
            return Refusal("ConvTranspose: weight cannot be read")
        w = upsample.weight(np.asarray(wv, F32))
        if b_t is not None:
            bias = upsample.bias(np.asarray(ctx.value(b_t), F32)).astype(F32)
        kind, macs, axis, out_rank = "conv", upsample.macs(), 1, 4
    elif op in ("MatMul", "Gemm"):
        if len(w_shape) != 2:
            return Refusal(f"{op}: weight is not 2-D")
        if x_shape is None or len(x_shape) < 2:
            return Refusal(f"{op}: input rank unknown or < 2")
        if op == "Gemm":
            if int(node.attrs.get("transA", 0)) != 0:
                return Refusal("Gemm: transA=1")
            if len(x_shape) != 2:
                return Refusal("Gemm: input is not 2-D")
        w = ctx.value(w_t)
        if w is None:
            return Refusal(f"{op}: weight cannot be read")
        w = np.asarray(w, F32)
        if op == "Gemm":
            if int(node.attrs.get("transB", 0)):
                w, transposed = np.ascontiguousarray(w.T), True
            alpha = float(node.attrs.get("alpha", 1.0))
            if alpha != 1.0:
                w = (w * F32(alpha)).astype(F32)
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                c_t = node.inputs[2]
                if not _is_const(ctx, c_t):
                    return Refusal("Gemm: C is not a constant initializer")
                c = ctx.value(c_t)
                bias = _bias_vector(np.asarray(c), w.shape[1], 2, -1) if c is not None else None
                if bias is None:
                    return Refusal("Gemm: C does not broadcast as a per-column bias")
                bias = (bias * F32(node.attrs.get("beta", 1.0))).astype(F32)
        k, n = w.shape
        if isinstance(x_shape[-1], int) and x_shape[-1] != k:
            return Refusal(f"{op}: input's last dimension does not match the weight")
        rows = int(np.prod([d for d in x_shape[:-1] if isinstance(d, int) and d > 0] or [1]))
        kind, macs, axis, out_rank = "gemm", rows * k * n, -1, len(x_shape)
    else:
        if len(w_shape) != 4 or (x_shape is not None and len(x_shape) != 4):
            return Refusal("Conv: only 2-D convolutions (4-D weights) are quantized")
        w = ctx.value(w_t)
        if w is None:
            return Refusal("Conv: weight cannot be read")
        w = np.asarray(w, F32)
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            if not _is_const(ctx, node.inputs[2]):
                return Refusal("Conv: bias is not a constant initializer")
            bias = np.asarray(ctx.value(node.inputs[2]), F32).reshape(-1)
        out_shape = node.outputs[0].shape or ()
        spatial = int(np.prod([d for d in out_shape[2:] if isinstance(d, int) and d > 0] or [1]))
        kind, macs, axis, out_rank = "conv", spatial * int(np.prod(w.shape)), 1, 4
    n_ch = w.shape[1] if kind == "gemm" else upsample.m if upsample is not None else w.shape[0]
    site = Site(node, kind, x, w_t, w, bias, [node], node.outputs[0], macs=macs, transposed=transposed,
                upsample=upsample)
    if fold_bias:
        nxt = _sole_consumer(site.out, graph)
        if nxt is not None and nxt.op == "Add" and (nxt.domain or "") in ("", "ai.onnx"):
            v = _const_operand(ctx, nxt, site.out)
            vec = _bias_vector(np.asarray(v), n_ch, out_rank, axis) if v is not None else None
            if vec is not None and upsample is not None:
                vec = upsample.bias(vec).astype(F32)  # the Conv's channel m*phases + r is channel m
            if vec is not None:
                site.bias = vec if site.bias is None else (site.bias + vec).astype(F32)
                site.nodes.append(nxt)
                site.out = nxt.outputs[0]
    if fold_activation:
        nxt = _sole_consumer(site.out, graph)
        if nxt is not None and (nxt.domain or "") in ("", "ai.onnx") and nxt.op in ("Relu", "Clip"):
            bounds = (0.0, np.inf) if nxt.op == "Relu" else _clip_bounds(ctx, nxt)
            if bounds is not None and bounds[0] <= bounds[1]:
                site.activation = "relu" if nxt.op == "Relu" else "clip"
                site.clip = bounds
                site.act_node = nxt
                site.nodes.append(nxt)
                site.out = nxt.outputs[0]
    return site


def pre_activation(site: Site) -> gs.Tensor:
    """The site's result before its activation (what the activation node reads)."""
    return site.act_node.inputs[0] if site.act_node is not None else site.out


# ---------------------------------------------------------------------------------------- rewriting

class Emitter:
    """Builds replacement nodes in `graph`; shares quantized weights between sites reading one tensor."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, prefix: str):
        self.graph, self.ctx, self.prefix = graph, ctx, prefix
        self._weights: Dict[tuple, tuple] = {}

    def const(self, base: str, value) -> gs.Constant:
        return gs.Constant(self.ctx.fresh_name(f"{base}_{self.prefix}"), np.asarray(value))

    def var(self, base: str, dtype=None, shape=None) -> gs.Variable:
        return gs.Variable(self.ctx.fresh_name(base), dtype=dtype, shape=shape)

    def node(self, op: str, inputs, outputs, name_base: str, domain: Optional[str] = None, **attrs) -> gs.Node:
        n = gs.Node(op=op, name=self.ctx.fresh_name(name_base), attrs=attrs,
                    inputs=[gs.Variable.empty() if t is None else t for t in inputs], outputs=outputs,
                    domain=domain)
        self.graph.nodes.append(n)
        return n

    def weights(self, site: Site, layout: str) -> Tuple[gs.Constant, gs.Constant, np.ndarray, np.ndarray]:
        """(q constant, scale constant, q array, scale array) for the site's weight, once per tensor."""
        key = (id(site.weight_tensor), site.transposed, float(site.node.attrs.get("alpha", 1.0))
               if site.node.op == "Gemm" else 1.0, layout, site.upsample.key if site.upsample is not None else None)
        hit = self._weights.get(key)
        if hit is None:
            if layout == "ort-per-tensor":
                q, s = quantize_weight(np.asarray(site.weight).reshape(1, -1), 0)
                q = q.reshape(site.weight.shape)
            else:
                q, s = quantize_weight(site.weight, 1 if site.kind == "gemm" else 0)
            base = site.weight_tensor.name or "w"
            hit = (self.const(f"{base}_q", q), self.const(f"{base}_scale", s), q, s)
            self._weights[key] = hit
        return hit

    def take_over(self, site: Site, producer: gs.Node) -> None:
        """Make `producer` write the site's final tensor; the site's old nodes become dead."""
        out = site.out
        for n in site.nodes:
            n.outputs.clear()
        producer.outputs.append(out)


def lower_onnxopt(em: Emitter, site: Site, x_scale=None, x_zp=None) -> gs.Node:
    """QGemm / QConv (com.onnxopt) for `site`; static when x_scale is given, dynamic otherwise."""
    wq, ws, _, _ = em.weights(site, "onnxopt")
    inputs: List[Optional[gs.Tensor]] = [site.x, wq, ws,
                                         em.const("bias", site.bias) if site.bias is not None else None]
    if x_scale is not None:
        inputs += [em.const("x_scale", np.asarray(x_scale, F32).reshape(())),
                   em.const("x_zero_point", np.asarray(x_zp, np.uint8).reshape(()))]
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = {"activation": site.activation}
    if site.activation == "clip":
        attrs["clip_min"], attrs["clip_max"] = float(site.clip[0]), float(site.clip[1])
    if site.kind == "conv":
        src = site.upsample.conv_attrs() if site.upsample is not None else site.node.attrs
        for k in ("strides", "pads", "dilations", "group", "auto_pad", "kernel_shape"):
            if k in src:
                v = src[k]
                attrs[k] = v if not isinstance(v, (list, tuple)) else [int(i) for i in v]
    op = "QGemm" if site.kind == "gemm" else "QConv"
    node = em.node(op, inputs, [], f"{site.node.name or op}_{op}", domain=DOMAIN, **attrs)
    em.ctx.require_domain(DOMAIN, 1)
    if site.upsample is not None:
        _upsample_tail(em, site, node)
    else:
        em.take_over(site, node)
    return node


def _upsample_tail(em: Emitter, site: Site, conv: gs.Node) -> None:
    """A ConvTranspose site: `conv` computes the phases; the plan's DepthToSpace/Slice interleave and
    crop them into the site's output."""
    plan = site.upsample
    n = site.x.shape[0] if site.x.shape is not None else None
    base = site.node.name or "convtranspose"
    y = em.var(f"{base}_phases", F32, [n, plan.m * plan.phases] + plan.conv_len())
    conv.outputs.append(y)

    def make(op_type, inputs, shape, **attrs):
        out = em.var(f"{base}_{op_type}", F32, shape)
        em.node(op_type, [em.const(op_type.lower(), i) if isinstance(i, np.ndarray) else i for i in inputs], [out],
                f"{base}_{op_type}", **attrs)
        return out

    last = plan.tail(make, y, n)
    if last is y:  # stride 1 without a crop: the Conv is the whole thing
        conv.outputs.clear()
        em.take_over(site, conv)
        return
    producer = last.inputs[0]
    producer.outputs.clear()
    em.take_over(site, producer)


def lower_dynamic_ort(em: Emitter, site: Site) -> None:
    """DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add, + Relu/Clip): onnxruntime fuses it
    into com.microsoft DynamicQuantizeMatMul (per-column weight scales, bias and all)."""
    wq, _, _, ws = em.weights(site, "ort")
    base = site.node.name or "qmatmul"
    xq, xs, xz = em.var("xq", np.uint8), em.var("x_scale", F32, []), em.var("x_zp", np.uint8, [])
    em.node("DynamicQuantizeLinear", [site.x], [xq, xs, xz], f"{base}_dql")
    acc = em.var("acc", np.int32)
    em.node("MatMulInteger", [xq, wq, xz], [acc], f"{base}_mmi")
    accf = em.var("accf", F32)
    em.node("Cast", [acc], [accf], f"{base}_cast", to=int(onnx.TensorProto.FLOAT))
    sc = em.var("scale", F32, [len(ws)])
    em.node("Mul", [xs, em.const("w_scale", ws)], [sc], f"{base}_scale")
    y = em.var("y", F32)
    last = em.node("Mul", [accf, sc], [y], f"{base}_mul")
    last = _tail_ort(em, site, last, y, base)
    em.take_over(site, last)


def _tail_ort(em: Emitter, site: Site, last: gs.Node, y: gs.Variable, base: str) -> gs.Node:
    """Bias Add and activation after a float result `y` (written by `last`)."""
    if site.bias is not None:
        y2 = em.var("y", F32)
        last = em.node("Add", [y, em.const("bias", site.bias)], [y2], f"{base}_bias")
        y = y2
    if site.activation != "none":
        y2 = em.var("y", F32)
        if site.activation == "relu":
            last = em.node("Relu", [y], [y2], f"{base}_relu")
        else:
            lo, hi = site.clip
            last = em.node("Clip", [y, em.const("min", F32(lo)), em.const("max", F32(hi))], [y2], f"{base}_clip")
    last.outputs.clear()  # the caller hands this node the site's output
    return last


class QDQ:
    """QuantizeLinear -> DequantizeLinear pairs on activation tensors, one per tensor."""

    def __init__(self, em: Emitter, ranges: Dict[str, Tuple[float, float]]):
        self.em, self.ranges = em, ranges
        self.done: Dict[str, Tuple[gs.Variable, np.float32, np.uint8]] = {}

    def params(self, t: gs.Tensor) -> Tuple[np.float32, np.uint8]:
        lo, hi = self.ranges[t.name]
        return activation_params(lo, hi)

    def insert(self, t: gs.Tensor, graph: gs.Graph) -> gs.Variable:
        """Quantize-dequantize `t` once; every node that read `t` reads the dequantized tensor."""
        hit = self.done.get(t.name)
        if hit is not None:
            return hit[0]
        s, z = self.params(t)
        em = self.em
        sc, zp = em.const("act_scale", np.asarray(s, F32)), em.const("act_zp", np.asarray(z, np.uint8))
        q = em.var(f"{t.name}_q", np.uint8, t.shape)
        dq = em.var(f"{t.name}_dq", F32, t.shape)
        consumers = list(t.outputs)
        em.node("QuantizeLinear", [t, sc, zp], [q], f"{t.name}_Q")
        em.node("DequantizeLinear", [q, sc, zp], [dq], f"{t.name}_DQ")
        for c in consumers:
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = dq
        self.done[t.name] = (dq, s, z)
        return dq


def lower_static_ort(em: Emitter, site: Site, xd: gs.Variable, x_scale: np.float32, graph: gs.Graph) -> None:
    """Standard QDQ around the float op: DQ(per-channel s8 weight), the dequantized input `xd`, the
    float op (MatMul becomes Gemm, with a Reshape pair for rank > 2, because onnxruntime only fuses
    per-column MatMul weights in Gemm form), bias (int32 via DQ for Gemm), activation kept as a node
    (onnxruntime folds it into the quantized op)."""
    if site.upsample is not None:  # quantize_static refuses them for this target
        raise ValueError("ConvTranspose sites are lowered for the onnxopt target only")
    # DequantizeLinear's `axis` (per-channel scales) arrived in opset 13: below it the weights get one
    # scale, a form valid at the model's opset (the accuracy guard judges what that costs).
    per_channel = em.ctx.opset() >= 13
    wq, ws_c, _, ws = em.weights(site, "ort" if per_channel else "ort-per-tensor")
    base = site.node.name or site.node.op
    axis = {"axis": 1 if site.kind == "gemm" else 0} if per_channel else {}
    zeros = em.const("w_zp", np.zeros(len(ws), np.int8) if per_channel else np.int8(0))
    if not per_channel:
        ws_c = em.const("w_scale", ws.reshape(()))
    wd = em.var("w_dq", F32, list(site.weight.shape))
    em.node("DequantizeLinear", [wq, ws_c, zeros], [wd], f"{base}_wDQ", **axis)
    if site.kind == "conv":
        y = em.var("y", F32)
        attrs = {k: v for k, v in site.node.attrs.items()}
        bias = em.const("bias", site.bias) if site.bias is not None else None
        last = em.node("Conv", [xd, wd] + ([bias] if bias is not None else []), [y], f"{base}_conv", **attrs)
        site = dataclasses.replace(site, bias=None)
    else:
        n = int(site.weight.shape[1])
        bscale = (F32(x_scale) * ws).astype(F32)
        b = site.bias if site.bias is not None else np.zeros(n, F32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            bq64 = np.rint(b.astype(np.float64) / bscale.astype(np.float64))
        float_bias = not np.all(np.isfinite(bq64)) or np.abs(bq64).max(initial=0) >= 2**31 - 1
        bd = None
        if not float_bias:  # the int32 bias onnxruntime's QGemm wants (scale x_scale * w_scale)
            bd = em.var("b_dq", F32, [n])
            bscale = bscale if per_channel else bscale.reshape(())
            em.node("DequantizeLinear", [em.const("bias_q", bq64.astype(np.int32)), em.const("bias_scale", bscale)],
                    [bd], f"{base}_bDQ", **({"axis": 0} if per_channel else {}))
        rank = len(site.x.shape)
        inp = xd
        if rank > 2:
            inp = em.var("x2d", F32)
            em.node("Reshape", [xd, em.const("shape", np.array([-1, site.weight.shape[0]], np.int64))], [inp],
                    f"{base}_flatten")
        y = em.var("y", F32)
        last = em.node("Gemm", [inp, wd] + ([bd] if bd is not None else []), [y], f"{base}_gemm")
        if rank > 2:
            shp = em.var("xshape", np.int64, [rank])
            em.node("Shape", [site.x], [shp], f"{base}_shape")
            lead = em.var("lead", np.int64, [rank - 1])
            em.node("Slice", [shp, em.const("s0", np.array([0], np.int64)), em.const("s1", np.array([-1], np.int64))],
                    [lead], f"{base}_lead")
            oshape = em.var("oshape", np.int64, [rank])
            em.node("Concat", [lead, em.const("n", np.array([n], np.int64))], [oshape], f"{base}_oshape", axis=0)
            y2 = em.var("y", F32)
            last = em.node("Reshape", [y, oshape], [y2], f"{base}_unflatten")
            y = y2
        if not float_bias:
            site = dataclasses.replace(site, bias=None)
    last = _tail_ort(em, site, last, y, base)
    em.take_over(site, last)
