"""ir.py: lossless round trip, subgraph walk, external data kept lazy and saved back external."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
from onnx import helper

import onnxopt
from onnxopt import ir, verify

from .helpers import init, make_model, vi


def test_round_trip_without_passes_keeps_everything():
    w = np.ones((3, 3), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], doc_string="node doc"),
             helper.make_node("Relu", ["t"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [init("w", w)], value_info=[vi("t", [2, 3])])
    m.doc_string = "d"
    onnx.helper.set_model_props(m, {"k": "v"})
    out = onnxopt.optimize(m, passes=[])
    assert out.graph.node[0].doc_string == "node doc"
    assert [v.name for v in out.graph.value_info] == ["t"]
    assert out.doc_string == "d" and out.metadata_props[0].key == "k"
    assert out.graph.initializer[0].name == "w"


def test_iter_graphs_walks_nested_bodies():
    inner = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "inner", [], [vi("n", [1])])
    then_g = helper.make_graph([helper.make_node("If", ["c"], ["i"], then_branch=inner, else_branch=inner)],
                               "then", [], [vi("i", [1])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["a"])], "else", [], [vi("a", [1])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("c", [], onnx.TensorProto.BOOL), vi("x", [1])], [vi("y", [1])])
    graph = ir.import_graph(m)
    assert len(list(ir.iter_graphs(graph))) == 5
    assert ir.count_nodes(graph) == 5


def _external_model(tmp_path, n_tensors=3, rows=256):
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((rows, rows)).astype(np.float32) for _ in range(n_tensors)]
    nodes, x = [], "x"
    for i in range(n_tensors):
        nodes.append(helper.make_node("Identity", [f"w{i}"], [f"wi{i}"]))
        nodes.append(helper.make_node("MatMul", [x, f"wi{i}"], [f"h{i}"]))
        x = f"h{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"]))
    m = make_model(nodes, [vi("x", ["n", rows])], [vi("y", ["n", rows])], [init(f"w{i}", w) for i, w in enumerate(ws)])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.ModelProto.FromString(m.SerializeToString()), src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    return m, src / "m.onnx"


def test_external_data_stays_external_and_round_trips(tmp_path):
    from onnxopt.api import optimize_lazy

    original, path = _external_model(tmp_path)
    out, _ = optimize_lazy(str(path))
    # still references, not bytes in memory
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert out.ByteSize() < 10_000
    dst = tmp_path / "dst"
    dst.mkdir()
    onnxopt.save(out, dst / "o.onnx")
    assert sorted(os.listdir(dst)) == ["o.onnx", "o.onnx.data"]
    saved = onnx.load(str(dst / "o.onnx"), load_external_data=False)
    assert all(t.external_data[0].value == "o.onnx.data" for t in saved.graph.initializer)
    feeds = verify.make_feeds(original)
    reloaded = onnx.load(str(dst / "o.onnx"))
    assert verify.compare(verify.run(original, feeds), verify.run(reloaded, feeds)) is None
    # the source is untouched and the optimized model runs from a different cwd
    assert sorted(os.listdir(path.parent)) == ["m.data", "m.onnx"]


def test_save_external_on_request(tmp_path):
    original, _ = _external_model(tmp_path, n_tensors=1)
    out = onnxopt.optimize(original, passes=[])
    onnxopt.save(out, tmp_path / "e.onnx", external_data=True)
    loaded = onnx.load(str(tmp_path / "e.onnx"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(original.graph.initializer[0]))


def test_missing_external_file_is_a_clear_error(tmp_path):
    _, path = _external_model(tmp_path, n_tensors=1)
    os.unlink(path.parent / "m.data")
    try:
        onnxopt.optimize(str(path))
    except onnxopt.InvalidModelError as exc:
        assert "m.data" in str(exc)
    else:
        raise AssertionError("expected InvalidModelError")


def test_external_weights_are_not_all_loaded(tmp_path):
    """Peak memory of optimize+save stays well under 1.5x the weights (here 4 x 64 MiB): the result
    holds the weights once (as onnx.load would), save adds at most one tensor."""
    _, path = _external_model(tmp_path, n_tensors=4, rows=4096)
    weights = 4 * 4096 * 4096 * 4
    script = textwrap.dedent(f"""
        import onnxopt
        def status_kib(key):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key))
        base = status_kib("VmRSS")
        out = onnxopt.optimize({str(path)!r})
        onnxopt.save(out, {str(tmp_path / 'o.onnx')!r})
        print(base, status_kib("VmHWM"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(onnxopt.__file__))})
    base, peak = map(int, proc.stdout.split())
    grown = (peak - base) * 1024
    assert grown < 1.5 * weights, f"optimize grew RSS by {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"
    assert os.path.getsize(tmp_path / "o.onnx") >= weights  # below 2 GiB: in the proto, as onnx.save writes it
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_cli_streams_external_weights(tmp_path):
    """File to file (`onnxopt optimize`), external weights are streamed: peak memory a small fraction
    of them (here 4 x 64 MiB)."""
    _, path = _external_model(tmp_path, n_tensors=4, rows=4096)
    weights = 4 * 4096 * 4096 * 4
    out = tmp_path / "o.onnx"
    script = textwrap.dedent(f"""
        from onnxopt.cli import main
        def status_kib(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key))
        import onnxopt, onnxruntime  # noqa: F401  (their import is not the streaming's cost)
        base = status_kib("VmRSS")
        rc = main(["optimize", {str(path)!r}, "-o", {str(out)!r}, "--no-bench"])
        print(rc, base, status_kib("VmHWM"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(onnxopt.__file__))})
    rc, base, peak = map(int, proc.stdout.split()[-3:])
    assert rc == 0
    grown = (peak - base) * 1024
    assert grown < 0.3 * weights, f"the CLI grew RSS by {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"
    assert os.path.getsize(str(out) + ".data") >= weights


def test_initializer_that_is_a_graph_input_stays_an_overridable_input():
    w = np.ones((3, 3), np.float32)
    nodes = [helper.make_node("Identity", ["w"], ["wi"]), helper.make_node("MatMul", ["x", "wi"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3]), vi("w", [3, 3])], [vi("y", [2, 3])], [init("w", w)])
    out = onnxopt.optimize(m)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    other = np.full((3, 3), 2.0, np.float32)
    assert verify.compare(verify.run(m, {"x": x, "w": other}), verify.run(out, {"x": x, "w": other})) is None
    assert verify.compare(verify.run(m, {"x": x}), verify.run(out, {"x": x})) is None


def test_a_pass_may_give_a_large_constant_new_values():
    """A constant of >= 1 KiB is kept aside at import (a placeholder marked EXTERNAL): new values set
    by a pass must export inline, not as raw_data on a tensor still marked external."""
    import onnx_graphsurgeon as gs

    class Double(onnxopt.Pass):
        name = "test_double_large_constant"
        exact = False

        def run(self, graph, ctx):
            for t in graph.tensors().values():
                if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and not getattr(t, "_done", False):
                    t.values, t._done = t.values * 2, True
                    return True
            return False

    w = np.ones((16, 16), np.float32)  # 1 KiB
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 16])], [vi("y", [2, 16])],
                   [init("w", w)])
    out = onnxopt.optimize(m, passes=[Double()], measure_fidelity=False)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), 2 * w)
