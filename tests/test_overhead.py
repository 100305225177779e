"""A long run costs no memory that grows with it: counting and rows hold what a row needs, no more.

Timings live in benchmarks/run.py (a shared machine makes seconds meaningless in a test); here we
count bytes. Zero host syncs between rows is tests/test_counting.py's story.
"""
from __future__ import annotations

import gc
import sys
import tracemalloc

import torch

import stream_metrics
from support import InMemory, wait_for

MB = 2 ** 20


def batch(rows=8, width=64):
    ids = torch.randint(2, 258, (rows, width))
    mask = torch.ones_like(ids)
    mask[:, width // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def traced_growth(work, warmup) -> float:
    """Bytes still allocated after ``work()``, measured after ``warmup()`` reached a steady state.

    The objects alive before (a million and more late in a full suite, each collection then takes
    seconds) are frozen meanwhile: the collections look at what the warm-up and the work made. Freezing
    lets nothing go that a collection would keep (only what tracing saw counts, all of it made after).
    """
    gc.freeze()
    try:
        warmup()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            work()
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    finally:
        gc.unfreeze()


def test_two_hundred_thousand_updates_keep_memory_flat():
    b = batch()
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        def updates(n):
            return lambda: [run.update(b) for _ in range(n)] and None

        grown = traced_growth(updates(200_000), warmup=updates(1_000))
        assert grown < 1 * MB, f"200k update() calls kept {grown / MB:.2f} MB"
        assert run.log({"loss": 1.0}).samples == 8 * 201_000


def test_every_batch_form_keeps_memory_flat():
    b = batch()
    forms = [b, (b["input_ids"], b["attention_mask"]), b["input_ids"], [[1, 2, 3], [4, 5]]]
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        def updates(n):
            return lambda: [run.update(f) for _ in range(n) for f in forms] and None

        grown = traced_growth(updates(20_000), warmup=updates(500))
        assert grown < 1 * MB, f"80k update() calls of every form kept {grown / MB:.2f} MB"


def test_twenty_thousand_rows_keep_memory_flat():
    b = batch(2, 16)
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        def rows(n):
            def work():
                for i in range(n):
                    run.update(b)
                    run.log({"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5})
            return work

        grown = traced_growth(rows(20_000), warmup=rows(500))
        assert grown < 1 * MB, f"20k rows kept {grown / MB:.2f} MB"


class Recording(InMemory):
    """A backend that keeps only a count of what it was sent, so what memory grows is ours."""

    def __init__(self):
        self.rows = 0

    def log_rows(self, rows):
        self.rows += len(rows)


def test_delivered_rows_are_let_go(monkeypatch):
    backend = Recording()
    monkeypatch.setattr(sys.modules["stream_metrics.tracking"], "create", lambda name, options: backend)
    b = batch(2, 16)
    with stream_metrics.init(backend="mlflow", pad_token_id=0) as run:
        def rows(n):
            def work():
                for i in range(n):
                    run.update(b)
                    run.log({"loss": 1.0 / (i + 1)})
                assert run.flush(60)
            return work

        grown = traced_growth(rows(10_000), warmup=rows(500))
        assert backend.rows == 10_500
        assert grown < 1 * MB, f"10k delivered rows kept {grown / MB:.2f} MB"


class Calls(InMemory):
    """Keeps each log_rows call's rows, to see how the sender batched them."""

    max_rows_per_call = 4

    def __init__(self):
        self.calls = []

    def log_rows(self, rows):
        self.calls.append([row.seq for row in rows])
        self.stored_seq = rows[-1].seq


def test_the_sender_is_woken_only_when_it_has_work_yet_every_row_goes_out(monkeypatch):
    # submit() no longer wakes the sender at every row (it lingers, batching rows, and would take the
    # GIL at each one): rows must still go out at the end of the window, at once when a batch is
    # full, and at once on flush() and close(), which lifecycle.py relies on at exit and on signals.
    from stream_metrics.backends import delivery as delivery_module
    from stream_metrics.backends.base import Row
    from stream_metrics.backends.delivery import Delivery

    backend = Calls()
    d = Delivery(backend)
    d.submit("start", None)
    assert d.flush(30)
    monkeypatch.setattr(delivery_module, "LINGER_SECONDS", 0.2)
    rows = [Row({"loss": 1.0}, 0) for _ in range(3)]
    for row in rows:
        d.submit("rows", row)
    assert wait_for(lambda: d.delivered_rows == 3)  # the window ended, no flush
    assert backend.calls == [[r.seq for r in rows]]  # in one call

    monkeypatch.setattr(delivery_module, "LINGER_SECONDS", 3600.0)  # only a wake-up sends them now
    full = [Row({"loss": 1.0}, 0) for _ in range(4)]
    for row in full:
        d.submit("rows", row)
    assert wait_for(lambda: d.delivered_rows == 7)  # a full batch goes out without waiting for the window
    assert backend.calls[-1] == [r.seq for r in full]
    last = Row({"loss": 1.0}, 0)
    d.submit("rows", last)
    assert d.flush(30) and backend.calls[-1] == [last.seq]
    d.submit("rows", Row({"loss": 1.0}, 0))
    assert d.close("FINISHED", 30) is None and d.delivered_rows == 9
