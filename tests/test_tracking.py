"""tracking.row: what a row holds besides the metrics (the throughput since the previous row), and where it is made.

Expected values are worked out here by hand from the two Progress records, not by the library.
"""
from __future__ import annotations

import pytest

from stream_metrics import schema, tracking
from stream_metrics.flops import Peak
from stream_metrics.progress import Progress
from support import InMemory

LAST = Progress(step=10, samples=320, tokens=40_000, epoch=0.5, wall_clock=100.0, flops=6_000_000)
NOW = Progress(step=15, samples=480, tokens=61_000, epoch=0.75, wall_clock=104.0, flops=9_000_000)


class Keeping(InMemory):
    """Keeps the metrics of every row it is sent, as read by its sender thread."""

    def __init__(self):
        self.rows = []

    def log_rows(self, rows):
        self.rows += [r.metrics for r in rows]


def test_a_row_holds_every_axis_then_the_rates_since_the_last_row_then_the_metrics():
    row = tracking.row(NOW, LAST, {"train/loss": 1.25}, None, 2)
    assert list(row)[:len(NOW.axes())] == list(NOW.axes())  # the axes first, as stored
    assert row[schema.SAMPLES_PER_S] == (480 - 320) / 4.0 == 40.0
    assert row[schema.TOKENS_PER_S] == (61_000 - 40_000) / 4.0 == 5250.0
    assert row[schema.TOKENS_PER_S_PER_DEVICE] == 5250.0 / 2
    assert row[schema.FLOPS_PER_S] == (9_000_000 - 6_000_000) / 4.0
    assert schema.MFU not in row  # no peak known
    assert row["train/loss"] == 1.25 and list(row)[-1] == "train/loss"


def test_mfu_divides_the_flop_rate_by_every_device_s_peak():
    row = tracking.row(NOW, LAST, {}, Peak(1e6, "given"), 2)
    assert row[schema.MFU] == pytest.approx(750_000.0 / (2 * 1e6))


def test_no_rate_without_time_between_the_rows_nor_tokens_without_token_counts():
    assert tracking.row(NOW, NOW, {}, None, 1).keys() == NOW.axes().keys()  # the same instant: no rate
    no_tokens = Progress(step=15, samples=480, wall_clock=104.0)
    row = tracking.row(no_tokens, Progress(samples=320, wall_clock=100.0), {}, None, 1)
    assert row[schema.SAMPLES_PER_S] == 40.0
    assert schema.TOKENS_PER_S not in row and schema.TOKENS_PER_S_PER_DEVICE not in row


def test_a_row_made_later_is_built_once_by_whichever_thread_reads_it_first():
    import threading

    from stream_metrics.backends.base import Row

    calls = []
    row = Row.later(lambda: calls.append(threading.current_thread().name) or {"loss": 1.0}, 5)
    assert calls == []  # handing it over builds nothing
    readers = [threading.Thread(target=lambda: row.metrics, name=f"sender-{i}") for i in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert len(calls) == 1 and calls[0].startswith("sender-")
    assert row.to_json() == {"metrics": {"loss": 1.0}, "timestamp_ms": 5, "seq": row.seq}
    assert Row.from_json(row.to_json()) == row


def test_log_leaves_the_axes_and_rates_to_the_sender_thread(monkeypatch):
    """The training thread hands the row over: the row's values are made on a sender thread."""
    import threading

    import stream_metrics
    backend = Keeping()
    monkeypatch.setattr(tracking, "create", lambda name, options: backend)
    made_on = []
    row = tracking.row
    monkeypatch.setattr(tracking, "row", lambda *a: made_on.append(threading.current_thread()) or row(*a))
    with stream_metrics.init(backend="mlflow") as run:
        for i in range(3):
            run.update(samples=4, tokens=40)
            run.log({"loss": 1.0 / (i + 1)})
    assert len(made_on) == 3 and threading.main_thread() not in made_on
    assert [r[schema.SAMPLES] for r in backend.rows] == [4, 8, 12]
    assert [r["loss"] for r in backend.rows] == [1.0, 0.5, 1.0 / 3]
    assert [r[schema.TOKENS] for r in backend.rows] == [40, 80, 120]


def test_an_mfu_above_one_warns_in_the_thread_that_logged(monkeypatch):
    """With a peak given, the row is made in log(): its one possible warning is the caller's to see."""
    import threading
    import warnings

    import stream_metrics
    from stream_metrics import _checks

    _checks.reset_warnings()
    backend = Keeping()
    monkeypatch.setattr(tracking, "create", lambda name, options: backend)
    seen = []
    show = warnings.showwarning
    monkeypatch.setattr(warnings, "showwarning",
                        lambda message, *a, **k: seen.append((str(message), threading.current_thread())))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        run = stream_metrics.init(backend="mlflow", flops_per_token=1e12, peak_flops=1.0)
        run.update(samples=1, tokens=10)
        run.log()
        run.update(samples=1, tokens=10)
        run.log({"loss": 1.0})
        run.finish()
    warnings.showwarning = show
    above = [t for m, t in seen if "above the peak" in m]
    assert above == [threading.current_thread()]
    assert len(backend.rows) == 2 and schema.MFU not in backend.rows[1]
