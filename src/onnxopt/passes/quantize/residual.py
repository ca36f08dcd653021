"""fuse_qconv_residual: a residual Add (and the Relu/Clip after it) folded into the QConv before it.

ResNet-style blocks end in ``Relu(Add(conv(x), shortcut))``. Once the conv is a com.onnxopt QConv,
the Add and the Relu are two more passes over a float tensor per block (about a fifth of int8
ResNet-50's time on one core). QConv takes the shortcut as its optional ``residual`` input and
computes ``act(conv + bias + residual)`` in its output stage, while the result is still in cache.
The float operations are the same ones in the same order (scale, bias, residual add, activation),
so the rewrite is exact.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Pass, PassContext, register_pass
from .common import DOMAIN, _clip_bounds, set_optional_input

_RESIDUAL = 6  # QConv's input index of the residual


def _activation(node: gs.Node) -> str:
    act = node.attrs.get("activation", "none")
    if isinstance(act, bytes):
        act = act.decode()
    return {0: "none", 1: "relu", 2: "clip"}.get(act, act) if not isinstance(act, str) else act


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Both shapes fully known (ints or the same symbolic names) and equal: no broadcasting."""
    sa, sb = a.shape, b.shape
    if sa is None or sb is None or len(sa) != 4 or len(sa) != len(sb):
        return False
    for x, y in zip(sa, sb):
        if x is None or y is None or x != y or (isinstance(x, int) and x < 0):
            return False
    return True


def _float32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


@register_pass
class FuseQConvResidual(Pass):
    """Fold ``Add(QConv(x), r)`` (then a ``Relu``, or a ``Clip`` with constant bounds) into the QConv
    as its ``residual`` input and activation: ``QConv(x, ..., residual=r, activation=relu)``.

    Applies when the QConv (domain com.onnxopt) has no activation and no residual yet, its output
    feeds only the Add and is not a graph output, and ``r`` is float32 with the same known shape as
    the output (no broadcasting). When both Add inputs are QConvs, the first one takes the other as
    its residual. Exact: the same float operations in the same order as Add and Relu after the conv.
    Part of the ``int8`` preset, after quantization; a model without QConv is left alone.
    """

    name = "fuse_qconv_residual"
    kind = "fusion"

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        outputs = {id(t) for t in graph.outputs}
        fused = 0
        for add in list(graph.nodes):
            if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
                continue
            y = add.outputs[0]
            for i in (0, 1):
                conv = self._fusable(add.inputs[i], outputs)
                if conv is None:
                    continue
                r = add.inputs[1 - i]
                if not (_float32(r) and _same_shape(add.inputs[i], r) and _same_shape(y, r)):
                    continue
                self._fuse(conv, add, r, outputs, ctx)
                fused += 1
                break
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False)
            ctx.note(f"{fused} residual Add(s) fused into QConv")
        return bool(fused)

    @staticmethod
    def _fusable(t: gs.Tensor, outputs) -> Optional[gs.Node]:
        if len(t.inputs) != 1 or len(t.outputs) != 1 or id(t) in outputs:
            return None
        conv = t.inputs[0]
        if conv.op != "QConv" or conv.domain != DOMAIN or _activation(conv) != "none":
            return None
        if len(conv.inputs) > _RESIDUAL and not (isinstance(conv.inputs[_RESIDUAL], gs.Variable)
                                                  and conv.inputs[_RESIDUAL].name == ""):
            return None
        return conv

    @staticmethod
    def _fuse(conv: gs.Node, add: gs.Node, r: gs.Tensor, outputs, ctx: PassContext) -> None:
        out = add.outputs[0]
        act, clip = "none", None
        if len(out.outputs) == 1 and id(out) not in outputs:
            nxt = out.outputs[0]
            if nxt.op == "Relu" and len(nxt.inputs) == 1:
                act = "relu"
            elif nxt.op == "Clip" and 1 <= len(nxt.inputs) <= 3 and nxt.inputs[0] is out:
                clip = _clip_bounds(ctx, nxt)  # inputs (opset 11+) or min/max attributes (opset < 11)
                if clip is not None:
                    act = "clip"
            if act != "none":
                out = nxt.outputs[0]
                nxt.outputs.clear()
        set_optional_input(conv, _RESIDUAL, r)
        conv.attrs["activation"] = act
        if clip is not None:
            conv.attrs["clip_min"], conv.attrs["clip_max"] = float(clip[0]), float(clip[1])
        conv.outputs.clear()
        add.outputs.clear()
        conv.outputs.append(out)
        add.inputs.clear()
