"""A user evaluates every 1M tokens and stops at 2B: each boundary fires once, across big batches and resumes."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stream_metrics
from stream_metrics import Progress
from stream_metrics.schedule import Every, Until


def test_a_batch_jumping_over_several_boundaries_fires_once_and_counts_them_all():
    every = Every("1ksp")
    answers = [every.crossed(Progress(samples=s)) for s in (0, 600, 999, 1000, 1001, 4500, 4999, 5000, 5000, 12345)]
    assert answers == [0, 0, 0, 1, 0, 3, 0, 1, 0, 7]
    assert every.boundaries == 12 == sum(answers)


@given(st.integers(1, 10_000), st.lists(st.integers(0, 30_000), max_size=40))
def test_each_boundary_is_counted_exactly_once(interval, jumps):
    every, samples, fired = Every((interval, "sp")), 0, 0
    for jump in jumps:
        before = samples // interval
        samples += jump
        crossed = every.crossed(Progress(samples=samples))
        assert crossed == samples // interval - before
        fired += crossed
    assert fired == samples // interval


def test_epoch_boundaries_survive_float_rounding():
    every = Every("0.1ep")
    epochs = [0.05, 0.1, 0.2, 0.1 + 0.2, 0.3, 0.39999, 0.4]
    assert [every.crossed(Progress(epoch=e)) for e in epochs] == [0, 1, 1, 1, 0, 0, 1]


def test_wall_clock_and_steps():
    every_minute, every_100 = Every("1min"), Every("100steps")
    assert [every_minute.crossed(Progress(wall_clock=t)) for t in (30.0, 61.0, 119.9, 200.0)] == [0, 1, 0, 2]
    assert [every_100.crossed(Progress(step=s)) for s in (99, 100, 350)] == [0, 1, 2]


def test_an_axis_that_never_moves_backwards_is_not_refired():
    every = Every("1ep")
    assert every.crossed(Progress(epoch=1.2)) == 1
    assert every.crossed(Progress(epoch=0.9)) == 0  # an estimate revised downwards
    assert every.crossed(Progress(epoch=1.5)) == 0


def test_without_tokens_an_interval_in_tokens_never_fires_and_says_why():
    every = Every("1ktok")
    with pytest.warns(UserWarning, match="no batch has carried token information"):
        assert every.crossed(Progress(samples=10_000)) == 0
    with pytest.warns(UserWarning, match="never reached"):
        assert not Until("1ktok").reached(Progress(samples=10_000))


def test_a_schedule_started_mid_run_counts_from_there():
    every = Every("1ksp", after=Progress(samples=2500))
    assert [every.crossed(Progress(samples=s)) for s in (2600, 3000, 5200)] == [0, 1, 2]
    assert Every("1ktok", after=Progress(samples=5)).boundaries == 0  # no tokens yet: from zero


def test_intervals_must_be_more_than_zero():
    with pytest.raises(ValueError, match="more than 0"):
        Every("0sp")


def test_state_is_plain_json_and_a_restored_schedule_does_not_fire_again():
    every = Every("2.5Mtok")
    assert every.crossed(Progress(tokens=6_000_000)) == 2
    state = json.loads(json.dumps(every.state_dict()))
    assert state == {"every": "2.5Mtok", "boundaries": 2}
    restored = Every.from_state_dict(state)
    assert restored.crossed(Progress(tokens=6_100_000)) == 0
    assert restored.crossed(Progress(tokens=7_500_000)) == 1
    with pytest.raises(ValueError, match="is not Every"):
        Every("1Mtok").load_state_dict(state)
    with pytest.raises(ValueError, match="whole number"):
        Every("2.5Mtok").load_state_dict({"every": "2.5Mtok", "boundaries": -1})


def test_until_is_reached_once_the_amount_is_done_and_stays_reached():
    until = Until("0.3ep")
    assert [until.reached(Progress(epoch=e)) for e in (0.0, 0.29, 0.1 + 0.2, 0.5)] == [False, False, True, True]
    assert Until("0sp").reached(Progress())
    assert Until((2, "h")).reached(Progress(wall_clock=7200.0))


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 500_000)), max_size=30))
def test_the_decision_is_a_function_of_progress_only(jumps):
    # Two ranks receive identical Progress values from the row's collective: they decide the same.
    rank0, rank1 = Every("1ksp"), Every("100ktok")
    copy0, copy1 = Every("1ksp"), Every("100ktok")
    samples = tokens = 0
    for ds, dt in jumps:
        samples, tokens = samples + ds, tokens + dt
        p = Progress(samples=samples, tokens=tokens)
        assert (rank0.crossed(p), rank1.crossed(p)) == (copy0.crossed(p), copy1.crossed(p))


# ---------------------------------------------------------------- the plain loop: Run.due
def test_run_due_answers_once_per_crossing_and_resumes_without_refiring():
    answers = []
    with stream_metrics.init(backend="none") as run:
        for _ in range(10):
            run.update(samples=300, tokens=30_000)
            row = run.log({"loss": 1.0})
            answers.append((row.samples, run.due("1ksp", row), run.due("60ktok")))
        state = json.loads(json.dumps(run.state_dict()))
    assert [s for s, due, _ in answers if due] == [1200, 2100, 3000]
    assert [s for s, _, due in answers if due] == [600, 1200, 1800, 2400, 3000]
    assert state["schedules"] == {"1000sp": {"every": "1000sp", "boundaries": 3},
                                  "60ktok": {"every": "60ktok", "boundaries": 5}}

    with stream_metrics.init(backend="none", resume=state) as run:
        run.update(samples=100, tokens=10_000)
        assert not run.due("1ksp") and not run.due("60ktok")
        # An interval new to this session counts from the restored progress, not from zero.
        assert not run.due("500sp")
        run.update(samples=900, tokens=10_000)
        assert run.due("1ksp") and run.due("500sp") and not run.due("60ktok")


def test_a_corrupt_schedule_in_a_state_dict_is_refused():
    with stream_metrics.init(backend="none") as run:
        run.update(samples=5)
        run.due("1ksp")
        state = run.state_dict()
    state["schedules"]["1000sp"]["boundaries"] = "many"
    with pytest.raises(ValueError, match="corrupt stream_metrics state dict"):
        stream_metrics.init(backend="none", resume=state)


# ---------------------------------------------------------------- syncing only near a boundary: Lookahead
from stream_metrics.schedule import MARGIN, Lookahead, next_boundary  # noqa: E402


def simulate(increments, interval, row_every):
    """A Trainer's schedule decided at every step (the oracle) and by the Lookahead; (fired, fired, syncs)."""
    oracle, every, look = Every((interval, "sp")), Every((interval, "sp")), Lookahead((interval, "sp"))
    synced = Progress()
    position, fired_oracle, fired, syncs = 0, [], [], []
    for step, increment in enumerate(increments, start=1):
        position += increment
        now = Progress(step=step, samples=position)
        if oracle.crossed(now):
            fired_oracle.append(step)
        look.observe(synced, clock=synced.step)
        if look.near(next_boundary(every), step):
            synced = now
            syncs.append(step)
        if every.crossed(synced if synced is now else Progress(step=step, samples=synced.samples)):
            fired.append(step)
        if step % row_every == 0:
            synced = now  # a row: the ranks meet anyway
    return fired_oracle, fired, syncs


@given(st.integers(1, 50), st.integers(100, 5000), st.integers(1, 20), st.integers(0, 2 ** 32),
       st.integers(50, 400))
def test_within_the_margin_every_boundary_fires_where_a_sync_per_step_would_fire_it(base, interval, row_every,
                                                                                    seed, steps):
    import random

    rng = random.Random(seed)  # a local generator: the test draws from no global RNG
    # Each step carries between `base` and MARGIN * `base` samples: within the rule's assumption.
    increments = [rng.randint(base, int(MARGIN * base)) for _ in range(steps)]
    fired_oracle, fired, syncs = simulate(increments, interval, row_every)
    assert fired == fired_oracle
    assert set(fired) <= set(syncs) | {s for s in range(1, steps + 1) if s % row_every == 0}


def test_far_from_a_boundary_no_step_syncs():
    # 100 samples a step, a boundary every 100k, a row every 50 steps: a sync at the first steps and
    # near each boundary only, about log2(1000 steps between boundaries) + 2 each.
    fired_oracle, fired, syncs = simulate([100] * 5000, 100_000, row_every=50)
    assert fired == fired_oracle == [1000, 2000, 3000, 4000, 5000]
    assert len(syncs) <= 2 + 5 * 12, syncs
    assert all(s <= 2 or any(0 <= b - s <= 60 for b in fired) for s in syncs), syncs


def test_a_step_far_bigger_than_the_pace_fires_late_and_says_so():
    look, every = Lookahead("1ksp"), Every("1ksp")
    for step, samples in enumerate((0, 10, 20, 30), start=0):
        look.observe(Progress(step=step, samples=samples), clock=step)
    assert not look.near(next_boundary(every), clock=4)  # 30 + 2 * 10 < 1000: no sync at step 4
    with pytest.warns(UserWarning, match="fired up to 2 step"):
        look.observe(Progress(step=5, samples=1500), clock=5)  # a row at step 5 shows 1500
    assert look.near(next_boundary(every), clock=6) and every.crossed(Progress(samples=1500)) == 1


def test_steps_in_the_trainer_and_unsteady_epochs():
    assert not Lookahead("100ba", clock_is_step=True).near(100, clock=100)  # the caller knows the step
    look = Lookahead("1ep")
    for clock, epoch, source in ((0, 0.0, "none"), (1, 0.01, "shards"), (2, 0.02, "shards")):
        look.observe(Progress(step=clock, epoch=epoch, epoch_source=source), clock=clock)
    assert look.near(1, clock=3)  # a shard estimate can jump: sync every step
    look.observe(Progress(step=3, epoch=0.03, epoch_source="pass"), clock=3)
    assert not look.near(1, clock=4)


def test_run_due_without_a_progress_syncs_only_near_a_boundary(monkeypatch):
    with stream_metrics.init(backend="none") as run:
        syncs = []
        sync = run.tally.sync
        monkeypatch.setattr(run.tally, "sync", lambda *args: syncs.append(1) or sync(*args))
        answers = []
        for i in range(1, 2001):
            run.update(samples=10, tokens=1000)
            if run.due("5ksp"):
                answers.append(i)
        assert answers == [500, 1000, 1500, 2000]  # 10 samples a call: at 5000, 10000, ...
        assert len(syncs) < 100, len(syncs)  # instead of 2000
