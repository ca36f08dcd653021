"""Builds examples/small_cnn.onnx: a small CNN written the way exporters write real models.

Weights behind Identity nodes and Constant nodes (TorchScript style), BatchNormalization after every
Conv, an explicit Pad before a Conv, a residual block, Dropout, a Flatten -> MatMul + Add head, and
a dynamic batch dimension. Deterministic (fixed seed); also writes OUT's calibration inputs (`small_cnn_calib.npz`) for the int8
demo. Run: python examples/make_small_cnn.py [OUT]
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
nodes, inits = [], []


def weight(name, shape, scale=None, identity=True):
    """An initializer, reached through an Identity node as TorchScript exports do."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    arr = (rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)
    inits.append(numpy_helper.from_array(arr, name + ".raw" if identity else name))
    if identity:
        nodes.append(helper.make_node("Identity", [name + ".raw"], [name]))
    return name


def conv_bn_relu(x, cin, cout, k, stride, name, relu=True, explicit_pad=False):
    w = weight(f"{name}.weight", (cout, cin, k, k))
    b = weight(f"{name}.bias", (cout,), scale=0.05)
    pad = k // 2
    src = x
    if explicit_pad and pad:
        pads = helper.make_node("Constant", [], [f"{name}.pads"],
                                value=numpy_helper.from_array(np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64)))
        nodes.append(pads)
        nodes.append(helper.make_node("Pad", [x, f"{name}.pads"], [f"{name}.padded"], mode="constant"))
        src, pad = f"{name}.padded", 0
    nodes.append(helper.make_node("Conv", [src, w, b], [f"{name}.conv"], kernel_shape=[k, k],
                                  strides=[stride, stride], pads=[pad] * 4))
    gamma = weight(f"{name}.bn.gamma", (cout,), scale=0.1, identity=False)
    inits[-1] = numpy_helper.from_array(1 + numpy_helper.to_array(inits[-1]), gamma)
    beta = weight(f"{name}.bn.beta", (cout,), scale=0.1, identity=False)
    mean = weight(f"{name}.bn.mean", (cout,), scale=0.1, identity=False)
    var = weight(f"{name}.bn.var", (cout,), scale=0.1, identity=False)
    inits[-1] = numpy_helper.from_array(np.abs(numpy_helper.to_array(inits[-1])) + 0.5, var)
    out = f"{name}.bn"
    nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", gamma, beta, mean, var], [out], epsilon=1e-5))
    if relu:
        nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
        out = f"{name}.relu"
    return out


def build() -> onnx.ModelProto:
    # (sized so that int8 pays on a small CPU: 32-channel 3x3 convs on a 64x64 image, ~110M
    # multiply-adds; at 32x32 with 16 channels the per-op costs of int8 ate the gain and the demo's
    # guarded int8 step returned the fp32 model)
    x = conv_bn_relu("input", 3, 32, 3, 1, "stem", explicit_pad=True)
    y = conv_bn_relu(x, 32, 32, 3, 1, "block1.a")
    y = conv_bn_relu(y, 32, 32, 3, 1, "block1.b", relu=False)
    nodes.append(helper.make_node("Add", [x, y], ["block1.add"]))
    nodes.append(helper.make_node("Relu", ["block1.add"], ["block1.out"]))
    z = conv_bn_relu("block1.out", 32, 64, 3, 2, "down")
    z = conv_bn_relu(z, 64, 128, 1, 1, "expand")
    nodes.append(helper.make_node("GlobalAveragePool", [z], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], axis=1))
    nodes.append(helper.make_node("Dropout", ["flat"], ["drop"]))
    w = weight("fc.weight_t", (128, 10), scale=0.1)
    b = weight("fc.bias", (10,), scale=0.05)
    nodes.append(helper.make_node("MatMul", ["drop", w], ["fc.mm"]))
    nodes.append(helper.make_node("Add", ["fc.mm", b], ["logits"]))
    for node in nodes:  # exporters name every node; name each after the value it computes
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxopt-example")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/small_cnn.onnx"
    onnx.save(build(), out)
    # calibration feeds for the int8 demo: 8 inputs, same distribution the demo's timing uses
    calib = out[: -len(".onnx")] + "_calib.npz"
    np.savez_compressed(calib, input=np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32))
    print(f"wrote {out} and {calib}")
