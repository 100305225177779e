"""``stream-metrics check``: is a stored run's data-seen axis sound? (SCHEMA section 6)

    stream-metrics check 3f2a9c... wandb/offline-run-20260101_120000-abc123 --expect-samples 400

Reads each run back from its store (MLflow's tracking store, W&B's offline transaction log) with
the readers ``compare`` uses, and checks what the contract promises:

- every row carries every progress axis (``progress/tokens`` may be missing only from every row:
  batches that carry no token information), no axis ever goes down, the counting axes are whole;
- the run's tags (MLflow) or its ``stream_metrics`` config entry (W&B) are there;
- MLflow: each row's step is the integer value of the key its ``stream_metrics.mlflow_step`` names;
- W&B: the axes are defined with ``define_metric``, and every other key is plotted against the x-axis;
- ``Expected`` values (``--expect-samples`` ...) equal the last row's.

    from stream_metrics import check
    from stream_metrics.compare import read_runs

    [run] = read_runs(["wandb/latest-run"])
    print(check.problems(run, check.Expected(samples=400)))   # [] where the run is sound
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from . import schema
from .compare.readers import RunHistory
from .compare.render import number

#: The epoch is a float: equal within this fraction of the expected value.
EPOCH_TOLERANCE = 1e-6
# The axes stream_metrics writes; a user's own metric may also be named progress/... (a sanitised
# "progress/samples_2"), and is then a metric like any other.
_AXIS_KEYS = frozenset({*schema.AXES.values(), schema.LOSS_TOKENS})


@dataclass(frozen=True)
class Expected:
    """The final totals a run should reach, from a ground truth the caller computed (None: not checked)."""

    samples: int | None = None
    tokens: int | None = None
    steps: int | None = None
    epoch: float | None = None


def describe_run(run: RunHistory) -> str:
    """One line naming the run and its final axes, e.g. for the user to compare with what training printed."""
    last = run.rows[-1] if run.rows else {}
    axes = ", ".join(f"{key[len(schema.AXIS_PREFIX):]} {number(last[key])}"
                     for key in schema.AXES.values() if key in last)
    name = f" ({run.name})" if run.name and run.name != run.run_id else ""
    notes = [note for note, applies in (
        ("the run file has no end: the run was killed, or is still running", not run.ended),
        ("RUNNING: still training, or ended without a word; a row being written is left out", run.running))
        if applies]
    return f"{run.backend} run {run.run_id}{name} in {run.where}: {len(run.rows)} row(s)" + (
        f"; last row: {axes}" if axes else "") + "".join(f" ({note})" for note in notes)


def problems(run: RunHistory, expect: Expected | None = None) -> list[str]:
    """Every way ``run`` falls short of the contract, one sentence each ([] when it conforms)."""
    found = ([run.damaged] if run.damaged else []) + _tag_problems(run) + _row_problems(run)
    if run.backend == "mlflow":
        found += _step_problems(run)
    if run.backend == "wandb":
        found += _definition_problems(run)
    if expect is not None and run.rows:
        found += _final_problems(run.rows[-1], expect)
    return found


def _required_axes(run: RunHistory) -> tuple:
    # Batches with no token information leave progress/tokens out of every row (SCHEMA section 1).
    has_tokens = any(schema.TOKENS in row for row in run.rows)
    return tuple(key for key in schema.REQUIRED_AXES if key != schema.TOKENS or has_tokens)


def _tag_problems(run: RunHistory) -> list[str]:
    names = [schema.TAG_VERSION, schema.TAG_X_AXIS, schema.TAG_EPOCH_SOURCE]
    if run.backend == "mlflow":
        names.append(schema.TAG_MLFLOW_STEP)
    # MLflow: run tags stream_metrics.NAME; W&B: the run config entry stream_metrics, a dict of NAME.
    where = "tag" if run.backend == "mlflow" else "config entry"
    out = [f"{where} {schema.tag_name(name)} is missing" for name in names if name not in run.tags]
    source = run.tags.get(schema.TAG_EPOCH_SOURCE)
    if source is not None and source not in schema.EPOCH_SOURCES:
        out.append(f"epoch source {source!r} is not one of {', '.join(schema.EPOCH_SOURCES)}")
    for name in (schema.TAG_X_AXIS, schema.TAG_MLFLOW_STEP):
        value = run.tags.get(name)
        if value is not None and value not in schema.AXES.values():
            out.append(f"{name} {value!r} is not a progress axis")
    return out


def _row_problems(run: RunHistory) -> list[str]:
    if not run.rows:
        return ["no rows are stored"]
    required, out = _required_axes(run), []
    last: dict = {}
    for i, row in enumerate(run.rows):
        missing = [key for key in required if key not in row]
        if missing:
            out.append(f"row {i} lacks {', '.join(missing)} (it has {', '.join(sorted(row)) or 'nothing'})")
        for key in sorted(k for k in row if k in _AXIS_KEYS):
            value = row[key]
            if not math.isfinite(value) or value < 0:
                out.append(f"row {i}: {key} = {value!r} is not a number >= 0")
                continue
            if key in schema.INTEGER_AXES and not float(value).is_integer():
                out.append(f"row {i}: {key} = {value!r} is not a whole number")
            if key in last and value < last[key]:
                out.append(f"row {i}: {key} went down from {_number(last[key])} to {_number(value)}")
            last[key] = value
    return out


def _step_problems(run: RunHistory) -> list[str]:
    key = run.tags.get(schema.TAG_MLFLOW_STEP, schema.SAMPLES)
    return [f"row {i}: the MLflow step is {step}, but {key} is {_number(row[key])}"
            for i, (step, row) in enumerate(zip(run.steps, run.rows))
            if key in row and math.isfinite(row[key]) and int(row[key]) != step]


def _definition_problems(run: RunHistory) -> list[str]:
    x_axis = run.tags.get(schema.TAG_X_AXIS, schema.SAMPLES)
    keys = set(_required_axes(run)) | {key for row in run.rows for key in row}
    out = []
    for key in sorted(keys):
        defined = _step_metric(key, run.step_metrics)
        if key in _AXIS_KEYS:
            if key not in run.step_metrics and not any(d.endswith("*") and key.startswith(d[:-1])
                                                       for d in run.step_metrics if d != "*"):
                out.append(f"{key} is not defined with define_metric")
        elif defined != x_axis:
            out.append(f"{key} is plotted against {defined or 'the W&B step'}, not the x-axis {x_axis}")
    return out


def _step_metric(key: str, definitions: dict) -> str | None:
    """The step metric W&B plots ``key`` against: an exact definition beats a glob; globs that disagree give None."""
    if key in definitions:
        return definitions[key]
    matches = {step for pattern, step in definitions.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)}
    return matches.pop() if len(matches) == 1 else None


def _final_problems(last: dict, expect: Expected) -> list[str]:
    out = []
    for key, want in ((schema.SAMPLES, expect.samples), (schema.TOKENS, expect.tokens), (schema.STEP, expect.steps)):
        if want is not None and last.get(key) != want:
            out.append(f"the last row's {key} is {_number(last.get(key))}, expected {_number(want)}")
    if expect.epoch is not None:
        got = last.get(schema.EPOCH)
        if got is None or abs(got - expect.epoch) > EPOCH_TOLERANCE * max(1.0, abs(expect.epoch)):
            out.append(f"the last row's {schema.EPOCH} is {_number(got)}, expected {_number(expect.epoch)}")
    return out


def _number(value) -> str:
    if value is None:
        return "missing"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)
