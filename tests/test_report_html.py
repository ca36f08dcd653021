"""The HTML report (`--report`, Report.to_html) and the progress bars: a page that parses, holds the
text report's numbers, one chart per charted section, no URL; bad paths are one line, exit 2,
before the work; progress goes to stderr on a terminal only, never into --quiet runs or pipes."""
import html.parser
import io
import os
import re
import subprocess
import sys

import pytest

import onnxopt
from onnxopt import bench, progress, report_html
from onnxopt.cli import main
from onnxopt.passes.base import PassRecord, Report

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "small_cnn.onnx")
CALIB = os.path.join(os.path.dirname(__file__), "..", "examples", "small_cnn_calib.npz")
CHARTED = {"latency", "passes", "sensitivity", "node-times", "target"}


class _Page(html.parser.HTMLParser):
    """Sections, the charts inside each, every src/href, and whether the tags balance."""

    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.sections, self.links, self.section = [], {}, [], None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a["id"]
            self.sections[self.section] = 0
        if tag == "figure" and "chart" in (a.get("class") or ""):
            self.sections[self.section] += 1
        for k in ("src", "href", "xlink:href", "action", "data"):
            if k in a:
                self.links.append(a[k])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        for k in ("src", "href", "xlink:href"):
            if k in dict(attrs):
                self.links.append(dict(attrs)[k])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        self.text.append(data)


def _parse(text):
    page = _Page()
    page.feed(text)
    page.close()
    assert page.stack == [], page.stack
    return page


def _assert_offline(text, page):
    assert not [u for u in page.links if not u.startswith("#")], page.links  # only in-page references
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", text), re.search(r"(https?:)?//[\w.-]+\.\w", text)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text


def _synthetic():
    """A report as the int8 guard leaves it (rows, per-target verdicts, its notes) and a comparison."""
    r = Report(nodes_before=35, nodes_after=33, iterations=2, seconds=1.25)
    r.records = [PassRecord("eliminate_identity", 0, 0.001, 35, 23, True), PassRecord("quantize_auto", 0, 1.2, 14, 33, True),
                 PassRecord("fuse_gelu", 0, 0.0, 33, 33, False)]
    r.quantization = [
        {"node": "fc", "op": "Gemm", "quantized": False, "reason": "Gemm too small for int8 to pay (< min_macs=4096)"},
        {"node": "conv<script>alert(1)</script>", "op": "Conv", "quantized": True, "sqnr_db": 39.31,
         "alone_cosine": 0.99871, "ms_fp32": 1.575, "ms_int8": 1.138, "reason": "int8 pays, within tolerance",
         "targets": {"onnxopt": "kept", "onnxruntime": "kept"}},
        {"node": "head.conv", "op": "Conv", "quantized": False, "sqnr_db": 12.5, "alone_cosine": 0.9712,
         "ms_fp32": 3.5, "ms_int8": 1.7, "reason": "accuracy: SQNR 12.5 dB, alone cosine 0.97120",
         "targets": {"onnxopt": "accuracy: SQNR 12.5 dB", "onnxruntime": "accuracy: SQNR 12.5 dB"}},
    ]
    r.messages = [
        ("fold_conv_mul_add", "refused 1x: block1.add: Add operand is not a constant"),
        ("quantize_auto", "guard: whole models: fp32 35.373 ms, com.onnxopt ops 19.784 ms (1 site(s)), "
                          "onnxruntime QDQ 15.692 ms (1 site(s)): onnxruntime QDQ wins"),
        ("quantize_auto", "guard: fidelity on 1 held-out feed(s), 2 sample(s): cosine 0.99997, top-1 agreement "
                          "1.0000 (tolerance cosine >= 0.995, top1 >= 0.99)"),
        ("quantize_auto", "quantized 1 of 3 node(s) (onnxruntime target, minmax, guarded)"),
    ]
    r.fidelity = {"max_abs_diff": 0.0774, "cosine": 0.999972, "argmax_agreement": 1.0, "data": "calibration feed"}
    c = bench.Comparison(nodes=(35, 33), size=(198349, 60006), latency_ms=(32.506, 14.131), max_abs_diff=0.0754,
                         cosine=0.999972, argmax_agreement=1.0, rounds=3,
                         samples_ms=((32.0, 32.506, 40.1), (14.0, 14.131, 14.5)),
                         settings="graph optimization all, 1 intra-op thread(s), spinning off")
    return r, c


def test_html_parses_holds_the_text_numbers_and_one_chart_per_section(tmp_path):
    r, c = _synthetic()
    out = tmp_path / "r.html"
    r.to_html(out, c)
    text = out.read_text(encoding="utf-8")
    page = _parse(text)
    assert {k for k, n in page.sections.items() if n} == CHARTED
    assert all(n <= 1 for n in page.sections.values()), page.sections
    assert {"summary", "guard"} <= set(page.sections)
    _assert_offline(text, page)
    words = " ".join(page.text)
    for line in (c.format(("original", "optimized")) + "\n" + r.format()).splitlines():
        for number in re.findall(r"\d+\.\d+(?: ms|x)?", line):  # every figure the text report prints
            assert number in words, (number, line)
    assert "<script>alert" not in text and "conv&lt;script&gt;" in text  # names from a model are escaped
    assert "tolerance 0.995" in text  # the tolerance line on the alone-cosine chart
    assert "Target: onnxruntime QDQ" in re.sub(r"<[^>]+>", "", text)
    assert "spinning off" in words and "head.conv" in words


def test_bench_report_without_a_pass_report(tmp_path):
    _, c = _synthetic()
    report_html.write_report(tmp_path / "b.html", None, c)
    page = _parse((tmp_path / "b.html").read_text(encoding="utf-8"))
    assert {k for k, n in page.sections.items() if n} == {"latency"}
    assert "14.131 ms" in " ".join(page.text)


def test_cli_optimize_report_matches_the_printed_tables(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "o.html"
    assert main(["optimize", EXAMPLE, "-o", str(out), "--passes", "int8", "--calibration", CALIB,
                 "--no-autotune", "--rounds", "2", "--report", str(rep)]) == 0
    printed = capsys.readouterr().out
    text = rep.read_text(encoding="utf-8")
    page = _parse(text)
    _assert_offline(text, page)
    words = " ".join(page.text)
    table = printed[printed.index("latency (median)"):].splitlines()[0]
    for number in re.findall(r"\d+\.\d+ ms|\d+\.\d+x", table) + re.findall(r"cosine (\d\.\d+)", printed):
        assert number in words, number
    assert "sensitivity" in page.sections and page.sections["sensitivity"] == 1
    assert f"wrote {rep}" in printed


def test_cli_bench_report(tmp_path, capsys):
    opt, rep = tmp_path / "o.onnx", tmp_path / "b.html"
    onnxopt.save(onnxopt.optimize(EXAMPLE), str(opt))
    assert main(["bench", EXAMPLE, str(opt), "--rounds", "2", "--report", str(rep)]) == 0
    page = _parse(rep.read_text(encoding="utf-8"))
    assert page.sections.get("latency") == 1


def _must_not_run(*a, **k):
    raise AssertionError("the work ran before --report's path was checked")


@pytest.mark.parametrize("case", ["missing folder", "a directory", "the output", "the input"])
def test_bad_report_path_is_one_line_exit_2_before_the_work(tmp_path, capsys, monkeypatch, case):
    import onnxopt.api

    monkeypatch.setattr(onnxopt.api, "optimize_lazy", _must_not_run)
    out = tmp_path / "o.onnx"
    (tmp_path / "adir").mkdir()
    report = {"missing folder": tmp_path / "nope" / "r.html", "a directory": tmp_path / "adir",
              "the output": out, "the input": EXAMPLE}[case]
    assert main(["optimize", EXAMPLE, "-o", str(out), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "nope").exists()


def test_bench_bad_report_path_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "compare_models", _must_not_run)
    assert main(["bench", EXAMPLE, EXAMPLE, "--report", str(tmp_path / "nope" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


def test_missing_extra_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    import onnxopt.api

    monkeypatch.setattr(onnxopt.api, "optimize_lazy", _must_not_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when not installed
    assert main(["optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "onnxopt[report]" in err and err.count("\n") == 1


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def on_terminal(monkeypatch):
    """Call it in the test body: pytest sets its own sys.stderr after fixtures are set up."""
    def swap():
        err = _Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        return err

    yield swap
    progress.set_quiet(False)


def test_bar_draws_on_a_terminal_only_and_never_when_quiet(on_terminal, monkeypatch):
    terminal = on_terminal()
    for _ in progress.bar(range(3), desc="work"):
        pass
    assert "[onnxopt] work" in terminal.getvalue()
    progress.set_quiet(True)
    before = terminal.getvalue()
    for _ in progress.bar(range(3), desc="quiet"):
        pass
    assert terminal.getvalue() == before
    progress.set_quiet(False)
    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    for _ in progress.bar(range(3), desc="piped"):
        pass
    assert pipe.getvalue() == ""


def test_bench_rounds_bar_on_stderr_and_not_with_quiet(on_terminal, capsys, tmp_path):
    opt = tmp_path / "o.onnx"
    onnxopt.save(onnxopt.optimize(EXAMPLE), str(opt))
    terminal = on_terminal()
    assert main(["bench", EXAMPLE, str(opt), "--rounds", "2"]) == 0
    assert "[onnxopt] timing" in terminal.getvalue()
    assert "[onnxopt]" not in capsys.readouterr().out
    terminal.seek(0)
    terminal.truncate()
    assert main(["bench", EXAMPLE, str(opt), "--rounds", "2", "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_calibration_bar_on_a_terminal(on_terminal):
    import numpy as np
    import onnx

    from onnxopt.passes.quantize.calibrate import collect_ranges

    model = onnx.load(EXAMPLE)
    feeds = [dict(np.load(CALIB))]
    terminal = on_terminal()
    collect_ranges(model, [model.graph.node[0].output[0]], feeds)
    assert "[onnxopt] calibrating (minmax)" in terminal.getvalue()
    progress.set_quiet(True)
    terminal.seek(0)
    terminal.truncate()
    collect_ranges(onnx.load(EXAMPLE), [model.graph.node[0].output[0]], feeds)
    assert terminal.getvalue() == ""


def test_piped_cli_writes_no_progress(tmp_path):
    """A pipe is not a terminal: stderr stays empty (it used to get `timing: round 1/7 ...`)."""
    out = tmp_path / "o.onnx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", EXAMPLE, "-o", str(out), "--passes", "int8",
                           "--calibration", CALIB, "--no-autotune", "--rounds", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "latency (median)" in proc.stdout


def test_infinite_and_missing_figures_still_draw(tmp_path):
    """An int8 node that reproduces fp32 exactly has infinite SQNR; NaN cosine, missing timings: the
    page is still written (a valid model never makes onnxopt raise), charts drawn from what is finite."""
    r, c = _synthetic()
    r.quantization[1].update(sqnr_db=float("inf"), alone_cosine=float("nan"), ms_int8=None)
    r.quantization[2].update(ms_fp32=None)
    r.to_html(tmp_path / "r.html")  # no comparison: Report.to_html from Python after optimize()
    page = _parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert page.sections["sensitivity"] == 1 and page.sections["node-times"] == 1
    assert "inf" in " ".join(page.text) and "35" in " ".join(page.text)
