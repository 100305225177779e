"""tracking.row: what a row holds besides the metrics (the throughput since the previous row).

Expected values are worked out here by hand from the two Progress records, not by the library.
"""
from __future__ import annotations

import pytest

from stream_metrics import schema, tracking
from stream_metrics.flops import Peak
from stream_metrics.progress import Progress

LAST = Progress(step=10, samples=320, tokens=40_000, epoch=0.5, wall_clock=100.0, flops=6_000_000)
NOW = Progress(step=15, samples=480, tokens=61_000, epoch=0.75, wall_clock=104.0, flops=9_000_000)


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
