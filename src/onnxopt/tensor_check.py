"""Does a TensorProto hold as many bytes (or values) as its dtype and dims say?

onnx.checker does not compare payload sizes with dims; onnxruntime does, late ("raw_data size ...
does not match"), and a pass that reads a short buffer would crash or read garbage. Models are checked
once at load so a bad tensor is an InvalidModelError naming it.
"""
from __future__ import annotations

import math
from typing import Optional

import onnx
from onnx import TensorProto as T

from .errors import InvalidModelError

_SUB_BYTE_BITS = {T.UINT4: 4, T.INT4: 4, T.FLOAT4E2M1: 4}
for _name, _bits in (("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(T, _name):  # newer onnx only
        _SUB_BYTE_BITS[getattr(T, _name)] = _bits
_PACKED_IN_INT32 = {dt for dt, bits in _SUB_BYTE_BITS.items() if bits in (2, 4)}  # several per int32_data entry
_COMPLEX = {T.COMPLEX64, T.COMPLEX128}


def element_count(t: T) -> int:
    return math.prod(t.dims) if len(t.dims) else 1


def payload_nbytes(data_type: int, dims) -> Optional[int]:
    """Bytes of the raw (or external) payload of a tensor, None for strings and unknown types."""
    count = math.prod(dims) if len(dims) else 1
    if data_type in _SUB_BYTE_BITS:
        return -(-count * _SUB_BYTE_BITS[data_type] // 8)
    if data_type in (T.STRING, T.UNDEFINED):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # a data type this onnx does not know
        return None


def _typed_count(t: T) -> Optional[int]:
    """Entries the typed field of `t` must hold, None when unknown."""
    count = element_count(t)
    if t.data_type in _PACKED_IN_INT32:
        return -(-count * _SUB_BYTE_BITS[t.data_type] // 8)
    return count * 2 if t.data_type in _COMPLEX else count


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_tensor(t: T, where: str, external_length: Optional[int] = None) -> None:
    """Raise InvalidModelError when `t`'s payload does not match its data type and dims.

    `external_length`: the payload length of an external tensor (already bounds-checked against its
    file), when it is external.
    """
    name = t.name or "(unnamed)"
    if t.data_type == T.UNDEFINED or t.data_type not in T.DataType.values():
        raise InvalidModelError(f"{where}: tensor {name!r} has an unknown data type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise InvalidModelError(f"{where}: tensor {name!r} has a negative dimension {list(t.dims)}")
    dtype_name = T.DataType.Name(t.data_type)
    want = payload_nbytes(t.data_type, t.dims)
    if t.data_location == T.EXTERNAL:
        if external_length is not None and want is not None and external_length != want:
            raise InvalidModelError(f"{where}: tensor {name!r} ({dtype_name} {list(t.dims)}) needs {want} bytes "
                                    f"but its external data holds {external_length}")
        return
    if t.HasField("raw_data"):
        if t.data_type == T.STRING:
            raise InvalidModelError(f"{where}: tensor {name!r} is a STRING tensor with raw_data")
        if want is not None and len(t.raw_data) != want:
            raise InvalidModelError(f"{where}: tensor {name!r} ({dtype_name} {list(t.dims)}) needs {want} bytes "
                                    f"of raw_data, it has {len(t.raw_data)}")
        return
    present = [(f, len(getattr(t, f))) for f in _TYPED_FIELDS if len(getattr(t, f))]
    expected = _typed_count(t)
    if not present:
        if expected:
            raise InvalidModelError(f"{where}: tensor {name!r} ({dtype_name} {list(t.dims)}) has no data")
        return
    if len(present) > 1:
        raise InvalidModelError(f"{where}: tensor {name!r} has data in several fields "
                                f"({', '.join(f for f, _ in present)})")
    field, have = present[0]
    try:
        right_field = onnx.helper.tensor_dtype_to_field(t.data_type)
    except Exception:
        right_field = field
    if field != right_field:
        raise InvalidModelError(f"{where}: tensor {name!r} ({dtype_name}) keeps its values in {field}, "
                                f"onnx wants {right_field}")
    if have != expected:
        raise InvalidModelError(f"{where}: tensor {name!r} ({dtype_name} {list(t.dims)}) needs {expected} values "
                                f"in {field}, it has {have}")


def check_value_type(vi: onnx.ValueInfoProto, where: str) -> None:
    """A declared input/output/value_info type must name a known element type (graphsurgeon and
    onnxruntime fail on others deep inside)."""
    t = vi.type
    while True:  # sequences and optionals wrap a tensor type
        kind = t.WhichOneof("value")
        if kind == "sequence_type":
            t = t.sequence_type.elem_type
        elif kind == "optional_type":
            t = t.optional_type.elem_type
        else:
            break
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(t, kind).elem_type
        if elem not in T.DataType.values() or elem == T.UNDEFINED:  # onnxruntime refuses UNDEFINED too
            raise InvalidModelError(f"{where}: {vi.name!r} is declared with an unknown element type {elem}")
