"""Compare runs by the data they have seen: read what MLflow and W&B stored, line the runs up on a
progress axis, and write a table at equal amounts of data, a PNG and a self-contained HTML page.

    from stream_metrics import compare as sm_compare

    runs = sm_compare.read_runs(["bs8", "bs32", "wandb/offline-run-20260101_120000-abc123"],
                                mlflow_uri="sqlite:///mlflow.db")
    result = sm_compare.compare(runs, metrics=["train/loss"], axis="samples", at=[10_000])
    print(sm_compare.table_text(result))
    sm_compare.write_html(result, "compare.html")

The command line (cli.py) is a thin layer over these functions. Runs are read from the stores
themselves (MLflow's tracking store, W&B's offline transaction log), never from our own notes.
"""
from __future__ import annotations

import csv
import glob
import html
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

from . import schema
from .amount import UNITS, parse_amount
from .redact import redact_uri

DEFAULT_METRIC = "train/loss"
PLOT_INSTALL = "plotting a PNG needs matplotlib: pip install 'stream_metrics[plot]'"


class CompareError(Exception):
    """Something the user can fix, said in one sentence (the command prints it and exits non-zero)."""


@dataclass
class RunHistory:
    """One run as its backend stored it: rows in logging order, each a dict of key -> number."""

    run_id: str
    name: str
    backend: str            # "mlflow" or "wandb"
    where: str              # the tracking URI (credentials removed) or the W&B run folder
    rows: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)      # stream_metrics tags, without the prefix
    summary: dict = field(default_factory=dict)   # W&B's end-of-run figures
    label: str = ""         # the name shown in charts and tables, unique among compared runs

    def keys(self) -> set:
        return {key for row in self.rows for key in row}

    def points(self, metric: str, axis_key: str) -> tuple[list, list]:
        """The metric against the axis, from every row that has both (finite values only)."""
        xs, ys = [], []
        for row in self.rows:
            x, y = row.get(axis_key), row.get(metric)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
        return xs, ys


# ---------------------------------------------------------------------------- reading runs

def default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def mlflow_store(uri: str | None) -> str:
    """A tracking URI to read from; a bare path to a SQLite file is accepted too."""
    uri = uri or default_mlflow_uri()
    if not re.match(r"[A-Za-z][\w+.-]*:", uri) and uri != "databricks":
        uri = "sqlite:///" + os.path.abspath(uri)
    if uri.startswith("sqlite:///"):
        # MLflow would create an empty store at a mistyped path; say what is missing instead.
        path = uri[len("sqlite:///"):]
        if not os.path.isfile(path):
            raise CompareError(f"there is no MLflow store at {path}: pass --mlflow-uri sqlite:///PATH/TO/mlflow.db "
                               "or a server URL")
    return uri


def read_runs(refs=(), mlflow_uri: str | None = None, experiments=()) -> list[RunHistory]:
    """Read runs named by the user, each read once, with unique labels.

    A ref is a W&B run folder, its ``.wandb`` file, or a folder of run folders (``wandb/``);
    anything else is an MLflow run id or run name at ``mlflow_uri``. ``experiments`` adds every
    run of each named MLflow experiment.
    """
    runs, mlflow = [], None
    for ref in refs:
        files = wandb_files(ref)
        if files:
            runs += [read_wandb_run(f) for f in files]
            continue
        if os.path.isdir(ref):
            raise CompareError(f"the folder {ref!r} holds no W&B run (no .wandb file in it or in its run folders)")
        mlflow = mlflow or _MlflowReader(mlflow_uri)
        runs += [mlflow.read(r) for r in mlflow.find(ref)]
    for name in experiments:
        mlflow = mlflow or _MlflowReader(mlflow_uri)
        runs += [mlflow.read(r) for r in mlflow.experiment_runs(name)]
    if not runs:
        raise CompareError("name the runs to compare: MLflow run ids or names, W&B run folders, or --experiment NAME")
    unique, seen = [], set()
    for run in runs:
        if (run.backend, run.where, run.run_id) not in seen:
            seen.add((run.backend, run.where, run.run_id))
            unique.append(run)
    _label(unique)
    return unique


def _label(runs: list[RunHistory]) -> None:
    # The run name where it is unique; the backend, then the id, where several runs share a name
    # (a run logged to both backends has the same name in each).
    for run in runs:
        run.label = run.name or run.run_id
    for extra in (lambda r: r.backend, lambda r: f"{r.backend} {r.run_id[:8]}", lambda r: r.where):
        names = [r.label for r in runs]
        for run in runs:
            if names.count(run.label) > 1:
                run.label = f"{run.name or run.run_id} ({extra(run)})"


class _MlflowReader:
    def __init__(self, uri: str | None):
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise CompareError("reading MLflow runs needs MLflow: pip install 'stream_metrics[mlflow]'") from None
        self.uri = mlflow_store(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._missing = MlflowException

    def find(self, ref: str) -> list:
        """The run with this id, else the one run with this name in any experiment."""
        try:
            return [self.client.get_run(ref)]
        except self._missing:
            pass
        experiment_ids = [e.experiment_id for e in self.client.search_experiments()]
        quoted = json.dumps(ref) if "'" in ref else f"'{ref}'"
        found = self.client.search_runs(experiment_ids, filter_string=f"attributes.run_name = {quoted}",
                                        max_results=100) if experiment_ids else []
        if len(found) > 1:
            ids = ", ".join(r.info.run_id for r in found)
            raise CompareError(f"the run name {ref!r} matches {len(found)} MLflow runs ({ids}): name one by its id")
        if not found:
            raise CompareError(f"there is no run {ref!r} (by MLflow id or name at {redact_uri(self.uri)}, or as a "
                               "W&B run folder)")
        return found

    def experiment_runs(self, name: str) -> list:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(e.name for e in self.client.search_experiments()) or "none"
            raise CompareError(f"there is no MLflow experiment {name!r} at {redact_uri(self.uri)} "
                               f"(experiments: {known})")
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs

    def read(self, run) -> RunHistory:
        run_id = run.info.run_id
        # Every key of a row shares the row's step and timestamp, so (step, timestamp) rebuilds the rows.
        rows: dict = {}
        for key in run.data.metrics:
            for point in self.client.get_metric_history(run_id, key):
                rows.setdefault((point.step, point.timestamp), {})[key] = point.value
        tags = {k[len(schema.TAG_PREFIX):]: v for k, v in run.data.tags.items() if k.startswith(schema.TAG_PREFIX)}
        return RunHistory(run_id=run_id, name=run.info.run_name or "", backend="mlflow",
                          where=redact_uri(self.uri), rows=[rows[k] for k in sorted(rows)], tags=tags)


def wandb_files(ref: str) -> list[str]:
    """The .wandb files a path names: a run folder's, the file itself, or every run's in a ``wandb/`` folder."""
    if os.path.isfile(ref) and ref.endswith(".wandb"):
        return [ref]
    if not os.path.isdir(ref):
        return []
    own = sorted(glob.glob(os.path.join(ref, "*.wandb")))
    if own:
        return own[-1:]
    # offline-run-* and run-* folders; latest-run is a link to one of them.
    found = {os.path.realpath(f): f for pattern in ("offline-run-*", "run-*")
             for f in glob.glob(os.path.join(ref, pattern, "*.wandb"))}
    return sorted(found.values())


def read_wandb_run(path: str) -> RunHistory:
    """One W&B run from its transaction log (the file ``wandb sync`` uploads); no account needed."""
    run_id = name = ""
    rows, config, summary = [], {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, name = record.run.run_id or run_id, record.run.display_name or name
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            row = {k: v for k, v in _items(record.history.item).items() if not k.startswith("_")}
            rows.append({k: float(v) for k, v in row.items() if _is_number(v)})
        elif kind == "summary":
            summary.update({k: float(v) for k, v in _items(record.summary.update).items()
                            if not k.startswith("_") and _is_number(v)})
    tags = config.get(schema.CONFIG_KEY) or {}
    if isinstance(tags, dict) and isinstance(tags.get("value"), dict):
        tags = tags["value"]  # the config as W&B writes it to disk wraps each entry in {"value": ...}
    # The summary's figures that the history already holds are its last row; keep only the rest.
    summary = {k: v for k, v in summary.items() if not any(k in row for row in rows)}
    return RunHistory(run_id=run_id or os.path.basename(path), name=name, backend="wandb",
                      where=os.path.dirname(os.path.abspath(path)), rows=rows,
                      tags=tags if isinstance(tags, dict) else {}, summary=summary)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _items(items) -> dict:
    out = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        try:
            out[key] = json.loads(item.value_json)
        except ValueError:
            out[key] = item.value_json
    return out


def _wandb_records(path: str):
    """The records of a .wandb file: a LevelDB-style log of 32 KiB blocks holding protobuf records."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        raise CompareError("reading W&B runs needs wandb: pip install 'stream_metrics[wandb]'") from None
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise CompareError(f"{path} is not a W&B transaction log")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        if pos + 7 + length > len(data):
            return  # cut short: the writer is still running or was killed mid-write
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:      # a whole record
            whole = payload
        elif kind == 2:    # first, middle and last pieces of a record split across blocks
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            whole, pending = pending + payload, b""
        else:
            continue
        record = pb.Record()
        try:
            record.ParseFromString(whole)
        except Exception:
            return  # a damaged tail: keep what came before it
        yield record


# ---------------------------------------------------------------------------- lining runs up

@dataclass
class Line:
    """One run's metric against the axis, as plotted: raw values, and smoothed where asked."""

    run: str            # the run's label
    x: list
    y: list
    smoothed: list | None = None


@dataclass
class Comparison:
    axis: str                       # the progress key on x, e.g. "progress/samples"
    metrics: list
    runs: list                      # RunHistory, in the order given
    lines: dict                     # metric -> [Line]
    table: list                     # rows {"metric", "amount", "run", "value", "reached_by_all"}
    smooth: float | None = None
    notes: list = field(default_factory=list)  # what was left out, and why


def compare(runs: list[RunHistory], metrics=(DEFAULT_METRIC,), axis: str = "samples", smooth: float | None = None,
            at=()) -> Comparison:
    """Line the runs up on ``axis`` and tabulate each metric at equal amounts of data.

    The table holds each metric at the largest amount every run reached and at each amount in
    ``at`` (numbers, or text like ``"50k"``), linearly interpolated between stored rows (blank
    where a run did not get that far).
    ``smooth`` is a half-life in units of the axis (a number, or text like ``at``); it changes the
    plot only, never the table.
    """
    try:
        axis_key = schema.axis_key(axis, what="axis")
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    if smooth is not None:
        smooth = amounts_on(axis_key, [smooth])[0]
        if not smooth > 0:
            raise CompareError(f"--smooth needs a half-life above 0 (in {axis_key[len(schema.AXIS_PREFIX):]})")
    metrics = list(dict.fromkeys(metrics or [DEFAULT_METRIC]))
    lines, table, notes = {}, [], []
    for metric in metrics:
        having = [run for run in runs if any(metric in row for row in run.rows)]
        if not having:
            known = sorted({k for run in runs for k in run.keys() if not k.startswith(schema.AXIS_PREFIX)})
            raise CompareError(f"no run has the metric {metric!r} (they have: {', '.join(known) or 'no metrics'})")
        notes += [f"{run.label} has no {metric}" for run in runs if run not in having]
        lines[metric] = []
        for run in having:
            x, y = run.points(metric, axis_key)
            if not x:
                has = [name for name, key in schema.AXES.items() if any(key in row for row in run.rows)]
                raise CompareError(f"run {run.label!r} has no {axis_key} beside {metric}, so it cannot be placed on "
                                   f"the {axis_key[len(schema.AXIS_PREFIX):]} axis: choose another --axis "
                                   f"(it has {', '.join(has) or 'none'})")
            lines[metric].append(Line(run.label, x, y, smoothed(x, y, smooth) if smooth else None))
        reached_by_all = min(line.x[-1] for line in lines[metric])
        for amount in sorted({*amounts_on(axis_key, at), float(reached_by_all)}):
            for line in lines[metric]:
                table.append({"metric": metric, "amount": amount, "run": line.run,
                              "value": interpolate(line.x, line.y, amount),
                              "reached_by_all": amount == reached_by_all})
    return Comparison(axis_key, metrics, list(runs), lines, table, smooth, notes)


def amounts_on(axis_key: str, at) -> list[float]:
    """Amounts in the axis's units: numbers as they are, text as amount.py reads it.

    ``"50k"`` is 50,000 of the axis's own unit; a unit must match the axis (``"2Mtok"`` on
    tokens, ``"30min"`` on wall_clock, which counts seconds).
    """
    field_name = axis_key[len(schema.AXIS_PREFIX):]
    own_unit = next(u for u, (f, scale) in UNITS.items() if f == field_name and scale == 1)
    out = []
    for value in at:
        if not isinstance(value, str):
            out.append(float(value))
            continue
        try:
            amount = parse_amount(value)
        except ValueError:
            try:
                amount = parse_amount(value + own_unit)  # a bare number counts in the axis's units
            except ValueError:
                raise CompareError(f"{value!r} is not an amount of {field_name}: write a number such as 50000, "
                                   f"50k or 1.5M, or one with a unit such as 50k{own_unit}") from None
        if amount.field != field_name:
            raise CompareError(f"{value!r} is an amount of {amount.field}, but the axis is {field_name}: "
                               f"give amounts in {field_name} (or choose --axis {amount.field})")
        out.append(float(amount.value * UNITS[amount.unit][1]))
    return out


def smoothed(x: list, y: list, half_life: float) -> list:
    """An exponential moving average whose weights halve every ``half_life`` of the axis.

    Weighting by distance on the axis, not by row count, smooths a run that logs every 8 samples
    and one that logs every 64 alike, so smoothing never separates runs that agree.
    """
    out, weighted, weights, previous = [], 0.0, 0.0, None
    for xi, yi in zip(x, y):
        decay = 0.0 if previous is None else 0.5 ** ((xi - previous) / half_life)
        weighted, weights, previous = weighted * decay + yi, weights * decay + 1.0, xi
        out.append(weighted / weights)
    return out


def interpolate(x: list, y: list, at: float) -> float | None:
    """y at ``at``, linear between the stored points around it; None outside the run's range.

    Where several rows share an x value the last of them counts (the latest value at that amount).
    """
    if not x or at < x[0] or at > x[-1]:
        return None
    for i, xi in enumerate(x):
        if xi >= at:
            break
    if x[i] == at:
        while i + 1 < len(x) and x[i + 1] == at:
            i += 1
        return y[i]
    x0, y0, x1, y1 = x[i - 1], y[i - 1], x[i], y[i]
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


# ---------------------------------------------------------------------------- the table

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
        "lines": {metric: [{"run": line.run, "x": line.x, "y": line.y, "smoothed": line.smoothed}
                           for line in comparison.lines[metric]] for metric in comparison.metrics},
        "table": comparison.table,
    }


def write_html(comparison: Comparison, path: str, log_x: bool = False, log_y: bool = False) -> None:
    """A single page with no outside resources: the data as JSON, drawn as SVG by a small script."""
    data = json.dumps(html_data(comparison, log_x, log_y)).replace("</", "<\\/")
    tables = []
    for metric in comparison.metrics:
        header, body = _grid(comparison, metric)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run"] + header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        tables.append(f"<h3>{html.escape(_title(comparison, metric))}</h3><table><tr>{head}</tr>{rows}</table>")
    page = (_PAGE.replace("{{TITLE}}", html.escape(f"{', '.join(comparison.metrics)} by {comparison.axis}"))
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

# The page's smoothing repeats smoothed() above, so the reader can change it without the command.
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>stream-metrics compare: {{TITLE}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
svg{width:100%;max-width:920px;height:auto;background:#fff;border:1px solid #ddd;display:block}
.legend span{cursor:pointer;margin-right:16px;user-select:none;white-space:nowrap}
.legend span.off{opacity:.3}
.legend i{display:inline-block;width:14px;height:3px;margin-right:5px;vertical-align:middle}
table{border-collapse:collapse;margin-bottom:12px}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:4px 8px;
font-size:12px;display:none;white-space:pre}
.note{color:#666}
</style></head><body>
<h2>{{TITLE}}</h2>
<p><label><input type="checkbox" id="logx"> log x</label>
<label><input type="checkbox" id="logy"> log y</label>
<label>smoothing half-life in {{AXIS}}: <input id="smooth" type="number" min="0" step="any" style="width:8em"></label>
<span class="note">click a run to hide it</span></p>
<div id="charts"></div>
<h2>At equal amounts of data</h2>{{TABLES}}<p class="note">{{NOTES}}</p>
<div id="tip"></div>
""" + _DATA_OPEN + """{{DATA}}</script>
<script>
const D = JSON.parse(document.getElementById('stream-metrics-data').textContent);
const COLORS = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
const W = 900, H = 340, L = 70, R = 16, T = 16, B = 42;
const hidden = new Set(), tip = document.getElementById('tip');
const color = run => COLORS[D.runs.findIndex(r => r.label === run) % COLORS.length];
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
function smooth(x, y, h) {
  if (!(h > 0)) return y;
  let w = 0, n = 0, prev = null;
  return y.map((v, i) => { const d = prev === null ? 0 : Math.pow(0.5, (x[i] - prev) / h);
    w = w * d + v; n = n * d + 1; prev = x[i]; return w / n; });
}
function scale(lo, hi, a, b, log) {
  const f = log ? Math.log10 : (v => v), g = log ? (v => Math.pow(10, v)) : (v => v);
  const l = f(lo), span = (f(hi) - l) || 1;
  return {to: v => a + (f(v) - l) / span * (b - a), from: p => g(l + (p - a) / (b - a) * span)};
}
function nice(x) { const e = Math.pow(10, Math.floor(Math.log10(x))), f = x / e;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * e; }
function ticks(lo, hi, log) {
  const out = [];
  if (log) { for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    const v = Math.pow(10, e); if (v >= lo && v <= hi) out.push(v); } return out.length ? out : [lo, hi]; }
  const step = nice((hi - lo) / 6 || Math.abs(hi) || 1);
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}
function fmt(v) { const a = Math.abs(v);
  return a !== 0 && (a >= 1e6 || a < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(5)); }
function nearest(x, at) { let lo = 0, hi = x.length - 1;
  while (hi - lo > 1) { const m = (lo + hi) >> 1; if (x[m] < at) lo = m; else hi = m; }
  return Math.abs(x[lo] - at) <= Math.abs(x[hi] - at) ? lo : hi; }
function chart(metric) {
  const logx = document.getElementById('logx').checked, logy = document.getElementById('logy').checked;
  const h = parseFloat(document.getElementById('smooth').value);
  const lines = D.lines[metric].filter(l => !hidden.has(l.run)).map(l => {
    const ys = smooth(l.x, l.y, h), keep = l.x.map((v, i) => (!logx || v > 0) && (!logy || ys[i] > 0));
    return {run: l.run, x: l.x.filter((_, i) => keep[i]), y: ys.filter((_, i) => keep[i])};
  }).filter(l => l.x.length);
  const all = f => lines.flatMap(f);
  const xs = all(l => l.x), ys = all(l => l.y);
  const div = document.createElement('div');
  const legend = D.lines[metric].map(l => `<span data-run="${esc(l.run)}" class="${hidden.has(l.run) ? 'off' : ''}">` +
    `<i style="background:${color(l.run)}"></i>${esc(l.run)}</span>`).join('');
  if (!xs.length) {
    div.innerHTML = `<h3>${esc(metric)}</h3><div class="legend">${legend}</div><p>nothing to show</p>`;
    return div;
  }
  const sx = scale(Math.min(...xs), Math.max(...xs), L, W - R, logx);
  const sy = scale(Math.min(...ys), Math.max(...ys), H - B, T, logy);
  let svg = `<svg viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg">`;
  for (const v of ticks(Math.min(...xs), Math.max(...xs), logx))
    svg += `<line x1="${sx.to(v)}" x2="${sx.to(v)}" y1="${T}" y2="${H - B}" stroke="#eee"/>` +
           `<text x="${sx.to(v)}" y="${H - B + 16}" font-size="11" text-anchor="middle">${fmt(v)}</text>`;
  for (const v of ticks(Math.min(...ys), Math.max(...ys), logy))
    svg += `<line x1="${L}" x2="${W - R}" y1="${sy.to(v)}" y2="${sy.to(v)}" stroke="#eee"/>` +
           `<text x="${L - 6}" y="${sy.to(v) + 4}" font-size="11" text-anchor="end">${fmt(v)}</text>`;
  svg += `<text x="${(L + W - R) / 2}" y="${H - 6}" font-size="12" text-anchor="middle">${esc(D.axis)}</text>`;
  for (const l of lines)
    svg += `<polyline fill="none" stroke="${color(l.run)}" stroke-width="1.6" points="` +
           l.x.map((v, i) => sx.to(v).toFixed(1) + ',' + sy.to(l.y[i]).toFixed(1)).join(' ') + '"/>';
  svg += `<line class="cursor" y1="${T}" y2="${H - B}" stroke="#999" visibility="hidden"/></svg>`;
  div.innerHTML = `<h3>${esc(metric)}</h3><div class="legend">${legend}</div>${svg}`;
  const el = div.querySelector('svg'), cursor = div.querySelector('.cursor');
  el.addEventListener('mousemove', ev => {
    const box = el.getBoundingClientRect(), px = (ev.clientX - box.left) * W / box.width;
    if (px < L || px > W - R) { tip.style.display = 'none'; cursor.setAttribute('visibility', 'hidden'); return; }
    const at = sx.from(px);
    cursor.setAttribute('x1', px); cursor.setAttribute('x2', px); cursor.setAttribute('visibility', 'visible');
    tip.textContent = `${D.axis} ≈ ${fmt(at)}\\n` + lines.map(l => { const i = nearest(l.x, at);
      return `${l.run}: ${fmt(l.y[i])} (at ${fmt(l.x[i])})`; }).join('\\n');
    tip.style.display = 'block'; tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
  });
  el.addEventListener('mouseleave', () => { tip.style.display = 'none'; cursor.setAttribute('visibility', 'hidden'); });
  div.querySelectorAll('.legend span').forEach(s => s.addEventListener('click', () => {
    const run = s.dataset.run; hidden.has(run) ? hidden.delete(run) : hidden.add(run); draw(); }));
  return div;
}
function draw() {
  const charts = document.getElementById('charts');
  charts.replaceChildren(...D.metrics.map(chart));
}
document.getElementById('logx').checked = D.log_x;
document.getElementById('logy').checked = D.log_y;
document.getElementById('smooth').value = D.smooth || '';
for (const id of ['logx', 'logy', 'smooth']) document.getElementById(id).addEventListener('input', draw);
draw();
</script>
</body></html>
"""


# ---------------------------------------------------------------------------- one run

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
