"""ONNX schemas for the custom ops of domain ``com.onnxopt`` (QGemm, QConv), version 1.

Importing this module registers both schemas with ``onnx.defs`` (once per process), with type and
shape inference written in Python, so that ``onnx.checker.check_model(m, full_check=True)`` and
``onnx.shape_inference.infer_shapes`` understand models that use the ops. The operator contract is
in passes.md, "Custom operators"; the shape rules here are the ones the kernels enforce at run time.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

DOMAIN = "com.onnxopt"
VERSION = 1

# Input order (optional inputs are omitted at the end or given the empty name "").
QGEMM_INPUTS = ("X", "W", "w_scale", "bias", "x_scale", "x_zero_point", "w_zero_point")
QCONV_INPUTS = ("X", "W", "w_scale", "bias", "x_scale", "x_zero_point", "residual", "y_scale", "y_zero_point")
ACTIVATIONS = ("none", "relu", "clip")
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

_FP = OpSchema.FormalParameter
_OPT = OpSchema.FormalParameterOption.Optional
_A = OpSchema.AttrType


class ShapeError(onnx.shape_inference.InferenceError):
    """Inputs or attributes that cannot go together (raised from shape inference)."""


def _param(name, type_str, doc, optional=False):
    if optional:
        return _FP(name, type_str, doc, param_option=_OPT)
    return _FP(name, type_str, doc)


def _activation_attributes():
    return [
        OpSchema.Attribute("activation", helper.make_attribute("activation", "none"),
                           'fused activation: "none", "relu" or "clip"'),
        OpSchema.Attribute("clip_min", _A.FLOAT, "lower bound for activation=clip (default -inf)",
                           required=False),
        OpSchema.Attribute("clip_max", _A.FLOAT, "upper bound for activation=clip (default +inf)",
                           required=False),
    ]


def _common_inputs(w_doc, n):
    return [
        _param("X", "T", "float activations"),
        _param("W", "tensor(int8)", w_doc),
        _param("w_scale", "T", f"weight scale, [1] (per tensor) or [{n}] (per channel)"),
        _param("bias", "T", f"optional bias [{n}], added after scaling", optional=True),
        _param("x_scale", "T", "optional static activation scale (scalar); absent = dynamic",
               optional=True),
        _param("x_zero_point", "tensor(uint8)", "optional static activation zero point (scalar)",
               optional=True),
    ]


_TYPES = [("T", ["tensor(float)"], "float32 activations, scales, bias and output")]


# ---- shape helpers ----------------------------------------------------------------------------

def _input_dims(ctx, i):
    """List of dims (int, str for symbolic, None for unknown) or None when the shape is unknown."""
    if not ctx.has_input(i):
        return None
    t = ctx.get_input_type(i)
    if t is not None and t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        out = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                out.append(d.dim_value if d.dim_value >= 0 else None)  # -1: dynamic, as onnxruntime reads it
            elif d.HasField("dim_param"):
                out.append(d.dim_param)
            else:
                out.append(None)
        return out
    data = ctx.get_input_data(i)  # an initializer without a declared value_info
    if data is not None:
        return list(data.dims)
    return None


def _known(d):
    return isinstance(d, int)


def _set_output(ctx, dims, elem_type=TensorProto.FLOAT):
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = elem_type
    if dims is not None:
        shape = tp.tensor_type.shape
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str) and d:
                dim.dim_param = d
    ctx.set_output_type(0, tp)


def _attr(ctx, name, default):
    a = ctx.get_attribute(name)
    return default if a is None else helper.get_attribute_value(a)


def _check_activation(ctx, op):
    a = ctx.get_attribute("activation")
    if a is None:
        return
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        v = v.decode()
    if v not in ACTIVATIONS and v not in (0, 1, 2):
        raise ShapeError(f"{op}: activation must be one of {ACTIVATIONS}, got {v!r}")


def _check_len(op, what, dims, n):
    if dims is not None and _known(n) and len(dims) >= 1 and _known(dims[-1]) and dims[-1] not in (1, n) \
            and what == "w_scale":
        raise ShapeError(f"{op}: w_scale must have 1 or {n} elements, got {dims}")
    if dims is not None and what == "bias" and _known(n) and len(dims) == 1 and _known(dims[0]) \
            and dims[0] != n:
        raise ShapeError(f"{op}: bias must have {n} elements, got {dims}")


def _infer_qgemm(ctx):
    _check_activation(ctx, "QGemm")
    x = _input_dims(ctx, 0)
    w = _input_dims(ctx, 1)
    if w is not None and len(w) != 2:
        raise ShapeError(f"QGemm: W must be [K, N], got rank {len(w)}")
    if x is not None and len(x) < 2:
        raise ShapeError(f"QGemm: X must have rank >= 2, got rank {len(x)}")
    if x is not None and w is not None and _known(x[-1]) and _known(w[0]) and x[-1] != w[0]:
        raise ShapeError(f"QGemm: X's last dimension {x[-1]} does not match W's K = {w[0]}")
    n = w[1] if w is not None else None
    _check_len("QGemm", "w_scale", _input_dims(ctx, 2), n)
    _check_len("QGemm", "bias", _input_dims(ctx, 3), n)
    _set_output(ctx, None if x is None else x[:-1] + [n])


def _conv_out(size, k, stride, dil, pad0, pad1, auto_pad):
    if not (_known(size) and _known(k)):
        return None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // stride)
    if auto_pad == "VALID":
        pad0 = pad1 = 0
    out = (size + pad0 + pad1 - dil * (k - 1) - 1) // stride + 1
    if out < 1:
        raise ShapeError(f"QConv: spatial size {size} is smaller than the dilated kernel {dil * (k - 1) + 1}")
    return out


def _input_elem_type(ctx, i):
    if not ctx.has_input(i):
        return None
    t = ctx.get_input_type(i)
    if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
        return t.tensor_type.elem_type
    return None


def _has(ctx, i):
    return ctx.get_num_inputs() > i and ctx.has_input(i)


def _infer_qconv(ctx):
    _check_activation(ctx, "QConv")
    x_type = _input_elem_type(ctx, 0) or TensorProto.FLOAT
    if x_type == TensorProto.UINT8:
        if not _has(ctx, 4) or not _has(ctx, 7):
            raise ShapeError("QConv: a uint8 X needs x_scale (its quantization) and y_scale (the uint8 output's)")
    elif _has(ctx, 7):
        raise ShapeError("QConv: y_scale is only for a uint8 X (the output has X's type)")
    x = _input_dims(ctx, 0)
    w = _input_dims(ctx, 1)
    group = _attr(ctx, "group", 1)
    if w is not None and len(w) != 4:
        raise ShapeError(f"QConv: W must be [M, C/group, kH, kW], got rank {len(w)}")
    if x is not None and len(x) != 4:
        raise ShapeError(f"QConv: X must be NCHW, got rank {len(x)}")
    if x is not None and w is not None and _known(x[1]) and _known(w[1]) and x[1] != w[1] * group:
        raise ShapeError(f"QConv: X has {x[1]} channels, W expects {w[1]} x group {group}")
    auto_pad = _attr(ctx, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in AUTO_PADS:
        raise ShapeError(f"QConv: auto_pad must be one of {AUTO_PADS}, got {auto_pad!r}")
    strides = list(_attr(ctx, "strides", [1, 1]))
    dil = list(_attr(ctx, "dilations", [1, 1]))
    pads = list(_attr(ctx, "pads", [0, 0, 0, 0]))
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4:
        raise ShapeError("QConv: strides and dilations need 2 values, pads 4")
    m = w[0] if w is not None else None
    _check_len("QConv", "w_scale", _input_dims(ctx, 2), m)
    _check_len("QConv", "bias", _input_dims(ctx, 3), m)
    if x is None:
        _set_output(ctx, None, x_type)
        return
    kh, kw = (w[2], w[3]) if w is not None else (None, None)
    ks = _attr(ctx, "kernel_shape", None)
    if ks is not None and len(ks) == 2:
        kh, kw = (kh if _known(kh) else ks[0]), (kw if _known(kw) else ks[1])
    oh = _conv_out(x[2], kh, strides[0], dil[0], pads[0], pads[2], auto_pad)
    ow = _conv_out(x[3], kw, strides[1], dil[1], pads[1], pads[3], auto_pad)
    out = [x[0], m, oh, ow]
    r = _input_dims(ctx, 6) if ctx.get_num_inputs() > 6 else None
    if r is not None:
        if len(r) != 4 or any(_known(a) and _known(b) and a != b for a, b in zip(r, out)):
            raise ShapeError(f"QConv: residual must have the output's shape {out}, got {r}")
    _set_output(ctx, out, x_type)


# ---- schemas ----------------------------------------------------------------------------------

def _qgemm_schema():
    inputs = _common_inputs("int8 weights [K, N], a constant initializer", "N")
    inputs.append(_param("w_zero_point", "tensor(int8)",
                         "optional int8 weight zero point [N], a constant initializer", optional=True))
    s = OpSchema(
        "QGemm", DOMAIN, VERSION,
        "Y[..., N] = act(float(q(X) x W - zero-point terms) * x_scale * w_scale + bias), "
        "int32 accumulation; X [..., K] of any rank >= 2. See onnxopt passes.md, Custom operators.",
        inputs=inputs,
        outputs=[_param("Y", "T", "float output [..., N]")],
        type_constraints=_TYPES,
        attributes=_activation_attributes(),
    )
    s.set_type_and_shape_inference_function(_infer_qgemm)
    return s


def _qconv_schema():
    attrs = _activation_attributes() + [
        OpSchema.Attribute("auto_pad", helper.make_attribute("auto_pad", "NOTSET"),
                           "NOTSET, SAME_UPPER, SAME_LOWER or VALID, as in Conv"),
        OpSchema.Attribute("group", helper.make_attribute("group", 1), "number of groups"),
        OpSchema.Attribute("strides", _A.INTS, "[stride_h, stride_w] (default 1, 1)", required=False),
        OpSchema.Attribute("dilations", _A.INTS, "[dil_h, dil_w] (default 1, 1)", required=False),
        OpSchema.Attribute("pads", _A.INTS, "[top, left, bottom, right] (default 0)", required=False),
        OpSchema.Attribute("kernel_shape", _A.INTS, "[kH, kW]; must match W if given", required=False),
    ]
    s = OpSchema(
        "QConv", DOMAIN, VERSION,
        "2-D convolution with int8 weights [M, C/group, kH, kW], NCHW float in and out, int32 "
        "accumulation, fused scale, bias and activation. See onnxopt passes.md, Custom operators.",
        inputs=[_param("X", "TX", "activations: float, or uint8 already quantized with x_scale / x_zero_point "
                       "(then Y is uint8 too)")]
        + _common_inputs("int8 weights [M, C/group, kH, kW], a constant initializer", "M")[1:] + [
            _param("residual", "T", "optional float tensor shaped like Y, added after the bias and before "
                   "the activation (a fused residual connection)", optional=True),
            _param("y_scale", "T", "uint8 X only: the uint8 output's scale (scalar)", optional=True),
            _param("y_zero_point", "tensor(uint8)", "uint8 X only: the output's zero point (default 0)",
                   optional=True)],
        outputs=[_param("Y", "TX", "output [N, M, OH, OW], X's type")],
        type_constraints=_TYPES + [("TX", ["tensor(float)", "tensor(uint8)"], "X and Y: float, or uint8 "
                                    "(u8 activations chained between convolutions)")],
        attributes=attrs,
    )
    s.set_type_and_shape_inference_function(_infer_qconv)
    return s


def register() -> None:
    """Register the com.onnxopt schemas with onnx.defs; does nothing if they are already there."""
    for make in (_qgemm_schema, _qconv_schema):
        s = make()
        if not onnx.defs.has(s.name, s.domain):
            onnx.defs.register_schema(s)


def opset_import():
    """The OperatorSetIdProto a model using these ops must carry."""
    return helper.make_opsetid(DOMAIN, VERSION)


register()
