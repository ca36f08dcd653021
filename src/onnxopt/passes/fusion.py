"""Fusions: fold BatchNormalization and per-channel Mul/Add into weights, MatMul+Add into Gemm, Pad
into Conv/Pool pads, and the decomposed LayerNormalization and GELU back into their ops.

Each fusion is a RewriteRule (pattern + condition + replacement); the condition spells out why a
match is refused and the replacement computes new weights with numpy instead of inserting
arithmetic nodes. Weights must be initializers the caller cannot override (not graph inputs) and
used by the matched node only: folding a shared weight would silently duplicate it.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .base import PassContext, register_pass
from .pattern import RewriteRule

FLOAT_TYPES = ("float16", "float32", "float64", "bfloat16")


class FusionRule(RewriteRule):
    """A RewriteRule repeated to its own fixed point, so chains (Conv→Mul→Add) fold in one run."""

    max_rounds = 8

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        changed = False
        first_message = len(ctx.report.messages)
        for _ in range(self.max_rounds):
            del ctx.report.messages[first_message:]  # the last round's refusals are the ones that stand
            if not super().run(graph, ctx):
                break
            changed = True
            _drop_dead(graph)
        return changed


def _drop_dead(graph: gs.Graph) -> None:
    """Remove nodes of `graph` whose outputs nobody reads (the leftovers of a rewrite round).

    Links are cut with plain list operations, once per touched tensor: graphsurgeon's synchronized
    lists remove one node at a time with a deep Node.__eq__ scan, quadratic on shared constants.
    """
    outputs = {id(t) for t in graph.outputs}
    local = {id(n) for n in graph.nodes}
    removed = {}

    def dead(n):
        return all(id(t) not in outputs and all(id(c) in removed for c in t.outputs) for t in n.outputs)

    work = [n for n in graph.nodes if dead(n)]
    while work:
        n = work.pop()
        if id(n) in removed or not dead(n):
            continue
        removed[id(n)] = n
        work.extend(t.inputs[0] for t in n.inputs if len(t.inputs) == 1 and id(t.inputs[0]) in local)
    if not removed:
        return
    touched = {}
    for n in removed.values():
        for t in n.inputs:
            touched[id(t)] = t
        for t in n.outputs:
            list.clear(t.inputs)
        list.clear(n.inputs)
        list.clear(n.outputs)
    for t in touched.values():
        kept = [c for c in t.outputs if id(c) not in removed]
        list.clear(t.outputs)
        list.extend(t.outputs, kept)
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


# ------------------------------------------------------------------------------------------ helpers

_OVERRIDABLE: "weakref.WeakKeyDictionary[PassContext, frozenset]" = weakref.WeakKeyDictionary()


def _overridable(ctx: PassContext) -> frozenset:
    """Names of initializers that are also graph inputs in a model of IR >= 4: a caller may feed
    other values, so they are not constants (graphsurgeon imports them as constants anyway)."""
    names = _OVERRIDABLE.get(ctx)
    if names is None:
        names = frozenset()
        m = ctx.model
        if m is not None and m.ir_version >= 4:
            names = frozenset({i.name for i in m.graph.input} & {t.name for t in m.graph.initializer})
        _OVERRIDABLE[ctx] = names
    return names


def _is_const(ctx: PassContext, t: Optional[gs.Tensor]) -> bool:
    """Is `t` an initializer no caller can override (not also a graph input)? Loads nothing."""
    if t is None or not ctx.is_constant(t):
        return False
    return not (t.name in _overridable(ctx) or (ctx.root is not None and any(t is i for i in ctx.root.inputs)))


def _const(ctx: PassContext, t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    """Value of `t` if `_is_const`, else None."""
    return ctx.value(t) if _is_const(ctx, t) else None


def _present(t: Optional[gs.Tensor]) -> bool:
    return t is not None and not t.is_empty()


def _shared(t: gs.Tensor, owner: gs.Node) -> bool:
    """True when a node other than `owner` reads `t` (in any graph)."""
    return any(c is not owner for c in t.outputs)


def _float_dtype(ctx: PassContext, t: gs.Tensor) -> Optional[np.dtype]:
    try:
        dt = ctx.dtype(t)
    except TypeError:
        return None
    return dt if dt is not None and dt.name in FLOAT_TYPES else None


def _scalar(ctx: PassContext, t: gs.Tensor, x: gs.Tensor) -> Optional[float]:
    """The value of a one-element constant whose broadcast against `x` keeps x's shape."""
    v = _const(ctx, t)
    if v is None or v.size != 1:
        return None
    rank = ctx.rank(x)
    if v.ndim > 0 and (rank is None or v.ndim > rank):
        return None
    return float(v.reshape(()))


def _close(value: Optional[float], target: float, dtype: np.dtype) -> bool:
    rtol = 1e-5 if dtype.itemsize >= 4 else 2e-3
    return value is not None and abs(value - target) <= rtol * abs(target)


def _attr(node: gs.Node, name: str, default):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _rule(name, patterns, replacement, condition, doc):
    return register_pass(FusionRule(name, patterns, replacement, condition, doc=doc))


# -------------------------------------------------------------------------------- fold_batchnorm

def _bn_pattern(op_type: str, n_inputs: int):
    def pattern(op, x, w, b, scale, beta, mean, var):
        producer = getattr(op, op_type)(*[x, w, b][:n_inputs], _as="producer")
        return op.BatchNormalization(producer, scale, beta, mean, var, _as="bn")
    return pattern


def _out_channels(producer: gs.Node, wshape: tuple) -> int:
    if producer.op == "Conv":
        return wshape[0]
    if producer.op == "ConvTranspose":
        return wshape[1] * int(producer.attrs.get("group", 1))
    if producer.op == "Gemm":
        return wshape[0] if producer.attrs.get("transB", 0) else wshape[1]
    return wshape[1]  # MatMul


def _bn_condition(ctx, producer, bn, x, w, scale, beta, mean, var, b=None):
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return ctx.refuse(f"{bn.name}: BatchNormalization in training mode (running-statistics outputs or "
                          "training_mode=1) normalizes with batch statistics")
    if bn.attrs.get("spatial", 1) != 1:
        return ctx.refuse(f"{bn.name}: spatial=0 BatchNormalization has per-element statistics")
    if not all(_is_const(ctx, t) for t in (scale, beta, mean, var)):
        return ctx.refuse(f"{bn.name}: scale/B/mean/var are not all constant initializers")
    if not _is_const(ctx, w):
        return ctx.refuse(f"{producer.name or producer.op}: weight {w.name!r} is not a constant initializer")
    if _shared(w, producer):
        return ctx.refuse(f"{producer.name or producer.op}: weight {w.name!r} is shared with other nodes; folding would copy it")
    if _present(b) and not _is_const(ctx, b):
        return ctx.refuse(f"{producer.name or producer.op}: bias {b.name!r} is not a constant initializer")
    wshape = tuple(w.shape)  # the weight's bytes are not needed (nor loaded) to decide
    if _float_dtype(ctx, w) is None:
        return ctx.refuse(f"{producer.name or producer.op}: weight dtype {w.dtype} is not a float type")
    if producer.op in ("Conv", "ConvTranspose") and len(wshape) < 3:
        return ctx.refuse(f"{producer.name or producer.op}: weight of rank {len(wshape)}")
    if producer.op in ("Gemm", "MatMul") and len(wshape) != 2:
        return ctx.refuse(f"{producer.name or producer.op}: {producer.op} weight is not 2-D")
    if producer.op == "MatMul" and ctx.rank(x) != 2:
        return ctx.refuse(f"{producer.name or producer.op}: BatchNormalization after MatMul normalizes dim 1, which is the "
                          f"weight's output dim only for a 2-D input (rank here: {ctx.rank(x)})")
    m = _out_channels(producer, wshape)
    if any(tuple(t.shape) != (m,) for t in (scale, beta, mean, var)):
        return ctx.refuse(f"{bn.name}: parameters are not of shape [{m}] (the producer's output channels)")
    return True


def _bn_replacement(op, producer, bn, x, w, scale, beta, mean, var, b=None):
    """Fold an inference BatchNormalization into the weights and bias of the Conv/ConvTranspose/Gemm/
    MatMul before it.

    BN(y) = γ·(y − mean)/√(var + ε) + β = s·y + (β − s·mean) with s = γ/√(var + ε), one value per
    output channel. With y = W∗x + b that is (s·W)∗x + s·(b − mean) + β: the weights are scaled per
    output channel (Conv: W[m]; ConvTranspose: W[c, m] with its [C, M/group, k...] layout; Gemm: the
    columns of B, rows when transB=1; MatMul: columns) and the bias becomes s·(b − mean) + β.
    """
    ctx = op.ctx
    g, bt, mu, v = (_const(ctx, t).astype(np.float64) for t in (scale, beta, mean, var))
    s = g / np.sqrt(v + float(bn.attrs.get("epsilon", 1e-5)))
    wv = _const(ctx, w)
    w64 = wv.astype(np.float64)
    attrs = dict(producer.attrs)
    if producer.op == "Conv":
        w_new = w64 * s.reshape((-1,) + (1,) * (w64.ndim - 1))
    elif producer.op == "ConvTranspose":
        group = int(attrs.get("group", 1))
        c, mg = w64.shape[:2]
        grouped = w64.reshape((group, c // group, mg) + w64.shape[2:])
        w_new = (grouped * s.reshape((group, 1, mg) + (1,) * (w64.ndim - 2))).reshape(w64.shape)
    elif producer.op == "Gemm" and attrs.get("transB", 0):
        w_new = w64 * s[:, None]
    else:  # Gemm (B is [K, N]) or MatMul
        w_new = w64 * s[None, :]
    b_old = _const(ctx, b).astype(np.float64) if _present(b) else 0.0
    if producer.op == "Gemm":
        b_old = b_old * float(attrs.get("beta", 1.0))
        attrs["beta"] = 1.0
    b_new = (b_old - mu) * s + bt
    b_dtype = _const(ctx, b).dtype if _present(b) else wv.dtype
    w_t = op.const(w_new.astype(wv.dtype), "w")
    b_t = op.const(b_new.astype(b_dtype), "b")
    if producer.op == "MatMul":
        return op.Gemm(x, w_t, b_t)
    return getattr(op, producer.op)(x, w_t, b_t, **attrs)


fold_batchnorm = _rule(
    "fold_batchnorm",
    [_bn_pattern(t, n) for t in ("Conv", "ConvTranspose", "Gemm") for n in (3, 2)] + [_bn_pattern("MatMul", 2)],
    _bn_replacement, _bn_condition,
    doc="Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul weights.\n\n"
        + (_bn_replacement.__doc__ or ""))


# ------------------------------------------------------------------------------ fold_conv_mul_add

def _cma_pattern(op_type: str, n_inputs: int):
    def pattern(op, x, w, b, c):
        conv = op.Conv(*[x, w, b][:n_inputs], _as="conv")
        return getattr(op, op_type)(conv, c, _as="root")
    return pattern


def _per_channel(c: np.ndarray, m: int, rank: int) -> Optional[np.ndarray]:
    """`c` as a vector of m per-output-channel values, if its broadcast against [N, m, spatial...]
    is per channel and does not grow the output."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if shape[0] != 1 or shape[1] not in (1, m) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(c.reshape(-1), (m,))


def _cma_condition(ctx, conv, root, x, w, c, b=None):
    if not _is_const(ctx, w):
        return ctx.refuse(f"{conv.name or conv.op}: weight {w.name!r} is not a constant initializer")
    if _shared(w, conv):
        return ctx.refuse(f"{conv.name or conv.op}: weight {w.name!r} is shared with other nodes; folding would copy it")
    if _present(b) and not _is_const(ctx, b):
        return ctx.refuse(f"{conv.name or conv.op}: bias {b.name!r} is not a constant initializer")
    cv = _const(ctx, c)
    if cv is None:
        return ctx.refuse(f"{root.name or root.op}: {root.op} operand {c.name!r} is not a constant initializer")
    if _per_channel(cv, w.shape[0], len(w.shape)) is None:
        return ctx.refuse(f"{root.name or root.op}: {root.op} operand of shape {list(cv.shape)} is not per output channel "
                          f"([M,1,...], [1,M,1,...] or one value)")
    return True


def _cma_replacement(op, conv, root, x, w, c, b=None):
    """Fold a per-output-channel Mul or Add by a constant into the Conv before it.

    Mul: (W∗x + b)·c = (c·W)∗x + c·b, W scaled along its output-channel axis.
    Add: (W∗x + b) + c = W∗x + (b + c).
    c must broadcast as [M,1,1] / [1,M,1,1] / one value, so the output shape is unchanged.
    """
    ctx = op.ctx
    wv = _const(ctx, w)
    m = wv.shape[0]
    cv = _per_channel(_const(ctx, c).astype(np.float64), m, wv.ndim)
    w64 = wv.astype(np.float64)
    b64 = _const(ctx, b).astype(np.float64) if _present(b) else np.zeros(m)
    b_dtype = _const(ctx, b).dtype if _present(b) else wv.dtype
    w_t = w
    if root.op == "Mul":
        w_t = op.const((w64 * cv.reshape((-1,) + (1,) * (wv.ndim - 1))).astype(wv.dtype), "w")
        b64 = b64 * cv
    else:
        b64 = b64 + cv
    return op.Conv(x, w_t, op.const(b64.astype(b_dtype), "b"), **conv.attrs)


fold_conv_mul_add = _rule(
    "fold_conv_mul_add",
    [_cma_pattern(t, n) for t in ("Mul", "Add") for n in (3, 2)],
    _cma_replacement, _cma_condition,
    doc="Fold a per-output-channel constant Mul/Add after a Conv into its weights and bias.\n\n"
        + (_cma_replacement.__doc__ or ""))


# ------------------------------------------------------------------------- fuse_matmul_add_to_gemm

GEMM_TYPES = ("float16", "float32", "float64", "bfloat16", "int32", "int64", "uint32", "uint64")


def _mm_pattern(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def _dims_agree(bias_dim, out_dim) -> bool:
    if isinstance(bias_dim, (int, np.integer)) and bias_dim == 1:
        return True
    return bias_dim is not None and bias_dim == out_dim and not (isinstance(bias_dim, str) and not bias_dim)


def _mm_condition(ctx, x, w, b):
    if ctx.opset() < 7:
        return ctx.refuse(f"opset {ctx.opset()} < 7: Gemm has no broadcasting C")
    if ctx.rank(x) != 2:
        return ctx.refuse(f"MatMul input rank {ctx.rank(x)} is not 2; MatMul+Add of higher rank stays "
                          "(onnxruntime fuses it itself)")
    if ctx.rank(w) != 2:
        return ctx.refuse(f"MatMul {x.name!r} @ {w.name!r}: weight rank {ctx.rank(w)} is not 2")
    try:
        dt = ctx.dtype(x)
    except TypeError:
        dt = None
    if dt is None or dt.name not in GEMM_TYPES:
        return ctx.refuse(f"MatMul {x.name!r}: dtype {dt} is not a Gemm type")
    bs = ctx.shape(b)
    if bs is None or len(bs) > 2:
        return ctx.refuse(f"bias {b.name!r}: shape {bs} is not broadcastable to the 2-D MatMul output")
    out = (ctx.shape(x)[0], ctx.shape(w)[1])
    aligned = (1,) * (2 - len(bs)) + tuple(bs)
    if not all(_dims_agree(bd, od) for bd, od in zip(aligned, out)):
        return ctx.refuse(f"bias {b.name!r}: shape {list(bs)} does not broadcast to {list(out)} without growing it")
    return True


def _mm_replacement(op, x, w, b):
    """MatMul + Add → Gemm for a 2-D input: Add(MatMul(x, W), b) = Gemm(x, W, b) with alpha = beta = 1."""
    return op.Gemm(x, w, b)


fuse_matmul_add_to_gemm = _rule(
    "fuse_matmul_add_to_gemm", _mm_pattern, _mm_replacement, _mm_condition,
    doc="Fuse a 2-D MatMul followed by a bias Add into Gemm.\n\n" + (_mm_replacement.__doc__ or ""))


# ------------------------------------------------------------------------------ fuse_pad_into_conv

def _pad_pattern(n_pad_inputs: int, consumer: str, n_consumer_inputs: int):
    def pattern(op, x, pads, value, axes, w, b):
        pad = op.Pad(*[x, pads, value, axes][:n_pad_inputs], _as="pad")
        return getattr(op, consumer)(pad, *[w, b][:n_consumer_inputs - 1], _as="conv")
    return pattern


def _pad_plan(ctx, pad, conv, w=None, pads=None, value=None, axes=None):
    """(new attrs for `conv`) or a Refusal."""
    where = f"{pad.name or pad.op} -> {conv.name or conv.op}"
    if _attr(pad, "mode", "constant") != "constant":
        return ctx.refuse(f"{where}: Pad mode {_attr(pad, 'mode', '')!r} is not 'constant'")
    if "pads" in pad.attrs:  # opset < 11
        pv = np.asarray(pad.attrs["pads"], dtype=np.int64)
        cval = float(pad.attrs.get("value", 0.0))
    else:
        pv = _const(ctx, pads)
        if pv is None:
            return ctx.refuse(f"{where}: pads are not constant")
        pv = pv.astype(np.int64).reshape(-1)
        cval = 0.0
        if _present(value):
            cv = _const(ctx, value)
            if cv is None or cv.size != 1:
                return ctx.refuse(f"{where}: constant_value is not a constant scalar")
            cval = float(cv.reshape(()))
    kernel = conv.attrs.get("kernel_shape")
    if conv.op == "Conv":
        rank = ctx.rank(w) if kernel is None else len(kernel) + 2
    else:
        rank = len(kernel) + 2 if kernel is not None else None
    if rank is None:
        return ctx.refuse(f"{where}: rank of the padded tensor is unknown")
    if _present(axes):
        av = _const(ctx, axes)
        if av is None:
            return ctx.refuse(f"{where}: axes are not constant")
        full = np.zeros(2 * rank, dtype=np.int64)
        k = len(av)
        for i, a in enumerate(av.reshape(-1)):
            a = int(a) % rank
            full[a], full[a + rank] = pv[i], pv[i + k]
        pv = full
    if len(pv) != 2 * rank:
        return ctx.refuse(f"{where}: {len(pv)} pads for a rank-{rank} tensor")
    if (pv < 0).any():
        return ctx.refuse(f"{where}: negative pads crop; Conv pads cannot")
    if pv[0] or pv[1] or pv[rank] or pv[rank + 1]:
        return ctx.refuse(f"{where}: Pad pads the batch or channel dimension")
    auto_pad = _attr(conv, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return ctx.refuse(f"{where}: {conv.op} uses auto_pad={auto_pad}")
    sp = rank - 2
    old = np.asarray(conv.attrs.get("pads", [0] * 2 * sp) if auto_pad == "NOTSET" else [0] * 2 * sp, np.int64)
    new = old + np.concatenate([pv[2:rank], pv[rank + 2:]])
    attrs = {k: v for k, v in conv.attrs.items() if k != "auto_pad"}
    attrs["pads"] = [int(p) for p in new]
    if conv.op in ("AveragePool", "MaxPool"):
        if conv.attrs.get("ceil_mode", 0):
            return ctx.refuse(f"{where}: ceil_mode=1 windows may end inside the moved padding")
        if any(d != 1 for d in conv.attrs.get("dilations", [1] * sp)):
            return ctx.refuse(f"{where}: dilated pooling")
    if conv.op in ("Conv", "AveragePool") and cval != 0.0:
        return ctx.refuse(f"{where}: Pad value {cval} is not 0")
    if conv.op == "AveragePool" and not conv.attrs.get("count_include_pad", 0):
        if old.any():
            return ctx.refuse(f"{where}: AveragePool with its own pads and count_include_pad=0 would stop "
                              "counting the padded zeros")
        attrs["count_include_pad"] = 1  # the Pad's zeros were real elements: keep counting them
    if conv.op == "MaxPool":
        if len(conv.outputs) != 1:
            return ctx.refuse(f"{where}: MaxPool Indices output would change")
        if not _lowest(ctx, pad.outputs[0], cval):
            return ctx.refuse(f"{where}: MaxPool padding is ignored, Pad value {cval} is not the lowest value")
        if any(new[i] >= kernel[i % sp] or new[i + sp] >= kernel[i % sp] for i in range(sp)):
            return ctx.refuse(f"{where}: pads as large as the kernel leave windows without real elements")
    return attrs


def _lowest(ctx, t: gs.Tensor, value: float) -> bool:
    """Is `value` -inf or the lowest value of t's dtype (so it never wins a max)?"""
    if value == -math.inf:
        return True
    try:
        dt = ctx.dtype(t)
    except TypeError:
        return False
    if dt is None:
        return False
    if dt.kind == "f":
        return value <= float(np.finfo(dt).min)
    return dt.kind in "iu" and value <= float(np.iinfo(dt).min)


def _pad_condition(ctx, pad, conv, x, pads=None, value=None, axes=None, w=None, b=None):
    plan = _pad_plan(ctx, pad, conv, w, pads, value, axes)
    return plan if not isinstance(plan, dict) else True


def _pad_replacement(op, pad, conv, x, pads=None, value=None, axes=None, w=None, b=None):
    """Move a constant Pad of the spatial dims into the pads of the Conv/AveragePool/MaxPool after it.

    Conv: zero padding is what Conv pads add, so Conv(Pad(x, p)) = Conv(x, pads + p).
    AveragePool: the Pad's zeros are counted in the average, so the pool's padding must be counted
    too (count_include_pad=1; refused when the pool has its own uncounted pads).
    MaxPool: pool padding never wins the max, which equals Pad with -inf (or the dtype's lowest)
    as long as every window keeps a real element (pads < kernel, no ceil_mode, no dilation).
    """
    attrs = _pad_plan(op.ctx, pad, conv, w, pads, value, axes)
    ins = [x] + ([w] if _present(w) else []) + ([b] if _present(b) else [])
    return getattr(op, conv.op)(*ins, **attrs)


fuse_pad_into_conv = _rule(
    "fuse_pad_into_conv",
    [_pad_pattern(n, "Conv", c) for n in (1, 2, 3, 4) for c in (3, 2)]
    + [_pad_pattern(n, pool, 1) for n in (1, 2, 3, 4) for pool in ("AveragePool", "MaxPool")],
    _pad_replacement, _pad_condition,
    doc="Fold a constant spatial Pad into the pads of the Conv, AveragePool or MaxPool after it.\n\n"
        + (_pad_replacement.__doc__ or ""))


# ------------------------------------------------------------------------ fuse_layer_normalization

def _ln_pattern(axes_input: bool, square: str, normalize: str, affine: int):
    """affine: 0 none, 1 γ, 2 γ and β."""
    def pattern(op, x, ax1, ax2, two, eps, gamma, beta):
        def mean(t, ax, name):
            return op.ReduceMean(t, ax, _as=name) if axes_input else op.ReduceMean(t, _as=name)

        def root(level):
            return "root" if level == affine else None

        d = op.Sub(x, mean(x, ax1, "rm1"))
        sq = op.Pow(d, two) if square == "pow" else op.Mul(d, d)
        std = op.Sqrt(op.Add(mean(sq, ax2, "rm2"), eps))
        y = op.Div(d, std, _as=root(0)) if normalize == "div" else op.Mul(d, op.Reciprocal(std), _as=root(0))
        if affine >= 1:
            y = op.Mul(y, gamma, _as=root(1))
        if affine == 2:
            y = op.Add(y, beta, _as=root(2))
        return y
    return pattern


def _last_axis(ctx, rm, ax, rank) -> bool:
    if rm.attrs.get("keepdims", 1) != 1:
        return False
    axes = _const(ctx, ax) if _present(ax) else rm.attrs.get("axes")
    if axes is None:
        return False
    axes = np.asarray(axes).reshape(-1)
    return len(axes) == 1 and int(axes[0]) in (-1, rank - 1)


def _ln_vector(ctx, t, d: int, rank: int) -> Optional[np.ndarray]:
    """γ or β as a [D] array when it is a constant broadcasting like a [D] vector, else None."""
    v = _const(ctx, t)
    if v is None or v.ndim > rank or any(s != 1 for s in v.shape[:-1]) or (v.ndim and v.shape[-1] not in (1, d)):
        return None
    return np.broadcast_to(v.reshape(-1), (d,))


def _ln_condition(ctx, x, rm1, rm2, eps, root, gamma=None, beta=None, two=None, ax1=None, ax2=None):
    if ctx.opset() < 17:
        return ctx.refuse(f"LayerNormalization needs opset 17 (model has {ctx.opset()})")
    if _float_dtype(ctx, x) is None:
        return ctx.refuse(f"{x.name!r}: LayerNormalization wants a float input")
    shape = ctx.shape(x)
    if not shape or not isinstance(shape[-1], (int, np.integer)) or shape[-1] <= 0:
        return ctx.refuse(f"{x.name!r}: last dimension unknown (shape {shape})")
    rank, d = len(shape), int(shape[-1])
    if not (_last_axis(ctx, rm1, ax1, rank) and _last_axis(ctx, rm2, ax2, rank)):
        return ctx.refuse(f"{rm1.name}: ReduceMean is not over the last axis with keepdims=1")
    if two is not None and not _close(_scalar(ctx, two, x), 2.0, np.dtype(np.float32)):
        return ctx.refuse(f"{x.name!r}: the variance's Pow exponent is not 2")
    e = _scalar(ctx, eps, x)
    if e is None or e < 0:
        return ctx.refuse(f"{x.name!r}: epsilon is not a non-negative constant scalar")
    for t in (gamma, beta):
        if t is not None and _ln_vector(ctx, t, d, rank) is None and ctx.shape(t) != (d,):
            return ctx.refuse(f"{t.name!r}: scale/bias of shape {ctx.shape(t)} is not a [{d}] vector")
    if beta is None:  # leave it to the longer match when a constant γ Mul or β Add follows
        users = root.outputs[0].outputs
        follows = "Mul" if gamma is None else "Add"
        if len(users) == 1 and users[0].op == follows and any(ctx.is_constant(i) for i in users[0].inputs):
            return ctx.refuse("")
    return True


def _ln_replacement(op, x, eps, gamma=None, beta=None):
    """LayerNormalization over the last axis from its decomposition:
    d = x − ReduceMean(x); y = d / √(ReduceMean(d²) + ε) · γ + β  (d² as Pow(d, 2) or d·d, the division
    as Div or ·Reciprocal, γ and β optional) → LayerNormalization(x, γ or ones, β, axis=−1, epsilon=ε).
    """
    ctx = op.ctx
    shape = ctx.shape(x)
    rank, d = len(shape), int(shape[-1])

    def vec(t):
        v = _ln_vector(ctx, t, d, rank)
        return t if v is None or ctx.shape(t) == (d,) else op.const(np.ascontiguousarray(v), "v")

    scale = vec(gamma) if gamma is not None else op.const(np.ones(d, dtype=_float_dtype(ctx, x)), "ones")
    ins = [x, scale] + ([vec(beta)] if beta is not None else [])
    return op.LayerNormalization(*ins, axis=-1, epsilon=_scalar(ctx, eps, x))


fuse_layer_normalization = _rule(
    "fuse_layer_normalization",
    [_ln_pattern(a, s, n, affine) for affine in (2, 1, 0) for a in (False, True) for s in ("pow", "mul")
     for n in ("div", "reciprocal")],
    _ln_replacement, _ln_condition,
    doc="Fuse the decomposed layer norm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) into "
        "LayerNormalization (opset >= 17).\n\n" + (_ln_replacement.__doc__ or ""))


# -------------------------------------------------------------------------------------- fuse_gelu

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_pattern(form: str, variant: str, assoc: int):
    def pattern(op, x, half, one, k, kappa, three):
        if form == "erf":
            u = op.Div(x, k, _as="scale_node") if variant == "div" else op.Mul(x, k, _as="scale_node")
            h = op.Add(op.Erf(u), one)
        else:
            cube = op.Pow(x, three) if variant == "pow" else op.Mul(x, op.Mul(x, x))
            h = op.Add(op.Tanh(op.Mul(op.Add(x, op.Mul(cube, kappa)), k)), one)
        if assoc == 0:
            return op.Mul(op.Mul(x, h), half)
        if assoc == 1:
            return op.Mul(op.Mul(x, half), h)
        return op.Mul(x, op.Mul(h, half))
    return pattern


def _gelu_condition(ctx, x, half, one, k, scale_node=None, kappa=None, three=None):
    if ctx.opset() < 20:
        return ctx.refuse(f"Gelu needs opset 20 (model has {ctx.opset()})")
    dt = _float_dtype(ctx, x)
    if dt is None:
        return ctx.refuse(f"{x.name!r}: Gelu wants a float input")
    checks = [(half, 0.5), (one, 1.0)]
    if kappa is None:
        checks.append((k, SQRT2 if scale_node.op == "Div" else 1 / SQRT2))
    else:
        checks += [(k, SQRT_2_OVER_PI), (kappa, 0.044715)]
        if three is not None:
            checks.append((three, 3.0))
    for t, want in checks:
        got = _scalar(ctx, t, x)
        if not _close(got, want, dt):
            return ctx.refuse(f"{x.name!r}: constant {t.name!r} = {got} where GELU has {want:.7g}")
    return True


def _gelu_replacement(op, x, kappa=None):
    """GELU from its decomposition (opset >= 20):
    x·0.5·(1 + erf(x/√2)) → Gelu(x); 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) → Gelu(x,
    approximate="tanh"); the products in any association and order, x/√2 also as x·(1/√2), x³ as Pow or
    x·x·x.
    """
    if kappa is None:
        return op.Gelu(x)
    return op.Gelu(x, approximate="tanh")


fuse_gelu = _rule(
    "fuse_gelu",
    [_gelu_pattern("erf", v, a) for v in ("div", "mul") for a in range(3)]
    + [_gelu_pattern("tanh", v, a) for v in ("pow", "mul") for a in range(3)],
    _gelu_replacement, _gelu_condition,
    doc="Fuse the decomposed GELU (erf form or tanh approximation) into the Gelu op (opset >= 20).\n\n"
        + (_gelu_replacement.__doc__ or ""))


DEFAULT = [
    "fuse_pad_into_conv",
    "fuse_matmul_add_to_gemm",
    "fold_batchnorm",
    "fold_conv_mul_add",
    "fuse_layer_normalization",
    "fuse_gelu",
]
