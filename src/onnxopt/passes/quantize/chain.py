"""chain_qconv_u8: consecutive QConvs pass uint8 activations instead of float tensors.

A statically quantized QConv quantizes its float input with (x_scale, x_zero_point); when the float
comes straight from another QConv, that producer can requantize its output with exactly those
parameters instead (QConv's uint8 mode: X uint8 in, Y uint8 out). The tensors between the convs
shrink fourfold, and on memory-bound layers (MobileNet's 112x112 and 56x56 stages) so does the time.

Since a uint8 QConv's output is uint8 too, a chain c0 -> c1 -> ... -> cn becomes
``QuantizeLinear -> c0 -> ... -> c(n-1) -> DequantizeLinear -> cn``: c0's input is quantized by a
standard QuantizeLinear with c0's own parameters, and the last link is dequantized for cn, which
quantizes it again with the same parameters. Every step is bit-identical to the unchained model:
QuantizeLinear computes the kernels' static quantization exactly (tested), requantizing a float with
the consumer's parameters is the consumer's own quantization, and dequantize-then-quantize with the
same scale and zero point returns the same integers (|q - zp| <= 255, two roundings of 2^-24).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Pass, PassContext, PassOptionError, register_pass
from .common import DOMAIN, set_optional_input

_X_SCALE, _X_ZP, _Y_SCALE, _Y_ZP = 4, 5, 7, 8


def _is_qconv(node: gs.Node) -> bool:
    return node.op == "QConv" and node.domain == DOMAIN


def _const(node: gs.Node, i: int) -> Optional[gs.Constant]:
    if len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant):
        return node.inputs[i]
    return None


def _static(node: gs.Node) -> bool:
    """Static activation quantization with constant parameters and a float input."""
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return False
    s = _const(node, _X_SCALE)
    if s is None or np.asarray(s.values).size != 1:
        return False
    zp_given = len(node.inputs) > _X_ZP and node.inputs[_X_ZP].name != ""
    if zp_given and _const(node, _X_ZP) is None:
        return False
    return len(node.inputs) <= _Y_SCALE or node.inputs[_Y_SCALE].name == ""


def _zero_point(node: gs.Node) -> gs.Constant:
    """The node's x_zero_point; an absent one (0) is made explicit on the node, so that the
    QuantizeLinear/DequantizeLinear and the producer's y_zero_point share one constant."""
    z = _const(node, _X_ZP)
    if z is None:
        z = gs.Constant(f"{node.name}_x_zero_point_u8", np.zeros((), np.uint8))
        set_optional_input(node, _X_ZP, z)
    return z


def _set_output_quant(a: gs.Node, b: gs.Node) -> None:
    """a's uint8 output is quantized with b's input parameters (QConv inputs 7 and 8)."""
    while len(a.inputs) > _Y_SCALE:  # (graphsurgeon's input lists take no slice deletion)
        a.inputs.pop()
    set_optional_input(a, _Y_SCALE, b.inputs[_X_SCALE])
    a.inputs.append(_zero_point(b))


@register_pass
class ChainQConvU8(Pass):
    """Pass uint8 activations between consecutive statically quantized ``QConv`` nodes.

    A chain is a run of QConvs c0 -> c1 -> ... -> cn (domain com.onnxopt) where each output feeds only
    the next conv and is not a graph output, and every member has static, constant ``x_scale`` /
    ``x_zero_point`` (float input). It becomes ``QuantizeLinear(c0's parameters) -> c0 -> ... ->
    c(n-1) -> DequantizeLinear -> cn``: c0..c(n-1) take uint8 X and write uint8 Y requantized with the
    next conv's ``x_scale`` / ``x_zero_point`` (QConv inputs 7 and 8); cn stays float in. Exact:
    bit-identical to the unchained model (see the module docstring). Chains shorter than
    ``min_length`` convs (default 4) are left alone: the QuantizeLinear and DequantizeLinear cost about
    what one uint8 link saves (ResNet-50's three-conv bottlenecks measured 3.74x -> 3.56x of fp32 with
    them chained; MobileNet's 27-conv chain gains).
    """

    name = "chain_qconv_u8"
    kind = "fusion"
    options = {"min_length": 4}

    def validate_options(self) -> None:
        n = self.options["min_length"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 3:
            raise PassOptionError("chain_qconv_u8: min_length must be an int >= 3")

    def run(self, graph: gs.Graph, ctx: PassContext) -> bool:
        if (graph.opset or 0) < 10:  # QuantizeLinear / DequantizeLinear
            return False
        outputs = {id(t) for t in graph.outputs}
        convs = [n for n in graph.nodes if _is_qconv(n)]
        nxt: Dict[int, gs.Node] = {}
        has_prev = set()
        for a in convs:
            y = a.outputs[0]
            if id(y) in outputs or len(y.outputs) != 1:
                continue
            b = y.outputs[0]
            if _is_qconv(b) and b.inputs[0] is y and _static(b) and _static(a):
                nxt[id(a)] = b
                has_prev.add(id(b))
        chains: List[List[gs.Node]] = []
        for a in convs:
            if id(a) in has_prev or id(a) not in nxt:
                continue
            chain = [a]
            while id(chain[-1]) in nxt:
                chain.append(nxt[id(chain[-1])])
            if len(chain) >= self.options["min_length"]:
                chains.append(chain)
        for chain in chains:
            self._rewrite(graph, chain)
        if chains:
            links = sum(len(c) - 2 for c in chains)
            ctx.note(f"{len(chains)} QConv chain(s), {links} uint8 link(s)")
        return bool(chains)

    @staticmethod
    def _rewrite(graph: gs.Graph, chain: List[gs.Node]) -> None:
        c0 = chain[0]
        base = c0.name or "qconv"
        xq = gs.Variable(f"{base}_x_u8", dtype=np.uint8, shape=c0.inputs[0].shape)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_quantize",
                                   inputs=[c0.inputs[0], c0.inputs[_X_SCALE], _zero_point(c0)], outputs=[xq]))
        c0.inputs[0] = xq
        for a, b in zip(chain[:-2], chain[1:-1]):
            a.outputs[0].dtype = np.uint8
            _set_output_quant(a, b)
        last, cn = chain[-2], chain[-1]
        y = last.outputs[0]
        yq = gs.Variable(f"{last.name or 'qconv'}_y_u8", dtype=np.uint8, shape=y.shape)
        _set_output_quant(last, cn)
        last.outputs.clear()
        last.outputs.append(yq)
        graph.nodes.append(gs.Node("DequantizeLinear", f"{last.name or 'qconv'}_dequantize",
                                   inputs=[yq, cn.inputs[_X_SCALE], _zero_point(cn)], outputs=[y]))
        graph.toposort()
