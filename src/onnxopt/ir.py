"""onnx <-> onnx-graphsurgeon, without losing what graphsurgeon does not model.

graphsurgeon keeps nodes, tensors, opsets, local functions and subgraphs; the model-level fields it
drops (metadata_props, doc strings, domain, model_version, training info) are carried over from the
source model on export. Weights stored as external data stay lazy: the TensorProto keeps its
reference (rewritten to an absolute path at load, so reading one tensor works from any cwd) and is
streamed into the new data file by `save`, never held in memory as a whole model.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Iterator, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import InvalidModelError, UnsupportedModelError

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto above this cannot exist: weights go external
EXTERNAL_THRESHOLD = 1024  # bytes: tensors at least this big go to the data file when saving external


# --------------------------------------------------------------------------------------------- load

class Source:
    """A loaded model kept in stripped form: `proto` holds the structure, with every large payload
    replaced by a placeholder reference into `payloads` (see `stripped`). Weights are copied out of
    protobuf once at load and back in once at export; nothing in between serializes them."""

    def __init__(self, proto: onnx.ModelProto, payloads: list, where: str):
        self.proto, self.payloads, self.where = proto, payloads, where

    def full(self) -> onnx.ModelProto:
        """A complete ModelProto (a copy with the payloads filled in)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        return hydrate(model, self.payloads)


def load_source(model: Union[ModelLike, Source]) -> Source:
    """Parse and check `model` (path, bytes or ModelProto; never mutated) into a private Source.

    External-data locations are rewritten to absolute paths (so tensors can be read from any cwd);
    external weights themselves are not read.
    """
    if isinstance(model, Source):
        return model
    base_dir = None
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "the given ModelProto"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        where = "the given bytes"
        proto = _parse(bytes(model), where)
    elif isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        if not os.path.isfile(where):
            raise InvalidModelError(f"{where}: no such file")
        with open(where, "rb") as f:
            data = f.read()
        proto = _parse(data, where)
        del data
        base_dir = os.path.dirname(os.path.abspath(where))
    else:
        raise InvalidModelError(
            f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    _check_opset(proto, where)
    if base_dir is not None:
        _absolutize_external_data(proto, base_dir, where)
    payloads = strip(proto)
    check(proto, where, is_stripped=True)
    return Source(proto, payloads, where)


def load_model(model: ModelLike) -> onnx.ModelProto:
    """A private, checked, complete copy of `model` (path, bytes or ModelProto)."""
    return load_source(model).full()


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, sometimes RuntimeWarning-ish others
        raise InvalidModelError(f"{where}: not an ONNX model (protobuf parse failed: {exc})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InvalidModelError(f"{where}: not an ONNX model (no graph or no IR version)")
    return proto


def _check_opset(proto: onnx.ModelProto, where: str) -> None:
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InvalidModelError(f"{where}: model has no default-domain opset import")
    newest = onnx.defs.onnx_opset_version()
    if default[0] > newest:
        raise UnsupportedModelError(
            f"{where}: opset {default[0]} is newer than this onnx package knows ({newest}); "
            "upgrade onnx or export with an older opset")


def check(proto: onnx.ModelProto, where: str = "model", error=InvalidModelError, is_stripped: bool = False) -> None:
    """onnx.checker on `proto` without pushing its weights through protobuf serialization.

    Large payloads are (or, unless `is_stripped`, are temporarily) references to an empty
    placeholder file while the checker runs: it validates structure, not weight bytes, so a 400 MB
    model checks in milliseconds and external-data models check wherever their data lives.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
        open(os.path.join(tmp, PLACEHOLDER), "wb").close()
        path = os.path.join(tmp, "model.onnx")
        if is_stripped:
            data = proto.SerializeToString()
        else:
            with stripped(proto):
                data = proto.SerializeToString()
        with open(path, "wb") as f:
            f.write(data)
        try:
            onnx.checker.check_model(path)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "checker failed"
            raise error(f"{where}: invalid ONNX model: {first}") from None


# ------------------------------------------------------------------------------- payload stripping

PLACEHOLDER = "__onnxopt_payload__"  # external-data location that stands for "kept aside in memory"
STRIP_THRESHOLD = 1024  # bytes: smaller payloads stay in the proto (shape constants and the like)


def strip(proto: onnx.ModelProto) -> list:
    """Turn every large tensor payload of `proto` into a placeholder reference, in place.

    Each stripped tensor becomes external data at location PLACEHOLDER with `offset` = its index in
    the returned list of payloads: (raw bytes or None, external-data entries or None, data_type,
    dims). `hydrate` puts them back.
    """
    payloads = []
    for t in _proto_tensors(proto):
        if uses_external_data(t):
            payload = (None, [(e.key, e.value) for e in t.external_data])
        elif t.HasField("raw_data") and len(t.raw_data) >= STRIP_THRESHOLD:
            payload = (t.raw_data, None)
            t.ClearField("raw_data")
        else:
            continue
        index = len(payloads)
        payloads.append(payload + (t.data_type, tuple(t.dims)))
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", PLACEHOLDER), ("offset", str(index)), ("length", "0")):
            e = t.external_data.add()
            e.key, e.value = k, v
    return payloads


@contextlib.contextmanager
def stripped(proto: onnx.ModelProto):
    """`proto` stripped for the duration of the block (cheap to serialize), then restored."""
    payloads = strip(proto)
    try:
        yield payloads
    finally:
        hydrate(proto, payloads)


def _set_payload(t: onnx.TensorProto, raw, entries) -> None:
    del t.external_data[:]
    if raw is not None:
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw
    else:
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in entries:
            e = t.external_data.add()
            e.key, e.value = k, v


def _placeholder_index(t: onnx.TensorProto) -> Optional[int]:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return int(info["offset"]) if info.get("location") == PLACEHOLDER else None


def hydrate(model: onnx.ModelProto, payloads: list) -> onnx.ModelProto:
    """Put the kept-aside payloads back into the placeholder tensors of `model` (in place)."""
    for t in _proto_tensors(model):
        idx = _placeholder_index(t)
        if idx is not None:
            raw, entries, _, _ = payloads[idx]
            _set_payload(t, raw, entries)
    return model


class PayloadValues(LazyValues):
    """LazyValues over a kept-aside payload: raw bytes in memory or an absolute external file."""

    def __init__(self, placeholder: onnx.TensorProto, payload: tuple, index: int):
        super().__init__(placeholder)
        self.payload = payload
        self.index = index

    def load(self):
        raw, entries, data_type, dims = self.payload
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
        if raw is not None:
            if data_type in _NON_NUMPY_RAW:
                t = onnx.TensorProto()
                t.data_type, t.raw_data = data_type, raw
                t.dims.extend(dims)
                return np.array(onnx.numpy_helper.to_array(t))
            return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
        info = dict(entries)
        count = int(np.prod(dims)) if dims else 1
        with open(info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(count * np.dtype(dtype).itemsize)
        if data_type in _NON_NUMPY_RAW:
            t = onnx.TensorProto()
            t.data_type, t.raw_data = data_type, data
            t.dims.extend(dims)
            return np.array(onnx.numpy_helper.to_array(t))
        return np.frombuffer(data, dtype=dtype).reshape(dims).copy()


_NON_NUMPY_RAW = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                  onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ, onnx.TensorProto.INT4,
                  onnx.TensorProto.UINT4, onnx.TensorProto.BOOL}


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _proto_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _all_tensors(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def _absolutize_external_data(proto: onnx.ModelProto, base_dir: str, where: str) -> None:
    for t in _all_tensors(proto.graph):
        if not uses_external_data(t):
            continue
        for entry in t.external_data:
            if entry.key == "location":
                loc = entry.value if os.path.isabs(entry.value) else os.path.join(base_dir, entry.value)
                if not os.path.isfile(loc):
                    raise InvalidModelError(
                        f"{where}: external data file {entry.value!r} of tensor {t.name!r} not found")
                entry.value = os.path.normpath(loc)


# ------------------------------------------------------------------------------------- graph <-> IR

def import_graph(source: Union[Source, onnx.ModelProto], infer_shapes: bool = True) -> gs.Graph:
    """graphsurgeon Graph for `source` (not modified). Shape inference first, best effort.

    Weights never pass through protobuf serialization or numpy here: inference and import run on
    the stripped structure and each initializer's values stay lazy (`PayloadValues`) until a pass
    reads them.
    """
    if not isinstance(source, Source):  # a caller-owned ModelProto: strip a copy, no checks
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        source = Source(proto, strip(proto), "model")
    small = onnx.ModelProto()
    small.CopyFrom(source.proto)
    if infer_shapes:
        small = infer_model_shapes(small)
    extras = _take_node_extras(small.graph, {}, [0])
    # An initializer that is also a graph input (IR >= 4) is a default value the caller may
    # override: passes must see an input, not a constant. It goes back in at export.
    overridable = []
    if small.ir_version >= 4:
        names = {i.name for i in small.graph.input}
        keep = [t for t in small.graph.initializer if t.name not in names]
        overridable = [t for t in small.graph.initializer if t.name in names]
        if overridable:
            del small.graph.initializer[:]
            small.graph.initializer.extend(keep)
    graph = gs.import_onnx(small)
    graph.__dict__["_onnxopt_overridable"] = overridable
    payloads = source.payloads
    for g in _graphs_and_functions(graph):
        for t in _constants_of(g):
            v = t._values
            if type(v) is LazyValues:
                idx = _placeholder_index(v.tensor)
                if idx is not None:
                    t._values = PayloadValues(v.tensor, payloads[idx], idx)
    graph.__dict__["_onnxopt_node_extras"] = extras
    graph.__dict__["_onnxopt_payloads"] = payloads
    return graph


def _graphs_and_functions(graph: gs.Graph) -> Iterator[gs.Graph]:
    yield from iter_graphs(graph)
    for fn in graph.functions:
        yield from iter_graphs(fn)


def _constants_of(graph: gs.Graph) -> Iterator[gs.Constant]:
    seen = set()
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                yield t
        for attr in node.attrs.values():
            if isinstance(attr, gs.Constant) and id(attr) not in seen:
                seen.add(id(attr))
                yield attr
    for t in list(graph.inputs) + list(graph.outputs):
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            yield t


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every NodeProto of `graph` and of its If/Loop/Scan bodies, outer first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from walk_nodes(g)


def _take_node_extras(graph: onnx.GraphProto, extras: dict, counter: list) -> dict:
    """Node doc strings and metadata_props, which graphsurgeon drops, keyed by (made-unique) name."""
    names = {n.name for n in walk_nodes(graph) if n.name}
    for node in walk_nodes(graph):
        meta = list(getattr(node, "metadata_props", []))
        if not node.doc_string and not meta:
            continue
        if not node.name or node.name in extras:
            while f"{node.op_type}_{counter[0]}" in names:
                counter[0] += 1
            node.name = f"{node.op_type}_{counter[0]}"
            names.add(node.name)
        extras[node.name] = (node.doc_string, meta)
    return extras


def infer_model_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                 data_prop=True)
    except Exception:  # inference is advisory: models with unknown custom ops still optimize
        return proto


def export_model(graph: gs.Graph, template: Union[Source, onnx.ModelProto], hydrate_payloads: bool = True) -> onnx.ModelProto:
    """ModelProto for `graph`, with the model-level fields of `template` carried over.

    Initializers still lazy are exported as placeholders (cheap) and then filled in from the kept
    payloads; with `hydrate_payloads=False` the placeholders stay (for checking and inspection).
    """
    if isinstance(template, Source):
        template = template.proto
    model = gs.export_onnx(graph, do_type_check=False)
    _hoist_shared_initializers(model.graph)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    model.graph.doc_string = template.graph.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    inputs = {i.name for i in model.graph.input}
    model.graph.initializer.extend(t for t in graph.__dict__.get("_onnxopt_overridable", []) if t.name in inputs)
    extras = graph.__dict__.get("_onnxopt_node_extras")
    if extras:
        for node in walk_nodes(model.graph):
            if node.name in extras:
                doc, meta = extras[node.name]
                node.doc_string = doc
                if meta:
                    node.metadata_props.extend(meta)
    if template.training_info:
        model.training_info.extend(template.training_info)
    # Graph inputs/outputs keep the source's declared types exactly (shape inference would
    # otherwise invent names like unk__0 for unknown dims), unless a pass changed the element type
    # on purpose (convert_fp16 without keep_io_types).
    for field in ("input", "output"):
        declared = {v.name: v for v in getattr(template.graph, field)}
        for v in getattr(model.graph, field):
            src = declared.get(v.name)
            if src is not None and src.type.tensor_type.elem_type == v.type.tensor_type.elem_type:
                v.CopyFrom(src)
    if template.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        listed = {i.name for i in model.graph.input}
        for t in model.graph.initializer:
            if t.name not in listed:
                model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    # Opset imports: keep the source's (graphsurgeon may drop unused domains), add any new domain.
    versions = {o.domain: o.version for o in template.opset_import}
    for o in model.opset_import:
        versions.setdefault(o.domain, o.version)
    used = {n.domain for n in walk_nodes(model.graph)} | {f.domain for f in model.functions}
    for fn in model.functions:
        used |= {n.domain for n in fn.node}
    for dom in used:
        if dom not in versions and dom not in ("ai.onnx",):
            versions[dom] = 1
    del model.opset_import[:]
    for dom, ver in versions.items():
        model.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    if hydrate_payloads:
        hydrate(model, graph.__dict__.get("_onnxopt_payloads", []))
    return model


def _hoist_shared_initializers(root: onnx.GraphProto) -> None:
    """One copy of each initializer that graphsurgeon wrote into several graphs of the model.

    graphsurgeon writes a constant as an initializer of every graph whose nodes read it, so a weight
    read inside both branches of an If (or in a body and around it) was stored once per graph: the
    model grew with every nesting level. Names are unique across a model and an If/Loop/Scan body may
    read any tensor of an enclosing graph, so the one copy goes to the innermost graph enclosing all
    the readers.
    """
    where: Dict[str, list] = {}  # name -> [(path of graphs from the root, its TensorProto), ...]

    def visit(g: onnx.GraphProto, path: tuple) -> None:
        for t in g.initializer:
            where.setdefault(t.name, []).append((path, t))
        for node in g.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    visit(sub, path + (sub,))

    visit(root, (root,))
    for name, copies in where.items():
        if len(copies) < 2:
            continue
        first = copies[0][1]
        if any(t.SerializeToString() != first.SerializeToString() for _, t in copies[1:]):
            continue  # not one tensor written several times: leave it to the checker
        common = 0
        while all(len(p) > common and p[common] is copies[0][0][common] for p, _ in copies):
            common += 1
        home = copies[0][0][common - 1]
        kept = next((t for p, t in copies if p[-1] is home), None)
        if kept is None:
            home.initializer.add().CopyFrom(first)
        for path, t in copies:
            if t is not kept:
                path[-1].initializer.remove(t)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph` and every subgraph of If/Loop/Scan nodes in it, outermost first."""
    yield graph
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, (list, tuple)) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    yield from iter_graphs(sub)


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` (in any graph, subgraphs included) read `new` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in iter_graphs(graph))


# ----------------------------------------------------------------------------------------- values

def is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """Numpy value of a Constant (loads external data on demand), else None."""
    if not isinstance(t, gs.Constant):
        return None
    if isinstance(t._values, LazyValues) and not isinstance(t._values, SparseValues):
        return np.asarray(t._values.load())  # not cached on the tensor: big weights stay lazy
    return np.asarray(t.values)


def nbytes(t: gs.Constant) -> int:
    v = t._values
    if hasattr(v, "nbytes"):
        return int(v.nbytes)
    return int(np.asarray(t.values).nbytes)


# ------------------------------------------------------------------------------------------- save

def model_size(proto: Union[onnx.ModelProto, str, os.PathLike]) -> int:
    """Bytes of the model including external data it references (a path: the file plus its
    `<path>.data`)."""
    if not isinstance(proto, onnx.ModelProto):
        return file_size(proto)
    total = 0
    seen = set()
    for t in _all_tensors(proto.graph):
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            key = (info.get("location"), info.get("offset"))
            if key not in seen:
                seen.add(key)
                total += int(info.get("length", 0)) or _tensor_nbytes(t)
    return total + proto.ByteSize()


def file_size(path: Union[str, os.PathLike]) -> int:
    """Bytes of a saved model plus its `<path>.data` external-data file, if any."""
    data = os.fspath(path) + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def needs_external(proto: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in _all_tensors(proto.graph)) or \
        proto.ByteSize() > PROTOBUF_LIMIT - (64 << 20)


def save(model: onnx.ModelProto, path: Union[str, os.PathLike], external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically (temp file + rename).

    Weights go to `<name>.data` beside it when `external_data` is true, or (default) when the model
    references external data already or would not fit in one protobuf. Tensors already external are
    streamed from their source file; the in-memory `model` is not modified.
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path)) or "."
    if external_data is None:
        external_data = needs_external(model)
    if not external_data:
        _atomic_write(path, out_dir, model.SerializeToString())
        return
    data_name = os.path.basename(path) + ".data"
    data_path = os.path.join(out_dir, data_name)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # only references and small tensors: large ones are external already
    fd, tmp_data = tempfile.mkstemp(prefix=".onnxopt-", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as data_file:
            for t in _all_tensors(proto.graph):
                _externalize(t, data_file, data_name)
        _atomic_write(path, out_dir, proto.SerializeToString(), before_rename=lambda: os.replace(tmp_data, data_path))
    except BaseException:
        if os.path.exists(tmp_data):
            os.unlink(tmp_data)
        raise


def _externalize(t: onnx.TensorProto, data_file, data_name: str) -> None:
    align = 4096
    if uses_external_data(t):
        info = {e.key: e.value for e in t.external_data}
        src_offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else _tensor_nbytes(t)
        pos = data_file.tell()
        pad = (-pos) % align
        data_file.write(b"\0" * pad)
        offset = pos + pad
        with open(info["location"], "rb") as src:
            src.seek(src_offset)
            remaining = length
            while remaining:
                chunk = src.read(min(remaining, 64 << 20))
                if not chunk:
                    raise InvalidModelError(f"external data of {t.name!r} is truncated")
                data_file.write(chunk)
                remaining -= len(chunk)
    else:
        if not t.HasField("raw_data"):
            if _tensor_nbytes(t) < EXTERNAL_THRESHOLD or t.data_type == onnx.TensorProto.STRING:
                return
            arr = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        if len(t.raw_data) < EXTERNAL_THRESHOLD:
            return
        pos = data_file.tell()
        pad = (-pos) % align
        data_file.write(b"\0" * pad)
        offset = pos + pad
        length = len(t.raw_data)
        data_file.write(t.raw_data)
        t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _atomic_write(path: str, out_dir: str, data: bytes, before_rename=None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".onnxopt-", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
