"""The PyTorch -> int8 example runs end to end and int8 keeps the float model's accuracy."""
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def test_pytorch_to_int8_example(tmp_path, capsys):
    import pytorch_to_int8

    results = pytorch_to_int8.main(["--epochs", "4", "--out", str(tmp_path)])
    (acc32, _, size32), (acc8, _, size8) = results["fp32"], results["int8"]
    assert acc32 > 0.9  # the net learned something, so the comparison means something
    assert acc8 >= acc32 - 0.01
    assert size8 < 0.5 * size32
    assert "int8 vs fp32" in capsys.readouterr().out
