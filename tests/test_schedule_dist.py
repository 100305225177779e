"""Schedules under torchrun cost no collective between rows, except near a boundary, and fire where they should.

A real Trainer on 2 CPU ranks (gloo) with eval_every, save_every and stop_at: tests/dist/schedule_collectives.py
counts every collective and every host read of a tensor that stream_metrics makes, step by step. The
evaluations and checkpoints are compared with the steps computed from the data alone.
"""
from __future__ import annotations

import collections

import pytest

from test_distributed import torchrun, trainer_corpus

from stream_metrics.schedule import MARGIN, PACE_MIN

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BATCH, ACCUM = 4, 3
EVAL_EVERY, SAVE_EVERY, STOP_AT = 400, 20_000, 1150  # samples, tokens, samples
LOGGING_STEPS = 7


def global_counts(paths, steps):
    """(samples, tokens) summed over both ranks after each optimizer step 0..steps, from the data alone."""
    import tiny
    from test_hf import consumed

    per_rank = [[consumed(tiny.read_texts([path]), BATCH, ACCUM, k)[:2] for k in range(1, steps + 1)]
                for path in paths]
    return [(0, 0)] + [tuple(map(sum, zip(*step))) for step in zip(*per_rank)]


def crossings(positions, interval):
    return [k for k in range(1, len(positions)) if positions[k] // interval > positions[k - 1] // interval]


def test_schedules_cost_a_collective_only_at_rows_and_near_boundaries(workdir, mlflow_uri):
    paths = trainer_corpus(workdir)
    counts = global_counts(paths, 80)
    samples, tokens = [c[0] for c in counts], [c[1] for c in counts]
    stop = min(k for k in range(len(counts)) if samples[k] >= STOP_AT)
    samples, tokens = samples[:stop + 1], tokens[:stop + 1]
    evaluations, saves = crossings(samples, EVAL_EVERY), crossings(tokens, SAVE_EVERY)
    assert len(evaluations) >= 2 and len(saves) >= 2 and stop > 30  # the test means something

    reports = torchrun("schedule_collectives", "--mlflow-uri", mlflow_uri, "--eval-every", f"{EVAL_EVERY}sp",
                       "--save-every", f"{SAVE_EVERY}tok", "--stop-at", f"{STOP_AT}sp",
                       "--batch-size", BATCH, "--grad-accum", ACCUM, "--logging-steps", LOGGING_STEPS, *paths)

    # Where they land: as computed from the data, on every rank.
    for report in reports:
        assert report["final_step"] == stop
        assert report["evaluations"] == evaluations
        assert report["checkpoints"] == sorted(set(saves) | {stop})
        assert (report["progress"]["samples"], report["progress"]["tokens"]) == (samples[stop], tokens[stop])
    assert reports[0]["calls"] == reports[1]["calls"]  # every rank meets at the same points: no deadlock

    calls = [c for c in reports[0]["calls"] if c["phase"] == "train"]
    collectives = collections.defaultdict(list)
    host_syncs = collections.defaultdict(list)
    for c in calls:
        (collectives if c["kind"] == "collective" else host_syncs)[c["step"]].append(c)
    rows = collections.Counter(reports[0]["rows"])
    saved = set(saves) | {stop}
    per_step = {k: len(collectives[k]) for k in range(1, stop + 1)}
    print("collectives per step:", per_step)

    scheduled = []
    for k in range(1, stop + 1):
        by_caller = collections.Counter(c["caller"] for c in collectives[k])
        # A row is one all_gather, a checkpoint's state one more; each is the one host read of its sync.
        assert all(c["name"] == "all_gather" for c in collectives[k]), collectives[k]
        # At the last step the Trainer's end-of-training entry is rewritten with our figures: one more read.
        assert by_caller["on_log"] == rows[k] + (k == stop), (k, by_caller)
        # The checkpoint state is taken (one more sync) where a save is due at a step's end, and, with
        # several ranks, at every evaluation, where save_strategy="best" may decide to save (hf.py).
        # (At the stop step the end-of-step state serves the evaluation too.) Never on any other step.
        assert (k in saved) <= by_caller["_take_state"] <= (k in saved) + (k in evaluations), (k, by_caller)
        assert by_caller["_apply_schedules"] <= 1
        at_end = {"on_train_end"} if k == stop else set()
        assert set(by_caller) <= {"on_log", "_take_state", "_apply_schedules"} | at_end
        assert sorted(c["caller"] for c in host_syncs[k]) == sorted(c["caller"] for c in collectives[k]), k
        assert all(c["name"] == "tolist" for c in host_syncs[k]), host_syncs[k]
        if by_caller["_apply_schedules"]:
            scheduled.append(k)

    # A schedule syncs only near a boundary: from the last sync before step k, MARGIN times the largest
    # step seen in the data could reach the next boundary of one of the schedules (or the pace was not
    # known yet: the first PACE_MIN steps, one more for tokens, which the start of a run has none of).
    biggest = {"samples": max(b - a for a, b in zip(samples, samples[1:])),
               "tokens": max(b - a for a, b in zip(tokens, tokens[1:]))}
    for k in scheduled:
        if k <= PACE_MIN + 1:
            continue
        last = max(s for s in range(k) if s == 0 or per_step[s])
        reach = {axis: positions[last] + MARGIN * biggest[axis] * (k - last)
                 for axis, positions in (("samples", samples), ("tokens", tokens))}
        next_eval = (samples[k - 1] // EVAL_EVERY + 1) * EVAL_EVERY
        next_save = (tokens[k - 1] // SAVE_EVERY + 1) * SAVE_EVERY
        assert reach["samples"] >= next_eval or reach["tokens"] >= next_save or reach["samples"] >= STOP_AT, \
            (k, last, reach, next_eval, next_save)

    # And most steps without a row or a checkpoint cost nothing at all.
    quiet = [k for k in range(1, stop + 1) if not rows[k] and k not in saved]
    free = [k for k in quiet if per_step[k] == 0]
    print(f"{len(free)} of {len(quiet)} steps without a row or a checkpoint cost no collective; "
          f"schedule syncs at steps {scheduled}")
    assert len(free) >= len(quiet) // 2, (free, quiet, per_step)
