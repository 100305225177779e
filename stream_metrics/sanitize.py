"""Metric keys and values made safe for every backend, the same way for all of them.

MLflow allows letters, digits, ``_ - . / :`` and space, at most 250 characters, and a key that
``posixpath.normpath`` leaves unchanged and that does not start with ``..``; W&B keeps keys that
start with ``_`` for itself (``_step``, ``_runtime``). One rule set serves both, so a metric has
one name everywhere: other characters become ``_`` (accents are dropped first), empty and ``.``
parts go, a ``..`` part becomes ``__``, leading ``_``, ``.`` and spaces go, an empty key becomes
``metric``, and a key over 250 characters is cut and ends with a hash of the whole.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import posixpath
import re
import unicodedata
import warnings

from ._checks import warn_once

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
    # or ends with a space, so posixpath.normpath leaves the result as it is. The key starts with
    # neither '..' (MLflow) nor '_' (W&B's own keys): leading '_', '.' and spaces go.
    parts = ["__" if part == ".." else part for part in (p.strip(" ") for p in text.split("/"))
             if part not in ("", ".")]
    while parts and not parts[0].lstrip("_. "):
        parts.pop(0)
    if parts:
        parts[0] = parts[0].lstrip("_. ")
    return "/".join(parts) or "metric"


def is_valid_key(key: str) -> bool:
    """True where ``key`` is stored unchanged: MLflow and W&B both accept it as it is."""
    return (isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and not _NOT_ALLOWED.search(key)
            and posixpath.normpath(key) == key and sanitize_key(key) == key)


class KeyMap:
    """One run's mapping from the keys users log to the names stored; never two keys to one name.

    Reserved names (the progress axes) are never handed to a user metric.
    """

    def __init__(self, reserved=(), what: str = "metric key"):
        self.what = what  # how the warning names the keys: "metric key", "parameter"
        self._names: dict[str, str] = {}
        self._taken: set[str] = set(reserved)
        self._warned: set[str] = set()

    def __call__(self, key, text: str | None = None) -> str:
        """The stored name of ``key``: any hashable identity (a nested metric's path is a tuple);
        ``text`` is how the user wrote it (``str(key)`` by default), sanitised into the name."""
        name = self._names.get(key)
        if name is not None:
            return name
        text = str(key) if text is None else text
        base = sanitize_key(text)
        name, n = base, 1
        while name in self._taken:
            n += 1
            suffix = f"_{n}"
            name = _normalise_parts(base[:MAX_KEY_LENGTH - len(suffix)] + suffix)
        self._names[key] = name
        self._taken.add(name)
        if name != text and key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"stream_metrics: {self.what} {text!r} is stored as {name!r} (keys allow letters, digits, "
                          f"'_-./: ' and space, at most {MAX_KEY_LENGTH} characters, no empty or '..' parts, and do "
                          "not start with '_' or '.'; two keys never share a name)", stacklevel=4)
        return name


class _Skip(Exception):
    pass


def _warn_value_once(key: str, kind: str, message: str) -> None:
    warn_once(f"value:{kind}:{key}", f"metric {key!r}: {message} (warned once per key)", stacklevel=5)


def to_number(key: str, value):
    """A metric value as an int or float, or raise _Skip after a one-time warning saying why.

    Stored as they are: ints, floats, NumPy scalars, 0-d and 1-element tensors and arrays (read
    when the row is written, the one host sync). Converted, with a one-time warning per key:
    bools -> 0/1; numeric strings ("0.5") -> their number; NaN and +/-inf are kept (a diverging
    loss is worth seeing; MLflow itself stores +/-inf as +/-1.8e308). Skipped, with a one-time
    warning naming the fix: None, other strings, multi-element arrays, values that cannot be read
    (a tensor on the meta device), ints too large for a float, anything else.
    """
    if type(value) is float and value - value == 0.0:  # the common value: a finite float (a loss read)
        return value
    if isinstance(value, bool):
        _warn_value_once(key, "bool", f"the bool {value} is stored as {int(value)}")
        return int(value)
    if isinstance(value, numbers.Integral):
        try:
            float(value)
        except OverflowError:
            _warn_value_once(key, "big", "an int too large for a 64-bit float is skipped; log it as a float")
            raise _Skip from None
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            _warn_value_once(key, "nonfinite", f"the value {number} is stored as it is (MLflow stores +/-inf "
                                               "as +/-1.8e308)")
        return number
    if value is None:
        _warn_value_once(key, "none", "value None is skipped; log a number")
        raise _Skip
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        try:
            number = float(text)
        except ValueError:
            _warn_value_once(key, "str", f"the string {text[:40]!r} is not a number and is skipped; "
                                         "log text as a config value instead")
            raise _Skip from None
        _warn_value_once(key, "numeric-str", f"the string {text[:40]!r} is stored as the number {number}")
        return to_number(key, number)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        count = numel() if callable(numel) else numel
    except Exception:
        count = None
    if count == 1 and hasattr(value, "item"):
        try:
            item = value.item()  # the one host sync for a device value, taken as the row is written
        except Exception as exc:
            _warn_value_once(key, "unreadable", f"the value cannot be read ({type(exc).__name__}: {exc}) and is "
                                                "skipped; log a tensor with data, or a number")
            raise _Skip from None
        return to_number(key, item)
    if count is not None and hasattr(value, "shape"):
        _warn_value_once(key, "array", f"an array of {count} elements is skipped; log a scalar such as "
                                       "value.mean() or one key per element")
        raise _Skip
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        _warn_value_once(key, "type", f"a {type(value).__name__} is not a number and is skipped; log a number, "
                                      "or one key per element")
        raise _Skip from None
    return to_number(key, number)


def flatten(metrics, prefix: str = "", path: tuple = ()):
    """Nested dicts become '/'-joined keys: ``{"eval": {"loss": 1}}`` -> ``("eval", "loss"), "eval/loss", 1``.

    Yields ``(identity, text, value)``: a top-level key is its own identity, a nested one its path
    (a tuple), so ``{"a/b": 1}`` and ``{"a": {"b": 2}}``, or the keys ``7`` and ``"7"``, stay two
    metrics (KeyMap names the second ``a/b_2``, with its warning) rather than one overwriting the other.
    """
    for key, value in metrics.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, full, (*path, key))
        else:
            yield ((*path, key) if path else key), full, value


class Pending:
    """A one-element device tensor metric, read with the row's counts in its one host sync."""

    __slots__ = ("key", "name", "tensor", "value")

    def __init__(self, key: str, name: str, tensor):
        self.key, self.name, self.tensor, self.value = key, name, tensor, None


_TORCH: list = []  # [torch], imported at the first metric (the CLI imports this module without torch)


def _torch():
    if not _TORCH:
        import torch

        _TORCH.append(torch)
    return _TORCH[0]


def _deferrable(value) -> bool:
    # A one-element real tensor with data: read later, together with the counts (distributed.gather).
    torch = _torch()
    return isinstance(value, torch.Tensor) and _deferrable_tensor(value, torch)


def _deferrable_tensor(value, torch) -> bool:
    """``_deferrable`` for a value known to be a tensor (clean_metrics' path for a known key)."""
    dtype = value.dtype
    return not dtype.is_complex and dtype is not torch.bool and value.numel() == 1 and not value.is_meta


def clean_metrics(metrics, key_map: KeyMap, pending: list | None = None) -> dict:
    """User metrics as ``{stored name: number}``: flattened, converted, sanitised; bad values skipped.

    With a ``pending`` list, one-element tensors are not read here: each is appended to it as a
    ``Pending`` (its place in the row kept), and ``resolve`` fills them in once the row's single
    host sync has read them all together with the counts. Without it, each is read with ``.item()``.
    """
    row = {}
    names = key_map._names
    torch = _torch()
    tensor = torch.Tensor
    for key, value in metrics.items():
        # The common row, every step: finite floats under keys seen before; nothing to convert or check.
        kind = type(value)
        if kind is float and value - value == 0.0 and key in names:
            row[names[key]] = value
            continue
        if kind is tensor and pending is not None and key in names and _deferrable_tensor(value, torch):
            name = names[key]  # a tensor under a key seen before (a loss): read with the counts
            pending.append(Pending(key, name, value))
            row[name] = None
            continue
        for ident, full, item in flatten({key: value}):
            if pending is not None and _deferrable(item):
                name = key_map(ident, full)
                pending.append(Pending(full, name, item))
                row[name] = None  # keeps the row's order; filled in by resolve()
                continue
            try:
                number = to_number(full, item)
            except _Skip:
                continue
            row[key_map(ident, full)] = number
    return row


def resolve(row: dict, pending: list) -> dict:
    """``row`` with every ``Pending`` metric's value (read by the row's sync) put in its place."""
    for item in pending:
        try:
            row[item.name] = to_number(item.key, item.value)
        except _Skip:
            row.pop(item.name, None)
    return row
