"""Mutations of calibration data: the arrays (names, dtypes, shapes, values), the feeds an API
caller passes, and the .npz file the CLI reads."""
from __future__ import annotations

import io
import zipfile
from typing import Tuple

import numpy as np


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
    first = next(iter(feeds[0].values()), None)  # an earlier mutation may have dropped every array
    if how == "list_of_arrays":
        return [first for _ in feeds], "calibration feeds: arrays, not dicts"
    return [feeds[0], {"other": first}], "calibration feeds: second feed names another input"


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


def feeds_from_arrays(arrays: dict, rng) -> list:
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
