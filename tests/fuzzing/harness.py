"""Fuzz harness: lays each case out on disk, hands it to a worker process, collects the verdicts.

Folder of one case (`root`):
    model/      model.onnx and its files (external data, symlinks, hard links) - the model's folder
    secret.bin  the sentinel, outside the model's folder: onnxopt must never read it
    out/        where the CLI (or onnxopt.save after the API call) writes
    calib/      the calibration .npz the CLI is given; feeds.pkl for the API
    cwd/        the worker's working directory during the case
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from . import mutate
from .context import SENTINEL_BYTES, SENTINEL_NAME

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILURES = ("traceback", "crash", "timeout", "invalid_model", "unclean_error", "harness_error")
MEMORY_LIMIT = 6 << 30  # bytes of address space per worker: a huge dim must not wake the OOM killer


@dataclasses.dataclass
class Verdict:
    case: mutate.Case
    outcome: str
    outside: List[str]
    detail: str = ""
    category: str = ""  # invalid_model: which check failed; traceback: exception type and where


    @property
    def failed(self) -> bool:
        return self.outcome in FAILURES or bool(self.outside)

    def key(self) -> str:
        """What groups failures into classes: outcome, exception type and where it was raised."""
        if self.outside:
            hows = sorted({m.rsplit(": ", 1)[-1] for m in self.case.mutations if m.startswith("external data")})
            return f"outside read ({', '.join(hows) or 'no external-data mutation'})"
        return f"{self.outcome}: {self.category}" if self.category else f"{self.outcome}: {self.detail[:80]}"

    def line(self) -> str:
        out = f"{self.case.describe()}\n    -> {self.outcome}"
        if self.detail:
            out += f": {self.detail}"
        for o in self.outside:
            out += f"\n    -> outside: {o}"
        return out


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class Worker:
    """A `python -m tests.fuzzing.worker` child; restarted after a crash or a timeout."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), REPO, env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        # importing onnxruntime_extensions (another test may have) sets this to "python" in os.environ;
        # the pure-Python protobuf parses non-UTF-8 strings differently from the default upb one that
        # users run, which would make the verdicts depend on the tests that ran before
        env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzzing.worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     preexec_fn=_limit_memory, text=True, bufsize=1)
        ready = self._read(120)
        if ready is None or not ready.get("ready"):
            raise RuntimeError(f"fuzz worker did not start; see {self.log_path}")

    def _read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, request: dict, timeout: float):
        """The worker's answer, or ("crash", returncode) / ("timeout", None)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if answer is not None:
            return answer
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # our own child, by pid
            self.proc.wait()
            self.close()
            return ("timeout", None)
        code = self.proc.returncode
        self.close()
        return ("crash", code)

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.log.close()


def lay_out(case: mutate.Case, root: str) -> dict:
    """Write the case's files; returns the request the worker runs."""
    model_dir, out_dir, calib_dir, cwd = (os.path.join(root, d) for d in ("model", "out", "calib", "cwd"))
    for d in (model_dir, out_dir, calib_dir, cwd):
        os.makedirs(d)
    sentinel = os.path.join(root, SENTINEL_NAME)
    with open(sentinel, "wb") as f:
        f.write(SENTINEL_BYTES)
    model_path = os.path.join(model_dir, "model.onnx")
    with open(model_path, "wb") as f:
        f.write(case.model_bytes)
    for name, spec in case.files.items():
        path = os.path.join(os.fsencode(model_dir), os.fsencode(name))
        try:
            _write_spec(path, spec)
        except (ValueError, OSError):  # a name or target the file system refuses (NUL): the model points at nothing
            pass
    request = {"mode": case.mode, "model_dir": model_dir, "out_dir": out_dir, "calib_dir": calib_dir,
               "cwd": cwd, "sentinel": sentinel, "model_path": model_path,
               "stage_file": os.path.join(root, "stage")}
    if case.mode == "api-int8":
        request["feeds_path"] = os.path.join(root, "feeds.pkl")
        request["no_autotune"] = "--no-autotune" in case.cli_extra
        with open(request["feeds_path"], "wb") as f:
            pickle.dump(case.calibration, f)
    out = os.path.join(out_dir, "out.onnx")
    if case.mode == "cli-inspect":
        request["argv"] = ["inspect", model_path]
    elif case.mode.startswith("cli"):
        request["argv"] = ["optimize", model_path, "-o", out, "--rounds", "1"]
        request["cli_out"] = out
        if case.mode == "cli-int8":
            calib = os.path.join(calib_dir, "feeds.npz")
            _write_spec(os.fsencode(calib), case.calibration)
            request["argv"] += ["--passes", "int8", "--calibration", calib, *case.cli_extra]
    return request


def _write_spec(path: bytes, spec) -> None:
    if isinstance(spec, bytes):
        with open(path, "wb") as f:
            f.write(spec)
    elif spec[0] == "symlink":
        os.symlink(spec[1], path)
    elif spec[0] == "hardlink":
        os.link(spec[1], path)
    elif spec[0] == "dir":
        os.makedirs(path, exist_ok=True)


class Fuzzer:
    """Runs cases `index` of one seed; keeps the folders of failing cases when `keep` is set."""

    def __init__(self, seed: int, workdir: Optional[str] = None, timeout: float = 120.0, keep: bool = False):
        self.seed, self.timeout, self.keep = seed, timeout, keep
        self.workdir = workdir or tempfile.mkdtemp(prefix="ofuzz-")
        self.worker = Worker(os.path.join(self.workdir, "worker.log"))
        self.counts = collections.Counter()
        self.classes: dict = {}  # key -> the Verdicts of that failure class
        self.class_counts = collections.Counter()
        self.verdicts: List[Verdict] = []

    def run_case(self, index) -> Verdict:
        root = os.path.join(self.workdir, f"case-{index}")
        os.makedirs(root)
        try:
            case = mutate.build_case(self.seed, index, root)
        except Exception as exc:  # noqa: BLE001 - a mutator bug must not end a long run
            case = mutate.Case(index, "?", "?", [f"building the case failed: {type(exc).__name__}: {exc}"], b"", {})
            verdict = Verdict(case, "harness_error", [], case.mutations[0])
            self._count(verdict)
            shutil.rmtree(root, ignore_errors=True)
            return verdict
        try:
            request = lay_out(case, root)
            answer = self.worker.ask(request, self.timeout)
        except Exception as exc:  # noqa: BLE001 - a harness bug must not end a long run
            answer = {"outcome": "harness_error", "detail": f"{type(exc).__name__}: {exc}"}
        if isinstance(answer, tuple):
            verdict = self._died(case, root, *answer)
        else:
            detail = answer.get("detail") or ""
            category = answer.get("category", "")
            if answer["outcome"] == "traceback":
                category = f"{answer.get('exc_type')} at {answer.get('where', '?')}"
                detail = f"{answer.get('last_line', '')} | at {answer.get('line', '?')}" + (
                    f" | {detail}" if detail else "")
            elif answer["outcome"] in ("clean_error", "unclean_error") and answer.get("message"):
                detail = f"{detail} | {answer['message']}" if detail else f"| {answer['message']}"
            verdict = Verdict(case, answer["outcome"], answer.get("outside", []), detail, category)
            if answer["outcome"] == "valid" and answer.get("int8_ops"):
                self.counts["valid_int8"] += 1
        self._count(verdict)
        if not (self.keep and verdict.failed):
            shutil.rmtree(root, ignore_errors=True)
        return verdict

    def _died(self, case, root, kind, code) -> Verdict:
        stage = "?"
        try:
            with open(os.path.join(root, "stage")) as f:
                stage = f.read().strip()
        except OSError:
            pass
        if kind == "crash" and stage == "run-input":  # onnxruntime died on the input model, not onnxopt's
            return Verdict(case, "reference_crash", [], f"onnxruntime died running the input (exit {code})")
        detail = f"worker {kind} during {stage}" + (f" (exit {code})" if code is not None else "")
        return Verdict(case, "invalid_model" if stage in ("check-output", "run-output") else kind, [], detail)

    def _count(self, v: Verdict) -> None:
        self.verdicts.append(v)
        self.counts["cases"] += 1
        self.counts[v.outcome] += 1
        if v.outside:
            self.counts["outside_read"] += 1
        if v.failed:
            self.class_counts[v.key()] += 1
            self.classes.setdefault(v.key(), []).append(v)

    def summary(self) -> str:
        c = self.counts
        return (f"fuzz: {c['cases']} cases, {c['clean_error']} clean errors, {c['valid']} valid models "
                f"({c['valid_int8']} with int8 ops), {c['traceback']} tracebacks, {c['crash'] + c['timeout']} crashes ({c['timeout']} timeouts), "
                f"{c['invalid_model']} invalid models written, {c['unclean_error']} unclean errors, "
                f"{c['outside_read']} outside reads, {c['reference_crash']} onnxruntime crashes on inputs, "
                f"{c['harness_error']} harness errors")

    def close(self):
        self.worker.close()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run(seed: int, indices, timeout: float = 120.0, keep: bool = False, budget: Optional[float] = None,
        progress=None) -> Fuzzer:
    fuzzer = Fuzzer(seed, timeout=timeout, keep=keep)
    start = time.monotonic()
    try:
        for index in indices:
            if budget is not None and time.monotonic() - start > budget:
                break
            verdict = fuzzer.run_case(index)
            if progress:
                progress(fuzzer, verdict)
    finally:
        fuzzer.close()
    return fuzzer
