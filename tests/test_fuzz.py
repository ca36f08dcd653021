"""Mutation fuzzing (issue 16): every mutated model ends as a clean onnxopt error or a valid model.

A short, seeded, deterministic run of the fuzzer in tests/fuzzing (the long run is
benchmarks/fuzz.py): each case is one small seed model with a few mutations, run the way users run
onnxopt (API with the default passes or the int8 preset, `onnxopt optimize`, `onnxopt inspect`) in a
worker process. A case passes when it ends as an onnxopt.OptimizeError (CLI: one line on stderr,
exit 2, nothing written, the model's folder untouched) or as a model that passes onnx.checker, runs
in onnxruntime and matches the input's outputs, and onnxopt opened nothing outside the model's folder
and leaked no byte of the sentinel file beside it. Replay a failing case with
`python benchmarks/fuzz.py --seed 2026 --only INDEX --keep`.

The oracle itself is tested first (it must see an outside read, a hard link, a leak), so a green run
means something.
"""
import os

import numpy as np
import pytest

from tests.fuzzing import harness, mutate, seeds, worker
from tests.fuzzing.context import SENTINEL_BYTES, SENTINEL_NAME, SENTINEL_TOKEN
from tests.fuzzing.external_mutators import EXTERNAL_HOW

SEED = 2026
CASES = 120  # random cases; with the targeted ones ~10-20 s: the worker runs ~15 cases/s here
INDICES = [f"t{k}" for k in range(len(mutate.TARGETED))] + list(range(CASES))


@pytest.fixture(scope="module")
def verdicts():
    fuzzer = harness.run(SEED, INDICES, timeout=120.0)
    return {v.case.index: v for v in fuzzer.verdicts}


@pytest.mark.parametrize("index", INDICES)
def test_fuzz_case_is_clean(verdicts, index):
    v = verdicts[index]
    if v.failed:
        pytest.fail(v.line(), pytrace=False)


def test_the_short_run_covers_every_mutator_and_mode(tmp_path):
    """The CI cases exercise every mutator family, every way of running onnxopt and every seed."""
    mutations, modes, seed_names = [], set(), set()
    for i in INDICES:
        case = mutate.build_case(SEED, i, str(tmp_path))
        mutations += case.mutations
        modes.add(case.mode)
        seed_names.add(case.seed_name)
    text = "\n".join(mutations)
    for family in ("dims ->", "raw_data", "data_type", "typed fields", "value_info", "renamed (non_utf8)",
                   "external data", "opset", "ir_version", "attribute", "If ", "serialized bytes",
                   "calibration array", "Proto."):
        assert family in text, family
    for how in EXTERNAL_HOW:
        assert f": {how}" in text, how
    assert modes == set(mutate.MODES)
    assert seed_names == {"conv", "matmul", "external", "if"}


def test_cases_are_deterministic(tmp_path):
    a = mutate.make_case(SEED, 7, str(tmp_path))
    b = mutate.make_case(SEED, 7, str(tmp_path))
    assert (a.mutations, a.model_bytes, a.mode, a.files) == (b.mutations, b.model_bytes, b.mode, b.files)
    assert mutate.make_case(SEED, 8, str(tmp_path)).model_bytes != a.model_bytes


def _laid_out(tmp_path):
    case = mutate.Case(0, "matmul", "api", [], b"", {"w.bin": b"1234", "hard.bin": ("hardlink", ""),
                                                        "link.bin": ("symlink", "")})
    sentinel = str(tmp_path / SENTINEL_NAME)
    case.files["hard.bin"] = ("hardlink", sentinel)
    case.files["link.bin"] = ("symlink", sentinel)
    return harness.lay_out(case, str(tmp_path))


def test_the_oracle_sees_reads_outside_the_models_folder(tmp_path):
    req = _laid_out(tmp_path)
    model_dir = req["model_dir"]
    events = [("open", os.path.join(model_dir, "w.bin")), ("open", "../model/w.bin"),
              ("open", os.path.join(model_dir, "hard.bin")), ("open", os.path.join(model_dir, "link.bin")),
              ("open", os.path.join(model_dir, "..", SENTINEL_NAME)), ("open", "/etc/hostname"),
              ("os.rename", os.path.join(req["out_dir"], "x"))]
    req["cwd"] = req["out_dir"]
    bad = worker.outside_accesses(events, req)
    assert not any("w.bin" in b for b in bad), bad  # inside the folder (also by a relative path)
    assert any("hard.bin" in b for b in bad) and any("link.bin" in b for b in bad)
    assert any(SENTINEL_NAME in b and "link" not in b for b in bad)
    assert any("/etc/hostname" in b for b in bad)
    assert not any(req["out_dir"] in b for b in bad)


def test_the_oracle_sees_sentinel_bytes_in_outputs(tmp_path):
    req = _laid_out(tmp_path)
    assert worker.sentinel_leaks(req) == []
    with open(os.path.join(req["out_dir"], "out.onnx.data"), "wb") as f:
        f.write(b"\0" * 100 + SENTINEL_BYTES[5:200])
    assert worker.sentinel_leaks(req, ["printed text"]) and worker.sentinel_leaks(req, [SENTINEL_TOKEN])


def test_the_oracle_sees_invalid_written_models(tmp_path):
    """A written model that fails onnx.checker, or that passes it but onnxruntime refuses, is invalid."""
    req = _laid_out(tmp_path)
    model, _ = seeds.matmul_model(np.random.default_rng(0))
    with open(req["model_path"], "wb") as f:
        f.write(model.SerializeToString())
    req.update(input_full_check=True, stage_file=str(tmp_path / "stage"))
    out = os.path.join(req["out_dir"], "api.onnx")
    assert worker.check_output(req, {"out_path": out})[0] == "no model"
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    assert worker.check_output(req, {"out_path": out}) is None
    unknown_op = seeds.matmul_model(np.random.default_rng(0))[0]
    unknown_op.graph.node[2].op_type = "NoSuchOp"
    with open(out, "wb") as f:
        f.write(unknown_op.SerializeToString())
    assert worker.check_output(req, {"out_path": out})[0] == "fails onnx.checker"
    short = seeds.matmul_model(np.random.default_rng(0))[0]
    w2 = next(t for t in short.graph.initializer if t.name == "w2")
    w2.raw_data += b"\0" * 4  # the checker lets extra bytes through; onnxruntime does not
    with open(out, "wb") as f:
        f.write(short.SerializeToString())
    assert worker.check_output(req, {"out_path": out})[0] == "onnxruntime refuses it (the input loads)"
    scaled = seeds.matmul_model(np.random.default_rng(0))[0]
    w2 = next(t for t in scaled.graph.initializer if t.name == "w2")
    w2.raw_data = (np.frombuffer(w2.raw_data, np.float32) * 2).tobytes()
    with open(out, "wb") as f:
        f.write(scaled.SerializeToString())
    assert worker.check_output(req, {"out_path": out})[0] == "outputs differ"
