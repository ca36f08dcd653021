"""onnx <-> onnx-graphsurgeon, without losing what graphsurgeon does not model.

graphsurgeon keeps nodes, tensors, opsets, local functions and subgraphs; the model-level fields it
drops (metadata_props, doc strings, domain, model_version, training info) are carried over from the
source model on export. Models are untrusted: every tensor's payload is checked against its dtype and
dims at load (`tensor_check`), and external data is checked and read as onnx does it
(`external_data`). Weights stored as external data stay lazy inside onnxopt: the TensorProto refers
to its checked file through a marker location, is read only when a pass needs its values and is
streamed into the new data file by `save`. `materialize` gives the public result the form
`onnx.load` gives: weights in the proto (below 2 GiB).
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

from . import external_data, tensor_check
from .errors import InvalidModelError, OptimizeError, UnsupportedModelError

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto above this cannot exist: weights go external
INLINE_LIMIT = PROTOBUF_LIMIT - (64 << 20)  # results up to this many bytes keep their weights in the proto
# Older default-domain opsets are refused: onnxruntime lacks kernels for their versions of common ops
# (Relu-1 ...) and guarantees only 7+; 6 still runs (onnx's own backend suite has 112 such models).
OLDEST_OPSET = 6
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

    Every tensor's payload is checked against its dtype and dims; every external-data reference is
    checked as onnx checks it (relative to the model's folder, or to the current directory for
    bytes and ModelProtos) and becomes a lazy marker; external weights themselves are not read.
    """
    if isinstance(model, Source):
        return model
    base_dir = os.getcwd()
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "the given ModelProto"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        where = "the given bytes"
        proto = _parse(bytes(model), where)
    elif isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        if not os.path.exists(where):
            raise InvalidModelError(f"{where}: no such file")
        if not os.path.isfile(where):
            raise InvalidModelError(f"{where}: not a regular file")
        with open(where, "rb") as f:
            data = f.read()
        proto = _parse(data, where)
        del data
        base_dir = os.path.dirname(os.path.abspath(where))
    else:
        raise InvalidModelError(
            f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    _check_opset(proto, where)
    _check_tensors(proto, base_dir, where)
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
    _check_text(proto, where)
    return proto


def _check_text(msg, where: str) -> None:
    """Decode every string of `msg` once: protobuf parses invalid UTF-8 and fails only when a name
    is read, deep inside a pass. Tensor payloads are not touched (they are bytes, and large)."""
    if isinstance(msg, onnx.TensorProto):
        fields = [(f, getattr(msg, f.name)) for f in _TENSOR_TEXT]
    else:
        fields = msg.ListFields()
        for field, value in fields:
            if field.type == field.TYPE_STRING:
                # proto2 strings are not validated: protobuf hands invalid UTF-8 back as bytes
                for text in (value if field.is_repeated else [value]):
                    if not isinstance(text, str):
                        raise InvalidModelError(f"{where}: {type(msg).__name__}.{field.name} {text!r} is not "
                                                "valid UTF-8")
    for field, value in fields:
        if field.message_type is None:
            continue
        for item in (value if field.is_repeated else [value]):
            _check_text(item, where)


_TENSOR_TEXT = [onnx.TensorProto.DESCRIPTOR.fields_by_name[n] for n in ("name", "doc_string", "external_data")]


def _check_opset(proto: onnx.ModelProto, where: str) -> None:
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InvalidModelError(f"{where}: model has no default-domain opset import")
    for o in proto.opset_import:
        if o.version < 1:
            raise InvalidModelError(f"{where}: opset import {o.domain or 'ai.onnx'} has version {o.version}")
    if default[0] < OLDEST_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {default[0]} is too old (onnxopt needs {OLDEST_OPSET} or newer); "
            "convert it first (onnx.version_converter.convert_version)")
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
        if raw is None:
            raw = read_external(self.tensor, entries)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
        if data_type in _NON_NUMPY_RAW:
            t = onnx.TensorProto()
            t.data_type, t.raw_data = data_type, raw
            t.dims.extend(dims)
            return np.array(onnx.numpy_helper.to_array(t))
        return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()


def read_external(t: onnx.TensorProto, entries=None) -> bytes:
    """The bytes of an external tensor (a checked marker, or a location checked in the cwd)."""
    file, offset, length = external_file(t, entries=entries)
    return external_data.read(file, offset, length, t.name)


_NON_NUMPY_RAW = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
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


_CONSTANT_VALUES = {"value", "value_float", "value_floats", "value_int", "value_ints", "value_string",
                    "value_strings", "sparse_value"}


def _check_tensors(proto: onnx.ModelProto, base_dir: str, where: str) -> None:
    """Check each tensor's payload size; turn each external reference into a checked lazy marker.
    A Constant node must hold exactly one value (onnx.checker lets one without pass; onnxruntime not);
    ref_attr_name belongs in function bodies only."""
    for node in walk_nodes(proto.graph):
        for a in node.attribute:
            if a.ref_attr_name:  # graphsurgeon would read it as a reference; onnxruntime ignores it
                raise InvalidModelError(f"{where}: attribute {a.name!r} of node {node.name or node.op_type!r} refers "
                                        f"to a function attribute ({a.ref_attr_name!r}) outside a function")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            values = [a.name for a in node.attribute if a.name in _CONSTANT_VALUES]
            if len(values) != 1:
                raise InvalidModelError(f"{where}: Constant node {node.name or node.output[0]!r} must hold exactly one "
                                        f"value attribute, it has {len(values)}")
    for t in _proto_tensors(proto):
        length = _check_external(t, base_dir) if t.data_location == onnx.TensorProto.EXTERNAL else None
        tensor_check.check_tensor(t, where, external_length=length)
    for g in _all_graphs(proto.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            tensor_check.check_value_type(vi, where)
        for sp in g.sparse_initializer:
            for t in (sp.values, sp.indices):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    raise InvalidModelError(f"{where}: sparse tensor {t.name!r} keeps its data externally "
                                            "(not supported)")
                tensor_check.check_tensor(t, where)


def _check_external(t: onnx.TensorProto, base_dir: str) -> int:
    """Check the external reference of `t` (in place: it becomes a marker); returns its length."""
    file, offset, length = external_file(t, base_dir)
    t.ClearField("raw_data")  # an external tensor has no inline data (onnx.checker says the same)
    _set_external(t, external_data.marker(file), offset, length)
    return length


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def external_file(t: onnx.TensorProto, base_dir: Optional[str] = None, entries=None):
    """(checked file, offset, length) of the external tensor `t` (or of its kept-aside `entries`): a
    marker, or a location checked inside `base_dir` (the current directory when None)."""
    if entries is None:
        entries = [(e.key, e.value) for e in t.external_data]
    location, offset, length = external_data.entries_info(entries, t.name)
    if external_data.is_marker(location):
        file = external_data.resolve_marker(location, t.name)
    else:
        file = external_data.check_location(base_dir or os.getcwd(), location, t.name)
    if length is None:
        length = tensor_check.payload_nbytes(t.data_type, t.dims)
        if length is None:
            raise external_data.ExternalDataError(
                f"Data of TensorProto ( tensor name: {t.name}) is external without a length, and its data "
                "type has no fixed size.")
    external_data.check_bounds(file, offset, length, t.name, location)
    return file, offset, length


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


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
                    # the placeholder says EXTERNAL; a pass that gives the constant new values
                    # must export them inline (graphsurgeon would stamp EXTERNAL on raw_data)
                    t.data_location = None
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
    """Every NodeProto of `graph` and of its If/Loop/Scan bodies, outer graphs first."""
    for g in _all_graphs(graph):
        yield from g.node


_LIST_ATTRS = {onnx.AttributeProto.INTS: "ints", onnx.AttributeProto.FLOATS: "floats",
               onnx.AttributeProto.STRINGS: "strings", onnx.AttributeProto.TENSORS: "tensors",
               onnx.AttributeProto.GRAPHS: "graphs"}


def _take_node_extras(graph: onnx.GraphProto, extras: dict, counter: list) -> dict:
    """What graphsurgeon drops or cannot carry, keyed by (made-unique) node name: doc strings,
    metadata_props, and empty list attributes (taken off the node here: graphsurgeon cannot export an
    empty list, it does not know its element type)."""
    names = {n.name for n in walk_nodes(graph) if n.name}
    for node in walk_nodes(graph):
        meta = list(getattr(node, "metadata_props", []))
        empty = [a for a in node.attribute if a.type in _LIST_ATTRS and not len(getattr(a, _LIST_ATTRS[a.type]))]
        if not node.doc_string and not meta and not empty:
            continue
        if not node.name or node.name in extras:
            while f"{node.op_type}_{counter[0]}" in names:
                counter[0] += 1
            node.name = f"{node.op_type}_{counter[0]}"
            names.add(node.name)
        kept = []
        for a in empty:
            copy = onnx.AttributeProto()
            copy.CopyFrom(a)
            kept.append(copy)
            node.attribute.remove(a)
        extras[node.name] = (node.doc_string, meta, kept)
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
                doc, meta, empty = extras[node.name]
                node.doc_string = doc
                if meta:
                    node.metadata_props.extend(meta)
                have = {a.name for a in node.attribute}
                node.attribute.extend(a for a in empty if a.name not in have)
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
    return tensor_check.payload_nbytes(t.data_type, t.dims) or 0


def payload_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of all tensor payloads of `proto` as dtype x dims say (upb's ByteSize would serialize
    the whole model to tell: twice the weights in memory)."""
    return sum(_tensor_nbytes(t) for t in _proto_tensors(proto))


def needs_external(proto: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in _proto_tensors(proto)) or payload_bytes(proto) > INLINE_LIMIT


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (in place) in the form `onnx.load` gives: lazily kept weights read into the proto.

    Above INLINE_LIMIT a ModelProto cannot be serialized whole: the weights stay on disk and each
    lazy tensor gets an empty raw_data, so a plain `onnx.save` stops with onnx's own error quoting
    the marker location ("... write this model with onnxopt.save") before writing anything, instead
    of writing a file whose tensors point somewhere onnxruntime refuses.
    """
    lazy = [t for t in _proto_tensors(model) if uses_external_data(t)]
    if not lazy:
        return model
    total = payload_bytes(model)
    for t in lazy:
        if total <= INLINE_LIMIT:
            data = read_external(t)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
        else:
            t.raw_data = b""
    return model


def check_output_path(path: Union[str, os.PathLike]) -> str:
    """`path` as a string, refused (OptimizeError) when a model cannot be written there: a missing
    folder, a directory in the way. Called before any work so a bad -o costs nothing."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise OptimizeError(f"output path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not path or os.path.basename(path) in ("", ".", ".."):
        raise OptimizeError(f"{path!r}: output path names no file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptimizeError(f"{path}: the output folder {folder} does not exist")
    if os.path.isdir(path):
        raise OptimizeError(f"{path}: is a directory, not a file name")
    data = os.path.join(folder, external_data.data_file_name(path))
    if os.path.isdir(data):
        raise OptimizeError(f"{path}: its external-data file name {data} is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptimizeError(f"{path}: the output folder {folder} is not writable")
    return path


def save(model: onnx.ModelProto, path: Union[str, os.PathLike], external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically (temp file + rename), with the mode plain files get.

    Weights go to `<name>.data` beside it when `external_data` is true, or (default) when the model
    references external data or would not fit in one protobuf. Tensors kept on disk are streamed from
    their (checked) files, in-memory ones are written one at a time; the in-memory `model` is not
    modified and never copied whole.
    """
    path = check_output_path(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    if external_data is None:
        external_data = needs_external(model)
    if not external_data:
        _atomic_write(path, out_dir, lambda f: _serialize_in_pieces(model, f))
        return
    data_name = _external.data_file_name(path)
    fd, tmp_data = _external.create_temp(out_dir)
    try:
        with os.fdopen(fd, "wb") as data_file:
            proto = onnx.ModelProto()
            _copy_writing_payloads(model, proto, _PayloadWriter(data_file, data_name))
        _atomic_write(path, out_dir, lambda f: f.write(proto.SerializeToString()),
                      before_rename=lambda: os.replace(tmp_data, os.path.join(out_dir, data_name)))
    except BaseException:
        if os.path.exists(tmp_data):
            os.unlink(tmp_data)
        raise


_external = external_data  # `save`'s parameter shadows the module name
_TENSOR = onnx.TensorProto.DESCRIPTOR.full_name
_WITH_TENSORS = {onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPH,
                 onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS}
_TENSOR_DATA = {"raw_data", "external_data", "data_location", "float_data", "int32_data", "string_data",
                "int64_data", "double_data", "uint64_data"}


def _copy_writing_payloads(src, dst, writer: "_PayloadWriter") -> None:
    """Copy message `src` into `dst`; each TensorProto goes through `writer` (its payload to the
    data file) instead of being copied: the big bytes are never duplicated in memory."""
    if src.DESCRIPTOR.full_name == _TENSOR:
        writer.tensor(src, dst)
        return
    if isinstance(src, onnx.NodeProto) and not any(a.type in _WITH_TENSORS for a in src.attribute):
        dst.CopyFrom(src)
        return
    if isinstance(src, onnx.AttributeProto) and src.type not in _WITH_TENSORS:
        dst.CopyFrom(src)
        return
    _copy_fields(src, dst, lambda s, d: _copy_writing_payloads(s, d, writer))


def _copy_fields(src, dst, copy_message, skip=()) -> None:
    """Copy the fields of message `src` into `dst` (but `skip`): scalars as they are, sub-messages
    through `copy_message(src_item, dst_item)`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.message_type is None:
            if field.is_repeated:
                getattr(dst, field.name).extend(value)
            else:
                setattr(dst, field.name, value)
        elif field.is_repeated:
            container = getattr(dst, field.name)
            for item in value:
                copy_message(item, container.add())
        else:
            copy_message(value, getattr(dst, field.name))


class _PayloadWriter:
    """Appends tensor payloads to the data file (each aligned to 4 KiB, so they can be mapped)."""

    ALIGN = 4096

    def __init__(self, data_file, data_name: str):
        self.file, self.name = data_file, data_name

    def _start(self) -> int:
        pos = self.file.tell()
        pad = (-pos) % self.ALIGN
        self.file.write(b"\0" * pad)
        return pos + pad

    def tensor(self, src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        if uses_external_data(src):
            file, src_offset, length = external_file(src)
            offset = self._start()
            _external.copy(file, src_offset, length, self.file, src.name)
        elif src.HasField("raw_data") and len(src.raw_data) >= EXTERNAL_THRESHOLD:
            offset = self._start()
            length = self.file.write(src.raw_data)
        elif (not src.HasField("raw_data") and src.data_type != onnx.TensorProto.STRING
              and _tensor_nbytes(src) >= EXTERNAL_THRESHOLD):
            raw = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(src)).raw_data
            offset = self._start()
            length = self.file.write(raw)
        else:
            dst.CopyFrom(src)
            return
        _copy_fields(src, dst, lambda s, d: d.CopyFrom(s), skip=_TENSOR_DATA)  # the header: all but the payload
        _set_external(dst, self.name, offset, length)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field_number: int, size: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(size)


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _copy_fields_except(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.message_type is None and not field.is_repeated:
            setattr(dst, field.name, value)
        elif field.message_type is None or field.is_repeated:
            getattr(dst, field.name).extend(value)
        else:
            getattr(dst, field.name).CopyFrom(value)


def _serialize_in_pieces(model: onnx.ModelProto, f) -> None:
    """Write `model`'s protobuf encoding to `f` one initializer at a time (a message's encoding is
    the concatenation of its fields' in any order), so serializing never doubles the weights."""
    head = onnx.ModelProto()
    _copy_fields_except(model, head, "graph")
    f.write(head.SerializeToString())
    if not model.HasField("graph"):
        return
    graph = onnx.GraphProto()
    _copy_fields_except(model.graph, graph, "initializer")
    rest = graph.SerializeToString()
    pieces = [_tensor_pieces(t) for t in model.graph.initializer]  # (header bytes, raw_data length)
    sizes = [len(h) + (len(_length_delimited(_RAW_FIELD, n)) + n if n is not None else 0) for h, n in pieces]
    total = len(rest) + sum(len(_length_delimited(_INITIALIZER_FIELD, n)) + n for n in sizes)
    f.write(_length_delimited(_GRAPH_FIELD, total))
    f.write(rest)
    for t, (header, raw_len), size in zip(model.graph.initializer, pieces, sizes):
        f.write(_length_delimited(_INITIALIZER_FIELD, size))
        f.write(header)
        if raw_len is not None:
            f.write(_length_delimited(_RAW_FIELD, raw_len))
            f.write(t.raw_data)


def _tensor_pieces(t: onnx.TensorProto):
    """(encoding of `t` without raw_data, length of raw_data or None): upb's ByteSize and
    SerializeToString each hold a second copy of the payload; this holds none."""
    if not t.HasField("raw_data"):
        return t.SerializeToString(), None
    header = onnx.TensorProto()
    _copy_fields_except(t, header, "raw_data")
    return header.SerializeToString(), len(t.raw_data)


def _atomic_write(path: str, out_dir: str, write, before_rename=None) -> None:
    fd, tmp = _external.create_temp(out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)  # replaces a link at `path` instead of writing through it
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
