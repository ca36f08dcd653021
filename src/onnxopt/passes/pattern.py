"""RewriteRule: a rewrite written as pattern + condition + replacement, which is a Pass.

    def pattern(op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def condition(ctx, x, w, b):
        return ctx.rank(x) == 2 or ctx.refuse("Gemm wants a 2-D input")

    def replacement(op, x, w, b):
        return op.Gemm(x, w, b)

    rule = RewriteRule("fuse_matmul_add_to_gemm", pattern, replacement, condition)

The pattern's parameters are variables bound to tensors. `op.Conv(x, w, _as="conv")` also binds the
matched node, so condition and replacement can read its attributes (`conv.attrs`). A pattern node
used twice (`d = op.Sub(x, m); op.Div(d, op.Sqrt(op.Mul(d, d)))`) matches one graph node. Attributes
given in a pattern must be equal to match (`op.Transpose(x, perm=[1, 0])`). Add, Mul, Max, Min, Sum and
the logical ops match in either input order. Values computed inside the match must not be used
outside it. The replacement builds new nodes with `op`; the tensor it returns takes over the name,
dtype and shape of the matched root's output, so consumers and graph outputs are untouched. The
condition and replacement receive only the bindings their signature names.
"""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from .base import Pass, PassContext, Refusal

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr",
               "BitwiseXor"}


class _Var:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


class _PNode:
    def __init__(self, op_type: str, inputs: Sequence, attrs: dict, domain: str, bind: Optional[str], outputs: int):
        self.op_type, self.inputs, self.attrs, self.domain, self.bind = op_type, list(inputs), attrs, domain, bind
        self.n_outputs = outputs


class _PatternBuilder:
    def __getattr__(self, op_type: str):
        if op_type.startswith("__"):
            raise AttributeError(op_type)

        def make(*inputs, _as: Optional[str] = None, _domain: str = "", _outputs: int = 1, **attrs):
            return _PNode(op_type, inputs, attrs, _domain, _as, _outputs)

        return make


class OpBuilder:
    """Builds real nodes into `graph` for a replacement: `op.Gemm(a, b, c, transB=1)`.

    Inputs may be tensors, numpy arrays / Python numbers (become initializers) or None (omitted
    optional input). `_outputs=n` returns a list of n outputs; `_domain` sets the node's domain.
    """

    def __init__(self, graph: gs.Graph, ctx: PassContext, prefix: str):
        self.graph, self.ctx, self.prefix = graph, ctx, prefix
        self.nodes: List[gs.Node] = []

    def const(self, value, name: str = "c") -> gs.Constant:
        arr = np.asarray(value)
        return gs.Constant(self.ctx.fresh_name(f"{self.prefix}_{name}"), arr)

    def _tensor(self, x) -> gs.Tensor:
        if x is None:
            return gs.Variable.empty()
        if isinstance(x, gs.Tensor):
            return x
        return self.const(x)

    def __getattr__(self, op_type: str):
        if op_type.startswith("__"):
            raise AttributeError(op_type)

        def make(*inputs, _outputs: int = 1, _domain: str = "", _name: Optional[str] = None, **attrs):
            name = _name or self.ctx.fresh_name(f"{self.prefix}_{op_type}")
            outs = [gs.Variable(f"{name}_out{i}") for i in range(_outputs)]
            node = gs.Node(op=op_type, name=name, attrs=attrs, inputs=[self._tensor(x) for x in inputs],
                           outputs=outs, domain=_domain or None)
            self.graph.nodes.append(node)
            self.nodes.append(node)
            return outs[0] if _outputs == 1 else outs

        return make


def _attrs_equal(want, have) -> bool:
    if isinstance(want, (list, tuple, np.ndarray)):
        try:
            return np.array_equal(np.asarray(want), np.asarray(have))
        except Exception:
            return False
    return want == have


class RewriteRule(Pass):
    """A rewrite given as pattern, replacement and optional condition functions."""

    kind = "fusion"

    def __init__(self, name: str, pattern: Union[Callable, Sequence[Callable]], replacement: Callable,
                 condition: Optional[Callable] = None, *, exact: bool = True, kind: str = "fusion", doc: str = ""):
        self.name = name
        self.exact = exact
        self.kind = kind
        self._doc = doc or (inspect.getdoc(replacement) or "").strip()
        self.patterns = [self._trace(p) for p in (pattern if isinstance(pattern, (list, tuple)) else [pattern])]
        self.replacement = replacement
        self.condition = condition
        super().__init__()

    def doc(self) -> str:  # instance-level: rules are configured objects
        return self._doc.splitlines()[0] if self._doc else f"rewrite rule {self.name}"

    # pattern tracing ------------------------------------------------------------------------
    @staticmethod
    def _trace(fn: Callable):
        params = list(inspect.signature(fn).parameters)[1:]
        variables = [_Var(p) for p in params]
        root = fn(_PatternBuilder(), *variables)
        if not isinstance(root, _PNode):
            raise TypeError("a pattern must return an op node built with its `op` argument")
        return root, [v.name for v in variables]

    # matching -------------------------------------------------------------------------------
    def _match(self, p, tensor: gs.Tensor, b: Dict, local: set) -> Iterator[Dict]:
        """Yield extended bindings for every way `tensor` matches pattern `p` (backtracking)."""
        if isinstance(p, _Var):
            bound = b.get(p.name)
            if bound is None:
                yield {**b, p.name: tensor}
            elif bound is tensor:
                yield b
            return
        if len(tensor.inputs) != 1:
            return
        node = tensor.inputs[0]
        seen = b.get("__pnodes__", {}).get(id(p))
        if seen is not None:  # a pattern node used twice (a DAG): it must be the same graph node
            if node is seen:
                yield b
            return
        if id(node) not in local or node.op != p.op_type or (node.domain or "") != p.domain:
            return
        if any(node is m for m in b["__nodes__"]) or (p.n_outputs == 1 and tensor is not node.outputs[0]):
            return
        for k, v in p.attrs.items():
            if k not in node.attrs or not _attrs_equal(v, node.attrs[k]):
                return
        real_inputs = list(node.inputs)
        while real_inputs and real_inputs[-1].is_empty():
            real_inputs.pop()
        if len(real_inputs) != len(p.inputs):
            return
        orders = [real_inputs]
        if p.op_type in COMMUTATIVE and len(real_inputs) == 2:
            orders.append(real_inputs[::-1])
        start = {**b, "__nodes__": b["__nodes__"] + (node,), "__pnodes__": {**b.get("__pnodes__", {}), id(p): node}}
        if p.bind:
            start[p.bind] = node
        for ins in orders:
            yield from self._match_inputs(p.inputs, ins, start, local)

    def _match_inputs(self, pats, tensors, b, local) -> Iterator[Dict]:
        if not pats:
            yield b
            return
        for b1 in self._match(pats[0], tensors[0], b, local):
            yield from self._match_inputs(pats[1:], tensors[1:], b1, local)

    @staticmethod
    def _exclusive(nodes, root: gs.Node, graph: gs.Graph) -> bool:
        ids = {id(n) for n in nodes}
        for n in nodes:
            for i, t in enumerate(n.outputs):
                if n is root and i == 0:
                    continue
                if t in graph.outputs or any(id(c) not in ids for c in t.outputs):
                    return False
        return True

    # rewriting ------------------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        changed = False
        refusals: Counter = Counter()
        local = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if id(node) not in local or not node.outputs:
                continue
            for root_p, names in self.patterns:
                if node.op != root_p.op_type:
                    continue
                done = False
                for b in self._match(root_p, node.outputs[0], {"__nodes__": ()}, local):
                    nodes = b["__nodes__"]
                    if not self._exclusive(nodes, node, graph):
                        continue
                    args = {k: v for k, v in b.items() if k not in ("__nodes__", "__pnodes__")}
                    if self.condition is not None:
                        ok = _call(self.condition, ctx, args)
                        if isinstance(ok, Refusal) or not ok:
                            refusals[str(ok) if isinstance(ok, Refusal) else "condition failed"] += 1
                            continue
                    if self._replace(graph, ctx, node, args, nodes):
                        for n in nodes:
                            local.discard(id(n))
                        changed = done = True
                        break
                if done:
                    break
        for reason, n in refusals.items():
            if reason:
                ctx.note(f"refused {n}x: {reason}")
        return changed

    def _replace(self, graph: gs.Graph, ctx: PassContext, root: gs.Node, args: Dict, matched=()) -> bool:
        op = OpBuilder(graph, ctx, root.name or self.name)
        result = _call(self.replacement, op, args)
        # a new node inherits the name of the matched node of its op type it replaces (Conv+BN ->
        # Conv keeps the Conv's name), so reports and profiles still speak the model's names
        taken = set()
        for new in op.nodes:
            old = next((m for m in matched if m.op == new.op and m.name and m.name not in taken), None)
            if old is not None:
                new.name = old.name
                taken.add(old.name)
        if result is None:  # the replacement declined
            built = {id(n) for n in op.nodes}
            graph.nodes = [n for n in graph.nodes if id(n) not in built]
            return False
        out = root.outputs[0]
        producer = result.inputs[0] if isinstance(result, gs.Variable) and len(result.inputs) == 1 else None
        if producer is not None and any(producer is n for n in op.nodes):
            idx = next(i for i, t in enumerate(producer.outputs) if t is result)
            root.outputs.clear()
            producer.outputs[idx] = out  # takes over name, dtype, shape and every consumer, in place
            return True
        if isinstance(result, gs.Tensor):  # an existing tensor: rewire consumers
            if out in graph.outputs:
                return False
            ir.replace_uses(out, result)
            root.outputs.clear()
            return True
        raise TypeError(f"rule {self.name}: replacement must return a tensor or None, got {type(result).__name__}")


def _call(fn: Callable, first, args: Dict):
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1:]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return fn(first, **args)
    return fn(first, **{p.name: args[p.name] for p in params if p.name in args})
