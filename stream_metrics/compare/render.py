"""What ``compare`` and ``show`` write: tables (text, Markdown, CSV), a PNG, a self-contained HTML
page (page.html, filled with the data as JSON), and one run's description."""
from __future__ import annotations

import csv
import html
import json
import math
from importlib import resources

from .. import schema
from .align import Comparison
from .readers import CompareError, RunHistory

PLOT_INSTALL = "plotting a PNG needs matplotlib: pip install 'stream_metrics[plot]'"


def number(value) -> str:
    """A number as people read it: whole numbers whole, the rest to 6 significant digits."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _grid(comparison: Comparison, metric: str) -> tuple[list, list]:
    """The header (amounts) and one row per run of one metric's table."""
    cells = [row for row in comparison.table if row["metric"] == metric]
    amounts = sorted({row["amount"] for row in cells})
    header = [number(a) + ("*" if any(r["reached_by_all"] for r in cells if r["amount"] == a) else "")
              for a in amounts]
    body = [[line.run] + [number(next(r["value"] for r in cells if r["run"] == line.run and r["amount"] == a))
                          for a in amounts] for line in comparison.lines[metric]]
    return header, body


def _title(comparison: Comparison, metric: str) -> str:
    return f"{metric} at equal {comparison.axis} (* = the most every run reached; between rows: linear interpolation)"


def table_text(comparison: Comparison) -> str:
    """The table as aligned plain text, one block per metric."""
    blocks = []
    for metric in comparison.metrics:
        header, body = _grid(comparison, metric)
        rows = [["run"] + header] + body
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        blocks.append("\n".join([_title(comparison, metric)] + lines))
    return "\n\n".join(blocks + ([("note: " + "; ".join(comparison.notes))] if comparison.notes else []))


def table_markdown(comparison: Comparison) -> str:
    blocks = []
    for metric in comparison.metrics:
        header, body = _grid(comparison, metric)
        rows = [["run"] + header, ["---"] + ["---:"] * len(header)] + body
        blocks.append(f"### {_title(comparison, metric)}\n\n"
                      + "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows))
    return "\n\n".join(blocks) + "\n"


def write_csv(comparison: Comparison, path: str) -> None:
    """One line per metric, amount and run: easy to load in a spreadsheet or pandas."""
    ids = {run.label: run for run in comparison.runs}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["metric", "axis", "amount", "run", "backend", "run_id", "value", "reached_by_all"])
        for row in comparison.table:
            run = ids[row["run"]]
            out.writerow([row["metric"], comparison.axis, number(row["amount"]), row["run"], run.backend, run.run_id,
                          "" if row["value"] is None else repr(row["value"]), row["reached_by_all"]])


# ---------------------------------------------------------------------------- pictures

def write_png(comparison: Comparison, path: str, log_x: bool = False, log_y: bool = False) -> None:
    """One chart per metric, one line per run; the run names are also in the PNG's text metadata."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError(PLOT_INSTALL) from None
    figure, charts = plt.subplots(len(comparison.metrics), 1, squeeze=False,
                                  figsize=(8, 3.4 * len(comparison.metrics)))
    try:
        for chart, metric in zip(charts[:, 0], comparison.metrics):
            for i, line in enumerate(comparison.lines[metric]):
                color = f"C{i % 10}"
                if line.smoothed is not None:
                    chart.plot(line.x, line.y, color=color, alpha=0.25, linewidth=1)
                    chart.plot(line.x, line.smoothed, color=color, label=line.run, linewidth=1.6)
                else:
                    chart.plot(line.x, line.y, color=color, label=line.run, linewidth=1.6)
            chart.set_xscale("log" if log_x else "linear")
            chart.set_yscale("log" if log_y else "linear")
            chart.set_xlabel(comparison.axis)
            chart.set_ylabel(metric)
            chart.grid(True, alpha=0.3)
            chart.legend(fontsize="small")
        figure.tight_layout()
        runs = ", ".join(run.label for run in comparison.runs)
        figure.savefig(path, dpi=120, metadata={"Title": f"{', '.join(comparison.metrics)} by {comparison.axis}",
                                                "Description": f"stream-metrics compare: {runs}"})
    finally:
        plt.close(figure)


def html_data(comparison: Comparison, log_x: bool = False, log_y: bool = False) -> dict:
    """What the HTML page plots, as JSON-safe data (the page embeds exactly this)."""
    return {
        "axis": comparison.axis, "metrics": comparison.metrics, "smooth": comparison.smooth,
        "log_x": log_x, "log_y": log_y,
        "runs": [{"label": r.label, "name": r.name, "run_id": r.run_id, "backend": r.backend, "where": r.where}
                 for r in comparison.runs],
        "lines": {metric: [_finite_points(line) for line in comparison.lines[metric]] for metric in comparison.metrics},
        "table": comparison.table,
    }


def _no_infinities(value):
    """``value`` with NaN and infinities (the table's, a smoothed point's) as null: JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _no_infinities(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_infinities(v) for v in value]
    return value


def _finite_points(line) -> dict:
    """A line's points the page can draw: JSON has no NaN or infinity (its parser refuses the page's
    data), and a chart has no place for them; the table keeps every stored value."""
    keep = [i for i, (x, y) in enumerate(zip(line.x, line.y)) if math.isfinite(x) and math.isfinite(y)]
    return {"run": line.run, "x": [line.x[i] for i in keep], "y": [line.y[i] for i in keep],
            "smoothed": None if line.smoothed is None else [line.smoothed[i] for i in keep]}


def write_html(comparison: Comparison, path: str, log_x: bool = False, log_y: bool = False) -> None:
    """A single page with no outside resources: the data as JSON, drawn as SVG by a small script."""
    data = json.dumps(_no_infinities(html_data(comparison, log_x, log_y)), allow_nan=False).replace("</", "<\\/")
    tables = []
    for metric in comparison.metrics:
        header, body = _grid(comparison, metric)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run"] + header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        tables.append(f"<h3>{html.escape(_title(comparison, metric))}</h3><table><tr>{head}</tr>{rows}</table>")
    page = (_page().replace("{{TITLE}}", html.escape(f"{', '.join(comparison.metrics)} by {comparison.axis}"))
            .replace("{{AXIS}}", html.escape(comparison.axis))
            .replace("{{TABLES}}", "".join(tables))
            .replace("{{NOTES}}", html.escape("; ".join(comparison.notes)))
            .replace("{{DATA}}", data))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def read_html_data(path: str) -> dict:
    """The data a page written by ``write_html`` plots (for checks and for other tools)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(_DATA_OPEN) + len(_DATA_OPEN)
    return json.loads(text[start:text.index("</script>", start)].replace("<\\/", "</"))

_DATA_OPEN = '<script type="application/json" id="stream-metrics-data">'


def _page() -> str:
    """page.html, shipped beside this module: the page's styles and script, with {{...}} to fill.

    Its script smooths as align.smoothed() does, so the reader can change the half-life on the page.
    """
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def describe(run: RunHistory) -> str:
    """``stream-metrics show``: a run's axes, epoch source, throughput and final metrics, as text."""
    out = [f"{run.label or run.name or run.run_id}: {run.backend} run {run.run_id} in {run.where}"]
    tags = run.tags
    out.append(f"  rows: {len(run.rows)}; x-axis: {tags.get(schema.TAG_X_AXIS, '?')}"
               + (f"; MLflow step: {tags[schema.TAG_MLFLOW_STEP]}" if schema.TAG_MLFLOW_STEP in tags else "")
               + f"; epoch source: {tags.get(schema.TAG_EPOCH_SOURCE, 'unknown')}"
               + (f"; stream_metrics {tags[schema.TAG_VERSION]}" if schema.TAG_VERSION in tags else ""))
    last = {}
    for row in run.rows:
        last.update(row)
    axes = [key for key in (*schema.AXES.values(), schema.LOSS_TOKENS) if key in last]
    out.append("  axes (final value):" if axes else "  axes: none (not a stream_metrics run?)")
    width = max([len(k) for k in last] + [0])
    out += [f"    {key.ljust(width)}  {number(last[key])}" for key in axes]
    seconds = last.get(schema.WALL_CLOCK)
    if seconds:
        rates = [f"{number(round(last[key] / seconds, 1))} {key[len(schema.AXIS_PREFIX):]}/s"
                 for key in (schema.SAMPLES, schema.TOKENS) if key in last]
        recent = [f"{number(round(last[key], 1))} {key.split('/')[1].replace('_per_s', '/s')}"
                  for key in (schema.SAMPLES_PER_S, schema.TOKENS_PER_S) if key in last]
        out.append(f"  throughput over the run: {', '.join(rates)}"
                   + (f"; in the last row: {', '.join(recent)}" if recent else ""))
    finals = {k: v for k, v in last.items() if not k.startswith(schema.AXIS_PREFIX)
              and k not in (schema.SAMPLES_PER_S, schema.TOKENS_PER_S)}
    finals.update(run.summary)
    out.append("  final metrics:" if finals else "  final metrics: none")
    out += [f"    {key.ljust(width)}  {number(value)}" for key, value in sorted(finals.items())]
    return "\n".join(out)
