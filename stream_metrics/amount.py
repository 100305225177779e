"""Amounts of training: ``"500ksp"``, ``"2.5Mtok"``, ``"0.5ep"``, ``"1000steps"``, ``"30min"``, parsed in one place.

>>> parse_amount("2.5Mtok")
Amount(value=2500000, unit='tok')
>>> str(parse_amount("1000steps")), str(Amount(0.5, "ep")), str(as_amount((30, "min")))
('1000ba', '0.5ep', '30min')
"""
from __future__ import annotations

import math
import re
import reprlib
import sys
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

# unit -> (the Progress field it measures, how many of that field's units make one of it).
UNITS = {
    "sp": ("samples", 1),
    "tok": ("tokens", 1),
    "ep": ("epoch", 1),
    "ba": ("step", 1),
    "s": ("wall_clock", 1),
    "min": ("wall_clock", 60),
    "h": ("wall_clock", 3600),
    "flop": ("flops", 1),
}
ALIASES = {"steps": "ba", "flops": "flop"}  # other spellings, and the unit each stands for
# Multipliers. "K" and "G" are accepted spellings of k and B; "m" is not one (milli? minutes?).
SUFFIXES = {"k": 1_000, "K": 1_000, "M": 1_000_000, "B": 1_000_000_000, "G": 1_000_000_000,
            "T": 1_000_000_000_000}
_WRITTEN = ("T", "B", "M", "k")  # the suffixes str() writes, largest first

_UNIT_NAMES = sorted([*UNITS, *ALIASES], key=len, reverse=True)  # longest first: "steps" before "s"
_PATTERN = re.compile(r"\s*(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*"
                      rf"(?P<suffix>[{''.join(SUFFIXES)}]?)\s*(?P<unit>{'|'.join(_UNIT_NAMES)})\s*")
FORMS = ("a number, an optional multiplier k (or K) = 1e3, M = 1e6, B (or G) = 1e9, T = 1e12 or an exponent, "
         "and a unit: sp (samples), tok (tokens), ep (estimated epochs), ba or steps (optimizer steps), "
         "s, min, h (wall-clock), flop (training FLOPs); for example '500ksp', '2.5Mtok', '5e5sp', '0.5ep', "
         "'1000steps', '30min', '1e18flop'")


@dataclass(frozen=True)
class Amount:
    """A number and a unit: how much training, on one progress axis.

    ``value`` is an int when it is whole, a float otherwise; ``unit`` is one of ``UNITS``
    (``"steps"`` is stored as ``"ba"``).

    >>> from stream_metrics import Progress
    >>> p = Progress(samples=250_000, wall_clock=5400.0)
    >>> Amount(500_000, "sp").of(p), Amount(1, "h").of(p)   # how far p is, in each amount's unit
    (250000, 1.5)
    """

    value: int | float
    unit: str

    def __post_init__(self):
        unit = ALIASES.get(self.unit, self.unit)
        if unit not in UNITS:
            raise ValueError(f"unit {self.unit!r} is not one of {', '.join([*UNITS, *ALIASES])}")
        value = self.value
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond any float
            raise ValueError(f"{reprlib.repr(value)} is too large an amount of training") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"an amount of training must be a finite number >= 0, not {reprlib.repr(value)}")
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "value", int(value) if number.is_integer() else number)

    @property
    def field(self) -> str:
        """The Progress field this amount measures (``"samples"``, ``"tokens"``, ..., ``"wall_clock"``)."""
        return UNITS[self.unit][0]

    def of(self, progress) -> float | int | None:
        """How far ``progress`` is, in this amount's unit (None where the axis is unknown: no tokens)."""
        position = getattr(progress, self.field)
        if position is None:
            return None
        scale = UNITS[self.unit][1]
        return position if scale == 1 else position / scale

    def __str__(self) -> str:
        return _format_number(self.value) + self.unit


def parse_amount(text: str) -> Amount:
    """Read an amount of training from text: ``parse_amount("500ksp") == Amount(500_000, "sp")``."""
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not an amount of training: write {FORMS}")
    written = Decimal(match["number"])
    if written and written.adjusted() > 400:  # far beyond any float: refused before any arithmetic
        raise ValueError(f"{text!r} is too large an amount of training")
    number = Fraction(written) * SUFFIXES.get(match["suffix"], 1)  # exact: "2.5M" is 2500000, not 2499999.99
    value = number.numerator if number.denominator == 1 else float(number)
    if number and not value:
        raise ValueError(f"{text!r} is too small an amount of training (below the smallest float)")
    if number > sys.float_info.max:
        raise ValueError(f"{text!r} is too large an amount of training")
    return Amount(value, match["unit"])


def as_amount(amount) -> Amount:
    """An Amount from an Amount, a string (``"1Mtok"``) or a (number, unit) pair (``(1e6, "tok")``)."""
    if isinstance(amount, Amount):
        return amount
    if isinstance(amount, str):
        return parse_amount(amount)
    if isinstance(amount, tuple) and len(amount) == 2:
        return Amount(*amount)
    raise ValueError(f"{amount!r} is not an amount of training: pass an Amount, a (number, unit) pair, or text: "
                     f"{FORMS}")


def _format_number(value: int | float) -> str:
    """Short exact text for a value: 2500000 -> "2.5M", 0.5 -> "0.5", 1234567 -> "1234567", 1000 -> "1000"."""
    if isinstance(value, float):
        return repr(value)  # repr round-trips exactly, exponent and all
    plain = str(value)
    if value < 10_000:
        return plain
    for suffix in _WRITTEN:
        whole, rest = divmod(value, SUFFIXES[suffix])
        thousandths, leftover = divmod(rest * 1000, SUFFIXES[suffix])
        text = f"{whole}.{thousandths:03d}".rstrip("0").rstrip(".") + suffix
        if whole and not leftover and len(text) < len(plain):
            return text
    return plain
