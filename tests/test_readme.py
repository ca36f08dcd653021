"""The README's "write your own pass" example runs as written and does what it says."""
import os
import re

import numpy as np
from onnx import helper

import onnxopt

from .helpers import assert_equivalent, init, make_model, ops, vi

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _example_code():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Write your own pass", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_rule_example():
    code = _example_code()
    assert len(code.strip().splitlines()) <= 17  # "fits in ~15 lines"
    code = code.replace('"model.onnx"', repr(os.path.join(ROOT, "examples", "small_cnn.onnx")))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["model"].graph.node  # the example optimized the bundled model
    assert "my_matmul_add_to_gemm" in onnxopt.list_passes()

    m = make_model([helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["b", "t"], ["y"])],
                   [vi("x", [4, 3])], [vi("y", [4, 5])],
                   [init("w", np.arange(15, dtype=np.float32).reshape(3, 5)), init("b", np.ones(5, np.float32))])
    out = onnxopt.optimize(m, passes=["my_matmul_add_to_gemm"])
    assert ops(out) == ["Gemm"]
    assert_equivalent(m, out)
    # the condition refuses a 3-D input, and says why
    m3 = make_model([helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
                    [vi("x", [2, 4, 3])], [vi("y", [2, 4, 5])],
                    [init("w", np.ones((3, 5), np.float32)), init("b", np.ones(5, np.float32))])
    out3, report = onnxopt.optimize(m3, passes=["my_matmul_add_to_gemm"], return_report=True)
    assert ops(out3) == ["MatMul", "Add"]
    assert any("Gemm wants a 2-D input" in text for _, text in report.messages)
