"""Argument checks and one-time warnings, in one place so every message reads the same.

    >>> whole_number("dataset_size", 1000, minimum=1)
    1000
    >>> whole_number("buffer_rows", -1)
    Traceback (most recent call last):
    ...
    ValueError: buffer_rows=-1 must be a whole number >= 0

A bad argument is one ``ValueError`` naming the argument, the value and what it must be.
One-time warnings are process-wide (a training loop calls us thousands of times);
``reset_warnings()`` forgets every one, so a test, or a second run in a notebook, sees them again.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

_warned: set[str] = set()


def warn_once(kind: str, message: str, stacklevel: int = 3) -> None:
    """Warn ``stream_metrics: message`` the first time ``kind`` comes up in this process, never again."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"stream_metrics: {message}", stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget every one-time warning already given."""
    _warned.clear()


def whole_number(name: str, value: Any, *, minimum: int = 0, hint: str = "") -> int:
    """``value`` as an int where it is a whole number >= ``minimum`` (``8.0`` counts, ``True`` does not)."""
    whole = None
    if isinstance(value, bool):
        pass  # a flag, not a count
    elif isinstance(value, numbers.Integral):
        whole = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        whole = int(float(value))
    if whole is None or whole < minimum:
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}" + (f": {hint}" if hint else ""))
    return whole


def non_negative(name: str, value: Any, *, unit: str = "", hint: str = "", infinite: bool = False) -> float:
    """``value`` where it is a finite number >= 0 (``unit`` names what it counts, e.g. "seconds");
    ``infinite``: ``math.inf`` is allowed too (a timeout that waits for ever)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0 or (
            math.isinf(value) and not infinite):
        what = f"a number of {unit}" if unit else "a number"
        raise ValueError(f"{name}={value!r} must be {what} >= 0" + (f": {hint}" if hint else ""))
    return float(value)



def missing_extra(exc: ImportError, module: str, extra: str, feature: str) -> ImportError:
    """The error to raise where importing ``module`` failed: one sentence naming the extra to install.

        try:
            from transformers import TrainerCallback
        except ImportError as exc:
            raise missing_extra(exc, "transformers", "hf", "stream_metrics.hf") from None
    """
    if exc.name and exc.name.split(".")[0] != module:
        return exc  # something else is missing or broken: its own message says more than ours could
    return ImportError(f'{feature} needs {module}, which is not installed: pip install "stream_metrics[{extra}]"')
