"""Pass, PassContext, the registry and the PassManager.

A pass is a small configured object whose `run(graph, ctx)` rewrites one graphsurgeon Graph in place
and returns whether it changed anything. The manager calls it on the main graph and, unless the pass
says otherwise, on every If/Loop/Scan body; it runs runs of exact passes to a fixed point, records
per-pass wall time and node delta, and keeps the graph tidy between passes.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..errors import PassOptionError, UnknownPassError


class Refusal(str):
    """Falsy value a condition returns to say why a rewrite does not apply."""

    def __bool__(self):
        return False


class Pass:
    """Base class of every pass.

    Subclasses set the class attributes and implement `run`. Options are keyword arguments of
    `__init__` (declared in `options`, a dict of name -> default) and land in `self.options`.
    """

    name: str = ""
    kind: str = "cleanup"  # cleanup | fold | fusion | prune | quantize | lowering | analysis
    exact: bool = True  # outputs equal within fp32 rounding
    idempotent: bool = True  # a second run changes nothing
    needs_calibration: bool = False
    recurse_subgraphs: bool = True  # the manager calls run() on every subgraph too
    options: Dict[str, Any] = {}

    def __init__(self, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise PassOptionError(
                f"pass {self.name!r} has no option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(self.options)) or 'none'}")
        merged = dict(self.options)
        merged.update(options)
        self.options = merged
        self.validate_options()

    def validate_options(self) -> None:
        """Raise PassOptionError for bad option values."""

    def run(self, graph: gs.Graph, ctx: "PassContext") -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def doc(cls) -> str:
        text = inspect.getdoc(cls) or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    def __repr__(self):
        diff = {k: v for k, v in self.options.items() if type(self).options.get(k, object()) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in diff.items())
        return f"{self.name}({args})"


# --------------------------------------------------------------------------------------- context

@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool

    @property
    def node_delta(self) -> int:
        return self.nodes_after - self.nodes_before


@dataclasses.dataclass
class Report:
    """What the pass manager did: one record per pass execution, plus messages from passes."""

    records: List[PassRecord] = dataclasses.field(default_factory=list)
    messages: List[tuple] = dataclasses.field(default_factory=list)  # (pass name, text)
    quantization: List[dict] = dataclasses.field(default_factory=list)  # per node, from quantize_auto's guards
    nodes_before: int = 0
    nodes_after: int = 0
    iterations: int = 0
    seconds: float = 0.0
    fidelity: Optional[dict] = None  # set by optimize() when an approximate pass changed the model

    def summary(self) -> List[dict]:
        """Per pass (in first-run order): runs, total seconds, total node delta, changed count."""
        out: Dict[str, dict] = {}
        for r in self.records:
            row = out.setdefault(r.name, {"pass": r.name, "runs": 0, "seconds": 0.0, "node_delta": 0, "changed": 0})
            row["runs"] += 1
            row["seconds"] += r.seconds
            row["node_delta"] += r.node_delta
            row["changed"] += int(r.changed)
        return list(out.values())

    def format(self) -> str:
        rows = self.summary()
        w = max([len(r["pass"]) for r in rows] + [5])
        lines = [f"{'pass':<{w}} {'runs':>4} {'changed':>7} {'nodes':>7} {'ms':>9}"]
        for row in rows:
            lines.append(f"{row['pass']:<{w}} {row['runs']:>4} {row['changed']:>7} {row['node_delta']:>+7d} "
                         f"{row['seconds'] * 1e3:>9.1f}")
        lines.append(f"{'total':<{w}} {'':>4} {'':>7} {self.nodes_after - self.nodes_before:>+7d} "
                     f"{self.seconds * 1e3:>9.1f}   ({self.nodes_before} -> {self.nodes_after} nodes, "
                     f"{self.iterations} iteration(s))")
        for name, text in self.messages:
            lines.append(f"  [{name}] {text}")
        if self.quantization:
            lines += ["", _quantization_table(self.quantization)]
        return "\n".join(lines)

    def __str__(self):
        return self.format()

    def to_html(self, path, comparison=None) -> None:
        """This report as one self-contained HTML file with charts (needs the `onnxopt[report]`
        extra); `comparison` (bench.compare_models) adds sizes and latency distributions."""
        from ..report_html import write_report

        write_report(path, self, comparison)


def _quantization_table(rows: List[dict]) -> str:
    def num(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"

    w = max([len(r["node"]) for r in rows] + [4])
    ow = max([len(r["op"]) for r in rows] + [6])  # ConvTranspose is wider than Conv/MatMul/Gemm
    lines = [f"{'node':<{w}} {'op':<{ow}} {'int8':<4} {'SQNR dB':>7} {'alone cos':>9} {'fp32 ms':>8} {'int8 ms':>8}  reason"]
    for r in rows:
        lines.append(f"{r['node']:<{w}} {r['op']:<{ow}} {'yes' if r['quantized'] else 'no':<4} {num(r, 'sqnr_db', '.1f'):>7} "
                     f"{num(r, 'alone_cosine', '.5f'):>9} {num(r, 'ms_fp32', '.3f'):>8} {num(r, 'ms_int8', '.3f'):>8}  "
                     f"{r['reason']}")
    return "\n".join(lines)


class PassContext:
    """What a pass may know besides its graph: opsets, shapes, constants, options, the report."""

    def __init__(self, model: Optional[onnx.ModelProto] = None, *, calibration=None, report: Optional[Report] = None,
                 options: Optional[dict] = None):
        self.model = model  # the source model (read-only)
        self.calibration = calibration
        self.report = report or Report()
        self.options = dict(options or {})
        self.current_pass: Optional[str] = None
        self.root: Optional[gs.Graph] = None  # the main graph while a pipeline runs
        self._name_counter = 0
        self._noted: set = set()

    # opsets -------------------------------------------------------------------------------
    def opset(self, domain: str = "") -> int:
        if self.root is not None:
            if domain in ("", "ai.onnx"):
                return int(self.root.opset)
            for d in self.root.import_domains or []:
                if d.domain == domain:
                    return int(d.version)
        if self.model is not None:
            for o in self.model.opset_import:
                if o.domain == domain or (domain == "" and o.domain == "ai.onnx"):
                    return int(o.version)
        return 0

    def require_domain(self, domain: str, version: int = 1) -> None:
        """Make sure the model imports `domain` (for custom ops a pass introduces)."""
        root = self.root
        if root is None:
            return
        domains = list(root.import_domains or [])
        if not any(d.domain == domain for d in domains):
            domains.append(onnx.helper.make_opsetid(domain, version))
            root.import_domains = domains

    # tensors ------------------------------------------------------------------------------
    @staticmethod
    def is_constant(t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant)

    @staticmethod
    def value(t: gs.Tensor) -> Optional[np.ndarray]:
        return ir.constant_value(t)

    @staticmethod
    def shape(t: gs.Tensor) -> Optional[tuple]:
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        return tuple(t.shape) if t.shape is not None else None

    @classmethod
    def rank(cls, t: gs.Tensor) -> Optional[int]:
        s = cls.shape(t)
        return len(s) if s is not None else None

    @staticmethod
    def dtype(t: gs.Tensor):
        return np.dtype(t.dtype) if t.dtype is not None else None

    def is_graph_output(self, t: gs.Tensor, graph: Optional[gs.Graph] = None) -> bool:
        graphs = [graph] if graph is not None else list(ir.iter_graphs(self.root)) if self.root else []
        return any(t in g.outputs for g in graphs if g is not None)

    def fresh_name(self, base: str) -> str:
        self._name_counter += 1
        return f"{base}__oo{self._name_counter}"

    # messages -----------------------------------------------------------------------------
    @staticmethod
    def refuse(reason: str) -> Refusal:
        return Refusal(reason)

    def note(self, text: str) -> None:
        """Record a message for the report (once: fixed-point rounds repeat the same refusals)."""
        entry = (self.current_pass or "", text)
        if entry not in self._noted:
            self._noted.add(entry)
            self.report.messages.append(entry)


# ----------------------------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Callable[..., Pass]] = {}
_PRESETS: Dict[str, List[Union[str, Pass]]] = {}


def register_pass(pass_or_class, *, name: Optional[str] = None, replace: bool = False):
    """Register a Pass subclass (or a configured instance, e.g. a RewriteRule) under its name.

    Usable as a class decorator. Returns its argument.
    """
    key = name or getattr(pass_or_class, "name", "")
    if not key:
        raise PassOptionError("a pass needs a non-empty name to be registered")
    if key in _PRESETS:
        raise PassOptionError(f"{key!r} is a preset name")
    if key in _REGISTRY and not replace and _REGISTRY[key] is not pass_or_class:
        existing = _REGISTRY[key]
        if not (isinstance(pass_or_class, Pass) and isinstance(existing, Pass)
                and type(existing) is type(pass_or_class)):
            raise PassOptionError(f"a pass named {key!r} is already registered")
    _REGISTRY[key] = pass_or_class
    return pass_or_class


def register_preset(name: str, passes: Sequence[Union[str, Pass]]) -> None:
    _PRESETS[name] = list(passes)


def list_passes() -> List[str]:
    return sorted(_REGISTRY)


def list_presets() -> Dict[str, List[str]]:
    return {k: [p if isinstance(p, str) else p.name for p in v] for k, v in _PRESETS.items()}


def pass_class(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = _close_names(name)
        raise UnknownPassError(f"unknown pass {name!r}{hint}; `onnxopt passes` lists them") from None


def get_pass(name: str, **options) -> Pass:
    """A configured pass: `get_pass("prune_channels", ratio=0.3)`."""
    entry = pass_class(name)
    if isinstance(entry, Pass):  # registered instance (rule): configure a copy
        if options:
            clone = type(entry).__new__(type(entry))
            clone.__dict__.update(entry.__dict__)
            Pass.__init__(clone, **{**entry.options, **options})
            return clone
        return entry
    return entry(**options)


def _close_names(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(_REGISTRY) + list(_PRESETS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def pass_is_exact(pipeline: Sequence[Pass], name: str) -> bool:
    """Exactness of the pass called `name` in `pipeline` (True if absent)."""
    return next((p.exact for p in pipeline if p.name == name), True)


def resolve(passes: Optional[Iterable[Union[str, Pass]]]) -> List[Pass]:
    """Expand preset names and pass names into configured Pass objects, in order."""
    if passes is None:
        passes = ["default"]
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    out: List[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            if p in _PRESETS:
                out.extend(resolve(_PRESETS[p]))
            else:
                out.append(get_pass(p))
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise UnknownPassError(f"not a pass: {p!r} (give a name, a preset or a Pass object)")
    return out


# ------------------------------------------------------------------------------------------ manager

class PassManager:
    """Runs passes over a graph.

    Consecutive exact, idempotent passes form a group that is repeated until no pass in it changes
    anything (at most `max_iterations` times); any other pass runs once, in order. After each pass
    the graph is cleaned (dead nodes removed) and topologically sorted.
    """

    def __init__(self, passes: Sequence[Pass], max_iterations: int = 8, after_pass: Optional[Callable] = None):
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.after_pass = after_pass  # callback(pass, graph, ctx), used by verify's bisection

    def groups(self) -> List[List[Pass]]:
        groups: List[List[Pass]] = []
        for p in self.passes:
            fixed = p.exact and p.idempotent
            if fixed and groups and groups[-1] and getattr(groups[-1], "fixed", False):
                groups[-1].append(p)
            else:
                g = _Group([p])
                g.fixed = fixed
                groups.append(g)
        return groups

    def run(self, graph: gs.Graph, ctx: PassContext) -> Report:
        report = ctx.report
        ctx.root = graph
        t0 = time.perf_counter()
        report.nodes_before = ir.count_nodes(graph)
        iterations = 0
        for group in self.groups():
            rounds = self.max_iterations if group.fixed else 1
            for it in range(rounds):
                iterations = max(iterations, it + 1)
                changed_any = False
                for p in group:
                    changed_any |= self._run_one(p, graph, ctx, it)
                if not changed_any:
                    break
        report.iterations = iterations
        report.nodes_after = ir.count_nodes(graph)
        report.seconds = time.perf_counter() - t0
        return report

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, iteration: int) -> bool:
        ctx.current_pass = p.name
        before = ir.count_nodes(graph)
        t0 = time.perf_counter()
        if p.recurse_subgraphs:
            changed = False
            for g in list(ir.iter_graphs(graph)):
                changed |= bool(p.run(g, ctx))
        else:
            changed = bool(p.run(graph, ctx))
        if changed:
            tidy(graph)
        dt = time.perf_counter() - t0
        ctx.report.records.append(PassRecord(p.name, iteration, dt, before, ir.count_nodes(graph), changed))
        ctx.current_pass = None
        if self.after_pass is not None:
            self.after_pass(p, graph, ctx)
        return changed


class _Group(list):
    fixed = False


def tidy(graph: gs.Graph) -> None:
    """Remove dead nodes (never graph inputs/outputs) in every graph and restore topological order."""
    graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
    for g in ir.iter_graphs(graph):
        g.toposort(recurse_subgraphs=False, recurse_functions=False)
