"""Every CLI path ends in one line on stderr and exit code 2 on bad input, checked before the work,
nothing written; calibration files split to the model's batch and their errors name the right thing."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.cli import main

from .helpers import init, make_model, vi

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "small_cnn.onnx")


def _one_error_line(capsys, *needles):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("onnxopt: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _pythonpath():
    src = os.path.dirname(os.path.dirname(onnxopt.__file__))
    return os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])


def test_output_into_a_missing_folder_is_refused_before_the_pipeline(tmp_path, capsys, monkeypatch):
    import onnxopt.api

    monkeypatch.setattr(onnxopt.api, "optimize_lazy", lambda *a, **k: pytest.fail("the pipeline ran"))
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "nowhere" / "o.onnx"), "--no-bench"]) == 2
    _one_error_line(capsys, "does not exist")


def test_output_naming_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "d"), "--no-bench"]) == 2
    _one_error_line(capsys, "is a directory")
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bad_calibration_batch_is_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--passes", "int8",
              "--calibration", "x.npz", "--calibration-batch", value])
    assert info.value.code == 2
    _one_error_line(capsys, "--calibration-batch", "positive integer")


def test_non_utf8_names_are_one_line(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(b"\x0a\x01x", b"\x0a\x01\xff"))
    for argv in (["optimize", str(path), "-o", str(tmp_path / "o.onnx")], ["inspect", str(path)]):
        assert main(argv) == 2
        _one_error_line(capsys, "UTF-8")
    assert not (tmp_path / "o.onnx").exists()


def test_bench_with_bad_data_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    assert main(["bench", EXAMPLE, EXAMPLE, "--data", str(bad), "--rounds", "1"]) == 2
    _one_error_line(capsys, "bad.npz", "not an .npz")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 3, 64, 64), np.float32))
    assert main(["bench", EXAMPLE, EXAMPLE, "--data", str(wrong), "--rounds", "1"]) == 2
    _one_error_line(capsys, "'image'", "not model inputs")


def test_inspect_into_a_closed_pipe_is_one_line_without_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt.cli", "inspect", EXAMPLE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": _pythonpath()})
    proc.stdout.close()  # `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken pipe" in lines[0], err


# ---- calibration files -------------------------------------------------------------------------

def test_dev_null_is_not_a_regular_file(tmp_path, capsys):
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--passes", "int8",
                 "--calibration", os.devnull, "--no-bench"]) == 2
    line = _one_error_line(capsys, "not a regular file")
    assert "no such" not in line


def test_npz_with_an_extra_array_names_it(tmp_path, capsys):
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((6, 3, 64, 64), np.float32), extra=np.zeros((3, 2), np.float32))
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--passes", "int8",
                 "--calibration", str(calib), "--no-bench"]) == 2
    _one_error_line(capsys, "'extra'", "not model inputs")


def test_calibration_errors_name_the_first_bad_batch():
    feeds = [{"input": np.zeros((1, 3, 64, 64), np.float64)} for _ in range(8)]  # every batch has the wrong dtype
    with pytest.raises(onnxopt.CalibrationError, match="calibration batch 0:"):
        onnxopt.optimize(EXAMPLE, passes=["int8"], calibration=feeds)
    feeds = [{"input": np.zeros((1, 3, 64, 64), np.float32)} for _ in range(8)]
    feeds[3] = {"input": np.zeros((1, 3, 32, 64), np.float32)}
    with pytest.raises(onnxopt.CalibrationError, match="calibration batch 3:"):
        onnxopt.optimize(EXAMPLE, passes=["int8"], calibration=feeds)


def _fixed_batch_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 256])], [vi("y", [1, 128])],
                      [init("w", w)], opset=13)


def test_npz_is_split_to_a_fixed_model_batch(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_fixed_batch_model(), str(path))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((10, 256)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--passes", "int8", "--calibration", str(calib),
                 "--no-autotune", "--no-bench"]) == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(str(out)))
    model, report = onnxopt.optimize(str(path), passes=["int8"], calibration=str(calib), return_report=True,
                                     measure_fidelity=True)
    assert report.fidelity is not None and report.fidelity["cosine"] > 0.99
    capsys.readouterr()
    assert main(["optimize", str(path), "-o", str(out), "--passes", "int8", "--calibration", str(calib),
                 "--calibration-batch", "4", "--no-bench"]) == 2
    _one_error_line(capsys, "fix the batch at 1")


def test_non_finite_calibration_is_counted_and_fidelity_stays_finite():
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(8)]
    feeds[0]["x"][0, :5] = np.nan
    feeds[2]["x"][0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="6 NaN/Inf value"):
        _, report = onnxopt.optimize(_fixed_batch_model(), passes=["int8"], calibration=feeds,
                                     return_report=True, measure_fidelity=True)
    text = report.format()
    assert "6 NaN/Inf value(s) in 2 sample(s)" in text and "2 of 8 sample(s) left out" in text
    assert np.isfinite(report.fidelity["max_abs_diff"]) and report.fidelity["cosine"] > 0.99


def test_all_nan_calibration_is_an_error_not_an_fp32_model():
    feeds = [{"x": np.full((1, 256), np.nan, np.float32)} for _ in range(4)]
    with pytest.raises(onnxopt.CalibrationError, match="no sample without NaN/Inf"):
        onnxopt.optimize(_fixed_batch_model(), passes=["int8"], calibration=feeds)


def test_bench_inputs_too_large_for_memory_leave_out_the_table(tmp_path, capsys, monkeypatch):
    import onnxopt.bench

    def no_memory(*a, **k):
        raise MemoryError
    monkeypatch.setattr(onnxopt.bench, "compare_models", no_memory)
    out = tmp_path / "o.onnx"
    assert main(["optimize", EXAMPLE, "-o", str(out), "--rounds", "1"]) == 0
    assert "do not fit in memory" in capsys.readouterr().out
    assert out.exists()


def test_a_declared_shape_past_numpys_limit_is_a_memory_note_not_a_traceback(tmp_path, capsys):
    """A declared dim of 2**63 - 1: numpy raises ValueError ('array is too big'), not MemoryError, so
    the CLI's before/after bench died with a traceback (fuzz case 3082)."""
    from onnxopt import verify

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2**63 - 1, 4])], [vi("y", [2**63 - 1, 4])])
    with pytest.raises(MemoryError, match="does not fit in memory"):
        verify.make_feeds(m)
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(path))
    code = main(["optimize", str(path), "-o", str(out), "--rounds", "1"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and (code == 0 or (code == 2 and len(captured.err.splitlines()) == 1))


def test_the_before_after_table_times_at_onnxruntimes_defaults():
    """The CLI's table timed both models at 1 thread without spinning: not what users run."""
    from onnxopt import bench

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 4])], [vi("y", [2, 4])])
    cmp = bench.compare_models(m, m, rounds=1)
    assert "as onnxruntime picks" in cmp.settings and "spinning as onnxruntime sets it" in cmp.settings
    assert "1 intra-op thread(s)" in bench.compare_models(m, m, rounds=1, threads=1).settings
