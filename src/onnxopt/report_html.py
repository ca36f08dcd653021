"""The optimize / bench report as one self-contained HTML file: the text report's numbers as tables,
charts drawn by matplotlib (the `onnxopt[report]` extra) as inline SVG, no script and no URL, so it
opens offline in any browser. Reads a passes.base.Report (duck-typed: no import of the passes) and
optionally a bench.Comparison; the guard's decisions come from its per-node rows and its notes."""
from __future__ import annotations

import html
import io
import math
import os
import re
import tempfile
from typing import List, Optional

from . import ir
from .errors import OptimizeError

EXTRA = "onnxopt[report]"
FP32, INT8, BACK = "#8a94a6", "#2b6cb0", "#d9822b"  # fp32 bars, int8 bars, nodes sent back to fp32


def require() -> None:
    """Raise a one-line OptimizeError naming the extra when matplotlib is missing (before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptimizeError(f"--report needs matplotlib: pip install '{EXTRA}'") from None


def check_path(path, *others) -> str:
    """`path` as a string, refused like -o (missing folder, a directory, not writable) or when it
    names one of the other files of the run (`others`: the model, the output)."""
    path = ir.check_output_path(path)
    for other in others:
        if other and os.path.abspath(path) == os.path.abspath(other):
            raise OptimizeError(f"{path}: the report would overwrite {other}")
    return path


def write_report(path, report=None, comparison=None, names=("original", "optimized"), title=None) -> None:
    """Write the HTML for `report` (optimize) and/or `comparison` (bench) to `path`, atomically."""
    require()
    path = check_path(path)
    text = render(report, comparison, names, title)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onnxopt-report-", suffix=".html", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- the page ---------------------------------------------------------------------------------

def render(report=None, comparison=None, names=("original", "optimized"), title=None) -> str:
    title = title or ("onnxopt optimize report" if report is not None else "onnxopt bench report")
    sections = [_summary(report, comparison, names)]
    if comparison is not None and getattr(comparison, "samples_ms", ()):
        sections.append(_latency(comparison, names))
    if report is not None:
        sections.append(_passes(report))
        rows = list(report.quantization or [])
        if rows:
            tol = _tolerance(report)
            sections.append(_sensitivity(rows, tol))
            if any(_finite(r.get("ms_fp32")) for r in rows):
                sections.append(_node_times(rows))
            sections.append(_guard(report, rows))
            sections.append(_target(report))
        others = [(n, t) for n, t in report.messages if not _is_guard(n, t)]
        if others:
            sections.append(_section("notes", "Notes from the passes",
                                     "<ul>" + "".join(f"<li><b>{_e(n)}</b>: {_e(t)}</li>" for n, t in others) + "</ul>"))
    return _PAGE.format(title=_e(title), body="\n".join(sections))


def _summary(report, comparison, names) -> str:
    rows = []
    if comparison is not None:
        from .bench import _human

        c = comparison
        rows.append(("nodes", f"{c.nodes[0]}", f"{c.nodes[1]}", f"{c.nodes[1] / max(c.nodes[0], 1):.2f}x"))
        rows.append(("size", _human(c.size[0]), _human(c.size[1]), f"{c.size[1] / max(c.size[0], 1):.2f}x"))
        rows.append(("latency (median)", f"{c.latency_ms[0]:.3f} ms", f"{c.latency_ms[1]:.3f} ms",
                     f"{c.speedup:.2f}x faster"))
    elif report is not None:
        rows.append(("nodes", f"{report.nodes_before}", f"{report.nodes_after}",
                     f"{report.nodes_after / max(report.nodes_before, 1):.2f}x"))
    table = _table(["", names[0], names[1], "ratio"], rows, numeric=(1, 2, 3))
    facts = []
    if report is not None:
        facts.append(f"optimizer: {report.nodes_before} &rarr; {report.nodes_after} nodes, {report.iterations} "
                     f"iteration(s), {report.seconds * 1e3:.1f} ms")
        if report.fidelity:
            f = report.fidelity
            fid = f"max abs diff {f['max_abs_diff']:.3g}, cosine {f['cosine']:.6f}"
            if f.get("argmax_agreement") is not None:
                fid += f", argmax agreement {f['argmax_agreement']:.4f}"
            facts.append(f"fidelity vs original on {_e(f.get('data', 'generated inputs'))}: {fid}")
    if comparison is not None:
        c = comparison
        fid = f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f}"
        if c.argmax_agreement is not None:
            fid += f", argmax agreement {c.argmax_agreement:.4f}"
        facts.append(f"fidelity (onnxruntime, same inputs): {fid}")
        facts.append(f"latency: medians of {c.rounds} interleaved rounds at {_e(c.settings or 'onnxruntime defaults')}")
    body = _headline(report, comparison) + table + "<ul class='facts'>" + "".join(f"<li>{x}</li>" for x in facts) + "</ul>"
    return _section("summary", "Summary", body)


def _headline(report, comparison) -> str:
    """The few numbers someone deciding to ship looks for first, large."""
    cards = []
    if comparison is not None:
        c = comparison
        cards.append((f"{c.speedup:.2f}x", "faster (median latency)"))
        cards.append((f"{c.size[1] / max(c.size[0], 1):.2f}x", "size"))
        cards.append((f"{c.cosine:.6f}", "output cosine"))
    elif report is not None and report.fidelity:
        cards.append((f"{report.fidelity['cosine']:.6f}", "output cosine"))
    rows = list(getattr(report, "quantization", None) or [])
    if rows:
        cards.append((f"{sum(1 for r in rows if r.get('quantized'))} of {len(rows)}", "nodes in int8"))
    if not cards:
        return ""
    return "<div class='cards'>" + "".join(f"<div class='card'><div class='value'>{_e(v)}</div>"
                                          f"<div class='what'>{_e(w)}</div></div>" for v, w in cards) + "</div>"


def _latency(c, names) -> str:
    fig, ax = _figure(len(names), height_per=0.55, min_height=2.2)
    data = [list(s) for s in c.samples_ms]
    colors = [FP32, INT8]
    boxes = ax.boxplot(data, orientation="horizontal", widths=0.5, showfliers=False, patch_artist=True,
                       medianprops={"color": "#111", "linewidth": 2})
    for i, (box, s) in enumerate(zip(boxes["boxes"], data)):  # every round as a dot: the spread matters
        box.set(facecolor=colors[i % 2], alpha=0.35)
        ax.scatter(s, [i + 1] * len(s), s=22, color=colors[i % 2], zorder=3)
    ax.set_yticks(range(1, len(names) + 1),
                  [f"{_label(n)}\nmedian {m:.3f} ms" for n, m in zip(names, c.latency_ms)])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per run (one dot per round)")
    ax.set_xlim(0, max(max(s) for s in data) * 1.1)
    text = (f"<p>Each model's time per run over {c.rounds} interleaved rounds "
            f"({_e(c.settings or 'onnxruntime defaults')}). Box: quartiles; line: median.</p>")
    return _section("latency", "Latency distribution", text + _svg(fig, "latency"))


def _passes(report) -> str:
    rows = report.summary()
    def line(r):
        return (r["pass"], r["runs"], r["changed"], f"{r['node_delta']:+d}", f"{r['seconds'] * 1e3:.1f}")

    head, num = ["pass", "runs", "changed", "nodes", "ms"], (1, 2, 3, 4)
    total = ("total", "", "", f"{report.nodes_after - report.nodes_before:+d}", f"{report.seconds * 1e3:.1f}")
    idle = [r for r in rows if not r["changed"]]
    table = _table(head, [line(r) for r in rows if r["changed"]] + [total], numeric=num)
    if idle:  # most passes find nothing to do: listed, out of the way
        table += (f"<details><summary>{len(idle)} pass(es) changed nothing</summary>"
                  + _table(head, [line(r) for r in idle], numeric=num) + "</details>")
    changed = [r for r in rows if r["node_delta"]]
    if not changed:
        return _section("passes", "Passes", "<p>No pass changed the node count.</p>" + table)
    fig, ax = _figure(len(changed), height_per=0.3)
    deltas = [r["node_delta"] for r in changed]
    ax.barh(range(len(changed)), deltas, color=[INT8 if d < 0 else FP32 for d in deltas])
    for i, d in enumerate(deltas):
        ax.annotate(f"{d:+d}", (d, i), xytext=(4 if d >= 0 else -4, 0), textcoords="offset points",
                    ha="left" if d >= 0 else "right", va="center", fontsize=9)
    ax.set_yticks(range(len(changed)), [_label(r["pass"]) for r in changed])
    ax.invert_yaxis()
    ax.axvline(0, color="#333", linewidth=0.8)
    lo, hi = min(deltas + [0]), max(deltas + [0])
    pad = max(1, (hi - lo) * 0.15)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("nodes added (+) or removed (-)")
    return _section("passes", "Passes", _svg(fig, "passes") + table)


def _sensitivity(rows, tol) -> str:
    import matplotlib.patches as mpatches

    sites = [r for r in rows if r.get("sqnr_db") is not None and not math.isnan(r["sqnr_db"])]
    if not sites:
        return _section("sensitivity", "int8 sensitivity per node",
                        "<p>No node was measured (none could be quantized).</p>")
    cos = [r for r in sites if _finite(r.get("alone_cosine"))]
    cols = 2 if cos else 1
    fig, axes = _figure(len(sites), cols=cols)
    axes = axes if cols == 2 else [axes]
    y = range(len(sites))
    colors = [INT8 if r.get("quantized") else BACK for r in sites]
    ax = axes[0]
    finite = [r["sqnr_db"] for r in sites if math.isfinite(r["sqnr_db"])]
    top = max(finite + [0.0]) * 1.1 or 10.0  # a node int8 reproduces exactly has infinite SQNR: drawn here
    sqnr = [min(r["sqnr_db"], top) for r in sites]
    ax.barh(y, sqnr, color=colors)
    for i, r in enumerate(sites):
        ax.annotate(f"{r['sqnr_db']:.1f}", (sqnr[i], i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(list(y), [_label(r["node"]) for r in sites])
    ax.invert_yaxis()
    ax.set_xlabel("SQNR dB, each node quantized alone" + ("\n" if cos else " ") + "(higher: less noise)")
    ax.set_xlim(min(sqnr + [0.0]) * 1.15, max(sqnr + [0.0]) * 1.15 or 1)
    if cos:
        ax2 = axes[1]
        vals = [r["alone_cosine"] if _finite(r.get("alone_cosine")) else None for r in sites]
        ax2.barh([i for i, v in enumerate(vals) if v is not None], [v for v in vals if v is not None],
                 color=[c for c, v in zip(colors, vals) if v is not None])
        ax2.set_yticks(list(y), [""] * len(sites))
        ax2.set_ylim(axes[0].get_ylim())
        ax2.set_xlabel("whole-model cosine, only this node int8"
                       + (f"\n(dashed: tolerance {tol:g})" if tol is not None else ""))
        for i, v in enumerate(vals):  # inside the bar's end: the axis stops at 1.0
            if v is not None:
                ax2.annotate(f"{v:.5f}", (v, i), xytext=(-4, 0), textcoords="offset points", ha="right",
                             va="center", color="white", fontsize=8)
        lo = min([v for v in vals if v is not None] + ([tol] if tol is not None else []))
        ax2.set_xlim(max(0.0, lo - (1 - lo) * 0.5 - 1e-4), 1.0)
        if tol is not None:
            # labelled in the axis title: a label on the line would sit on a bar
            ax2.axvline(tol, color="#c53030", linestyle="--", linewidth=1.5)
    fig.legend(handles=[mpatches.Patch(color=INT8, label="int8"), mpatches.Patch(color=BACK, label="kept in fp32")],
               loc="outside upper right", ncol=2, frameon=False, fontsize=9)
    back = [r for r in rows if not r.get("quantized")]
    text = "<p>"
    text += (f"Tolerance: whole-model cosine &ge; {tol:g}. " if tol is not None else "")
    text += ("Alone cosine was measured for the nodes the accuracy guard probed. " if cos else
             "Alone cosine not measured: the int8 model met the tolerance as a whole. ")
    text += (f"Kept in fp32: {', '.join(_e(r['node']) for r in back)}." if back else "Every node became int8.") + "</p>"
    return _section("sensitivity", "int8 sensitivity per node", text + _svg(fig, "sensitivity"))


def _node_times(rows) -> str:
    timed = [r for r in rows if _finite(r.get("ms_fp32"))]
    fig, ax = _figure(len(timed), height_per=0.5)
    h = 0.38
    fp = [r["ms_fp32"] for r in timed]
    q = [r["ms_int8"] if _finite(r.get("ms_int8")) else 0.0 for r in timed]
    ax.barh([i - h / 2 for i in range(len(timed))], fp, height=h, color=FP32, label="fp32")
    ax.barh([i + h / 2 for i in range(len(timed))], q, height=h,
            color=[INT8 if r.get("quantized") else BACK for r in timed], label="int8")
    for i, (a, b) in enumerate(zip(fp, q)):
        ax.annotate(f"{a:.3f}", (a, i - h / 2), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.annotate(f"{b:.3f} ({a / b:.1f}x)" if b > 0 else "-", (b, i + h / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(timed)), [_label(r["node"]) for r in timed])
    ax.invert_yaxis()
    ax.set_xlim(0, max(fp + q) * 1.25 or 1)
    ax.set_xlabel("milliseconds, each node alone on a held-out input")
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    total_f, total_q = sum(fp), sum(q)
    text = (f"<p>Where the time goes: {total_f:.3f} ms fp32 vs {total_q:.3f} ms int8 over the timed nodes "
            f"(orange: int8 measured but the node stayed fp32).</p>")
    return _section("node-times", "Time per node, fp32 vs int8", text + _svg(fig, "node_times"))


def _guard(report, rows) -> str:
    targets = sorted({t for r in rows for t in (r.get("targets") or {})})
    head = ["node", "op", "int8", "SQNR dB", "alone cos", "fp32 ms", "int8 ms"] + targets + ["reason"]

    def num(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"

    body = []
    for r in rows:
        reason = re.sub(r"\s*\[[^\]]*\]$", "", r.get("reason", "")) if targets else r.get("reason", "")
        body.append([r["node"], r["op"], "yes" if r.get("quantized") else "no", num(r, "sqnr_db", ".1f"),
                     num(r, "alone_cosine", ".5f"), num(r, "ms_fp32", ".3f"), num(r, "ms_int8", ".3f")]
                    + [(r.get("targets") or {}).get(t, "-") for t in targets] + [reason])
    notes = [t for n, t in report.messages if _is_guard(n, t)]
    text = "<ul>" + "".join(f"<li>{_e(t)}</li>" for t in notes) + "</ul>" if notes else ""
    return _section("guard", "The guard's decisions", _table(head, body, numeric=(3, 4, 5, 6),
                                                             flag=lambda row: row[2] == "no") + text)


def _target(report) -> str:
    notes = [t for _, t in report.messages]
    chosen = next((m.group(1) for t in notes for m in [re.search(r"quantized \d+ of \d+ node\(s\) \(([\w.]+) target", t)]
                   if m), None)
    why = [t for t in notes if t.startswith(("guard: whole models:", "guard: whole model "))]
    times = _whole_model_times(why)
    chosen = _winner(why) or (times[-1][0] if len(times) == 2 else chosen)  # the label, as in the table
    text = f"<p class='big'>Target: <b>{_e(chosen)}</b></p>" if chosen else "<p class='big'>No int8 target: the result stays fp32.</p>"
    text += "".join(f"<p>{_e(t.removeprefix('guard: '))}</p>" for t in why)
    if not times:
        return _section("target", "Target chosen and why", text)
    fig, ax = _figure(len(times), height_per=0.5)
    labels = [k for k, _ in times]
    vals = [v for _, v in times]
    won = _winner(why)
    ax.barh(range(len(times)), vals, color=[FP32 if k == "fp32" else INT8 if k == won or won is None else "#a3bffa"
                                            for k in labels])
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.3f} ms ({vals[0] / v:.2f}x)" if v > 0 else "", (v, i), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(range(len(times)), [_label(k) + (" (chosen)" if k == won else "") for k in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, max(vals) * 1.3)
    ax.set_xlabel("whole model, milliseconds per run on a held-out feed (median)")
    return _section("target", "Target chosen and why", text + _svg(fig, "target"))


def _whole_model_times(notes: List[str]) -> list:
    """[(label, ms)] from the guard's whole-model notes, fp32 first; [] when none says it."""
    for t in notes:
        if t.startswith("guard: whole models:"):
            body = t.split(":", 2)[2].rsplit(":", 1)[0]
            return [(k.strip(), float(v)) for k, v in re.findall(r"(?:^|, )([^,]+?) ([0-9.]+) ms", body)]
    for t in notes:
        m = re.match(r"guard: whole model ([0-9.]+) ms int8 \((.+?)\) vs ([0-9.]+) ms fp32", t)
        if m:
            return [("fp32", float(m.group(3))), (m.group(2), float(m.group(1)))]
    return []


def _winner(notes: List[str]) -> Optional[str]:
    for t in notes:
        m = re.search(r": ([^:]+) wins$", t)
        if m:
            return m.group(1)
    return None


def _tolerance(report) -> Optional[float]:
    for _, t in report.messages:
        m = re.search(r"tolerance cosine >= ([0-9.eE+-]+)", t)
        if m:
            return float(m.group(1))
    return None


def _is_guard(name, text) -> bool:
    return name.startswith("quantize") and (text.startswith("guard:") or text.startswith("warning: guard"))


# --- helpers ----------------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _e(text) -> str:
    return html.escape(str(text))


def _label(text: str, width: int = 34) -> str:
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def _section(key, title, body) -> str:
    return f"<section id='{key}'><h2>{_e(title)}</h2>{body}</section>"


def _table(head, rows, numeric=(), flag=None) -> str:
    def cell(i, v, tag="td"):
        cls = " class='num'" if i in numeric else ""
        return f"<{tag}{cls}>{_e(v)}</{tag}>"

    out = ["<table><thead><tr>" + "".join(cell(i, h, "th") for i, h in enumerate(head)) + "</tr></thead><tbody>"]
    for row in rows:
        cls = " class='back'" if flag is not None and flag(row) else ""
        out.append(f"<tr{cls}>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _figure(n_rows: int, cols: int = 1, height_per: float = 0.4, min_height: float = 2.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, max(min_height, 0.9 + height_per * n_rows)), layout="constrained")
    axes = fig.subplots(1, cols, sharey=False) if cols > 1 else fig.subplots()
    for ax in (axes if cols > 1 else [axes]):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", color="#e2e8f0", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, axes


def _svg(fig, key: str) -> str:
    """`fig` as inline SVG: text kept as text (the page's font), no metadata, no namespace URLs."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": key, "text.parse_math": False}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)  # the HTML parser puts inline SVG in its namespace
    return f"<figure class='chart' data-chart='{key}'>{svg}</figure>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1a202c;
       max-width: 1100px; margin: 1.5em auto; padding: 0 1em; line-height: 1.4; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.15em; border-bottom: 2px solid #e2e8f0; padding-bottom: 0.2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }}
th, td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #edf2f7; text-align: left; vertical-align: top; }}
th {{ background: #f7fafc; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.back td {{ background: #fffaf0; }}
ul.facts {{ padding-left: 1.2em; }}
div.cards {{ display: flex; gap: 1em; flex-wrap: wrap; margin: 0.8em 0; }}
div.card {{ border: 1px solid #e2e8f0; border-radius: 6px; padding: 0.5em 1em; min-width: 9em; background: #f7fafc; }}
div.card .value {{ font-size: 1.6em; font-weight: 600; color: #2b6cb0; }}
div.card .what {{ font-size: 0.85em; color: #4a5568; }}
details summary {{ cursor: pointer; color: #4a5568; font-size: 0.9em; }}
p.big {{ font-size: 1.1em; }}
figure.chart {{ margin: 0.5em 0; }}
figure.chart svg {{ width: 100%; height: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
