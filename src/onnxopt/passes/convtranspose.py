"""convtranspose_to_conv: a 2-D ConvTranspose as a stride-1 Conv followed by DepthToSpace and Slice.

Sub-pixel decomposition (no zero insertion). Along one spatial axis, ConvTranspose with stride s,
kernel k and dilation d computes the full output

    y_full[o] = sum over i, j with i*s + j*d = o of x[i] * w[j],        0 <= o < (H-1)*s + (k-1)*d + 1 + op

and then keeps `y_full[pb : pb + OH]` (pads crop, output_padding adds zeros at the end, output_shape
and SAME_* choose the crop). Write o = q*s + alpha + r with the phase r in [0, s): the taps that reach
phase r are the j congruent to (alpha + r) mod s, and each of them reads x at q + a_r - t
(a_r = (alpha + r) // s, j = t*s + b_r). So every phase is a stride-1 correlation of x with its own
sub-kernel, and all phases read the same window of U = hi - lo + 1 input positions; one Conv with
s*s*M output channels (channel m*s_h*s_w + r_h*s_w + r_w: CRD order, so groups stay contiguous)
and a [U_h, U_w] kernel computes them all, taps that do not exist in a phase being zero. DepthToSpace
(mode CRD) interleaves the phases into rows/columns and a Slice keeps the ConvTranspose's window.

The phase offset alpha is chosen per axis to minimize U * (conv output length): alpha = 0 always
gives U = ceil(k / s), so the multiply-adds are the ConvTranspose's with the kernel rounded up to a
multiple of the stride (zero taps), over at most one extra row/column of phases where the crop cuts
through a phase group at a border (4x4, stride 2, pad 1: 57 rows of phases for 112 output rows);
another alpha can do better (k=3, s=2, pad 1, output_padding 1: U = 2, no border, no Slice). Stride 1
is a plain Conv with the flipped, transposed kernel, its dilation, and pads (k-1)*d - p (a negative
one becomes a crop in the Slice). Dilation with stride > 1 is refused.

Everything the rewrite needs (pads, crop, conv length minus H) is independent of the input's spatial
size except with `output_shape` or unequal strides (Reshape/Transpose instead of DepthToSpace), which
need a static H and W.

The same Plan serves quantize_static/quantize_auto, which quantize a ConvTranspose site as QConv +
this interleaving (see quantize/common.py): the int8 preset does not run this pass, because the float
rewrite is slower than onnxruntime's ConvTranspose when k is not a multiple of s (the zero taps), and
a ConvTranspose that the guard keeps in fp32 must stay one (see builtin.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import numpy as np
import onnx_graphsurgeon as gs

from .base import PassContext, Refusal, register_pass
from .fusion import _attr, _const, _is_const, _present
from .pattern import RewriteRule

INT64_MAX = np.iinfo(np.int64).max
BIG = 1 << 20  # stands for an unknown input size when comparing plans: U (the kernel) dominates


@dataclasses.dataclass
class AxisPlan:
    """How one spatial axis of a ConvTranspose becomes a stride-1 Conv plus DepthToSpace and Slice."""

    k: int  # ConvTranspose kernel
    s: int  # ConvTranspose stride (= the DepthToSpace block along this axis)
    d: int  # dilation (only with s == 1; it stays the Conv's dilation)
    alpha: int  # phase offset: full output o = q*s + alpha + r
    u: int  # Conv kernel
    pad_begin: int  # Conv pads
    pad_end: int
    start: int  # Slice of the interleaved Conv output: [start, len - tail)
    tail: int
    extra: int  # Conv output length - input length
    taps: np.ndarray  # [s, u]: ConvTranspose tap feeding phase r at Conv position u, or k (a zero tap)

    def cost(self, size: Optional[int]) -> int:
        return self.u * ((size if size is not None else BIG) + self.extra)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def axis_plan(k: int, s: int, d: int, pb: int, pe: int, op: int, alpha: int) -> AxisPlan:
    """The plan for crop [pb, full - pe) of the full output (output_padding `op` included in full)."""
    phases = []  # (a_r, b_r, taps of phase r)
    for r in range(s):
        a, b = divmod(alpha + r, s)
        phases.append((a, b, max(0, _ceil_div(k - b, s))))
    live = [(a, n) for a, _, n in phases if n > 0]
    lo = min(a - n + 1 for a, n in live)
    hi = max(a for a, _ in live)
    u = hi - lo + 1
    # Conv position u reads x[q + (lo + u)*d] for output row q*s + alpha + r of the full output; with
    # pad_begin P the Conv's row q' is q + P + lo*d, i.e. interleaved index p = o + (P + lo*d)*s - alpha.
    pad_begin = max(0, _ceil_div(alpha - pb, s) - lo * d)
    start = pb + (pad_begin + lo * d) * s - alpha
    pad_end = max(0, hi * d - 1 + _ceil_div(op + (k - 1) * d + 1 - pe - alpha, s))
    extra = pad_begin + pad_end - (u - 1) * d
    # interleaved length (H + extra)*s minus start minus OH = (H-1)*s + op + (k-1)*d + 1 - pb - pe
    tail = extra * s + s - start - op - (k - 1) * d - 1 + pb + pe
    taps = np.full((s, u), k, dtype=np.int64)
    for r, (a, b, n) in enumerate(phases):
        for i in range(u):
            t = a - lo - i
            if 0 <= t < n:
                taps[r, i] = t * s + b
    assert start >= 0 and tail >= 0, (k, s, d, pb, pe, op, alpha)
    return AxisPlan(k, s, d, alpha, u, pad_begin, pad_end, start, tail, extra, taps)


def best_plan(k: int, s: int, d: int, pb: int, pe: int, op: int, size: Optional[int]) -> AxisPlan:
    """The phase offset with the fewest multiply-adds (then: no Slice, then the smallest offset)."""
    plans = [axis_plan(k, s, d, pb, pe, op, alpha) for alpha in range(s)]
    return min(plans, key=lambda p: (p.cost(size), p.start + p.tail > 0, p.alpha))


def _crop(ct: gs.Node, axis: int, size: Optional[int], k: int, s: int, d: int, op: int) -> Union[tuple, str]:
    """(pb, pe): the ConvTranspose's crop of its full output along `axis` (0 = H, 1 = W), as
    onnxruntime computes it, or the reason it cannot be rewritten."""
    auto_pad = _attr(ct, "auto_pad", "NOTSET")
    out_shape = ct.attrs.get("output_shape")
    full_minus_size = op + (k - 1) * d + 1 - s  # full output length - size*s
    if out_shape is not None:
        if size is None:
            return "output_shape with an input of unknown spatial size (the crop depends on it)"
        total = size * s + full_minus_size - int(out_shape[axis])
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = full_minus_size  # output size*s
    elif auto_pad == "VALID":
        return 0, 0
    else:
        pads = [int(p) for p in ct.attrs.get("pads", [0, 0, 0, 0])]
        if min(pads) < 0:
            return "negative pads"
        return pads[axis], pads[axis + 2]
    if total < 0:  # measured with onnxruntime 1.32, not what the ONNX spec's formulas give
        if out_shape is not None:
            return "output_shape larger than the full output (onnxruntime appends zeros at the end)"
        return (f"auto_pad={auto_pad} with input size * stride larger than the full output "
                "(onnxruntime returns the full output instead)")
    head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
    return head, total - head


def _spatial(x: gs.Tensor):
    shape = x.shape
    if shape is None or len(shape) != 4:
        return None, None
    return tuple(int(v) if isinstance(v, (int, np.integer)) and v > 0 else None for v in shape[2:])


@dataclasses.dataclass
class Plan:
    """The Conv (and the interleaving after it) that computes one ConvTranspose."""

    h: AxisPlan
    w: AxisPlan
    group: int
    m: int  # the ConvTranspose's output channels
    cg: int  # input channels per group
    sizes: tuple  # its input's H, W (None when not static)

    @property
    def phases(self) -> int:
        return self.h.s * self.w.s

    @property
    def key(self) -> tuple:
        """Identifies the Conv weight computed from a given ConvTranspose weight."""
        return tuple((p.s, p.alpha, p.u) for p in (self.h, self.w)) + (self.group,)

    def conv_attrs(self) -> dict:
        h, w = self.h, self.w
        return {"kernel_shape": [h.u, w.u], "pads": [h.pad_begin, w.pad_begin, h.pad_end, w.pad_end],
                "strides": [1, 1], "dilations": [h.d if h.s == 1 else 1, w.d if w.s == 1 else 1], "group": self.group}

    def conv_len(self) -> list:
        return [None if v is None else v + p.extra for v, p in zip(self.sizes, (self.h, self.w))]

    def weight(self, w: np.ndarray) -> np.ndarray:
        """[C, M/g, kH, kW] ConvTranspose weight -> [M*sH*sW, C/g, uH, uW] Conv weight: output channel
        m*sH*sW + rH*sW + rW is phase (rH, rW) of channel m (CRD order, each group's block contiguous)."""
        ph, pw, group = self.h, self.w, self.group
        c, mg, kh, kw = w.shape
        wz = np.zeros((c, mg, kh + 1, kw + 1), w.dtype)  # index k is a zero tap
        wz[:, :, :kh, :kw] = w
        g = wz[:, :, ph.taps[:, None, :, None], pw.taps[None, :, None, :]]  # [C, Mg, sH, sW, uH, uW]
        g = g.reshape(group, c // group, mg, ph.s, pw.s, ph.u, pw.u).transpose(0, 2, 3, 4, 1, 5, 6)
        return np.ascontiguousarray(g.reshape(group * mg * ph.s * pw.s, c // group, ph.u, pw.u))

    def bias(self, b: np.ndarray) -> np.ndarray:
        """A per-output-channel [M] vector of the ConvTranspose as the Conv's [M*sH*sW]."""
        return np.repeat(np.asarray(b).reshape(-1), self.phases)

    def macs(self) -> int:
        """Multiply-adds of the Conv per sample (unknown spatial sizes count as 1)."""
        spatial = int(np.prod([v for v in self.conv_len() if v is not None] or [1]))
        return spatial * self.m * self.phases * self.cg * self.h.u * self.w.u

    def tail(self, make: Callable, y, n):
        """Emit the interleaving and the crop after the Conv output `y`; returns the last tensor.

        make(op_type, inputs, shape, **attrs) -> output tensor; inputs are tensors or int64 arrays."""
        ph, pw, m = self.h, self.w, self.m
        conv_len = self.conv_len()
        full = [None if v is None else v * p.s for v, p in zip(conv_len, (ph, pw))]
        if self.phases > 1 and ph.s == pw.s:
            y = make("DepthToSpace", [y], [n, m] + full, blocksize=ph.s, mode="CRD")
        elif self.phases > 1:  # unequal strides: the same interleaving spelled out (static sizes, checked)
            y = make("Reshape", [y, np.array([0, m, ph.s, pw.s] + conv_len, np.int64)], [n, m, ph.s, pw.s] + conv_len)
            y = make("Transpose", [y], [n, m, conv_len[0], ph.s, conv_len[1], pw.s], perm=[0, 1, 4, 2, 5, 3])
            y = make("Reshape", [y, np.array([0, m] + full, np.int64)], [n, m] + full)
        if ph.start or ph.tail or pw.start or pw.tail:
            ends = [-p.tail if p.tail else INT64_MAX for p in (ph, pw)]
            out = [None if v is None else v - p.start - p.tail for v, p in zip(full, (ph, pw))]
            y = make("Slice", [y, np.array([ph.start, pw.start], np.int64), np.array(ends, np.int64),
                               np.array([2, 3], np.int64)], [n, m] + out)
        return y


def plan(ctx: PassContext, ct: gs.Node, x: gs.Tensor, w: gs.Tensor, b: Optional[gs.Tensor] = None) -> "Plan | Refusal":
    """The Plan for the ConvTranspose `ct`, or a Refusal saying why it stays (no tensor names, so the
    reasons aggregate)."""
    if (ct.domain or "") not in ("", "ai.onnx"):
        return ctx.refuse("not a default-domain ConvTranspose")
    if ctx.opset() < 11:
        return ctx.refuse(f"opset {ctx.opset()} < 11: DepthToSpace has no CRD mode")
    if not _is_const(ctx, w):
        return ctx.refuse("weight is not a constant initializer (computed, a graph input, or overridable as one)")
    if _present(b) and not _is_const(ctx, b):
        return ctx.refuse("bias is not a constant initializer")
    wshape = tuple(w.shape)
    if len(wshape) != 4 or (x.shape is not None and len(x.shape) != 4):
        return ctx.refuse("only 2-D ConvTranspose (4-D weight and input) is rewritten")
    for t in (x, w) + ((b,) if _present(b) else ()):
        try:
            if t.dtype is None or np.dtype(t.dtype) != np.float32:
                return ctx.refuse("only float32 ConvTranspose is rewritten")
        except TypeError:
            return ctx.refuse("only float32 ConvTranspose is rewritten")
    c, mg, kh, kw = (int(v) for v in wshape)
    group = int(ct.attrs.get("group", 1))
    if group < 1 or c % group:
        return ctx.refuse("group does not divide the weight's input channels")
    if _present(b) and tuple(b.shape) != (mg * group,):
        return ctx.refuse("bias is not of shape [M]")
    if list(ct.attrs.get("kernel_shape", [kh, kw])) != [kh, kw]:
        return ctx.refuse("kernel_shape does not match the weight")
    strides = [int(v) for v in ct.attrs.get("strides", [1, 1])]
    dil = [int(v) for v in ct.attrs.get("dilations", [1, 1])]
    opad = [int(v) for v in ct.attrs.get("output_padding", [0, 0])]
    out_shape = ct.attrs.get("output_shape")
    if len(strides) != 2 or len(dil) != 2 or len(opad) != 2 or (out_shape is not None and len(out_shape) != 2):
        return ctx.refuse("strides/dilations/output_padding/output_shape not of length 2")
    if min(strides) < 1 or min(dil) < 1 or min(opad) < 0:
        return ctx.refuse("non-positive strides/dilations or negative output_padding")
    if any(o >= s for o, s in zip(opad, strides)):  # the spec allows < max(stride, dilation)
        return ctx.refuse("output_padding not below the stride (onnxruntime 1.32 rejects it)")
    if any(d > 1 and s > 1 for s, d in zip(strides, dil)):
        return ctx.refuse("dilation with stride > 1 on one axis (each phase would need its own dilated sub-kernel)")
    if _attr(ct, "auto_pad", "NOTSET") not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return ctx.refuse(f"unknown auto_pad {_attr(ct, 'auto_pad', '')!r}")
    sizes = _spatial(x)
    if strides[0] != strides[1] and None in sizes:
        return ctx.refuse("unequal strides with an input of unknown spatial size (no DepthToSpace for them)")
    axes = []
    for axis, (k, s, d, op, size) in enumerate(zip((kh, kw), strides, dil, opad, sizes)):
        crop = _crop(ct, axis, size, k, s, d, op)
        if isinstance(crop, str):
            return ctx.refuse(crop)
        p = best_plan(k, s, d, crop[0], crop[1], op, size)
        if size is not None and (size + p.extra < 1 or (size + p.extra) * s - p.start - p.tail < 1):
            return ctx.refuse("empty output")
        axes.append(p)
    return Plan(axes[0], axes[1], group, mg * group, c // group, sizes)


# ------------------------------------------------------------------------------------------ the pass

def _ct(n_inputs: int, act: Optional[str], n_act_inputs: int = 1):
    def pattern(op, x, w, b, lo, hi):
        y = op.ConvTranspose(*[x, w, b][:n_inputs], _as="ct")
        if act is None:
            return y
        return getattr(op, act)(y, *[lo, hi][:n_act_inputs - 1], _as="act")
    return pattern


def _condition(ctx, ct, x, w, b=None, act=None):
    p = plan(ctx, ct, x, w, b)
    if isinstance(p, Refusal):
        return ctx.refuse(f"{ct.name or 'ConvTranspose'}: {p}")
    out = ct.outputs[0]
    if act is None and len(out.outputs) == 1 and out.outputs[0].op in ACTIVATIONS \
            and not ctx.is_graph_output(out) and (out.outputs[0].domain or "") in ("", "ai.onnx"):
        return ctx.refuse("")  # the longer match (with the activation moved before the interleaving) follows
    return True


def _replacement(op, ct, x, w, b=None, act=None, lo=None, hi=None):
    """2-D ConvTranspose (constant weight [C, M/g, kH, kW], optional constant bias) → Conv with
    sH*sW*M output channels and a kernel of at most ceil(k/s) on the padded input → DepthToSpace (CRD;
    Reshape/Transpose/Reshape for unequal strides) → Slice, equal within float rounding. A Relu or
    Clip after it moves before the interleaving (it is elementwise), where onnxruntime fuses it into
    the Conv and the quantizer folds it into QConv."""
    ctx = op.ctx
    p = plan(ctx, ct, x, w, b)
    bias = op.const(p.bias(_const(ctx, b)), "b") if _present(b) else None
    n = x.shape[0] if x.shape is not None else None
    y = op.Conv(x, op.const(p.weight(np.asarray(_const(ctx, w))), "w"), bias, **p.conv_attrs())
    _typed(y, [n, p.m * p.phases] + p.conv_len())
    if act is not None:
        y = getattr(op, act.op)(y, *act.inputs[1:], **act.attrs)
        _typed(y, [n, p.m * p.phases] + p.conv_len())

    def make(op_type, inputs, shape, **attrs):
        t = getattr(op, op_type)(*inputs, **attrs)
        _typed(t, shape)
        return t

    return p.tail(make, y, n)


def _typed(t: gs.Variable, shape) -> None:
    """Intermediate tensors get dtype and shape now: the quantizer reads the Conv output's shape
    (multiply-adds) before any shape inference runs."""
    t.dtype = np.float32
    t.shape = list(shape)


ACTIVATIONS = ("Relu", "Clip")

convtranspose_to_conv = register_pass(RewriteRule(
    "convtranspose_to_conv",
    [_ct(n, "Clip", a) for n in (3, 2) for a in (3, 2, 1)] + [_ct(n, "Relu") for n in (3, 2)]
    + [_ct(n, None) for n in (3, 2)],
    _replacement, _condition, kind="lowering",
    doc="Rewrite a 2-D ConvTranspose as a stride-1 Conv + DepthToSpace + Slice (sub-pixel decomposition, no "
        "zero insertion).\n\n" + (_replacement.__doc__ or "")))
