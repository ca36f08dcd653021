"""Mutations of a tensor's external data: every way out of the model's folder onnx refuses
(absolute, `..`, symlinks, hard links, special files, a second `location`) and malformed entries
(missing file, offsets and lengths wrong, negative, not numbers)."""
from __future__ import annotations

import os
from typing import Optional

from onnx import TensorProto

from .context import SENTINEL_NAME
from .protowalk import tensors


def _make_external(model, ctx) -> Optional[TensorProto]:
    """An external tensor of the model: an existing one, or an initializer moved to `ext.bin`."""
    ext = [t for t in tensors(model) if t.data_location == TensorProto.EXTERNAL]
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
