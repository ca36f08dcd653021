"""Pruning: zero the smallest weights (`prune_magnitude`) or remove whole output channels and rewrite
every tensor they flow into (`prune_channels`). Both are approximate and neither fine-tunes.

Zeros buy nothing on CPU (onnxruntime runs a sparse GEMM as fast as a dense one); fewer channels do.
Channel pruning therefore rests on a dependency analysis, `ChannelAnalysis`, that answers: which
tensors carry the output channels of which layer, on which axis, and which other layers must drop
the same channels?

- A *producer* is a Conv / ConvTranspose (group 1), Gemm or MatMul with a constant weight: it starts
  a *channel space* (its output channels).
- One sweep in topological order carries a `ChannelMap` (space, axis, block, rank) from each tensor
  to the tensors computed from it by channel-preserving ops (activations, pools, Pad on spatial
  dims, BatchNormalization, depthwise Conv, per-channel constant arithmetic, Flatten, Squeeze...).
  A Flatten turns channel c into the `block` = H·W consecutive features [c·block, (c+1)·block).
- Where a channel space is *consumed* (the next layer's input channels, a BatchNormalization's
  parameters, a per-channel constant, a depthwise Conv's weights) the sweep records a *slice*:
  (node, input index, axis, ChannelMap). Nothing is rewritten yet.
- Elementwise ops joining two mapped tensors (a residual Add, an SE-block Mul) *union* their spaces
  (union-find): they must keep the same channels. Concat along the channel axis makes a *composite*
  space whose channels are its inputs' channels at offsets.
- A space whose channels reach a graph output, a subgraph, or an op the sweep cannot follow
  (Transpose, Split, Gather/Slice, Reshape to fixed sizes, Softmax over channels, unknown ops...) is
  *blocked*: every producer in it keeps all its channels, and the report says why.

Then each unblocked group (union of producers) keeps its channels of largest summed weight norm and
every recorded slice is applied: one new initializer per (node, input).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from .base import Pass, PassContext, register_pass
from ..errors import PassOptionError
from .fusion import FLOAT_TYPES, _attr, _is_const

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _float(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype).name in FLOAT_TYPES
    except TypeError:
        return False


def _label(node: gs.Node) -> str:
    return node.name or node.op


def _names(nodes, limit: int = 4) -> str:
    names = [_label(n) for n in nodes]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------------- prune_magnitude

def _reduction_axis(node: gs.Node) -> int:
    """Axis of the weight that the layer sums over (N:M groups run along it)."""
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    return 0  # ConvTranspose [C_in, C_out/g, k...], MatMul [K, N]


def _nm_mask(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Boolean mask keeping the n largest |w| in every run of m consecutive elements along `axis`."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    order = np.argsort(groups, axis=-1, kind="stable")  # ascending: the first m - n are dropped
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@register_pass
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude weights of Conv/ConvTranspose/Gemm/MatMul (unstructured or N:M)."""

    name = "prune_magnitude"
    kind = "prune"
    exact = False
    idempotent = True
    recurse_subgraphs = False  # one run sees every graph, so scope="global" is global
    options = {"sparsity": 0.5, "scope": "layer", "pattern": None}

    def validate_options(self) -> None:
        s = self.options["sparsity"]
        if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise PassOptionError(f"prune_magnitude: sparsity must be in [0, 1), got {s!r}")
        if self.options["scope"] not in ("layer", "global"):
            raise PassOptionError(f"prune_magnitude: scope must be 'layer' or 'global', got {self.options['scope']!r}")
        self.nm = None
        pattern = self.options["pattern"]
        if pattern is not None:
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise PassOptionError(f"prune_magnitude: pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
            self.nm = (int(m.group(1)), int(m.group(2)))

    def _weights(self, graph: gs.Graph, ctx: PassContext) -> List[Tuple[gs.Constant, gs.Node]]:
        """(weight, first layer reading it) for every constant float weight read only as a weight."""
        found: Dict[int, Tuple[gs.Constant, gs.Node]] = {}
        for g in ir.iter_graphs(graph):
            for node in g.nodes:
                if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
                    continue
                w = node.inputs[1]
                if id(w) in found or not _is_const(ctx, w) or not _float(w) or len(w.shape) < 2:
                    continue
                if all(c.op in WEIGHT_OPS and c.inputs[1] is w and c.inputs[0] is not w for c in w.outputs):
                    found[id(w)] = (w, node)
        return list(found.values())

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        sparsity = float(self.options["sparsity"])
        if self.nm is None and sparsity == 0.0:
            return False
        layers = self._weights(graph, ctx)
        values = [ctx.value(w) for w, _ in layers]
        masks: List[Optional[np.ndarray]] = []
        if self.nm is not None:
            n, m = self.nm
            for (w, node), v in zip(layers, values):
                axis = _reduction_axis(node)
                if v.shape[axis] % m:
                    ctx.note(f"{_label(node)}: reduction dim {v.shape[axis]} is not a multiple of {m}; "
                             f"no {n}:{m} pattern")
                    masks.append(None)
                else:
                    masks.append(_nm_mask(v, axis, n, m))
        elif self.options["scope"] == "layer":
            for v in values:
                masks.append(_smallest_mask(np.abs(v).ravel(), int(round(sparsity * v.size))).reshape(v.shape))
        else:
            flat = np.concatenate([np.abs(v).ravel().astype(np.float32) for v in values]) if values else np.zeros(0)
            drop = _smallest_mask(flat, int(round(sparsity * flat.size)))
            start = 0
            for v in values:
                masks.append(drop[start:start + v.size].reshape(v.shape))
                start += v.size
        changed = False
        zeros = total = 0
        for (w, node), v, mask in zip(layers, values, masks):
            if mask is None:
                continue
            # N:M masks say what to keep; unstructured ones say what to drop
            drop = ~mask if self.nm is not None else mask
            before = int(np.count_nonzero(v == 0))
            if np.any(v[drop] != 0):
                nv = v.copy()
                nv[drop] = 0
                _replace_constant(w, nv)
                changed = True
            else:
                nv = v
            z = int(np.count_nonzero(nv == 0))
            zeros += z
            total += nv.size
            ctx.note(f"{_label(node)}: {z / nv.size:.1%} of {nv.size} weights zero (was {before / nv.size:.1%})")
        if total:
            what = f"{self.nm[0]}:{self.nm[1]} pattern" if self.nm else f"{self.options['scope']} scope"
            done = sum(mk is not None for mk in masks)
            ctx.note(f"{done} weight(s), {what}: {zeros / total:.1%} of {total} weights zero; "
                     "zeros shrink compressed storage, not CPU latency")
        return changed


def _replace_constant(w: gs.Constant, value: np.ndarray) -> None:
    """Every reader of `w` reads a new in-memory initializer of the same name holding `value`."""
    new = gs.Constant(w.name, value)
    for consumer in list(w.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is w:
                consumer.inputs[i] = new


def _smallest_mask(a: np.ndarray, k: int) -> np.ndarray:
    """Mask of exactly k entries of the 1-D `a` with the smallest values (ties broken by position)."""
    mask = np.zeros(a.shape, bool)
    if k <= 0:
        return mask
    if k >= a.size:
        mask[:] = True
        return mask
    idx = np.argpartition(a, k - 1, kind="introselect")[:k]
    mask[idx] = True
    return mask


# ------------------------------------------------------------------------------- channel analysis

@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """Where a channel space lives in a tensor: channel c of `space` (of `size` channels) owns the
    indices [c·block, (c+1)·block) of `axis` of a tensor of rank `rank`."""

    space: int
    axis: int
    block: int
    rank: int
    size: int


@dataclasses.dataclass
class Slice:
    """A pending rewrite: take the kept channels of `map.space` along `axis` of `node.inputs[index]`."""

    node: gs.Node
    index: int
    axis: int
    map: ChannelMap


@dataclasses.dataclass
class ChannelGroup:
    """Producers that must keep the same output channels (joined by elementwise ops)."""

    root: int
    producers: List[gs.Node]
    size: int
    blocked: List[str]


# Ops whose output element [.., c, ..] depends on input element [.., c, ..] only (or on a window of
# the non-channel dims around it): the channel map passes through unchanged.
UNARY = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor",
         "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "ThresholdedRelu", "Identity", "Cast", "Clip",
         "Dropout"}
SPATIAL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd"}


class ChannelAnalysis:
    """Channel spaces of one graph: which tensors carry whose channels, what to slice, what is blocked.

    Build it with `ChannelAnalysis(graph, ctx)`; read `groups()`, `maps` (id(tensor) -> ChannelMap)
    and `slices`; apply a choice of kept channels with `apply(keep)`.
    """

    def __init__(self, graph: gs.Graph, ctx: PassContext):
        self.graph = graph
        self.ctx = ctx
        self.parent: List[int] = []
        self.size: List[int] = []
        self.producers: List[List[gs.Node]] = []
        self.segments: List[Optional[List[Tuple[Optional[int], int]]]] = []  # composite (Concat) spaces
        self.blocked: Dict[int, List[str]] = {}
        self.maps: Dict[int, ChannelMap] = {}
        self.tensors: Dict[int, gs.Tensor] = {}
        self.slices: List[Slice] = []
        self.group_attrs: List[Tuple[gs.Node, ChannelMap]] = []  # depthwise convs: group = kept channels
        self.skipped: Dict[str, List[gs.Node]] = {}  # layers that are not prunable, by reason
        self.local = {id(n) for n in graph.nodes}
        for node in graph.nodes:
            self._visit(node)
        self._check_boundaries()

    # spaces ---------------------------------------------------------------------------------------
    def _new_space(self, size: int, producer: Optional[gs.Node] = None, segments=None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.producers.append([producer] if producer is not None else [])
        self.segments.append(segments)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def block(self, space: int, reason: str) -> None:
        self.blocked.setdefault(self.find(space), []).append(reason)

    def _union(self, a: int, b: int, where: str) -> Optional[int]:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.segments[ra] is not None or self.segments[rb] is not None:
            self.block(ra, f"{where} joins concatenated channels with other channels")
            self.block(rb, f"{where} joins concatenated channels with other channels")
            return None
        if self.size[ra] != self.size[rb]:
            self.block(ra, f"{where} joins {self.size[ra]} channels with {self.size[rb]}")
            self.block(rb, f"{where} joins {self.size[rb]} channels with {self.size[ra]}")
            return None
        self.parent[rb] = ra
        self.producers[ra].extend(self.producers[rb])
        if rb in self.blocked:
            self.blocked.setdefault(ra, []).extend(self.blocked.pop(rb))
        return ra

    def _map(self, t: gs.Tensor, m: ChannelMap) -> None:
        self.maps[id(t)] = m
        self.tensors[id(t)] = t

    # the sweep ------------------------------------------------------------------------------------
    def _visit(self, node: gs.Node) -> None:
        mapped = [(i, t, self.maps[id(t)]) for i, t in enumerate(node.inputs) if id(t) in self.maps]
        out = self._through(node, mapped) if mapped else None
        if out is not None:
            for t in node.outputs[: 2 if node.op == "Dropout" else 1]:
                self._map(t, out)
        produced = self._produce(node, mapped)
        if produced is not None:
            self._map(node.outputs[0], produced)

    def _through(self, node: gs.Node, mapped) -> Optional[ChannelMap]:
        """The channel map of `node`'s output, recording slices on the way; None ends the walk
        (the node consumes the channels, or the space got blocked)."""
        op, label = node.op, _label(node)
        if op in ELEMENTWISE:
            return self._elementwise(node, mapped)
        if op == "Concat":
            return self._concat(node, mapped)
        i, t, m = mapped[0]
        if len(mapped) > 1 or i != 0:
            for _, _, mm in mapped:
                self.block(mm.space, f"{label} ({op}) reads the channels as a parameter")
            return None
        if op in UNARY:
            if op == "Dropout" and len(node.inputs) > 2 and not _is_false(self.ctx, node.inputs[2]):
                self.block(m.space, f"{label}: Dropout in training mode")
                return None
            return m
        if op in SPATIAL:
            if m.axis != 1 or m.block != 1:
                return self._stop(m, label, f"{op} over a flattened channel axis")
            if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
                return self._stop(m, label, "MaxPool indices are used")
            return m
        if op == "Pad":
            return m if self._pad_spares_channels(node, m) else self._stop(m, label, "Pad on the channel axis or with non-constant pads")
        if op in ("BatchNormalization", "InstanceNormalization"):
            return self._normalization(node, m)
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return self._layer_input(node, m)
        if op == "Flatten":
            return self._flatten(node, m, _norm_axis(int(_attr(node, "axis", 1)), m.rank))
        if op == "Reshape":
            shape = self._const(node.inputs[1])
            if shape is not None and list(shape.ravel()) == [0, -1] and not _attr(node, "allowzero", 0):
                return self._flatten(node, m, 1)
            return self._stop(m, label, "Reshape to hard-coded sizes")
        if op in ("Squeeze", "Unsqueeze"):
            return self._squeeze(node, m)
        if op in REDUCE:
            return self._reduce(node, m)
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            default = -1 if self.ctx.opset() >= 13 else 1
            axis = _norm_axis(int(_attr(node, "axis", default)), m.rank)
            if (axis != m.axis) if self.ctx.opset() >= 13 else (axis > m.axis):
                return m
            return self._stop(m, label, f"{op} over the channel axis")
        return self._stop(m, label, f"{op} is not channel-traceable")

    def _stop(self, m: ChannelMap, label: str, why: str) -> None:
        self.block(m.space, f"{label}: {why}")
        return None

    def _const(self, t: gs.Tensor) -> Optional[np.ndarray]:
        return self.ctx.value(t) if t is not None and _is_const(self.ctx, t) else None

    def _shape(self, t: gs.Tensor) -> Optional[tuple]:
        if id(t) in self.maps:
            return None
        s = self.ctx.shape(t)
        return s if s is not None and all(isinstance(d, int) and d >= 0 for d in s) else None

    def _slice(self, node: gs.Node, index: int, axis: int, m: ChannelMap) -> None:
        self.slices.append(Slice(node, index, axis, m))

    def _layer_input(self, node: gs.Node, m: ChannelMap) -> Optional[ChannelMap]:
        """The channels are the input of a Conv / ConvTranspose / Gemm / MatMul."""
        label, op = _label(node), node.op
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if w is None or not _is_const(self.ctx, w):
            return self._stop(m, label, f"{op} weight is not a constant initializer")
        ws = tuple(w.shape)
        if op in ("Conv", "ConvTranspose"):
            if m.axis != 1 or m.block != 1:
                return self._stop(m, label, f"{op} reads a flattened channel axis")
            group = int(_attr(node, "group", 1))
            if group == 1 and op == "Conv" and ws[1] == m.size:
                self._slice(node, 1, 1, m)
                return None
            if group == 1 and op == "ConvTranspose" and ws[0] == m.size:
                self._slice(node, 1, 0, m)
                return None
            if op == "Conv" and group == m.size and ws[0] == m.size and ws[1] == 1:  # depthwise: in/out tied
                b = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
                if b is not None and not _is_const(self.ctx, b):
                    return self._stop(m, label, "depthwise Conv bias is not a constant initializer")
                self._slice(node, 1, 0, m)
                if b is not None:
                    self._slice(node, 2, 0, m)
                self.group_attrs.append((node, m))
                return m
            return self._stop(m, label, f"grouped {op} (group={group})")
        if len(ws) != 2:
            return self._stop(m, label, f"{op} weight is not 2-D")
        if op == "Gemm":
            if _attr(node, "transA", 0) or m.axis != 1:
                return self._stop(m, label, "Gemm with transA=1")
            axis = 1 if _attr(node, "transB", 0) else 0
        else:
            if m.axis != m.rank - 1:
                return self._stop(m, label, "MatMul over a non-channel axis")
            axis = 0
        if ws[axis] != m.size * m.block:
            return self._stop(m, label, f"{op} reduces over {ws[axis]} features, not {m.size}x{m.block}")
        self._slice(node, 1, axis, m)
        return None

    def _normalization(self, node: gs.Node, m: ChannelMap) -> Optional[ChannelMap]:
        label = _label(node)
        if m.axis != 1 or m.block != 1:
            return self._stop(m, label, f"{node.op} over a flattened channel axis")
        if node.op == "BatchNormalization" and (_attr(node, "training_mode", 0) or len(node.outputs) > 1):
            return self._stop(m, label, "BatchNormalization in training mode")
        params = range(1, len(node.inputs))
        if not all(_is_const(self.ctx, node.inputs[j]) and tuple(node.inputs[j].shape) == (m.size,) for j in params):
            return self._stop(m, label, f"{node.op} parameters are not constant [{m.size}] vectors")
        for j in params:
            self._slice(node, j, 0, m)
        return m

    def _pad_spares_channels(self, node: gs.Node, m: ChannelMap) -> bool:
        if len(node.inputs) > 1:
            pads = self._const(node.inputs[1])
            if pads is None or any(not _is_const(self.ctx, t) for t in node.inputs[2:] if not t.is_empty()):
                return False
            axes = list(range(m.rank))
            if len(node.inputs) > 3 and not node.inputs[3].is_empty():
                axes = [_norm_axis(int(a), m.rank) for a in self._const(node.inputs[3]).ravel()]
        else:
            pads = np.asarray(node.attrs.get("pads", []))
            axes = list(range(m.rank))
        pads = pads.ravel()
        if len(pads) != 2 * len(axes):
            return False
        return all(pads[k] == 0 and pads[k + len(axes)] == 0 for k, a in enumerate(axes) if a == m.axis)

    def _flatten(self, node: gs.Node, m: ChannelMap, axis: int) -> Optional[ChannelMap]:
        label = _label(node)
        shape = self.ctx.shape(node.inputs[0])
        if axis != m.axis or shape is None or len(shape) != m.rank:
            return self._stop(m, label, "Flatten/Reshape that does not keep channels as whole feature blocks")
        inner = shape[m.axis + 1:]
        if not all(isinstance(d, int) and d > 0 for d in inner):
            return self._stop(m, label, "Flatten of dims of unknown size")
        return ChannelMap(m.space, 1, m.block * int(np.prod(inner, dtype=np.int64)), 2, m.size)

    def _axes(self, node: gs.Node, rank: int) -> Optional[List[int]]:
        if "axes" in node.attrs:
            return [_norm_axis(int(a), rank) for a in node.attrs["axes"]]
        if len(node.inputs) > 1 and not node.inputs[1].is_empty():
            v = self._const(node.inputs[1])
            return None if v is None else [_norm_axis(int(a), rank) for a in v.ravel()]
        return []

    def _squeeze(self, node: gs.Node, m: ChannelMap) -> Optional[ChannelMap]:
        label = _label(node)
        if node.op == "Squeeze":
            axes = self._axes(node, m.rank)
            if not axes or m.axis in axes:
                return self._stop(m, label, "Squeeze of the channel axis or of unspecified axes")
            return ChannelMap(m.space, m.axis - sum(a < m.axis for a in axes), m.block, m.rank - len(axes), m.size)
        out_rank = m.rank + len(node.attrs.get("axes", [])) if "axes" in node.attrs else None
        if out_rank is None:
            v = self._const(node.inputs[1]) if len(node.inputs) > 1 else None
            if v is None:
                return self._stop(m, label, "Unsqueeze with non-constant axes")
            out_rank = m.rank + v.size
        axes = self._axes(node, out_rank)
        pos = m.axis
        for a in sorted(axes):
            if a <= pos:
                pos += 1
        return ChannelMap(m.space, pos, m.block, out_rank, m.size)

    def _reduce(self, node: gs.Node, m: ChannelMap) -> Optional[ChannelMap]:
        axes = self._axes(node, m.rank)
        if axes is None or not axes or m.axis in axes:
            return self._stop(m, _label(node), f"{node.op} over the channel axis")
        if _attr(node, "keepdims", 1):
            return m
        return ChannelMap(m.space, m.axis - sum(a < m.axis for a in axes), m.block, m.rank - len(axes), m.size)

    def _elementwise(self, node: gs.Node, mapped) -> Optional[ChannelMap]:
        """Add/Mul/... : mapped inputs join one space; constants per channel are sliced."""
        label = _label(node)
        ranks = [self.maps[id(t)].rank if id(t) in self.maps else
                 (len(t.shape) if t.shape is not None else None) for t in node.inputs]
        if any(r is None for r in ranks):
            for _, _, m in mapped:
                self.block(m.space, f"{label}: {node.op} with an operand of unknown rank")
            return None
        rank = max(ranks)
        aligned = [(t, ChannelMap(m.space, m.axis + rank - m.rank, m.block, rank, m.size)) for _, t, m in mapped]
        first = aligned[0][1]
        for _, m in aligned[1:]:
            if (m.axis, m.block) != (first.axis, first.block):
                for _, mm in aligned:
                    self.block(mm.space, f"{label}: {node.op} joins channels on different axes")
                return None
        for j, t in enumerate(node.inputs):
            if id(t) in self.maps:
                continue
            pos = first.axis - (rank - ranks[j])
            shape = self.ctx.shape(t)
            dim = shape[pos] if pos >= 0 else 1
            if dim == 1:
                continue  # broadcast along the channels
            if _is_const(self.ctx, t) and dim == first.size * first.block:
                self._slice(node, j, pos, first)
                continue
            for _, mm in aligned:
                self.block(mm.space, f"{label}: {node.op} with {t.name!r}, whose channels cannot be pruned")
            return None
        space = first.space
        for _, m in aligned[1:]:
            space = self._union(space, m.space, f"{label} ({node.op})")
            if space is None:
                return None
        return dataclasses.replace(first, space=self.find(space))

    def _concat(self, node: gs.Node, mapped) -> Optional[ChannelMap]:
        label = _label(node)
        m0 = mapped[0][2]
        axis = _norm_axis(int(_attr(node, "axis", 1)), m0.rank)
        ok = all(m.rank == m0.rank and m.axis == m0.axis and m.block == 1 for _, _, m in mapped)
        if ok and axis == m0.axis:
            segments = []
            for t in node.inputs:
                m = self.maps.get(id(t))
                if m is not None:
                    segments.append((m.space, m.size))
                    continue
                shape = self.ctx.shape(t)
                if shape is None or len(shape) != m0.rank or not isinstance(shape[axis], int):
                    ok = False
                    break
                segments.append((None, shape[axis]))
            if ok:
                size = sum(n for _, n in segments)
                space = self._new_space(size, segments=segments)
                return ChannelMap(space, axis, 1, m0.rank, size)
        elif ok and len(mapped) == len(node.inputs):  # along another axis: channels must match
            space = m0.space
            for _, _, m in mapped[1:]:
                space = self._union(space, m.space, f"{label} (Concat)")
                if space is None:
                    return None
            return dataclasses.replace(m0, space=self.find(space))
        for _, _, m in mapped:
            self.block(m.space, f"{label}: Concat with inputs whose channels cannot be followed")
        return None

    # producers ------------------------------------------------------------------------------------
    def _produce(self, node: gs.Node, mapped) -> Optional[ChannelMap]:
        """A new channel space for a prunable layer's output, its weight (and bias) slices recorded."""
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2 or len(node.outputs) != 1:
            return None
        w = node.inputs[1]
        if not _is_const(self.ctx, w) or any(t is w for t in node.inputs[:1]):
            return self._skip(node, "weight is not a constant initializer")
        if not _float(w):
            return self._skip(node, "weight is not a float tensor")
        ws = tuple(w.shape)
        b = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if b is not None and not _is_const(self.ctx, b):
            return self._skip(node, "bias is not a constant initializer")
        if node.op in ("Conv", "ConvTranspose"):
            group = int(_attr(node, "group", 1))
            if group != 1:  # depthwise convs follow their input's channels: not a layer of their own
                return None if node.op == "Conv" and ws[1] == 1 else self._skip(node, f"grouped {node.op}")
            w_axis = 0 if node.op == "Conv" else 1
            size, rank, axis = ws[w_axis], len(ws), 1
            b_axis = 0
        else:
            if len(ws) != 2:
                return self._skip(node, "weight is not 2-D")
            if node.op == "Gemm":
                if _attr(node, "transA", 0):
                    return self._skip(node, "Gemm with transA=1")
                w_axis = 0 if _attr(node, "transB", 0) else 1
                rank, axis, size = 2, 1, ws[w_axis]
                b_axis = None
                if b is not None:
                    bs = tuple(b.shape)
                    if len(bs) > 2 or (len(bs) == 2 and bs[0] != 1) or (bs and bs[-1] not in (1, size)):
                        return self._skip(node, "Gemm bias is not one value per output channel")
                    if bs and bs[-1] == size:
                        b_axis = len(bs) - 1
            else:
                if mapped and mapped[0][0] == 0 and mapped[0][2].axis != mapped[0][2].rank - 1:
                    return None  # (blocked already: its input's channels are not the reduced axis)
                rank = mapped[0][2].rank if mapped and mapped[0][0] == 0 else self.ctx.rank(node.inputs[0])
                if rank is None or rank < 2:
                    return self._skip(node, "MatMul input of unknown rank or rank < 2")
                w_axis, axis, size, b_axis = 1, rank - 1, ws[1], None
        space = self._new_space(size, producer=node)
        m = ChannelMap(space, axis, 1, rank, size)
        self._slice(node, 1, w_axis, m)
        if b is not None and b_axis is not None:
            self._slice(node, 2, b_axis, m)
        return m

    def _skip(self, node: gs.Node, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(node)
        return None

    def _check_boundaries(self) -> None:
        outputs = {id(t): t for t in self.graph.outputs}
        for key, m in self.maps.items():
            t = self.tensors[key]
            if key in outputs:
                self.block(m.space, f"channels reach graph output {t.name!r}")
            elif any(id(c) not in self.local for c in t.outputs):
                self.block(m.space, f"{t.name!r} is read inside a subgraph")

    # results --------------------------------------------------------------------------------------
    def groups(self) -> List[ChannelGroup]:
        """Every group of producers, blocked ones with their reasons (composite blocks passed on)."""
        blocked = {self.find(s): list(r) for s, r in self.blocked.items()}
        work = list(blocked)
        while work:  # a blocked Concat blocks the spaces it concatenates
            root = work.pop()
            for seg, _ in self.segments[root] or []:
                if seg is None:
                    continue
                r = self.find(seg)
                if r not in blocked:
                    work.append(r)
                blocked.setdefault(r, []).extend(x for x in blocked[root] if x not in blocked.get(r, []))
        out = []
        for s in range(len(self.parent)):
            if self.find(s) == s and self.segments[s] is None and self.producers[s]:
                out.append(ChannelGroup(s, self.producers[s], self.size[s], blocked.get(s, [])))
        return out

    def kept(self, space: int, keep: Dict[int, np.ndarray]) -> Optional[np.ndarray]:
        """Kept channel indices of `space` (None: all of them) given each group root's choice."""
        root = self.find(space)
        if self.segments[root] is None:
            return keep.get(root)
        parts, offset, changed = [], 0, False
        for seg, n in self.segments[root]:
            k = self.kept(seg, keep) if seg is not None else None
            changed |= k is not None
            parts.append((k if k is not None else np.arange(n)) + offset)
            offset += n
        return np.concatenate(parts) if changed else None

    def apply(self, keep: Dict[int, np.ndarray]) -> None:
        """Rewrite the graph: slice every recorded input, fix depthwise groups and tensor shapes."""
        pending: Dict[Tuple[int, int], list] = {}
        for s in self.slices:
            k = self.kept(s.map.space, keep)
            if k is not None:
                pending.setdefault((id(s.node), s.index), [s.node, s.index, []])[2].append((s.axis, _expand(k, s.map.block)))
        for node, index, cuts in pending.values():
            t = node.inputs[index]
            v = self.ctx.value(t)
            for axis, idx in cuts:
                v = np.take(v, idx, axis=axis)
            node.inputs[index] = gs.Constant(self.ctx.fresh_name(t.name), np.ascontiguousarray(v))
        for node, m in self.group_attrs:
            k = self.kept(m.space, keep)
            if k is not None:
                node.attrs["group"] = int(len(k))
        for key, m in self.maps.items():
            k = self.kept(m.space, keep)
            t = self.tensors[key]
            if k is not None and t.shape is not None and len(t.shape) == m.rank:
                shape = list(t.shape)
                shape[m.axis] = int(len(k) * m.block)
                t.shape = shape


def _expand(keep: np.ndarray, block: int) -> np.ndarray:
    if block == 1:
        return keep
    return (keep[:, None] * block + np.arange(block)[None, :]).ravel()


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _is_false(ctx: PassContext, t: gs.Tensor) -> bool:
    if t.is_empty():
        return True
    v = ctx.value(t) if _is_const(ctx, t) else None
    return v is not None and not bool(np.asarray(v).ravel()[0])


def channel_norms(node: gs.Node, ctx: PassContext, criterion: str) -> np.ndarray:
    """Per-output-channel l1 or l2 norm of a producer's weight."""
    w = ctx.value(node.inputs[1]).astype(np.float64)
    if node.op == "Conv":
        w = w.reshape(w.shape[0], -1)
    elif node.op == "ConvTranspose":
        w = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    elif node.op == "Gemm" and _attr(node, "transB", 0):
        pass
    else:
        w = w.T
    return np.abs(w).sum(axis=1) if criterion == "l1" else np.sqrt((w * w).sum(axis=1))


# ---------------------------------------------------------------------------------- prune_channels

@register_pass
class PruneChannels(Pass):
    """Remove the lowest-norm output channels of Conv/ConvTranspose/Gemm/MatMul and rewrite their consumers."""

    name = "prune_channels"
    kind = "prune"
    exact = False
    idempotent = False
    recurse_subgraphs = False
    options = {"ratio": 0.3, "per_layer": None, "criterion": "l1", "min_channels": 8, "multiple_of": 8}

    def validate_options(self) -> None:
        o = self.options
        ratios = [("ratio", o["ratio"])] + [(f"per_layer[{k!r}]", v) for k, v in (o["per_layer"] or {}).items()]
        for what, r in ratios:
            if not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
                raise PassOptionError(f"prune_channels: {what} must be in [0, 1), got {r!r}")
        if o["per_layer"] is not None and not isinstance(o["per_layer"], dict):
            raise PassOptionError("prune_channels: per_layer must be a dict of node name -> ratio")
        if o["criterion"] not in ("l1", "l2"):
            raise PassOptionError(f"prune_channels: criterion must be 'l1' or 'l2', got {o['criterion']!r}")
        if not isinstance(o["multiple_of"], int) or o["multiple_of"] < 1:
            raise PassOptionError(f"prune_channels: multiple_of must be a positive int, got {o['multiple_of']!r}")
        if not isinstance(o["min_channels"], int) or o["min_channels"] < 1:
            raise PassOptionError(f"prune_channels: min_channels must be a positive int, got {o['min_channels']!r}")

    def ratio_for(self, producers: List[gs.Node]) -> float:
        """The group's ratio: the smallest per_layer override among its layers, else `ratio`."""
        per_layer = self.options["per_layer"] or {}
        overrides = [float(per_layer[p.name]) for p in producers if p.name in per_layer]
        return min(overrides) if overrides else float(self.options["ratio"])

    def channels_to_keep(self, size: int, ratio: float) -> int:
        """size − round(ratio·size), at least `min_channels`, rounded up to a multiple of
        `multiple_of` (onnxruntime's conv kernels work on blocks of 8/16 channels and a partial
        block costs nearly a whole one), at most `size`: never more than `ratio` is removed."""
        n = max(size - int(np.floor(ratio * size + 0.5)), min(size, self.options["min_channels"]))
        step = self.options["multiple_of"]
        return min(size, -(-n // step) * step)

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        if float(self.options["ratio"]) == 0.0 and not any((self.options["per_layer"] or {}).values()):
            return False
        for sub in list(ir.iter_graphs(graph))[1:]:
            layers = [n for n in sub.nodes if n.op in WEIGHT_OPS]
            if layers:
                ctx.note(f"{_names(layers)}: inside an If/Loop/Scan body; prune_channels prunes the main graph only")
        analysis = ChannelAnalysis(graph, ctx)
        for reason, nodes in analysis.skipped.items():
            hint = " (run the default preset first: it removes Identity/Constant nodes in front of weights)" \
                if "constant initializer" in reason else ""
            ctx.note(f"{len(nodes)} layer(s) not prunable, {reason}: {_names(nodes)}{hint}")
        keep: Dict[int, np.ndarray] = {}
        params_before = _weight_params(graph)
        pruned_layers = 0
        for group in analysis.groups():
            if group.blocked:
                ctx.note(f"left {_names(group.producers)} alone: {group.blocked[0]}"
                         + (f" (+{len(group.blocked) - 1} more reasons)" if len(group.blocked) > 1 else ""))
                continue
            n_keep = self.channels_to_keep(group.size, self.ratio_for(group.producers))
            if n_keep >= group.size:
                continue
            score = sum(channel_norms(p, ctx, self.options["criterion"]) for p in group.producers)
            keep[group.root] = np.sort(np.argsort(-score, kind="stable")[:n_keep])
            pruned_layers += len(group.producers)
            ctx.note(f"{_names(group.producers)}: {group.size} -> {n_keep} channels")
        if not keep:
            return False
        analysis.apply(keep)
        params_after = _weight_params(graph)
        ctx.note(f"pruned {len(keep)} channel group(s), {pruned_layers} layer(s); layer weights "
                 f"{params_before / 1e6:.3g}M -> {params_after / 1e6:.3g}M parameters "
                 f"({params_after / max(params_before, 1):.0%}); not fine-tuned")
        return True


def _weight_params(graph: gs.Graph) -> int:
    seen, total = set(), 0
    for node in graph.nodes:
        for t in node.inputs[1:3] if node.op in WEIGHT_OPS else ():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                total += int(np.prod(t.shape, dtype=np.int64))
    return total
