"""Schedules by amount of training: evaluate ``Every("500ksp")``, stop ``Until("2Btok")``.

Each decision is a pure function of Progress values, which every rank receives identically from a
row's collective, so every rank decides the same thing without another collective.

>>> from stream_metrics import Progress
>>> every = Every("1ksp")
>>> [every.crossed(Progress(samples=s)) for s in (600, 999, 1000, 1500, 4200, 4300)]
[0, 0, 1, 0, 3, 0]
>>> Until("2.5ksp").reached(Progress(samples=2500))
True
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ._checks import warn_once
from .amount import Amount, as_amount
from .progress import Progress

if TYPE_CHECKING:
    from .run import Run
    from .tally import Tally


class Every:
    """An interval: its boundaries are at 1, 2, 3, ... times the amount, counted from the run's start.

    ``crossed(progress)`` answers how many boundaries were crossed since the previous call, so each
    boundary is counted exactly once: a batch that jumps over three boundaries gives one answer of 3
    (evaluating three times on the same weights would be wasted), and the next call gives 0.
    ``state_dict()`` keeps the count, so a resumed run does not fire again for boundaries it passed.
    ``after``: a Progress up to which boundaries count as passed (for a schedule that starts mid-run).
    """

    def __init__(self, amount, after=None):
        self.amount: Amount = as_amount(amount)
        if self.amount.value == 0:
            raise ValueError(f"Every({str(self.amount)!r}): an interval must be more than 0")
        self.boundaries = 0  # boundaries crossed so far
        start = self.amount.of(after) if after is not None else None
        if start is not None:  # a schedule that starts mid-run: the boundaries up to ``after`` are passed
            self.boundaries = _multiples(start, self.amount.value)

    def crossed(self, progress) -> int:
        """How many boundaries ``progress`` has crossed since the previous call (0: none); truthy when due."""
        position = self.amount.of(progress)
        if position is None:
            warn_once(f"every-{self.amount.unit}", f"Every({str(self.amount)!r}) never fires: the run has no "
                                                   f"{self.amount.field} (no batch has carried token information)")
            return 0
        reached = _multiples(position, self.amount.value)
        new = max(0, reached - self.boundaries)
        self.boundaries = max(self.boundaries, reached)
        return new

    def state_dict(self) -> dict:
        """Plain, JSON-safe state: ``{"every": "500ksp", "boundaries": 3}``."""
        return {"every": str(self.amount), "boundaries": self.boundaries}

    def load_state_dict(self, state: dict) -> None:
        if as_amount(state["every"]) != self.amount:
            raise ValueError(f"saved schedule Every({state['every']!r}) is not Every({str(self.amount)!r})")
        boundaries = state["boundaries"]
        if isinstance(boundaries, bool) or not isinstance(boundaries, int) or boundaries < 0:
            raise ValueError(f"saved schedule boundaries={boundaries!r} is not a whole number >= 0")
        self.boundaries = boundaries

    @classmethod
    def from_state_dict(cls, state: dict) -> "Every":
        every = cls(state["every"])
        every.load_state_dict(state)
        return every

    def __repr__(self) -> str:
        return f"Every({str(self.amount)!r})"


class Until:
    """A target: ``reached(progress)`` is True once the run has done the amount (and stays True)."""

    def __init__(self, amount):
        self.amount: Amount = as_amount(amount)

    def reached(self, progress) -> bool:
        position = self.amount.of(progress)
        if position is None:
            warn_once(f"until-{self.amount.unit}", f"Until({str(self.amount)!r}) is never reached: the run has no "
                                                   f"{self.amount.field} (no batch has carried token information)")
            return False
        return self.amount.value == 0 or _multiples(position, self.amount.value) >= 1

    def __repr__(self) -> str:
        return f"Until({str(self.amount)!r})"


def _multiples(position, interval) -> int:
    """Whole multiples of ``interval`` in ``position``; exact for counts, forgiving of float rounding
    elsewhere (0.3 epochs hold three 0.1-epoch intervals, though 0.3 / 0.1 < 3 in floating point)."""
    if isinstance(position, int) and isinstance(interval, int):
        return position // interval
    return math.floor(position / interval + 1e-9)


#: Between two syncs, a run is taken to go at most this many times its fastest recent pace.
MARGIN = 2.0
#: The pace is the largest increase per tick over this many of the latest intervals between syncs.
PACE_WINDOW = 8
#: Intervals seen before the pace is trusted (one interval can be a poor sample of the run's pace).
PACE_MIN = 2
#: Epoch estimates that grow in proportion to the data (or the Trainer's step); the others can jump
#: when a pass ends (a stream's size was unknown or estimated), so they are not projected.
STEADY_EPOCH_SOURCES = ("pass", "sized")


class Lookahead:
    """Whether a boundary may have been reached, judged without a collective: when the ranks must sync.

    Every rank holds the same synced Progress (each row's collective hands it to all of them) and the
    same clock (the Trainer's optimizer step; in a plain loop, how many times the schedule was asked).
    From the syncs it sees, ``observe`` keeps the pace: the largest increase per tick between two syncs,
    over the last ``PACE_WINDOW`` intervals (trusted once ``PACE_MIN`` are seen). ``near(target, clock)``
    is True when the last synced position plus ``MARGIN`` times that pace for every tick since could
    reach ``target``; only then do the ranks sync to decide. The inputs are identical on every rank, so
    is the answer. Near a boundary the ranks sync at every step, so it fires at the first step at or
    past it, as with a sync per step.
    Before any pace is known, and for epoch estimates that can jump, it answers True (sync).

    >>> from stream_metrics import Progress
    >>> look = Lookahead("1ksp")
    >>> look.observe(Progress(samples=0), clock=0); look.near(1000, clock=1)   # no pace yet: sync
    True
    >>> look.observe(Progress(samples=100), clock=1)     # one interval: not trusted yet
    >>> look.observe(Progress(samples=200), clock=2)     # 100 samples a step: 200 with the margin
    >>> [look.near(1000, clock=c) for c in (3, 5, 6)]    # 200 + 3 * 200 < 1000 <= 200 + 4 * 200
    [False, False, True]
    """

    def __init__(self, amount, *, clock_is_step: bool = False):
        self.amount: Amount = as_amount(amount)
        # The Trainer's clock is the optimizer step itself: a schedule in steps needs no sync at all.
        self.exact = clock_is_step and self.amount.field == "step"
        self.position: int | float | None = None  # at the last sync seen, in the amount's unit (None: unknown)
        self.clock: int | None = None       # the clock at that sync
        self.source: str | None = None      # the epoch estimate's source at that sync
        self.samples = 0                    # samples at that sync
        self.paces: list[float] = []        # increase per tick, for each of the latest intervals
        self.calls = 0                      # a clock for callers that count their own calls (Run.due)
        self._seen: Progress | None = None  # the Progress last observed (a new object at every sync)
        self._target: int | float | None = None  # the target last asked about (to notice one reached unforeseen)

    def observe(self, progress, clock: int) -> None:
        """Take in a synced ``progress`` (the same on every rank), made at ``clock``. Seen before: nothing."""
        if progress is self._seen:
            return
        self._seen = progress
        position = self.amount.of(progress)
        if position is not None and self.position is not None and self.clock is not None:
            if clock > self.clock:
                ticks = clock - self.clock
                if self.paces and self._target is not None:
                    bound = self.position + ticks * MARGIN * max(self.paces)
                    if bound < self._target <= position:
                        warn_once(f"lookahead-{self.amount.unit}",
                                  f"the run went more than {MARGIN:g} times faster in {self.amount.field} than "
                                  f"before, so a {self.amount} boundary fired up to {ticks} step(s) after it "
                                  f"was reached (docs/schedule.md)")
                self.paces = (self.paces + [max(0, position - self.position) / ticks])[-PACE_WINDOW:]
            elif clock < self.clock:  # a new session: the pace seen before says nothing
                self.paces = []
        self.position, self.clock = position, clock
        self.source, self.samples = progress.epoch_source, progress.samples

    def near(self, target, clock: int) -> bool:
        """True when ``target`` (in the amount's unit) may have been reached by ``clock``: sync then."""
        self._target = target
        if self.exact:
            return False  # the caller knows the step: it decides without a sync
        if self.position is None:
            # No token information: before any batch, sync (the first may carry some); after batches
            # that carried none, nothing can be reached (Every warns when asked).
            return self.samples == 0
        if self.position >= target:
            return True
        if self.amount.field == "epoch" and self.source not in STEADY_EPOCH_SOURCES:
            return True
        pace = max(self.paces, default=0)
        if len(self.paces) < PACE_MIN or pace <= 0 or self.clock is None:
            return True
        return self.position + (clock - self.clock) * MARGIN * pace >= target - 1e-9 * abs(target)


def next_boundary(every: Every):
    """The next multiple of the interval that ``every`` has not counted yet, in its unit."""
    return (every.boundaries + 1) * every.amount.value


class Schedules:
    """The schedules a Run keeps by name (``Run.schedule``, ``Run.due``; in its ``state_dict()``), and
    the ``Lookahead`` that lets ``due()`` skip the ranks' sync when no boundary can be near."""

    def __init__(self) -> None:
        self.kept: dict[str, Every] = {}
        self._lookaheads: dict[str, tuple[Progress, Lookahead]] = {}  # name -> (session's base, Lookahead)

    def get(self, every: Any, name: str | None, session: Progress) -> Every:
        """The ``Every`` kept under ``name`` (default: the amount's text); one new to this session
        (or changed across a resume) counts from ``session``, the totals the session started from."""
        new = Every(every, after=session)
        name = str(new.amount) if name is None else name
        kept = self.kept.get(name)
        if kept is None or kept.amount != new.amount:
            kept = self.kept[name] = new
        return kept

    def due(self, every: Any, progress: Progress | None, tally: Tally) -> bool:
        """``Run.due``: from ``progress`` where given; else from ``tally``'s latest sync, syncing near a boundary."""
        schedule = self.get(every, None, tally.base)
        if progress is not None:
            if not isinstance(progress, Progress):
                raise TypeError(f"due({every!r}, {type(progress).__name__}): the second argument is the Progress "
                                "that log() or run.progress returned (or leave it out)")
            return schedule.crossed(progress) > 0
        look = self._lookahead(str(schedule.amount), schedule.amount, tally.base)
        # The clock is this schedule's calls, the same on every rank; a sync seen now (a row) was made
        # after the previous call.
        look.observe(tally.latest, clock=look.calls)
        look.calls += 1
        if look.near(next_boundary(schedule), look.calls):
            return schedule.crossed(tally.sync("progress")) > 0
        return schedule.crossed(tally.latest) > 0  # below the boundary: 0 (warns where an axis is missing)

    def _lookahead(self, name: str, amount: Amount, session: Progress) -> Lookahead:
        kept_session, look = self._lookaheads.get(name, (None, None))
        if look is None or kept_session is not session or look.amount != amount:  # new, or after a resume
            look = Lookahead(amount)
            self._lookaheads[name] = (session, look)
        return look

    def state_dict(self) -> dict:
        return {name: every.state_dict() for name, every in self.kept.items()}

    @staticmethod
    def read_state(state: Any) -> dict[str, Every]:
        """The schedules ``state_dict()`` saved (or None), to put in ``kept`` once the state is all read."""
        return {str(name): Every.from_state_dict(s) for name, s in dict(state or {}).items()}


class StepSchedules:
    """``eval_every`` / ``save_every`` / ``stop_at`` where the clock is the optimizer step (the Trainer).

    No collective on most steps: from the last synced Progress (every row brings one, identical on
    every rank) and the pace seen between syncs, a ``Lookahead`` per schedule tells when a boundary
    may be near; only then do the ranks sync (one collective) and decide from that Progress. The
    clock is the optimizer step, the same on every rank, so every rank syncs at the same steps and
    decides the same. The ``Every`` schedules are the run's (``Run.schedule``: kept in its state).
    """

    def __init__(self, eval_every: str | None = None, save_every: str | None = None, stop_at: str | None = None):
        self.eval_every, self.save_every, self.stop_at = eval_every, save_every, stop_at
        self._looks: tuple[Run | None, dict[str, Lookahead]] = (None, {})  # lookaheads last as long as the run

    def __bool__(self) -> bool:
        return bool(self.eval_every or self.save_every or self.stop_at)

    def decide(self, run: Run, step: int) -> tuple[bool, bool, bool, Progress | None]:
        """(evaluate, save, stop) at ``step``, and the Progress the ranks synced for it (None: no sync)."""
        plans = self._plans(run)
        last = run.last_progress  # the latest sync: a row, a checkpoint's state, or this method's
        for _, look in plans:
            look.observe(last, clock=last.step)
        synced = any(look.near(target, step) for target, look in plans)
        # Below every target by the lookahead, nothing can fire (Every/Until still warn about an axis
        # that is missing); steps are known exactly without a sync.
        progress = run.progress if synced else dataclasses.replace(last, step=step)
        evaluate = bool(self.eval_every and run.schedule(self.eval_every, name="eval_every").crossed(progress))
        save = bool(self.save_every and run.schedule(self.save_every, name="save_every").crossed(progress))
        stop = bool(self.stop_at and Until(self.stop_at).reached(progress))
        return evaluate, save, stop, (progress if synced else None)

    def _plans(self, run: Run) -> list[tuple[int | float, Lookahead]]:
        """(next target, Lookahead) for each schedule set."""
        if self._looks[0] is not run:
            self._looks = (run, {})
        looks = self._looks[1]
        plans = []
        for name, amount in (("eval_every", self.eval_every), ("save_every", self.save_every)):
            if amount:
                every = run.schedule(amount, name=name)
                look = looks.get(name)
                if look is None or look.amount != every.amount:
                    look = looks[name] = Lookahead(every.amount, clock_is_step=True)
                plans.append((next_boundary(every), look))
        if self.stop_at:
            look = looks.get("stop_at")
            if look is None or str(look.amount) != self.stop_at:
                look = looks["stop_at"] = Lookahead(self.stop_at, clock_is_step=True)
            plans.append((look.amount.value, look))
        return plans
