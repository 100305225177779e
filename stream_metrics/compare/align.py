"""Lining runs up on a progress axis: each metric against the axis, smoothing by amount of data,
and values at equal amounts (linear between stored rows)."""
from __future__ import annotations

import bisect

from dataclasses import dataclass, field

from .. import schema
from ..amount import UNITS, parse_amount
from .readers import CompareError, RunHistory

DEFAULT_METRIC = "train/loss"


@dataclass
class Line:
    """One run's metric against the axis, as plotted: raw values, and smoothed where asked."""

    run: str            # the run's label
    x: list             # the points drawn: finite values only
    y: list
    smoothed: list | None = None
    # The points the table reads: NaN and infinite values too, so a run whose metric diverged has
    # reached as far as its rows go, and shows nan or inf there (not a blank, as "did not reach").
    table_x: list = field(default_factory=list)
    table_y: list = field(default_factory=list)


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
    lines: dict = {}
    table: list = []
    notes: list = [f"{run.label}: {run.damaged}" for run in runs if run.damaged]
    for metric in metrics:
        having = [run for run in runs if any(metric in row for row in run.rows)]
        if not having:
            known = sorted({k for run in runs for k in run.keys() if not k.startswith(schema.AXIS_PREFIX)})
            raise CompareError(f"no run has the metric {metric!r} (they have: {', '.join(known) or 'no metrics'})")
        notes += [f"{run.label} has no {metric}" for run in runs if run not in having]
        lines[metric] = []
        unplaced = []
        for run in having:
            table_x, table_y = run.points(metric, axis_key, finite=False)
            if not table_x:
                unplaced.append(run)
                continue
            x, y = run.points(metric, axis_key)
            lines[metric].append(Line(run.label, x, y, smoothed(x, y, smooth) if smooth and x else None,
                                      table_x, table_y))
        for run in unplaced:
            has = [name for name, key in schema.AXES.items() if any(key in row for row in run.rows)]
            if not lines[metric] or has:  # a stream_metrics run without this axis: the user picks another
                raise CompareError(f"run {run.label!r} has no {axis_key} beside {metric}, so it cannot be placed on "
                                   f"the {axis_key[len(schema.AXIS_PREFIX):]} axis: choose another --axis "
                                   f"(it has {', '.join(has) or 'none: it was not logged by stream_metrics'})")
            # A run logged without stream_metrics (in an experiment compared whole) leaves the others
            # comparable: it is left out, and the table says so.
            notes.append(f"{run.label} has no {axis_key} beside {metric} (no progress axes: not logged by "
                         "stream_metrics): left out")
        reached_by_all = min(line.table_x[-1] for line in lines[metric])
        for amount in sorted({*amounts_on(axis_key, at), float(reached_by_all)}):
            for line in lines[metric]:
                table.append({"metric": metric, "amount": amount, "run": line.run,
                              "value": interpolate(line.table_x, line.table_y, amount),
                              "reached_by_all": amount == reached_by_all})
    return Comparison(axis_key, metrics, list(runs), lines, table, smooth, notes)


def amounts_on(axis_key: str, at) -> list[float]:
    """Amounts in the axis's units: numbers as they are, text as amount.py reads it.

    ``"50k"`` is 50,000 of the axis's own unit; a unit must match the axis (``"2Mtok"`` on
    tokens, ``"30min"`` on wall_clock, which counts seconds).
    """
    field_name = axis_key[len(schema.AXIS_PREFIX):]
    # An axis with no unit of its own in amount.py (a new axis) takes plain numbers only.
    own_unit = next((u for u, (f, scale) in UNITS.items() if f == field_name and scale == 1), "")
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
    i = bisect.bisect_left(x, at)  # the first stored point at or past ``at`` (x never goes down)
    if x[i] == at:
        while i + 1 < len(x) and x[i + 1] == at:
            i += 1
        return y[i]
    x0, y0, x1, y1 = x[i - 1], y[i - 1], x[i], y[i]
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)

