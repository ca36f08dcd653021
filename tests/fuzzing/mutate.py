"""Seeded mutators over serialized models and calibration data.

`make_case(seed, index, root)` is a pure function of (seed, index) apart from the absolute paths
under `root` it may write into the model: the same pair always gives the same mutations, so any
failure is replayed with `benchmarks/fuzz.py --seed S --only INDEX`.

A plain seeded mutator, not hypothesis: the inputs are protobuf messages plus a folder of files
(symlinks, hard links, an outside sentinel), the interesting mutations are structural and few per
case, and a failing case must replay bit for bit in a subprocess worker that may be killed by a crash;
hypothesis' shrinking would need its own process isolation to survive segfaults and adds a dependency
for no gain here. Each mutation is described in words (`Case.mutations`), which is what the findings
notes quote.
"""
from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto

from . import seeds

MODES = ("api", "api-int8", "cli-optimize", "cli-int8", "cli-inspect")
MODE_WEIGHTS = (0.3, 0.15, 0.3, 0.15, 0.1)
SENTINEL_NAME = "secret.bin"
SENTINEL_TOKEN = b"<<onnxopt-fuzz-sentinel>>"
SENTINEL_BYTES = SENTINEL_TOKEN * 400  # ~10 KB: any tensor read from it carries the token

# A file entry of the model's folder: bytes, or a link / directory to create.
FileSpec = Union[bytes, Tuple[str, str]]  # keyed by file name: str, or bytes for non-UTF-8 names  # ("symlink", target) | ("hardlink", target) | ("dir", "")


@dataclasses.dataclass
class Case:
    index: Union[int, str]
    seed_name: str
    mode: str
    mutations: List[str]
    model_bytes: bytes
    files: Dict[str, FileSpec]
    calibration: object = None  # api-int8: list of feed dicts; cli-int8: npz bytes or FileSpec
    cli_extra: List[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:  # index: an int (random case) or "tN" (targeted case)
        mode = self.mode + (" --no-autotune" if "--no-autotune" in self.cli_extra else "")
        return f"case {self.index} [{self.seed_name}/{mode}]: " + "; ".join(self.mutations or ["(no mutation)"])


class _Ctx:
    """What a mutator needs besides the model: the rng, the case folder and the files/bytes edits."""

    def __init__(self, rng: np.random.Generator, root: str, files: Dict[str, FileSpec], how: Optional[str] = None):
        self.rng, self.root, self.files, self.forced_how = rng, root, files, how
        self.byte_swaps: List[Tuple[bytes, bytes]] = []  # (marker, replacement) applied after serializing
        self.markers = 0

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def how(self, options):
        """The variant a mutator applies: random, or the one a targeted case asks for."""
        return self.forced_how if self.forced_how in options else self.choice(options)

    def non_utf8(self, base: str) -> str:
        """A same-length marker name that becomes invalid UTF-8 in the serialized bytes."""
        self.markers += 1
        marker = f"Q{self.markers}{''.join(c for c in base if c.isalnum())[:8]}Z"
        self.byte_swaps.append((marker.encode(), b"\xff" + marker.encode()[1:-1] + b"\xc3"))
        return marker

    @property
    def model_dir(self):
        return os.path.join(self.root, "model")


# ------------------------------------------------------------------------------------ model walks

def _graphs(g: onnx.GraphProto):
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def _tensors(model: onnx.ModelProto) -> List[TensorProto]:
    out = []
    for g in _graphs(model.graph):
        out.extend(g.initializer)
        for node in g.node:
            out.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return out


def _nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    return [n for g in _graphs(model.graph) for n in g.node]


def _value_names(model: onnx.ModelProto) -> List[str]:
    names = set()
    for g in _graphs(model.graph):
        names.update(v.name for v in list(g.input) + list(g.output))
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.update(x for x in list(n.input) + list(n.output) if x)
    return sorted(names)


def _rename_value(model: onnx.ModelProto, old: str, new: str, everywhere: bool, rng) -> None:
    for g in _graphs(model.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.name == old:
                v.name = new
        for t in g.initializer:
            if t.name == old:
                t.name = new
        for n in g.node:
            for field in (n.input, n.output):
                for i, x in enumerate(field):
                    if x == old and (everywhere or rng.random() < 0.5):
                        field[i] = new


# ------------------------------------------------------------------------------- model mutators
# Each takes (model, ctx) and returns a description, or None when it does not apply to this model.

DTYPES = [v for v in TensorProto.DataType.values()] + [99, 1000]


def m_dims(model, ctx):
    t = ctx.choice(_tensors(model))
    dims = list(t.dims)
    how = ctx.choice(["drop", "append1", "zero", "negative", "huge", "double", "int64max", "scalar"])
    if how == "drop" and dims:
        dims.pop()
    elif how == "append1":
        dims.append(1)
    elif how == "zero" and dims:
        dims[0] = 0
    elif how == "negative" and dims:
        dims[-1] = -dims[-1] or -1
    elif how == "huge":
        dims = [2**31] + dims[1:] if dims else [2**31]
    elif how == "double" and dims:
        dims[-1] *= 2
    elif how == "int64max":
        dims = [2**62, 4] if len(dims) != 1 else [2**63 - 1]
    else:
        dims = []
    del t.dims[:]
    t.dims.extend(dims)
    return f"tensor {t.name!r} dims -> {dims} ({how})"


def m_raw_length(model, ctx):
    ts = [t for t in _tensors(model) if t.HasField("raw_data")]
    if not ts:
        return None
    t = ctx.choice(ts)
    n = len(t.raw_data)
    new = ctx.choice([0, n - 1, n - 4, n - 12, max(n // 2, 1), n + 1, n + 4, n + 64])
    new = max(new, 0)
    t.raw_data = (t.raw_data + bytes(ctx.rng.integers(0, 256, max(new - n, 0), dtype=np.uint8)))[:new]
    return f"tensor {t.name!r} raw_data {n} -> {new} bytes"


def m_dtype(model, ctx):
    t = ctx.choice(_tensors(model))
    old = t.data_type
    t.data_type = int(ctx.choice(DTYPES))
    return f"tensor {t.name!r} data_type {old} -> {t.data_type}"


def m_typed_fields(model, ctx):
    """Values moved out of raw_data into the typed repeated fields, with wrong counts or kinds."""
    ts = [t for t in _tensors(model)
          if t.HasField("raw_data") and t.data_type == TensorProto.FLOAT and len(t.raw_data) % 4 == 0]
    if not ts:
        return None
    t = ctx.choice(ts)
    values = np.frombuffer(t.raw_data, np.float32)
    how = ctx.choice(["float_short", "float_long", "both", "int64", "string", "double"])
    t.ClearField("raw_data")
    if how == "float_short":
        t.float_data.extend(values[:-1].tolist())
    elif how == "float_long":
        t.float_data.extend(values.tolist() + [1.0, 2.0])
    elif how == "both":
        t.float_data.extend(values.tolist())
        t.raw_data = values.tobytes()
    elif how == "int64":
        t.int64_data.extend([1] * len(values))
    elif how == "string":
        t.string_data.extend([b"x"] * len(values))
    else:
        t.double_data.extend(values.astype(float).tolist())
    return f"tensor {t.name!r} values in typed fields ({how})"


def m_value_info(model, ctx):
    g = ctx.choice(list(_graphs(model.graph)))
    vis = list(g.input) + list(g.output)
    if not vis:
        return None
    v = ctx.choice(vis)
    tt = v.type.tensor_type
    how = ctx.choice(["elem_type", "no_type", "no_shape", "dim_negative", "dim_zero", "extra_dim",
                      "drop_dim", "dim_param_empty", "sequence_type"])
    if how == "elem_type":
        tt.elem_type = int(ctx.choice(DTYPES))
    elif how == "no_type":
        v.ClearField("type")
    elif how == "no_shape":
        tt.ClearField("shape")
    elif how in ("dim_negative", "dim_zero") and len(tt.shape.dim):
        tt.shape.dim[-1].dim_value = -3 if how == "dim_negative" else 0
    elif how == "extra_dim":
        tt.shape.dim.add().dim_value = 5
    elif how == "drop_dim" and len(tt.shape.dim):
        del tt.shape.dim[-1]
    elif how == "dim_param_empty" and len(tt.shape.dim):
        tt.shape.dim[0].dim_param = ""
    elif how == "sequence_type":
        elem = tt.elem_type
        v.type.sequence_type.elem_type.tensor_type.elem_type = elem
    return f"value_info {v.name!r} ({how})"


def m_rename(model, ctx):
    how = ctx.choice(["empty", "duplicate", "long", "unicode", "non_utf8", "slashes", "nul"])
    target = ctx.choice(["value", "value_one_use", "node", "graph", "attribute"])
    names = _value_names(model)

    def new_name(old):
        if how == "empty":
            return ""
        if how == "duplicate":
            return ctx.choice(names)
        if how == "long":
            return "n" * 5000
        if how == "unicode":
            return old + "_é中\u202e"
        if how == "non_utf8":
            return ctx.non_utf8(old)
        if how == "slashes":
            return "../../" + old
        return old + "\x00x"

    if target in ("value", "value_one_use"):
        old = ctx.choice(names)
        new = new_name(old)
        _rename_value(model, old, new, everywhere=target == "value", rng=ctx.rng)
    elif target == "node":
        node = ctx.choice(_nodes(model))
        old, new = node.name, new_name(node.name)
        node.name = new
    elif target == "graph":
        g = ctx.choice(list(_graphs(model.graph)))
        old, new = g.name, new_name(g.name)
        g.name = new
    else:
        attrs = [a for n in _nodes(model) for a in n.attribute]
        if not attrs:
            return None
        a = ctx.choice(attrs)
        old, new = a.name, new_name(a.name)
        a.name = new
    return f"{target} {old[:40]!r} renamed ({how})"


OPS = ["Conv", "MatMul", "Gemm", "Add", "Relu", "Identity", "If", "Loop", "Reshape", "QLinearConv",
       "QGemm", "QConv", "DequantizeLinear", "NoSuchOp", "BatchNormalization", "Constant", "Cast"]


def m_node(model, ctx):
    g = ctx.choice(list(_graphs(model.graph)))
    if not len(g.node):
        return None
    i = int(ctx.rng.integers(len(g.node)))
    node = g.node[i]
    how = ctx.choice(["op_type", "domain", "drop_input", "extra_input", "empty_input", "drop_output",
                      "remove", "duplicate", "reorder", "self_loop", "unknown_input"])
    if how == "op_type":
        node.op_type = ctx.choice(OPS + ["non_utf8"])
        if node.op_type == "non_utf8":
            node.op_type = ctx.non_utf8(OPS[0])
    elif how == "domain":
        node.domain = ctx.choice(["com.onnxopt", "com.microsoft", "ai.onnx", "ai.onnx.ml", "no.such.domain", "non_utf8"])
        if node.domain == "non_utf8":
            node.domain = ctx.non_utf8("domain")
    elif how == "drop_input" and len(node.input):
        del node.input[-1]
    elif how == "extra_input":
        node.input.append(ctx.choice(_value_names(model)))
    elif how == "empty_input" and len(node.input):
        node.input[0] = ""
    elif how == "drop_output" and len(node.output):
        del node.output[-1]
    elif how == "remove":
        del g.node[i]
    elif how == "duplicate":
        g.node.add().CopyFrom(node)
    elif how == "reorder" and len(g.node) > 1:
        moved = onnx.NodeProto()
        moved.CopyFrom(node)
        del g.node[i]
        g.node.append(moved) if i == 0 else g.node.insert(0, moved)
    elif how == "self_loop" and len(node.input) and len(node.output):
        node.input[0] = node.output[0]
    elif how == "unknown_input" and len(node.input):
        node.input[0] = "no_such_value"
    return f"node {node.name!r} ({node.op_type}) {how}"


def m_attribute(model, ctx):
    attrs = [(n, a) for n in _nodes(model) for a in n.attribute if a.type != onnx.AttributeProto.GRAPH]
    if not attrs:
        return None
    node, a = ctx.choice(attrs)
    how = ctx.choice(["int", "ints_empty", "ints_negative", "ints_long", "type", "float", "remove", "unknown"])
    if how == "int":
        a.ClearField("ints")
        a.type, a.i = onnx.AttributeProto.INT, int(ctx.choice([0, -1, 3, 2**40]))
    elif how == "ints_empty":
        a.type = onnx.AttributeProto.INTS
        del a.ints[:]
    elif how == "ints_negative":
        a.type = onnx.AttributeProto.INTS
        del a.ints[:]
        a.ints.extend([-1, -2, -1, -2])
    elif how == "ints_long":
        a.type = onnx.AttributeProto.INTS
        a.ints.extend([1] * 7)
    elif how == "type":
        a.type = int(ctx.choice(onnx.AttributeProto.AttributeType.values()))
    elif how == "float":
        a.type, a.f = onnx.AttributeProto.FLOAT, 1.5
    elif how == "remove":
        node.attribute.remove(a)
    else:
        extra = node.attribute.add()
        extra.name, extra.type, extra.i = "no_such_attr", onnx.AttributeProto.INT, 1
    return f"node {node.name!r} attribute {a.name!r} ({how})"


def m_opset(model, ctx):
    how = ctx.choice(["version", "version", "remove_default", "duplicate_default", "custom_domain", "ir_version"])
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if how == "version" and default:
        default[0].version = int(ctx.choice([0, 1, 5, 7, 9, 11, 13, 19, 21, 22, 23, 99, 2**40, -1]))
        return f"default opset -> {default[0].version}"
    if how == "remove_default" and default:
        model.opset_import.remove(default[0])
        return "default opset import removed"
    if how == "duplicate_default":
        model.opset_import.add().CopyFrom(onnx.helper.make_opsetid("", 11))
        return "second default opset import (11)"
    if how == "custom_domain":
        dom = ctx.choice(["com.onnxopt", "com.microsoft", "weird.domain"])
        model.opset_import.add().CopyFrom(onnx.helper.make_opsetid(dom, int(ctx.choice([0, 1, 2, 1000]))))
        return f"opset import {dom}"
    model.ir_version = int(ctx.choice([0, 1, 2, 3, 4, 7, 10, 11, 12, 99, -1]))
    return f"ir_version -> {model.ir_version}"


def _make_external(model, ctx) -> Optional[TensorProto]:
    """An external tensor of the model: an existing one, or an initializer moved to `ext.bin`."""
    ext = [t for t in _tensors(model) if t.data_location == TensorProto.EXTERNAL]
    if ext:
        return ctx.choice(ext)
    inits = [t for t in model.graph.initializer if t.HasField("raw_data")]
    if not inits:
        return None
    t = ctx.choice(inits)
    ctx.files["ext.bin"] = bytes(t.raw_data)
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "ext.bin"), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _set_entry(t: TensorProto, key: str, value: Optional[str]) -> None:
    keep = [(e.key, e.value) for e in t.external_data if e.key != key]
    if value is not None:
        keep.append((key, value))
    del t.external_data[:]
    for k, v in keep:
        e = t.external_data.add()
        e.key, e.value = k, v


def _entry(t: TensorProto, key: str, default=None):
    return next((e.value for e in t.external_data if e.key == key), default)


EXTERNAL_HOW = ["absolute", "dotdot", "dotdot_deep", "subdir_dotdot", "symlink", "symlink_dir", "hardlink",
                "missing", "directory", "empty", "nul", "offset_beyond", "offset_negative", "offset_text",
                "length_short", "length_long", "length_zero", "length_negative", "length_text", "no_length",
                "unknown_key", "duplicate_location", "no_entries", "default_with_entries", "proc", "dev_zero",
                "model_itself", "dot", "non_utf8_location", "symlink_inside", "absolute_inside"]


def m_external(model, ctx):
    t = _make_external(model, ctx)
    if t is None:
        return None
    how = ctx.how(EXTERNAL_HOW)
    loc = _entry(t, "location", "ext.bin")
    sentinel = os.path.join(ctx.root, SENTINEL_NAME)
    size = len(ctx.files.get(loc, b"")) if isinstance(ctx.files.get(loc), bytes) else 0
    offset = int(_entry(t, "offset", "0") or 0)
    length = _entry(t, "length")
    if how == "absolute":
        _set_entry(t, "location", sentinel)
    elif how == "dotdot":
        _set_entry(t, "location", "../" + SENTINEL_NAME)
    elif how == "dotdot_deep":
        _set_entry(t, "location", "../" * 12 + sentinel.lstrip("/"))
    elif how == "subdir_dotdot":
        ctx.files["sub"] = ("dir", "")
        _set_entry(t, "location", "sub/../../" + SENTINEL_NAME)
    elif how == "symlink":
        ctx.files["link.bin"] = ("symlink", sentinel)
        _set_entry(t, "location", "link.bin")
    elif how == "symlink_dir":
        ctx.files["up"] = ("symlink", ctx.root)
        _set_entry(t, "location", "up/" + SENTINEL_NAME)
    elif how == "hardlink":
        ctx.files["hard.bin"] = ("hardlink", sentinel)
        _set_entry(t, "location", "hard.bin")
    elif how == "missing":
        _set_entry(t, "location", "missing.bin")
    elif how == "directory":
        ctx.files["adir"] = ("dir", "")
        _set_entry(t, "location", "adir")
    elif how == "empty":
        _set_entry(t, "location", "")
    elif how == "nul":
        _set_entry(t, "location", loc + "\x00.txt")
    elif how == "offset_beyond":
        _set_entry(t, "offset", str(size + 4096 * 4))
    elif how == "offset_negative":
        _set_entry(t, "offset", "-16")
    elif how == "offset_text":
        _set_entry(t, "offset", ctx.choice(["abc", "1e3", "", "0x10", "99999999999999999999999"]))
    elif how == "length_short":
        _set_entry(t, "length", str(max(int(length or 8) - 4, 0)))
    elif how == "length_long":
        _set_entry(t, "length", str(int(length or 8) + 4096 * 8))
    elif how == "length_zero":
        _set_entry(t, "length", "0")
    elif how == "length_negative":
        _set_entry(t, "length", "-8")
    elif how == "length_text":
        _set_entry(t, "length", "many")
    elif how == "no_length":
        _set_entry(t, "length", None)
    elif how == "unknown_key":
        _set_entry(t, "whatever", "1")
    elif how == "duplicate_location":
        e = t.external_data.add()
        e.key, e.value = "location", sentinel
    elif how == "no_entries":
        del t.external_data[:]
    elif how == "default_with_entries":
        t.data_location = TensorProto.DEFAULT
    elif how == "proc":
        _set_entry(t, "location", "/proc/self/environ")
    elif how == "dev_zero":
        _set_entry(t, "location", "/dev/zero")
    elif how == "model_itself":
        _set_entry(t, "location", "model.onnx")
    elif how == "dot":
        _set_entry(t, "location", ".")
    elif how == "non_utf8_location":
        _set_entry(t, "location", ctx.non_utf8(loc))
        ctx.files[ctx.byte_swaps[-1][1]] = ctx.files.get(loc, b"")  # a file of that (bytes) name
    elif how == "symlink_inside":  # a symlink to a file inside the folder: onnx refuses symlinks too
        ctx.files["alias.bin"] = ("symlink", loc)
        _set_entry(t, "location", "alias.bin")
    elif how == "absolute_inside":  # absolute, but inside the model's folder: onnx refuses absolute
        _set_entry(t, "location", os.path.join(ctx.model_dir, loc))
    return f"external data of {t.name!r}: {how}"


def m_subgraph(model, ctx):
    ifs = [n for n in _nodes(model) if n.op_type == "If"]
    if not ifs:
        return None
    node = ctx.choice(ifs)
    how = ctx.choice(["drop_branch", "branch_outputs", "branch_input", "outer_name", "swap_branch_output_type"])
    branches = [a for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    if how == "drop_branch" and branches:
        node.attribute.remove(ctx.choice(branches))
    elif how == "branch_outputs" and branches:
        g = ctx.choice(branches).g
        g.output.add().CopyFrom(g.output[0])
    elif how == "branch_input" and branches:
        g = ctx.choice(branches).g
        g.input.add().CopyFrom(onnx.helper.make_tensor_value_info("body_in", TensorProto.FLOAT, [1]))
    elif how == "outer_name" and branches:
        g = ctx.choice(branches).g
        if len(g.node) and len(g.node[0].input):
            g.node[0].input[0] = "outer_missing"
    elif branches:
        g = ctx.choice(branches).g
        g.output[0].type.tensor_type.elem_type = TensorProto.INT64
    return f"If {node.name!r} {how}"


def _messages(msg):
    """Every sub-message of `msg` (depth first), `msg` included."""
    yield msg
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            for sub in value:
                yield from _messages(sub)
        else:
            yield from _messages(value)


_INTS = [0, 1, -1, 2, 7, 255, 2**31 - 1, -2**31, 2**63 - 1, -2**63]


def m_proto_field(model, ctx):
    """Any scalar field of any message of the model set to an edge value (protobuf's own types)."""
    msg = ctx.choice(list(_messages(model)))
    fields = [f for f in msg.DESCRIPTOR.fields if f.type != f.TYPE_MESSAGE]
    if not fields:
        return None
    f = ctx.choice(fields)
    if f.is_repeated:
        getattr(msg, f.name).__delitem__(slice(None))
        return f"{msg.DESCRIPTOR.name}.{f.name} cleared"
    if f.type == f.TYPE_STRING:
        value = ctx.choice(["", "x" * 10000, "../../etc/passwd", "\x00", "é"])
    elif f.type == f.TYPE_BYTES:
        value = ctx.choice([b"", b"\xff" * 7, bytes(4099)])
    elif f.type == f.TYPE_ENUM:
        value = int(ctx.choice([v.number for v in f.enum_type.values] + [99]))
    elif f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
        value = float(ctx.choice([0.0, -1.0, float("nan"), float("inf"), 1e38]))
    elif f.type == f.TYPE_BOOL:
        value = not getattr(msg, f.name)
    else:
        value = int(ctx.choice([v for v in _INTS if v >= 0] if f.type in (f.TYPE_UINT32, f.TYPE_UINT64) else _INTS))
        value = value if f.type not in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32, f.TYPE_ENUM) else \
            max(min(value, 2**31 - 1), -2**31)
    try:
        setattr(msg, f.name, value)
    except (ValueError, TypeError):
        return None
    return f"{msg.DESCRIPTOR.name}.{f.name} = {str(value)[:20]!r}"


MODEL_MUTATORS: Dict[str, Callable] = {
    "dims": m_dims, "raw_length": m_raw_length, "dtype": m_dtype, "typed_fields": m_typed_fields,
    "value_info": m_value_info, "rename": m_rename, "node": m_node, "attribute": m_attribute,
    "opset": m_opset, "external": m_external, "subgraph": m_subgraph, "proto_field": m_proto_field,
}
MODEL_WEIGHTS = {"dims": 1.0, "raw_length": 1.0, "dtype": 1.0, "typed_fields": 0.6, "value_info": 0.8,
                 "rename": 1.0, "node": 1.0, "attribute": 0.8, "opset": 1.0, "external": 2.0, "subgraph": 0.5,
                 "proto_field": 1.5}


def mutate_bytes(data: bytes, ctx) -> Tuple[bytes, str]:
    """Blind byte-level damage to the serialized model (protobuf's parser is the target)."""
    rng = ctx.rng
    how = ctx.choice(["truncate", "flip", "insert", "delete", "varint"])
    b = bytearray(data)
    if how == "truncate":
        b = b[:int(rng.integers(1, len(b)))]
    elif how == "flip":
        for _ in range(int(rng.integers(1, 6))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif how == "insert":
        i = int(rng.integers(len(b)))
        b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
    elif how == "delete":
        i = int(rng.integers(len(b)))
        del b[i:i + int(rng.integers(1, 16))]
    else:  # a length prefix made huge
        i = int(rng.integers(len(b)))
        b[i:i + 1] = b"\xff\xff\xff\xff\x0f"
    return bytes(b), f"serialized bytes: {how}"


# --------------------------------------------------------------------------- calibration mutators

def c_arrays(arrays: dict, ctx) -> str:
    """Mutate the calibration arrays (names, dtypes, shapes, values) in place."""
    name = ctx.choice(sorted(arrays))
    a = arrays[name]
    how = ctx.choice(["rename", "extra", "drop", "float64", "float16", "int32", "bool", "complex", "str",
                      "add_dim", "drop_dim", "inner_dim", "zero_samples", "one_sample", "scalar", "nan", "inf",
                      "all_nan", "huge", "object"])
    if how == "rename":
        arrays[name + "_x"] = arrays.pop(name)
    elif how == "extra":
        arrays["extra"] = np.zeros((3, 2), np.float32)
    elif how == "drop":
        del arrays[name]
    elif how in ("float64", "float16", "int32", "bool", "complex"):
        arrays[name] = a.astype({"float64": np.float64, "float16": np.float16, "int32": np.int32, "bool": bool,
                                 "complex": np.complex64}[how])
    elif how == "str":
        arrays[name] = a.astype(str)
    elif how == "add_dim":
        arrays[name] = a[..., None]
    elif how == "drop_dim" and a.ndim:
        arrays[name] = a.reshape(a.shape[0], -1)[:, 0] if a.ndim > 1 else a[0]
    elif how == "inner_dim" and a.ndim > 1:
        arrays[name] = np.concatenate([a, a], axis=-1)
    elif how == "zero_samples":
        arrays[name] = a[:0]
    elif how == "one_sample":
        arrays[name] = a[:1]
    elif how == "scalar":
        arrays[name] = np.float32(1.0)
    elif how in ("nan", "inf", "all_nan", "huge") and a.dtype.kind == "f":
        a = a.copy()
        if how == "all_nan":
            a[...] = np.nan
        else:
            a.flat[int(ctx.rng.integers(a.size))] = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[how]
        arrays[name] = a
    elif how == "object":
        arrays[name] = np.array([object()] * 2, dtype=object)
    return f"calibration array {name!r}: {how}"


def c_feeds(feeds: list, ctx) -> Tuple[object, str]:
    """What an API caller may hand over instead of a list of feed dicts (it must be pickleable)."""
    how = ctx.choice(["empty_list", "none_entry", "none_value", "string", "list_of_arrays", "mixed_keys"])
    if how == "empty_list":
        return [], "calibration feeds: empty list"
    if how == "none_entry":
        return feeds + [None], "calibration feeds: a None entry"
    if how == "none_value":
        return [{k: None for k in feeds[0]}] + feeds, "calibration feeds: None values"
    if how == "string":
        return "calibration.npz", "calibration feeds: a string"
    if how == "list_of_arrays":
        return [next(iter(f.values())) for f in feeds], "calibration feeds: arrays, not dicts"
    return [feeds[0], {"other": next(iter(feeds[0].values()))}], "calibration feeds: second feed names another input"


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def c_file(data: bytes, ctx) -> Tuple[object, str]:
    """File-level damage to an .npz the CLI reads."""
    how = ctx.choice(["truncate", "flip", "empty", "not_zip", "zip_junk_member", "npy_not_npz", "directory",
                      "dev_null"])
    if how == "truncate":
        return data[:len(data) // 2], "calibration file truncated"
    if how == "flip":
        b = bytearray(data)
        for _ in range(8):
            b[int(ctx.rng.integers(len(b)))] ^= 0xFF
        return bytes(b), "calibration file bytes flipped"
    if how == "empty":
        return b"", "calibration file empty"
    if how == "not_zip":
        return b"hello, not an npz\n" * 4, "calibration file is text"
    if how == "zip_junk_member":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("x.npy", b"\x93NUMPY garbage")
        return buf.getvalue(), "calibration npz member is not .npy"
    if how == "npy_not_npz":
        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 3), np.float32))
        return buf.getvalue(), "calibration file is .npy"
    if how == "directory":
        return ("dir", ""), "calibration path is an empty directory"
    return ("symlink", "/dev/null"), "calibration file is /dev/null"


# ------------------------------------------------------------------------------------------ cases

def make_case(seed: int, index: int, root: str) -> Case:
    rng = np.random.default_rng([seed, index])
    files: Dict[str, FileSpec] = {}
    ctx = _Ctx(rng, root, files)
    seed_name = ctx.choice(sorted(seeds.SEEDS))
    model, seed_files = seeds.SEEDS[seed_name](np.random.default_rng([seed, index, 1]))
    files.update(seed_files)
    arrays = seeds.calibration_arrays(model, np.random.default_rng([seed, index, 2]))  # from the unmutated seed
    mode = str(rng.choice(MODES, p=MODE_WEIGHTS))
    if seed_name == "if" and mode == "cli-int8":  # a scalar input cannot be cut into npz batches
        mode = "api-int8"
    mutations = []
    names = sorted(MODEL_MUTATORS)
    weights = np.array([MODEL_WEIGHTS[n] for n in names])
    count = int(rng.choice([0, 1, 1, 1, 2, 2, 3])) if mode.endswith("int8") else int(rng.choice([1, 1, 1, 2, 2, 3]))
    for _ in range(count):
        name = str(rng.choice(names, p=weights / weights.sum()))
        try:
            desc = MODEL_MUTATORS[name](model, ctx)
        except (ValueError, IndexError, TypeError):  # an earlier mutation left nothing it can work on
            desc = None
        if desc:
            mutations.append(desc)
    data = model.SerializeToString()
    for marker, replacement in ctx.byte_swaps:
        data = data.replace(marker, replacement)
    if rng.random() < 0.08:
        data, desc = mutate_bytes(data, ctx)
        mutations.append(desc)
    case = Case(index, seed_name, mode, mutations, data, files)
    if mode.endswith("int8"):
        calibration_mutated = not mutations or rng.random() < 0.4
        if calibration_mutated:
            mutations.append(c_arrays(arrays, ctx))
        if mode == "api-int8":
            case.calibration = _feeds(arrays, rng)
            if rng.random() < 0.1:
                case.calibration, desc = c_feeds(case.calibration, ctx)
                mutations.append(desc)
        else:
            case.calibration = npz_bytes(arrays)
            if rng.random() < 0.15:
                case.calibration, desc = c_file(case.calibration, ctx)
                mutations.append(desc)
        if rng.random() < 0.5:  # the CLI's flag; the API run gets the same preset with autotune=False
            case.cli_extra.append("--no-autotune")
    return case


def _feeds(arrays: dict, rng) -> list:
    """Feed dicts of 4 samples each; the If seed's scalar `cond` gets one sample per feed."""
    n = min((len(a) for a in arrays.values() if np.ndim(a)), default=1)
    feeds = []
    for i in range(0, max(n, 1), 4):
        feed = {}
        for k, a in arrays.items():
            if not np.ndim(a):
                feed[k] = a
            elif k == "cond":
                feed[k] = a[i] if i < len(a) else a[:0]
            else:
                feed[k] = a[i:i + 4]
        feeds.append(feed)
    return feeds


# A targeted case applies one chosen variant to a chosen seed and mode: every external-data attack
# on both the API and the CLI, whatever the random draw, so the short CI run always holds them.
# Control cases (no mutation: every seed in every mode) must come out valid: they keep the oracle honest.
TARGETED = [("external", mode, "external", how) for how in EXTERNAL_HOW for mode in ("api", "cli-optimize")] + \
    [("conv", "cli-int8", "external", how) for how in ("dotdot", "symlink", "hardlink", "absolute")] + \
    [(name, mode, None, None) for name in sorted(seeds.SEEDS) for mode in MODES
     if not (name == "if" and mode == "cli-int8")]


def make_targeted_case(k: int, root: str) -> Case:
    seed_name, mode, mutator, how = TARGETED[k]
    rng = np.random.default_rng([7, k])
    files: Dict[str, FileSpec] = {}
    ctx = _Ctx(rng, root, files, how=how)
    model, seed_files = seeds.SEEDS[seed_name](np.random.default_rng([7, k, 1]))
    files.update(seed_files)
    arrays = seeds.calibration_arrays(model, np.random.default_rng([7, k, 2]))
    mutations = [MODEL_MUTATORS[mutator](model, ctx)] if mutator else []
    data = model.SerializeToString()
    for marker, replacement in ctx.byte_swaps:
        data = data.replace(marker, replacement)
    case = Case(f"t{k}", seed_name, mode, mutations, data, files)
    if mode == "cli-int8":  # without the cost guard, so the written model holds the com.onnxopt int8 ops
        case.calibration = npz_bytes(arrays)
        case.cli_extra.append("--no-autotune")
    elif mode == "api-int8":
        case.calibration = _feeds(arrays, rng)
        case.cli_extra.append("--no-autotune")
    return case


def build_case(seed: int, index: Union[int, str], root: str) -> Case:
    """Random case `index` of `seed`, or targeted case "tK"."""
    if isinstance(index, str) and index.startswith("t"):
        return make_targeted_case(int(index[1:]), root)
    return make_case(seed, int(index), root)
