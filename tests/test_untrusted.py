"""Models from strangers: external data read and written only as onnx allows it, tensors whose bytes
do not match their dims refused, results that save with plain onnx.save, files with the umask's mode."""
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt import ir, verify

from .helpers import init, make_model, vi

W = np.arange(16 * 16, dtype=np.float32).reshape(16, 16) / 256


def _model(weight=W):
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["n", 16])], [vi("y", ["n", 16])],
                      [init("w", weight)])


def _point_at(model, location, offset=0, length=None):
    """`model` with its weight `w` as external data at `location` (the bytes are not written)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length or W.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return m


@pytest.fixture
def layout(tmp_path):
    """tmp/model/ (the model's folder) and tmp/secret.bin (outside it) holding W's bytes."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W.tobytes())
    return folder, secret


def _write(folder, model, name="m.onnx"):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _refused_like_onnx(path, match):
    with pytest.raises(onnx.checker.ValidationError):
        onnx.load(str(path))
    with pytest.raises(onnxopt.InvalidModelError, match=match) as info:
        onnxopt.optimize(str(path))
    assert isinstance(info.value, onnx.checker.ValidationError)  # the same error type as onnx's


def test_absolute_location_is_refused(layout):
    folder, secret = layout
    _refused_like_onnx(_write(folder, _point_at(_model(), str(secret))), "absolute path")


@pytest.mark.parametrize("climb", ["../secret.bin", "sub/../../secret.bin", "./../secret.bin"])
def test_location_climbing_out_is_refused(layout, climb):
    folder, _ = layout
    (folder / "sub").mkdir()
    _refused_like_onnx(_write(folder, _point_at(_model(), climb)), "points outside the directory")


def test_symlinks_are_refused(layout):
    folder, secret = layout
    os.symlink(secret, folder / "link.bin")
    _refused_like_onnx(_write(folder, _point_at(_model(), "link.bin")), "symbolic link")
    os.symlink(secret.parent, folder / "up")  # a linked folder that leads outside
    path = _write(folder, _point_at(_model(), "up/secret.bin"), "m2.onnx")
    with pytest.raises(onnxopt.InvalidModelError, match="points outside the directory"):
        onnxopt.optimize(str(path))


def test_hard_links_are_refused(layout):
    folder, secret = layout
    os.link(secret, folder / "hard.bin")
    _refused_like_onnx(_write(folder, _point_at(_model(), "hard.bin")), "hard links")


def test_out_of_bounds_and_mis_sized_external_data_are_refused(layout):
    folder, _ = layout
    (folder / "w.bin").write_bytes(W.tobytes())
    with pytest.raises(onnxopt.InvalidModelError, match="truncated"):
        onnxopt.optimize(str(_write(folder, _point_at(_model(), "w.bin", offset=512))))
    with pytest.raises(onnxopt.InvalidModelError, match="'w'.*needs 1024 bytes.*holds 512"):
        onnxopt.optimize(str(_write(folder, _point_at(_model(), "w.bin", length=512))))


def test_cli_refuses_a_model_pointing_outside_with_one_line(layout, capsys):
    from onnxopt.cli import main

    folder, secret = layout
    path = _write(folder, _point_at(_model(), "../secret.bin"))
    out = folder / "o.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--no-bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "points outside the directory" in err[0]
    assert sorted(os.listdir(folder)) == ["m.onnx"]


def test_save_refuses_external_data_outside_the_current_directory(layout, monkeypatch):
    folder, secret = layout
    monkeypatch.chdir(folder)
    for location, match in ((str(secret), "absolute path"), ("../secret.bin", "outside")):
        with pytest.raises(onnxopt.InvalidModelError, match=match):
            onnxopt.save(_point_at(_model(), location), folder / "o.onnx", external_data=True)
    assert sorted(os.listdir(folder)) == []


def test_save_replaces_a_link_at_the_destination_instead_of_writing_through_it(layout):
    folder, secret = layout
    before = secret.read_bytes()
    os.symlink(secret, folder / "o.onnx.data")
    onnxopt.save(onnxopt.optimize(_model()), folder / "o.onnx", external_data=True)
    assert secret.read_bytes() == before
    assert not os.path.islink(folder / "o.onnx.data")
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(folder / "o.onnx")).graph.initializer[0]), W)


def test_a_data_file_swapped_after_load_is_refused(layout):
    from onnxopt.api import optimize_lazy

    folder, _ = layout
    (folder / "w.bin").write_bytes(W.tobytes())
    lazy, _ = optimize_lazy(str(_write(folder, _point_at(_model(), "w.bin"))), passes=[])
    os.rename(folder / "w.bin", folder / "w.old")
    (folder / "w.bin").write_bytes(b"\0" * W.nbytes)  # another file (inode) under the checked name
    with pytest.raises(onnxopt.InvalidModelError, match="changed after it was checked"):
        onnxopt.save(lazy, folder / "o.onnx")
    assert not (folder / "o.onnx").exists()


# ---- tensor payloads -------------------------------------------------------------------------------

def _with_raw(raw):
    m = _model()
    m.graph.initializer[0].raw_data = raw
    return m


@pytest.mark.parametrize("raw", [W.tobytes()[:-12], W.tobytes() + b"\0" * 64], ids=["short", "long"])
def test_raw_data_of_the_wrong_size_is_refused_naming_the_tensor(raw):
    with pytest.raises(onnxopt.InvalidModelError, match=r"tensor 'w' \(FLOAT \[16, 16\]\) needs 1024 bytes"):
        onnxopt.optimize(_with_raw(raw))


def test_typed_data_of_the_wrong_count_is_refused():
    m = _model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 255)
    with pytest.raises(onnxopt.InvalidModelError, match="'w'.*needs 256 values in float_data, it has 255"):
        onnxopt.optimize(m)
    t.ClearField("float_data")
    with pytest.raises(onnxopt.InvalidModelError, match="'w'.*has no data"):
        onnxopt.optimize(m)
    t.int64_data.extend([1] * 256)
    with pytest.raises(onnxopt.InvalidModelError, match="int64_data, onnx wants float_data"):
        onnxopt.optimize(m)


def test_sub_byte_tensors_are_sized_as_packed():
    from onnxopt.tensor_check import check_tensor

    t = helper.make_tensor("q", onnx.TensorProto.INT4, [5], [1, 2, 3, 4, 5])
    check_tensor(t, "m")  # 5 int4 values: 3 packed int32_data entries
    raw = helper.make_tensor("q", onnx.TensorProto.INT4, [5], b"\0\0\0", raw=True)
    check_tensor(raw, "m")
    raw.raw_data = b"\0" * 5
    with pytest.raises(onnxopt.InvalidModelError, match="needs 3 bytes"):
        check_tensor(raw, "m")


# ---- the result saves with plain onnx.save (issue 12, cause 2) ---------------------------------

def _external_source(folder):
    onnx.save(_model(), str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    return folder / "m.onnx"


def test_result_of_an_external_data_model_saves_with_plain_onnx_save(layout, tmp_path):
    folder, _ = layout
    out = onnxopt.optimize(str(_external_source(folder)))
    dst = tmp_path / "elsewhere"
    dst.mkdir()
    onnx.save(out, str(dst / "o.onnx"))
    onnx.checker.check_model(str(dst / "o.onnx"))
    x = np.ones((2, 16), np.float32)
    got = ort.InferenceSession(str(dst / "o.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ W, rtol=1e-6)
    assert os.listdir(dst) == ["o.onnx"]  # weights in the proto, as onnx.load gives them


def test_result_above_the_proto_limit_points_plain_onnx_save_at_onnxopt_save(layout, tmp_path, monkeypatch):
    folder, _ = layout
    monkeypatch.setattr(ir, "INLINE_LIMIT", 512)  # stands for 2 GiB
    out = onnxopt.optimize(str(_external_source(folder)))
    dst = tmp_path / "elsewhere"
    dst.mkdir()
    with pytest.raises(Exception, match="onnxopt.save"):
        onnx.save(out, str(dst / "o.onnx"))
    assert os.listdir(dst) == []  # nothing written that onnxruntime would refuse
    onnxopt.save(out, dst / "o.onnx")
    x = np.ones((2, 16), np.float32)
    got = ort.InferenceSession(str(dst / "o.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ W, rtol=1e-6)


# ---- promises: opset, file modes --------------------------------------------------------------

def test_too_old_an_opset_is_unsupported():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 1)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    with pytest.raises(onnxopt.UnsupportedModelError, match="opset 1 is too old"):
        onnxopt.optimize(m)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        onnxopt.save(onnxopt.optimize(_model()), tmp_path / "o.onnx", external_data=True)
        onnxopt.save(onnxopt.optimize(_model()), tmp_path / "p.onnx")
    finally:
        os.umask(old)
    for name in ("o.onnx", "o.onnx.data", "p.onnx"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


# ---- names that are not UTF-8 -------------------------------------------------------------------

def _non_utf8_model() -> bytes:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return data.replace(b"\x0a\x01x", b"\x0a\x01\xff")  # the name "x" -> byte 0xff


def test_non_utf8_names_are_an_invalid_model():
    with pytest.raises(onnxopt.InvalidModelError, match="not valid UTF-8"):
        onnxopt.optimize(_non_utf8_model())


def test_checks_keep_valid_external_data_working(layout):
    folder, _ = layout
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(W.tobytes())
    path = _write(folder, _point_at(_model(), "sub/../sub/w.bin"))
    onnx.load(str(path))  # onnx accepts it: so must onnxopt
    out = onnxopt.optimize(str(path))
    assert verify.compare(verify.run(onnx.load(str(path)), {"x": np.ones((1, 16), np.float32)}),
                          verify.run(out, {"x": np.ones((1, 16), np.float32)})) is None


# ---- the result loads in onnxruntime (the contract), or the reason is given ----------------------

def test_a_model_onnxruntime_refuses_is_an_invalid_model():
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[-1, -1, -1, -1])],
                   [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 4, 4])], [init("w", np.ones((1, 1, 3, 3), np.float32))])
    with pytest.raises(onnxopt.InvalidModelError, match="onnxruntime refuses the model.*pads"):
        onnxopt.optimize(m)


class _MakeWeightHalf(onnxopt.Pass):
    """Test pass: turns the float weight into float16, which the float MatMul cannot take (the checker
    does not look at types, onnxruntime does)."""
    name = "test_make_weight_half"
    exact = False

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32:
                t.values = t.values.astype(np.float16)
                return True
        return False


def test_a_result_onnxruntime_refuses_gives_back_the_input_with_the_reason():
    with pytest.warns(RuntimeWarning, match="does not load in onnxruntime"):
        out, report = onnxopt.optimize(_model(), passes=[_MakeWeightHalf()], return_report=True,
                                       measure_fidelity=False)
    assert any("input is returned unchanged" in text for _, text in report.messages)
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(verify.run(out, {"x": x})[0], x @ W, rtol=1e-6)


def test_a_constant_without_its_value_and_a_negative_opset_version_are_invalid():
    m = make_model([helper.make_node("Constant", [], ["c"], value=init("v", np.ones(2, np.float32))),
                    helper.make_node("Add", ["x", "c"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    del m.graph.node[0].attribute[:]  # onnx.checker lets it pass, onnxruntime does not
    with pytest.raises(onnxopt.InvalidModelError, match="Constant node .* exactly one value attribute"):
        onnxopt.optimize(m)
    m = _model()
    m.opset_import.append(helper.make_opsetid("com.microsoft", -1))
    with pytest.raises(onnxopt.InvalidModelError, match="com.microsoft has version -1"):
        onnxopt.optimize(m)


def test_declared_types_must_be_known():
    m = _model()
    m.graph.output[0].type.tensor_type.elem_type = 99
    with pytest.raises(onnxopt.InvalidModelError, match="'y' is declared with an unknown element type 99"):
        onnxopt.optimize(m)
    m = _model()
    m.graph.output[0].type.tensor_type.elem_type = 0  # UNDEFINED: onnxruntime refuses it
    with pytest.raises(onnxopt.InvalidModelError, match="'y' is declared with an unknown element type 0"):
        onnxopt.optimize(m)


def test_a_declared_dimension_of_minus_one_is_dynamic():
    """paddle2onnx declares dynamic dims as dim_value -1 and onnxruntime runs such models: they are
    optimized, and the declaration is kept as the source wrote it."""
    m = _model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    out = onnxopt.optimize(m)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    x = np.ones((3,) + tuple(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]), np.float32)
    assert verify.compare(verify.run(m, {"x": x}), verify.run(out, {"x": x})) is None


def test_empty_list_attributes_survive():
    m = make_model([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [vi("x", [2, 3])], [vi("y", [])],
                   opset=11)
    m.graph.node[0].attribute.append(helper.make_attribute("axes", [], attr_type=onnx.AttributeProto.INTS))
    out = onnxopt.optimize(m, passes=[])
    attrs = {a.name: a for a in out.graph.node[0].attribute}
    assert attrs["axes"].type == onnx.AttributeProto.INTS and list(attrs["axes"].ints) == []
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert verify.run(out, {"x": x})[0] == 15


def test_an_opset_onnxruntime_does_not_support_is_unsupported():
    m = _model()
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1000))
    with pytest.raises(onnxopt.UnsupportedModelError, match="does not support the model's opsets"):
        onnxopt.optimize(m)


def test_ref_attr_name_outside_a_function_is_invalid():
    m = _model()
    m.graph.node.append(helper.make_node("Transpose", ["y"], ["z"], perm=[1, 0]))
    m.graph.output[0].name = "z"
    m.graph.node[1].attribute[0].ref_attr_name = "p"
    with pytest.raises(onnxopt.InvalidModelError, match="refers to a function attribute"):
        onnxopt.optimize(m)


def test_a_forged_lazy_marker_reads_nothing(layout):
    """Markers stand for files this process checked; one written by anyone else is refused."""
    from onnxopt import external_data

    forged = _point_at(_model(), external_data.MARKER_PREFIX + "0123456789abcdef" + external_data.MARKER_NOTE)
    with pytest.raises(onnxopt.InvalidModelError, match="another process"):
        onnxopt.optimize(forged)
    with pytest.raises(onnxopt.InvalidModelError, match="another process"):
        onnxopt.save(forged, layout[0] / "o.onnx")
    assert os.listdir(layout[0]) == []
