"""Metric keys and values made safe for every backend, the same way for all of them.

MLflow allows letters, digits, ``_ - . / :`` and space, at most 250 characters, and a key that
``posixpath.normpath`` leaves unchanged; W&B accepts all of those. One rule set serves both, so a
metric has one name everywhere.
"""
from __future__ import annotations

import hashlib
import numbers
import posixpath
import re
import unicodedata
import warnings

MAX_KEY_LENGTH = 250
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-./: ]")


def sanitize_key(key) -> str:
    """The backend-safe form of one key; idempotent: ``sanitize_key(sanitize_key(k)) == sanitize_key(k)``.

    >>> sanitize_key("eval/ä loss@2")
    'eval/a loss_2'
    """
    text = unicodedata.normalize("NFKD", str(key)).encode("ascii", "ignore").decode("ascii")
    text = _normalise_parts(_NOT_ALLOWED.sub("_", text))
    if len(text) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = _normalise_parts(text[:MAX_KEY_LENGTH - 9]) + "_" + digest
    return text


def _normalise_parts(text: str) -> str:
    # Empty and '.' parts go ('//', a leading or trailing '/'), '..' becomes '__', and no part starts
    # or ends with a space, so posixpath.normpath leaves the result as it is.
    parts = [part.strip(" ") for part in text.split("/")]
    return "/".join("__" if part == ".." else part for part in parts if part not in ("", ".")) or "_"


def is_valid_key(key: str) -> bool:
    """True where MLflow and W&B both accept ``key`` unchanged."""
    return (0 < len(key) <= MAX_KEY_LENGTH and not _NOT_ALLOWED.search(key)
            and posixpath.normpath(key) == key and not key.startswith("/"))


class KeyMap:
    """One run's mapping from the keys users log to the names stored; never two keys to one name.

    Reserved names (the progress axes) are never handed to a user metric.
    """

    def __init__(self, reserved=()):
        self._names: dict[str, str] = {}
        self._taken: set[str] = set(reserved)
        self._warned: set[str] = set()

    def __call__(self, key) -> str:
        name = self._names.get(key)
        if name is not None:
            return name
        base = sanitize_key(key)
        name, n = base, 1
        while name in self._taken:
            n += 1
            suffix = f"_{n}"
            name = base[:MAX_KEY_LENGTH - len(suffix)] + suffix
        self._names[key] = name
        self._taken.add(name)
        if name != key and key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"stream_metrics: metric key {key!r} is stored as {name!r} (keys allow letters, digits, "
                          f"'_-./: ' and space, at most {MAX_KEY_LENGTH} characters, and no empty or '..' parts; "
                          "two keys never share a name)", stacklevel=4)
        return name


class _Skip(Exception):
    pass


_warned_values: set[tuple[str, str]] = set()


def _warn_value_once(key: str, kind: str, message: str) -> None:
    if (key, kind) not in _warned_values:
        _warned_values.add((key, kind))
        warnings.warn(f"stream_metrics: metric {key!r}: {message} (warned once per key)", stacklevel=4)


def to_number(key: str, value):
    """A metric value as an int or float, or raise _Skip after a one-time warning saying why.

    Conversions (documented in the README): bool -> 0/1, NumPy scalars and 0-d or 1-element tensors
    -> their number (a host sync: this happens when a row is written, never per step); NaN and
    +/-inf are kept (a diverging loss is worth seeing). None, strings and multi-element arrays are
    skipped with a warning naming the fix.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if value is None:
        _warn_value_once(key, "none", "value None is skipped; log a number")
        raise _Skip
    if isinstance(value, (str, bytes)):
        try:
            return float(value)
        except ValueError:
            _warn_value_once(key, "str", f"the string {str(value)[:40]!r} is not a number and is skipped; "
                                         "log text as a config value instead")
            raise _Skip from None
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        count = numel() if callable(numel) else numel
    except Exception:
        count = None
    if count == 1 and hasattr(value, "item"):
        # The one host sync for a device value, taken as the row is written.
        return to_number(key, value.item())
    if count is not None and hasattr(value, "shape"):
        _warn_value_once(key, "array", f"an array of {count} elements is skipped; log a scalar such as "
                                       "value.mean() or one key per element")
        raise _Skip
    try:
        number = float(value)
    except (TypeError, ValueError):
        _warn_value_once(key, "type", f"a {type(value).__name__} is not a number and is skipped")
        raise _Skip from None
    return number


def flatten(metrics, prefix: str = ""):
    """Nested dicts become '/'-joined keys: ``{"eval": {"loss": 1}}`` -> ``{"eval/loss": 1}``."""
    for key, value in metrics.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, full)
        else:
            yield full, value


def clean_metrics(metrics, key_map: KeyMap) -> dict:
    """User metrics as ``{stored name: number}``: flattened, converted, sanitised; bad values skipped."""
    row = {}
    for key, value in flatten(metrics):
        try:
            number = to_number(key, value)
        except _Skip:
            continue
        row[key_map(key)] = number
    return row
