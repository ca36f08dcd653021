"""What counts as clean: files touched outside the model's folder, sentinel bytes in what onnxopt
wrote or printed, the model's folder before/after, and the validity of a written model (onnx.checker,
onnxruntime, outputs equal to the input model's)."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

from .context import SENTINEL_TOKEN


# -------------------------------------------------------------------------------- what is allowed

def _allowed_prefixes():
    import site

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()}
    roots |= {p for p in sys.path if p and os.path.isdir(p)}
    return [os.path.realpath(r) + os.sep for r in roots if r]


# read by libraries, never by a model's say: LLVM's host-CPU detection when numba first compiles in a
# fresh install (the fuzz cases' own external-data attacks aim at /proc/self/environ, still refused)
_ALLOWED_FILES = {"/dev/null", "/dev/urandom", "/proc/cpuinfo", "/proc/self/maps"}


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def outside_accesses(events, case) -> list:
    """Paths onnxopt touched that are outside the model's folder, the output folder, the calibration
    data the user named, onnxopt's own temp dirs and the Python installation (or that are the
    sentinel under another name: a hard link)."""
    model_dir = os.path.realpath(case["model_dir"])
    allowed_dirs = [os.path.realpath(case["out_dir"]), os.path.realpath(case["calib_dir"])]
    tmp = os.path.realpath(tempfile.gettempdir())
    try:
        st = os.stat(case["sentinel"])
        sentinel = (st.st_dev, st.st_ino)
    except OSError:
        sentinel = None
    prefixes = _allowed_prefixes()
    bad = []
    for event, path in events:
        full = os.path.normpath(os.path.join(case["cwd"], path))
        real = os.path.realpath(full)
        try:
            st = os.stat(real)
            if sentinel and (st.st_dev, st.st_ino) == sentinel:
                bad.append(f"{event} {path} (the sentinel)")
                continue
        except OSError:
            pass
        if _within(full, case["model_dir"]) and _within(real, model_dir):
            continue
        if any(_within(real, d) for d in allowed_dirs) or real in _ALLOWED_FILES or full in _ALLOWED_FILES:
            continue
        if _within(real, tmp) and os.path.relpath(real, tmp).split(os.sep)[0].startswith("onnxopt-"):
            continue  # onnxopt's own scratch dirs (checker, verify, sessions)
        if event == "open" and any(real.startswith(p) for p in prefixes):
            continue  # imports, numba caches, package data
        bad.append(f"{event} {path}")
    return bad


def sentinel_leaks(case, texts=()) -> list:
    found = []
    for t in texts:
        if isinstance(t, str):
            t = t.encode("utf-8", "surrogateescape")
        if SENTINEL_TOKEN in t:
            found.append("sentinel bytes in the result or the printed text")
    for name in os.listdir(case["out_dir"]):
        with open(os.path.join(case["out_dir"], name), "rb") as f:
            if SENTINEL_TOKEN in f.read():
                found.append(f"sentinel bytes in output file {name}")
    return found


def snapshot(folder: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, folder)] = (st.st_mode, st.st_size, digest)
    return out


def stage(case, name):
    with open(case["stage_file"], "w") as f:
        f.write(name)


def check_output(case, got):
    """None if the written model passes onnx.checker, runs in onnxruntime and matches the input, else
    (category, detail)."""
    import numpy as np
    import onnx

    import onnxopt

    path = got["out_path"]
    if not path or not os.path.isfile(path):
        return "no model", "reported success but wrote no model"
    stage(case, "check-output")
    try:
        onnx.checker.check_model(path, full_check=case["input_full_check"])
    except Exception as exc:  # noqa: BLE001
        return "fails onnx.checker", f"onnx.checker: {_first_line(exc)}"
    stage(case, "run-input")
    try:
        ref_sess = onnxopt.InferenceSession(case["model_path"])
    except Exception:  # noqa: BLE001 - onnxruntime cannot load the input: nothing to compare with
        ref_sess = None
    stage(case, "run-output")
    try:
        sess = onnxopt.InferenceSession(path)
    except Exception as exc:  # noqa: BLE001
        which = "onnxruntime refuses the input too" if ref_sess is None else "the input loads"
        return f"onnxruntime refuses it ({which})", f"onnxruntime refuses it ({which}): {_first_line(exc)}"
    feeds = make_feeds(sess)
    if feeds is None or ref_sess is None:
        return None
    stage(case, "run-input")
    try:
        ref = ref_sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - the input does not run on these feeds: nothing to compare with
        return None
    stage(case, "run-output")
    try:
        out = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return "fails to run", f"onnxruntime runs the input but not the output: {_first_line(exc)}"
    if [o.name for o in sess.get_outputs()] != [o.name for o in ref_sess.get_outputs()]:
        return "outputs differ", "output names differ from the input model's"
    exact = case["mode"] in ("api", "cli-optimize")
    for i, (a, b) in enumerate(zip(ref, out)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return "outputs differ", f"output {i}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                return "outputs differ", f"output {i}: values differ"
            continue
        if exact:
            finite = a[np.isfinite(a)]
            scale = max(1.0, float(np.max(np.abs(finite), initial=0.0)))
            if not np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
                diff = float(np.nanmax(np.abs(a.astype(np.float64) - b)))
                return "outputs differ", f"output {i}: max abs diff {diff:.3g} (exact passes)"
        elif np.isfinite(a).all() and a.size and np.linalg.norm(a) > 0:
            cos = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
            if not cos >= 0.98 and not got.get("fidelity_warned"):  # far off, and not said
                return "outputs differ", f"output {i}: cosine {cos:.4f} to the input model's output (int8, no warning)"
    return None


def uses_onnxopt_ops(path) -> bool:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - check_output says what is wrong with it
        return False
    return any(o.domain == "com.onnxopt" for o in model.opset_import)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else repr(exc)


def make_feeds(sess):
    """Inputs for the output model's session: standard normal floats, symbolic dims 2."""
    import numpy as np

    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(bool)": bool, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    feeds = {}
    for i in sess.get_inputs():
        if i.type not in types:
            return None
        shape = [d if isinstance(d, int) and d >= 0 else 2 for d in (i.shape or [])]
        if np.prod(shape, dtype=np.int64) > 1 << 20:
            return None
        dtype = types[i.type]
        if dtype is bool:
            feeds[i.name] = np.asarray(rng.integers(0, 2, shape).astype(bool))
        else:
            feeds[i.name] = np.asarray(rng.standard_normal(shape)).astype(dtype)
    return feeds


def input_passes_full_check(path) -> bool:
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
        return True
    except Exception:  # noqa: BLE001
        return False
