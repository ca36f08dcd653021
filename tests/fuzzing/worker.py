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
import io
import json
import os
import warnings
import pickle
import sys
import tempfile
import traceback

from . import oracle

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
        with _recording() as events, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = onnxopt.optimize(case["model_path"], **kw)
                onnxopt.save(result, out_path)  # the README's way to write it
                got = {"error": None}
            except BaseException as exc:  # noqa: BLE001 - classify() tells OptimizeError from the rest
                got = {"error": exc}
        got.update(kind="api", events=list(events), out_path=out_path,
                   fidelity_warned=any("far from the original" in str(w.message) for w in caught))
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

    res = {"outside": oracle.outside_accesses(got["events"], case)}
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
    if oracle.snapshot(case["model_dir"]) != case["before"]:
        if res["outcome"] == "traceback":
            res["detail"] = (res.get("detail", "") + " | the model's folder changed").lstrip(" |")
        else:
            res.update(outcome="unclean_error", category="the model's folder changed",
                       detail="the model's folder changed")
    res["outside"] += oracle.sentinel_leaks(case, texts)
    if res["outcome"] == "valid" and case["mode"] != "cli-inspect":
        res["int8_ops"] = oracle.uses_onnxopt_ops(got.get("out_path"))
        problem = oracle.check_output(case, got)
        if problem:
            res.update(outcome="invalid_model", category=problem[0], detail=problem[1][:400])
    return res


def handle(case) -> dict:
    os.chdir(case["cwd"])
    case["before"] = oracle.snapshot(case["model_dir"])
    case["input_full_check"] = oracle.input_passes_full_check(case["model_path"])
    oracle.stage(case, "onnxopt")
    got = run_onnxopt(case)
    res = classify(case, got)
    oracle.stage(case, "done")
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
