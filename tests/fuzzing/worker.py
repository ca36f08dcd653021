"""Fuzz worker: runs cases the way users do and classifies each; one process for many cases.

The parent (harness.py) lays a case out on disk and sends one JSON line per case on stdin; the answer
is one JSON line on the protocol fd. A crash (signal, abort) or hang kills only this process: the
parent sees it and restarts a worker. Before each step the worker writes the step's name into
`<root>/stage`, so the parent can tell a crash inside onnxopt from one in the reference run.

Outside reads are seen by a Python audit hook (every "open" and file-moving event while onnxopt
runs) plus a sentinel file outside the model's folder whose bytes must appear in no output.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
import traceback

from .context import SENTINEL_TOKEN

_events = None  # list of (event, path) while onnxopt runs, else None
# event -> (index of a path argument, index of its dir_fd argument or None), from the audit events table
_PATH_EVENTS = {"open": [(0, None)], "os.rename": [(0, 2), (1, 3)], "os.link": [(0, 2), (1, 3)],
                "os.symlink": [(1, 2)], "os.remove": [(0, 1)], "shutil.copyfile": [(0, None), (1, None)],
                "os.truncate": [(0, None)], "os.chmod": [(0, 2)], "tempfile.mkstemp": [(0, None)],
                "os.mkdir": [(0, 2)]}


def _audit(event, args):
    if _events is None or event not in _PATH_EVENTS:
        return
    for i, fd_i in _PATH_EVENTS[event]:
        if i >= len(args) or not isinstance(args[i], (str, bytes, os.PathLike)):
            continue
        if fd_i is not None and fd_i < len(args) and args[fd_i] not in (None, -100):
            continue  # relative to a directory fd (shutil.rmtree of a temp dir): not resolvable here
        _events.append((event, os.fsdecode(args[i])))


@contextlib.contextmanager
def _recording():
    global _events
    _events = []
    try:
        yield _events
    finally:
        _events = None


# -------------------------------------------------------------------------------- what is allowed

def _allowed_prefixes():
    import site

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()}
    roots |= {p for p in sys.path if p and os.path.isdir(p)}
    return [os.path.realpath(r) + os.sep for r in roots if r]


_ALLOWED_FILES = {"/dev/null", "/dev/urandom"}


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
        if any(_within(real, d) for d in allowed_dirs) or real in _ALLOWED_FILES:
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


# ------------------------------------------------------------------------------------ the folders

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


def _stage(case, name):
    with open(case["stage_file"], "w") as f:
        f.write(name)


# ---------------------------------------------------------------------------------------- running

def _onnxopt_frames(tb) -> str:
    """The onnxopt functions on the traceback, outermost first: `cmd_optimize>compare_models>session`."""
    names = [f.name for f in traceback.extract_tb(tb) if f"{os.sep}onnxopt{os.sep}" in f.filename]
    return ">".join(names[-4:]) or "?"


def _innermost_onnxopt_line(tb) -> str:
    where = "?"
    for frame in traceback.extract_tb(tb):
        if f"{os.sep}onnxopt{os.sep}" in frame.filename:
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return where


def _exception_result(exc) -> dict:
    lines = traceback.format_exception_only(type(exc), exc)
    last = lines[-1].strip() if lines else repr(exc)
    return {"outcome": "traceback", "exc_type": type(exc).__name__, "last_line": last[:300],
            "where": _onnxopt_frames(exc.__traceback__), "line": _innermost_onnxopt_line(exc.__traceback__)}


def run_onnxopt(case) -> dict:
    """The user's call; returns {"kind": "api"|"cli", ...} with what came back."""
    import onnxopt
    from onnxopt import cli

    mode = case["mode"]
    if mode.startswith("api"):
        kw = {}
        if mode == "api-int8":
            with open(case["feeds_path"], "rb") as f:
                kw = {"passes": ["int8"], "calibration": pickle.load(f)}
            if case.get("no_autotune"):  # the int8 preset with the cost guard's timing off
                kw["passes"] = [onnxopt.get_pass(p, autotune=False) if p == "quantize_auto" else p
                                for p in onnxopt.list_presets()["int8"]]
        out_path = os.path.join(case["out_dir"], "api.onnx")
        with _recording() as events:
            try:
                result = onnxopt.optimize(case["model_path"], **kw)
                onnxopt.save(result, out_path)  # the README's way to write it
                got = {"error": None}
            except BaseException as exc:  # noqa: BLE001 - classify() tells OptimizeError from the rest
                got = {"error": exc}
        got.update(kind="api", events=list(events), out_path=out_path)
        return got
    stdout, stderr = io.StringIO(), io.StringIO()
    with _recording() as events, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(case["argv"])
            exc = None
        except SystemExit as e:
            code, exc = e.code, None
        except BaseException as e:  # noqa: BLE001
            code, exc = None, e
    return {"kind": "cli", "code": code, "error": exc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "events": list(events), "out_path": case.get("cli_out")}


_PROGRESS = ("[onnxopt]", "  timing:", "\r")


def classify(case, got) -> dict:
    """outcome: clean_error | valid | traceback | invalid_model | unclean_error, plus outside reads."""
    import onnxopt

    res = {"outside": outside_accesses(got["events"], case)}
    texts = [got.get("stdout", ""), got.get("stderr", "")]
    err = got.get("error")
    if err is not None and not isinstance(err, onnxopt.OptimizeError):
        res.update(_exception_result(err))
    elif got["kind"] == "api" and err is not None:
        res.update(outcome="clean_error", message=str(err)[:300], exc_type=type(err).__name__)
        texts.append(str(err))
        if not str(err).strip() or "\n" in str(err).strip():
            res.update(outcome="unclean_error", category="message empty or several lines",
                       detail="error message empty or several lines")
    elif got["kind"] == "cli" and got["code"] != 0:
        lines = [ln for ln in got["stderr"].splitlines() if ln.strip() and not ln.startswith(_PROGRESS)]
        res.update(outcome="clean_error", message=(lines[-1] if lines else "")[:300])
        if got["code"] != 2 or len(lines) != 1 or not lines[0].startswith("onnxopt: error:"):
            res.update(outcome="traceback" if "Traceback" in got["stderr"] else "unclean_error",
                       category="not exit 2 with one stderr line",
                       detail=f"exit {got['code']}, stderr {len(lines)} line(s)")
    else:
        res["outcome"] = "valid"
    if res["outcome"] in ("clean_error", "unclean_error", "traceback"):
        left = os.listdir(case["out_dir"])
        if left and res["outcome"] != "traceback":
            res.update(outcome="unclean_error", category="error, but files left in the output folder",
                       detail=f"error but files left in the output folder: {sorted(left)}")
    if snapshot(case["model_dir"]) != case["before"]:
        if res["outcome"] == "traceback":
            res["detail"] = (res.get("detail", "") + " | the model's folder changed").lstrip(" |")
        else:
            res.update(outcome="unclean_error", category="the model's folder changed",
                       detail="the model's folder changed")
    res["outside"] += sentinel_leaks(case, texts)
    if res["outcome"] == "valid" and case["mode"] != "cli-inspect":
        res["int8_ops"] = _uses_onnxopt_ops(got.get("out_path"))
        problem = check_output(case, got)
        if problem:
            res.update(outcome="invalid_model", category=problem[0], detail=problem[1][:400])
    return res


def check_output(case, got):
    """None if the written model passes onnx.checker, runs in onnxruntime and matches the input, else
    (category, detail)."""
    import numpy as np
    import onnx

    import onnxopt

    path = got["out_path"]
    if not path or not os.path.isfile(path):
        return "no model", "reported success but wrote no model"
    _stage(case, "check-output")
    try:
        onnx.checker.check_model(path, full_check=case["input_full_check"])
    except Exception as exc:  # noqa: BLE001
        return "fails onnx.checker", f"onnx.checker: {_first_line(exc)}"
    _stage(case, "run-input")
    try:
        ref_sess = onnxopt.InferenceSession(case["model_path"])
    except Exception:  # noqa: BLE001 - onnxruntime cannot load the input: nothing to compare with
        ref_sess = None
    _stage(case, "run-output")
    try:
        sess = onnxopt.InferenceSession(path)
    except Exception as exc:  # noqa: BLE001
        which = "onnxruntime refuses the input too" if ref_sess is None else "the input loads"
        return f"onnxruntime refuses it ({which})", f"onnxruntime refuses it ({which}): {_first_line(exc)}"
    feeds = make_feeds(sess)
    if feeds is None or ref_sess is None:
        return None
    _stage(case, "run-input")
    try:
        ref = ref_sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - the input does not run on these feeds: nothing to compare with
        return None
    _stage(case, "run-output")
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
            if not cos >= 0.98:
                return "outputs differ", f"output {i}: cosine {cos:.4f} to the input model's output (int8)"
    return None


def _uses_onnxopt_ops(path) -> bool:
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


def handle(case) -> dict:
    os.chdir(case["cwd"])
    case["before"] = snapshot(case["model_dir"])
    case["input_full_check"] = input_passes_full_check(case["model_path"])
    _stage(case, "onnxopt")
    got = run_onnxopt(case)
    res = classify(case, got)
    _stage(case, "done")
    return res


def main():
    import faulthandler

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # native code and stray prints must not corrupt the protocol
    faulthandler.enable()  # a segfault's Python stack goes to stderr (the parent's log)
    tempfile.gettempdir()  # its first call writes a probe file into /tmp: not the model's doing
    import onnxopt  # noqa: F401  (import before recording: imports are not the model's reads)
    import onnxopt.cli  # noqa: F401
    import onnxruntime  # noqa: F401
    sys.addaudithook(_audit)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        try:
            res = handle(case)
        except Exception as exc:  # noqa: BLE001 - a harness bug: say so, do not blame onnxopt
            res = {"outcome": "harness_error", "detail": "".join(traceback.format_exception(exc))[-2000:]}
        proto.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
