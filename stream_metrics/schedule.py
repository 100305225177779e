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

import math

from .amount import Amount, as_amount
from .counting import warn_once


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
