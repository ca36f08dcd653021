"""Cleanup passes: Constant nodes to initializers, Identity/Dropout/no-op elimination, dead code,
duplicate initializers, common subexpressions and consecutive layout-op fusion.

All of them are exact and keep every graph input and output (name, dtype, shape). They are written
for one graph at a time (the manager calls them on every If/Loop/Scan body too): tensors from an
outer scope are never renamed or removed, and a tensor that is an output of any graph keeps its name
— when its producer goes away, the tensor is handed to the node that computes the same value.
Each pass builds its lookup tables once per run and walks the nodes once (linear in graph size).
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .. import ir
from .base import Pass, PassContext, register_pass

DEFAULT_DOMAINS = ("", "ai.onnx")
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
INT_MAX_ISH = 2**31 - 1  # Slice ends at or above this mean "to the end"


# ------------------------------------------------------------------------------------ helpers

class Scope:
    """What a pass needs to know about `graph` while rewriting it, computed once per run.

    `local`: ids of graph's own nodes; `boundary_out` / `boundary_in`: ids of tensors that are an
    output / input of any graph of the model (the main graph and every subgraph).
    """

    def __init__(self, graph: gs.Graph, ctx: Optional[PassContext]):
        self.graph = graph
        self.ctx = ctx
        self.local = {id(n) for n in graph.nodes}
        root = ctx.root if ctx is not None and ctx.root is not None else graph
        graphs = list(_iter_graph_objects(root))
        if not any(g is graph for g in graphs):
            graphs.extend(_iter_graph_objects(graph))
        self.boundary_out = {id(t) for g in graphs for t in g.outputs}
        self.boundary_in = {id(t) for g in graphs for t in g.inputs}
        self.removed: set = set()

    def is_output(self, t: gs.Tensor) -> bool:
        return id(t) in self.boundary_out

    def is_boundary(self, t: gs.Tensor) -> bool:
        return id(t) in self.boundary_out or id(t) in self.boundary_in

    def producer(self, t: gs.Tensor) -> Optional[gs.Node]:
        """The node of this graph producing `t`, or None (graph input, constant, outer scope)."""
        if len(t.inputs) == 1 and id(t.inputs[0]) in self.local and id(t.inputs[0]) not in self.removed:
            return t.inputs[0]
        return None

    def used(self, t: gs.Tensor) -> bool:
        return bool(t.outputs) or self.is_output(t)

    def can_replace(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        """Can every use of `old` read `new` instead (see `replace`)?"""
        if old is new:
            return False
        if not self.is_output(old):
            return True
        # `old` is a graph output: its name must stay, so `new`'s producer must take `old` over.
        return (isinstance(new, gs.Variable) and not self.is_boundary(new) and self.producer(new) is not None
                and not new.is_empty())

    def replace(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Make every consumer of `old` read `new`. Call after detaching `old`'s producer.

        When `old` is a graph output, `new`'s producer writes `old` instead and `new`'s consumers read
        `old`, so the output keeps its name (check `can_replace` first).
        """
        if self.is_output(old):
            prod = self.producer(new)
            prod.outputs[prod.outputs.index(new)] = old
            old, new = new, old
        for consumer in list(old.outputs):
            for j, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[j] = new

    def remove(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.removed.add(id(node))

    def commit(self) -> bool:
        """Drop removed nodes from the graph's node list; True when there were any."""
        if not self.removed:
            return False
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed]
        return True

    def bypass(self, node: gs.Node, src: gs.Tensor, out: gs.Tensor) -> bool:
        """Remove `node`, whose output `out` equals its input `src`; False when that is not allowed."""
        if not self.can_replace(out, src):
            return False
        self.remove(node)
        self.replace(out, src)
        return True


def _iter_graph_objects(graph: gs.Graph):
    yield graph
    for node in graph.nodes:
        for sub in _subgraphs(node):
            yield from _iter_graph_objects(sub)


def _subgraphs(node: gs.Node) -> List[gs.Graph]:
    out = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            out.append(attr)
        elif isinstance(attr, (list, tuple)):
            out.extend(a for a in attr if isinstance(a, gs.Graph))
    return out


def is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in DEFAULT_DOMAINS


def static_shape(t: gs.Tensor) -> Optional[tuple]:
    """The shape of `t` when every dimension is a known non-negative int, else None."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    shape = t.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def known_rank(t: gs.Tensor) -> Optional[int]:
    shape = t.shape
    return None if shape is None else len(shape)


def onnx_dtype(t: gs.Tensor) -> Optional[int]:
    """The ONNX element type of `t` (TensorProto enum), or None when unknown."""
    d = t.export_dtype if isinstance(t, gs.Constant) else t.dtype
    if d is None:
        return None
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d)))
    except Exception:
        return None


def const_value(t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    """Numpy value of a constant, or None (not a constant, or its external data cannot be read)."""
    if t is None or not isinstance(t, gs.Constant):
        return None
    try:
        return np.asarray(t.values)
    except Exception:
        return None


def const_ints(t: Optional[gs.Tensor]) -> Optional[List[int]]:
    """Values of a constant integer tensor as a flat list, else None."""
    v = const_value(t)
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in v.reshape(-1)]


def optional_input(node: gs.Node, i: int) -> Optional[gs.Tensor]:
    if len(node.inputs) > i and not node.inputs[i].is_empty():
        return node.inputs[i]
    return None


def axes_of(node: gs.Node, ctx: Optional[PassContext], input_since: int = 13):
    """(present, axes) for Squeeze/Unsqueeze/ReduceX-style `axes` (attribute before `input_since`).

    present=False: no axes given; axes=None: given but not a constant.
    """
    if "axes" in node.attrs:
        return True, [int(a) for a in node.attrs["axes"]]
    t = optional_input(node, 1)
    if t is None:
        return False, []
    return True, const_ints(t)


def normalize_axes(axes: Sequence[int], rank: Optional[int]) -> Optional[List[int]]:
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    if rank is not None and any(a < 0 or a >= rank for a in axes):
        return None
    return sorted(axes)


def _opset(ctx: Optional[PassContext], graph: gs.Graph) -> int:
    v = ctx.opset("") if ctx is not None else 0
    return v or int(getattr(graph, "opset", 0) or 0)


class GraphPass(Pass):
    """A pass whose run() builds a Scope and rewrites node by node."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        scope = Scope(graph, ctx)
        changed = self.rewrite(graph, scope, ctx)
        return scope.commit() or bool(changed)

    def rewrite(self, graph: gs.Graph, scope: Scope, ctx: PassContext) -> bool:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------- constant_to_initializer

def constant_node_value(node: gs.Node):
    """(values, export_dtype) of a Constant node's attribute, or None if unsupported (e.g. sparse)."""
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        c = a["value"]
        if isinstance(c._values, SparseValues):
            return None
        return c._values, c._export_dtype
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32), None
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32), None
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64), None
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64), None
    if "value_string" in a:
        s = a["value_string"]
        return np.array(s.encode() if isinstance(s, str) else s, dtype=object), None
    if "value_strings" in a:
        return np.array([s.encode() if isinstance(s, str) else s for s in a["value_strings"]], dtype=object), None
    return None


@register_pass
class ConstantToInitializer(GraphPass):
    """Turn Constant nodes into initializers (value, value_float(s), value_int(s), value_string(s))."""

    name = "constant_to_initializer"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        for node in graph.nodes:
            if node.op != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            # An initializer cannot be a graph output of its own graph in every runtime: keep those.
            if not isinstance(out, gs.Variable) or scope.is_output(out):
                continue
            value = constant_node_value(node)
            if value is None:
                continue
            scope.remove(node)
            out.to_constant(value[0], export_dtype=value[1])
        return False


# ------------------------------------------------------------------------------ eliminate_identity

@register_pass
class EliminateIdentity(GraphPass):
    """Remove Identity nodes (chains too, on initializers too); graph outputs keep their names."""

    name = "eliminate_identity"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        for node in list(graph.nodes):
            if node.op == "Identity" and is_default_domain(node) and len(node.inputs) == 1 \
                    and len(node.outputs) == 1:
                scope.bypass(node, node.inputs[0], node.outputs[0])
        return False


# ------------------------------------------------------------------------------- eliminate_dropout

def dropout_is_inference(node: gs.Node) -> bool:
    training = optional_input(node, 2)
    if training is None:
        return True
    value = const_value(training)
    return value is not None and not bool(np.any(value))


@register_pass
class EliminateDropout(GraphPass):
    """Remove inference-mode Dropout (no or constant-false training_mode) whose mask is unused."""

    name = "eliminate_dropout"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        for node in list(graph.nodes):
            if node.op != "Dropout" or not is_default_domain(node) or not node.inputs or not node.outputs:
                continue
            if not dropout_is_inference(node):
                continue
            if any(scope.used(t) for t in node.outputs[1:] if not t.is_empty()):
                continue  # the mask is consumed
            scope.bypass(node, node.inputs[0], node.outputs[0])
        return False


# --------------------------------------------------------------------------------- eliminate_nop

RESHAPE_LIKE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile"}
SINGLE_INPUT_NOP = {"Concat", "Sum", "Max", "Min", "Mean"}


def _reshape_target(in_shape: tuple, shape: List[int], allowzero: bool) -> Optional[tuple]:
    out = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            d = in_shape[i]
        out.append(d)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out)


def _slice_is_full(node: gs.Node, data: gs.Tensor) -> bool:
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = const_ints(optional_input(node, 1)), const_ints(optional_input(node, 2))
        if starts is None or ends is None:
            return False
        axes_t, steps_t = optional_input(node, 3), optional_input(node, 4)
        axes = const_ints(axes_t) if axes_t is not None else list(range(len(starts)))
        steps = const_ints(steps_t) if steps_t is not None else [1] * len(starts)
        if axes is None or steps is None:
            return False
    shape = data.shape
    rank = len(shape) if shape is not None else None
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            return False
        if a < 0:
            if rank is None:
                return False
            a += rank
        dim = shape[a] if shape is not None and 0 <= a < len(shape) else None
        dim = int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else None
        if s != 0 and not (dim is not None and s <= -dim):
            return False
        if e < INT_MAX_ISH and not (dim is not None and e >= dim):
            return False
    return True


def is_nop(node: gs.Node, ctx: Optional[PassContext], opset: int) -> bool:
    """Whether `node`'s first output always equals its first input (same dtype, shape and values)."""
    if not is_default_domain(node) or not node.inputs or len(node.outputs) != 1:
        return False
    op, x, y = node.op, node.inputs[0], node.outputs[0]
    if x.is_empty():
        return False
    if op in SINGLE_INPUT_NOP:
        return len(node.inputs) == 1
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            rank = known_rank(x)
            return rank is not None and rank <= 1
        return list(perm) == list(range(len(perm)))
    if op == "Cast":
        return onnx_dtype(x) is not None and onnx_dtype(x) == int(node.attrs.get("to", -1))
    if op == "CastLike":
        return len(node.inputs) == 2 and onnx_dtype(x) is not None and onnx_dtype(x) == onnx_dtype(node.inputs[1])
    if op == "Pad":
        pads = list(node.attrs["pads"]) if "pads" in node.attrs else const_ints(optional_input(node, 1))
        return pads is not None and all(p == 0 for p in pads)
    if op == "Slice":
        return _slice_is_full(node, x)
    if op not in RESHAPE_LIKE:
        return False
    in_shape = static_shape(x)
    if op == "Unsqueeze":
        present, axes = axes_of(node, ctx)
        if present and axes is not None and not axes:
            return True
    if op == "Tile":
        reps = const_ints(optional_input(node, 1))
        if reps is not None and all(r == 1 for r in reps):
            return True
    if in_shape is None:
        return False
    if op == "Reshape":
        shape = const_ints(optional_input(node, 1))
        if shape is not None:
            return _reshape_target(in_shape, shape, bool(node.attrs.get("allowzero", 0))) == in_shape
    if op == "Expand":
        shape = const_ints(optional_input(node, 1))
        if shape is not None:
            try:
                return tuple(np.broadcast_shapes(in_shape, tuple(shape))) == in_shape
            except ValueError:
                return False
    if op == "Squeeze":
        present, axes = axes_of(node, ctx)
        if (not present or axes == []) and 1 not in in_shape:
            return True
    # Pure reshapes whose (statically known) output shape equals the input shape.
    out_shape = static_shape(y)
    return out_shape is not None and out_shape == in_shape


@register_pass
class EliminateNop(GraphPass):
    """Remove no-op nodes: identity Transpose/Cast/Pad/Slice, same-shape Reshape/Expand/..., Concat of one."""

    name = "eliminate_nop"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        opset = _opset(ctx, graph)
        for node in list(graph.nodes):
            if is_nop(node, ctx, opset):
                scope.bypass(node, node.inputs[0], node.outputs[0])
        return False


# ---------------------------------------------------------------------------- eliminate_dead_code

# op -> index of the first output that may be omitted (every later output is optional too)
OPTIONAL_OUTPUTS_FROM = {"Dropout": 1, "BatchNormalization": 1, "MaxPool": 1, "LayerNormalization": 1,
                         "LSTM": 0, "GRU": 0, "RNN": 0, "Unique": 1, "SoftmaxCrossEntropyLoss": 1,
                         "NegativeLogLikelihoodLoss": 1}


@register_pass
class EliminateDeadCode(GraphPass):
    """Remove nodes whose outputs nothing uses and unused optional node outputs; graph I/O is kept."""

    name = "eliminate_dead_code"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        # Consumers inside a subgraph count through the node that owns the subgraph.
        owner: Dict[int, gs.Node] = {}
        for node in graph.nodes:
            for sub in _subgraphs(node):
                for g in _iter_graph_objects(sub):
                    for inner in g.nodes:
                        owner[id(inner)] = node
        dead = scope.removed  # nodes removed count as dead consumers

        def live(t: gs.Tensor) -> bool:
            if scope.is_output(t):
                return True
            for c in t.outputs:
                o = c if id(c) in scope.local else owner.get(id(c))
                if o is None or id(o) not in dead:
                    return True
            return False

        stack = list(graph.nodes)  # popped in reverse topological order: consumers first
        while stack:
            node = stack.pop()
            if id(node) in dead:
                continue
            if any(live(t) for t in node.outputs if not t.is_empty()):
                continue
            producers = [t.inputs[0] for t in node.inputs if len(t.inputs) == 1]
            for sub in _subgraphs(node):  # outer tensors read inside the subgraphs lose a consumer
                for g in _iter_graph_objects(sub):
                    for inner in g.nodes:
                        producers.extend(t.inputs[0] for t in inner.inputs if len(t.inputs) == 1)
            scope.remove(node)
            stack.extend(p for p in producers if id(p) in scope.local and id(p) not in dead)
        changed = False
        for node in graph.nodes:
            first = OPTIONAL_OUTPUTS_FROM.get(node.op)
            if first is None or id(node) in dead or not is_default_domain(node):
                continue
            outs = node.outputs
            for i in range(first, len(outs)):
                if not outs[i].is_empty() and not live(outs[i]):
                    outs[i] = gs.Variable.empty()
                    changed = True
            while len(outs) > max(first, 1) and outs[-1].is_empty():
                outs.pop()
        return changed


# ------------------------------------------------------------------- merge_duplicate_initializers

def _constant_bytes(c: gs.Constant) -> Optional[bytes]:
    """Raw little-endian bytes of a constant without converting lazily loaded protos when avoidable."""
    v = c._values
    if isinstance(v, SparseValues):
        return None
    if isinstance(v, ir.PayloadValues):  # kept-aside payload: its bytes, or where they live on disk
        raw, entries, _, _ = v.payload
        if raw is not None:
            return raw
        info = dict(entries)
        return repr(("external", info.get("location"), info.get("offset"), info.get("length"))).encode()
    if isinstance(v, LazyValues):
        t = v.tensor
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            return repr(("external", info.get("location"), info.get("offset"), info.get("length"))).encode()
        if t.HasField("raw_data"):
            return t.raw_data
        v = const_value(c)
        if v is None:
            return None
    arr = np.asarray(v)
    if arr.dtype == object:
        return repr(arr.tolist()).encode()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _sample(data: bytes) -> bytes:
    if len(data) <= 4096:
        return data
    step = len(data) // 2048
    return memoryview(data)[::step].tobytes() + data[-64:]


# values object (LazyValues or ndarray) -> fingerprint of its bytes: reading a lazily loaded
# initializer's bytes copies it, so each is read once per optimize() rather than once per run
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(c: gs.Constant) -> Optional[bytes]:
    v = c._values
    try:
        hit = _FINGERPRINTS.get(v)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    data = _constant_bytes(c)
    if data is None:
        return None
    fp = hashlib.blake2b(_sample(data), digest_size=16).digest() + len(data).to_bytes(8, "little")
    try:
        _FINGERPRINTS[v] = fp
    except TypeError:
        pass
    return fp


@register_pass
class MergeDuplicateInitializers(GraphPass):
    """Make initializers with equal dtype, shape and bytes one tensor (the first one's name wins).

    Runs over the main graph and every If/Loop/Scan body at once: equal weights in two branches
    (e.g. the same folded weight in both branches of an If) become one tensor, which the export
    stores once, in the innermost graph enclosing its readers."""

    name = "merge_duplicate_initializers"
    kind = "cleanup"
    recurse_subgraphs = False

    def rewrite(self, graph, scope, ctx):
        consts: Dict[int, gs.Constant] = {}
        for g in _iter_graph_objects(graph):
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and not scope.is_boundary(t):
                        consts.setdefault(id(t), t)
        buckets: Dict[tuple, List[gs.Constant]] = {}
        for c in consts.values():
            dt = onnx_dtype(c)
            if dt is None:
                continue
            buckets.setdefault((dt, tuple(c.shape)), []).append(c)
        changed = False
        for members in buckets.values():
            if len(members) < 2:
                continue
            groups: Dict[bytes, List[gs.Constant]] = {}
            for c in members:
                key = _fingerprint(c)
                if key is None:
                    continue
                reps = groups.setdefault(key, [])
                # equal fingerprints: confirm byte for byte (only for true duplicates, in practice)
                keep = next((k for k in reps if _constant_bytes(k) == _constant_bytes(c)), None) if reps else None
                if keep is None:
                    reps.append(c)
                    continue
                for consumer in list(c.outputs):
                    for j, t in enumerate(consumer.inputs):
                        if t is c:
                            consumer.inputs[j] = keep
                changed = True
        return changed


# ------------------------------------------------------------------ eliminate_common_subexpressions

class _Unhashable(Exception):
    pass


def _freeze(v):
    if isinstance(v, gs.Graph) or isinstance(v, gs.Node.AttributeRef):
        raise _Unhashable
    if isinstance(v, gs.Constant):
        data = _constant_bytes(v)
        if data is None:
            raise _Unhashable
        return ("T", onnx_dtype(v), tuple(v.shape), data)
    if isinstance(v, np.ndarray):
        return ("A", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, float) and v != v:
        return ("nan",)
    if isinstance(v, (dict, set)):
        raise _Unhashable
    return v


def node_key(node: gs.Node) -> Optional[tuple]:
    """Hashable identity of a node's computation, or None when it must not be merged."""
    domain = node.domain or ""
    if node.op in NONDETERMINISTIC or domain not in DEFAULT_DOMAINS + ("ai.onnx.ml", "com.microsoft"):
        return None
    if node.op == "Dropout" and not dropout_is_inference(node):
        return None
    try:
        attrs = tuple(sorted((k, _freeze(v)) for k, v in node.attrs.items()))
    except (_Unhashable, TypeError):
        return None
    inputs = tuple("" if t.is_empty() else id(t) for t in node.inputs)
    return node.op, domain, attrs, inputs, len(node.outputs)


@register_pass
class EliminateCommonSubexpressions(GraphPass):
    """Merge nodes with the same op, domain, attributes and inputs (not random ops, not subgraphs)."""

    name = "eliminate_common_subexpressions"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        seen: Dict[tuple, gs.Node] = {}
        for node in list(graph.nodes):
            key = node_key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            pairs = [(o, f) for o, f in zip(node.outputs, first.outputs) if not o.is_empty()]
            if any(f.is_empty() for _, f in pairs) or not all(scope.can_replace(o, f) for o, f in pairs):
                continue
            if len({id(f) for o, f in pairs if scope.is_output(o)}) < sum(scope.is_output(o) for o, _ in pairs):
                continue
            scope.remove(node)
            for o, f in pairs:
                scope.replace(o, f)
        return False


# --------------------------------------------------------------------- consecutive layout fusions

@register_pass
class FuseConsecutiveTransposes(GraphPass):
    """Fold Transpose(Transpose(x)) into one Transpose, or remove both when the perms cancel."""

    name = "fuse_consecutive_transposes"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        changed = False
        for node in list(graph.nodes):
            if node.op != "Transpose" or not is_default_domain(node) or id(node) in scope.removed:
                continue
            first = scope.producer(node.inputs[0])
            if first is None or first.op != "Transpose" or not is_default_domain(first):
                continue
            p1, p2 = first.attrs.get("perm"), node.attrs.get("perm")
            x = first.inputs[0]
            rank = len(p1) if p1 is not None else len(p2) if p2 is not None else known_rank(x)
            if rank is None:
                continue
            p1 = list(p1) if p1 is not None else list(range(rank))[::-1]
            p2 = list(p2) if p2 is not None else list(range(rank))[::-1]
            if len(p1) != len(p2):
                continue
            perm = [p1[i] for i in p2]
            if perm == list(range(rank)) and scope.bypass(node, x, node.outputs[0]):
                changed = True
                continue
            node.attrs["perm"] = perm
            node.inputs[0] = x
            changed = True
        return changed


@register_pass
class FuseConsecutiveReshapes(GraphPass):
    """Make Reshape(Reshape/Flatten/Squeeze/Unsqueeze(x), s) read x directly when s is a constant."""

    name = "fuse_consecutive_reshapes"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        changed = False
        for node in list(graph.nodes):
            if node.op != "Reshape" or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            shape = const_ints(node.inputs[1])
            if shape is None:
                continue
            if 0 in shape and not node.attrs.get("allowzero", 0):
                continue  # 0 copies a dimension of the (intermediate) input
            while True:
                first = scope.producer(node.inputs[0])
                if first is None or first.op not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") \
                        or not is_default_domain(first) or not first.inputs:
                    break
                node.inputs[0] = first.inputs[0]
                changed = True
        return changed


@register_pass
class FuseConsecutiveSqueezeUnsqueeze(GraphPass):
    """Cancel Squeeze/Unsqueeze pairs on the same axes and merge Unsqueeze(Unsqueeze(x)) into one."""

    name = "fuse_consecutive_squeeze_unsqueeze"
    kind = "cleanup"

    def rewrite(self, graph, scope, ctx):
        opset = _opset(ctx, graph)
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("Squeeze", "Unsqueeze") or not is_default_domain(node) \
                    or id(node) in scope.removed:
                continue
            first = scope.producer(node.inputs[0])
            if first is None or first.op not in ("Squeeze", "Unsqueeze") or not is_default_domain(first):
                continue
            present1, a1 = axes_of(first, ctx)
            present2, a2 = axes_of(node, ctx)
            if not (present1 and present2) or a1 is None or a2 is None or not a1 or not a2:
                continue
            x = first.inputs[0]
            r = known_rank(x)
            if first.op != node.op:
                # Unsqueeze(a) then Squeeze(a): both axes are relative to the unsqueezed rank.
                # Squeeze(a) then Unsqueeze(a): both relative to x's rank.
                base = r + len(a1) if (first.op == "Unsqueeze" and r is not None) else r
                n1, n2 = normalize_axes(a1, base), normalize_axes(a2, base)
                if n1 is None or n1 != n2 or len(set(n1)) != len(n1):
                    continue
                if scope.bypass(node, x, node.outputs[0]):
                    changed = True
                continue
            if node.op != "Unsqueeze":
                continue  # Squeeze(Squeeze(x)): rarely worth it, left alone
            out_rank = r + len(a1) + len(a2) if r is not None else None
            mid = normalize_axes(a1, r + len(a1) if r is not None else None)
            top = normalize_axes(a2, out_rank)
            if mid is None or top is None:
                continue
            taken, merged, j = set(top), list(top), 0
            slots = []
            while len(slots) <= max(mid):
                if j not in taken:
                    slots.append(j)
                j += 1
            merged.extend(slots[i] for i in mid)
            merged = sorted(merged)
            if len(set(merged)) != len(merged):
                continue
            if opset >= 13:
                node.inputs[1] = gs.Constant(ctx.fresh_name(f"{node.name or 'unsqueeze'}_axes"),
                                             np.array(merged, dtype=np.int64))
            else:
                node.attrs["axes"] = merged
            node.inputs[0] = x
            changed = True
        return changed


DEFAULT = [
    "constant_to_initializer",
    "eliminate_identity",
    "eliminate_dropout",
    "eliminate_nop",
    "fuse_consecutive_transposes",
    "fuse_consecutive_reshapes",
    "fuse_consecutive_squeeze_unsqueeze",
    "merge_duplicate_initializers",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
]
