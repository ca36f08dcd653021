"""The CLI: tables on good input; one line and exit code 2 on bad input, nothing written."""
import hashlib
import os
import subprocess
import sys

import onnx
import pytest

import onnxopt
from onnxopt.cli import main

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "small_cnn.onnx")


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_optimize_prints_report_and_table(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["optimize", EXAMPLE, "-o", str(out), "--verify", "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "latency (median)" in text and "max abs diff" in text
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.node) < len(onnx.load(EXAMPLE).graph.node)


def test_passes_lists_every_registered_pass(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in onnxopt.list_passes():
        assert name in text
    assert "preset default" in text


def test_inspect(capsys):
    assert main(["inspect", EXAMPLE]) == 0
    text = capsys.readouterr().out
    assert "Conv" in text and "ai.onnx=17" in text and "input  input" in text


def _bad_inputs(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all \x00\x01\x02" * 10)
    truncated = tmp_path / "truncated.onnx"
    data = open(EXAMPLE, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    return {"not onnx": (junk, []), "truncated": (truncated, []),
            "unknown pass": (tmp_path / "good.onnx", ["--passes", "default,no_such_pass"]),
            "missing": (tmp_path / "missing.onnx", [])}


@pytest.mark.parametrize("case", ["not onnx", "truncated", "unknown pass", "missing"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    (tmp_path / "good.onnx").write_bytes(open(EXAMPLE, "rb").read())
    path, extra = _bad_inputs(tmp_path)[case]
    before = _digest(path) if path.exists() else None
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(out), *extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error:"), proc.stderr
    assert not out.exists()
    assert (_digest(path) if path.exists() else None) == before
    assert sorted(os.listdir(tmp_path)) == sorted(p for p in os.listdir(tmp_path) if not p.startswith(".onnxopt-"))


def test_bad_input_raises_the_documented_errors(tmp_path):
    cases = _bad_inputs(tmp_path)
    with pytest.raises(onnxopt.InvalidModelError, match="not an ONNX model"):
        onnxopt.optimize(str(cases["not onnx"][0]))
    with pytest.raises(onnxopt.InvalidModelError):
        onnxopt.optimize(str(cases["truncated"][0]))
    with pytest.raises(onnxopt.InvalidModelError, match="no such file"):
        onnxopt.optimize(str(cases["missing"][0]))
    with pytest.raises(onnxopt.InvalidModelError):
        onnxopt.optimize(b"\x08\x07garbage")
    with pytest.raises(onnxopt.UnknownPassError):
        onnxopt.optimize(EXAMPLE, passes=["no_such_pass"])
    newer = onnx.load(EXAMPLE)
    newer.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    with pytest.raises(onnxopt.UnsupportedModelError, match="opset"):
        onnxopt.optimize(newer)


def _pythonpath():
    import onnxopt as pkg

    src = os.path.dirname(os.path.dirname(pkg.__file__))
    return os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])


def test_optimize_int8_with_npz_calibration(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.standard_normal((6, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["optimize", EXAMPLE, "-o", str(out), "--passes", "int8", "--calibration", str(calib),
                 "--calibration-batch", "2", "--target", "onnxruntime", "--no-autotune", "--verify",
                 "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "quantize" in text and "outputs match the original" in text
    model = onnx.load(out)
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}  # onnxruntime target: standard QDQ


def test_bad_calibration_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "calib.npz"
    bad.write_bytes(b"not an npz")
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "q.onnx"), "--passes", "int8",
                 "--calibration", str(bad)]) == 2
    assert "calib.npz" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()
