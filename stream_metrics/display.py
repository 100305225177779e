"""A progress display in data seen: samples, tokens, the estimated epoch, tokens per second, an ETA.

On a terminal it is one tqdm bar: the Trainer's own, with our fields as its postfix, or a bar of
its own where there is no other; elsewhere (CI, a log file) it writes a plain line at most every
``every_seconds`` of the run's clock. It only reads the Progress values it is given: it never
brings the ranks together by itself.

>>> import sys
>>> from stream_metrics import Progress
>>> display = ProgressDisplay(targets={"stop_at": "1Mtok"}, file=sys.stdout, interactive=False)
>>> display.update(Progress(step=1, samples=32, tokens=2_000, epoch=0.01, wall_clock=1.0))
step 1 | 32 samples | 2k tokens | epoch 0.01 | 0% of 1M tokens (stop_at)
>>> display.update(Progress(step=9, samples=320, tokens=200_000, epoch=0.1, wall_clock=41.0))
step 9 | 320 samples | 200k tokens | epoch 0.10 | 4.95k tok/s | 20% of 1M tokens (stop_at) | ETA 0:02:42
"""
from __future__ import annotations

import sys
import time
from typing import Any

from . import distributed
from .amount import SUFFIXES, Amount, as_amount
from .progress import Progress


class ProgressDisplay:
    """Show ``update(progress)`` calls as a bar (terminal) or as plain lines (not a terminal).

    ``targets``: an amount, a list of them, or a dict naming each (``{"stop_at": "2Btok",
    "max_steps": (1000, "ba")}``); the ETA is to the nearest, at the rate observed since the
    display started, and the line says which target it counts to.
    ``interactive``: bar or lines; by default a bar when ``file`` (stderr) is a terminal.
    ``bar``: a tqdm bar someone else owns (the Trainer's), or a function returning it (or None while
    there is none): on a terminal our fields become its postfix, so one bar shows steps and data.
    Only the main process shows anything.
    """

    def __init__(self, targets=(), *, file=None, interactive: bool | None = None, every_seconds: float = 30.0,
                 desc: str = "data seen", bar=None):
        self.targets = _amounts(targets)
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) or every_seconds < 0:
            raise ValueError(f"every_seconds={every_seconds!r} must be a number of seconds >= 0")
        self.file = file if file is not None else sys.stderr
        self.interactive = _isatty(self.file) if interactive is None else interactive
        self.every_seconds = every_seconds
        self.desc = desc
        self.enabled = distributed.is_main()
        self.redraw_seconds = 0.5  # a bar redraws at most twice a second
        self._first: Progress | None = None
        self._latest: Progress | None = None
        self._printed: Progress | None = None
        self._shown_at: float | None = None  # time.monotonic() of the last line or redraw
        self._bar: Any = None  # our own tqdm bar, where we draw one
        self._borrowed = bar if callable(bar) or bar is None else (lambda: bar)

    # ------------------------------------------------------------------ what is shown
    def describe(self, progress, *, step: bool = True) -> str:
        """The text of one line: ``step 9 | 320 samples | 200k tokens | epoch 0.10 | 4.95k tok/s | ...``.

        Every field is a number and its unit; ``step=False`` leaves the step out (a bar showing steps).
        """
        parts = [f"step {_count(progress.step)}"] if step else []
        parts.append(f"{_count(progress.samples)} samples")
        if progress.tokens is not None:
            parts.append(f"{_count(progress.tokens)} tokens")
        parts.append(f"epoch {progress.epoch:.2f}")
        rate_field, rate_unit = ("tokens", "tok/s") if progress.tokens is not None else ("samples", "samples/s")
        rate = self._rate(progress, rate_field)
        if rate is not None:
            parts.append(f"{_count(rate)} {rate_unit}")
        nearest = self._nearest(progress)
        if nearest is not None:
            (label, target), fraction, eta = nearest
            named = f" ({label})" if label else ""
            parts.append(f"{min(fraction, 1.0):.0%} of {_amount_text(target)}{named}")
            if eta is not None:
                parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def _rate(self, progress, field: str) -> float | None:
        """Units of ``field`` per second since the display's first update."""
        first = self._first or progress
        elapsed = progress.wall_clock - first.wall_clock
        if elapsed <= 0 or getattr(first, field) is None:
            return None
        return (getattr(progress, field) - getattr(first, field)) / elapsed

    def _nearest(self, progress):
        """((label, target), fraction done, seconds left or None) for the target nearest in time."""
        best, first = None, self._first or progress
        for label, target in self.targets:
            position, start = target.of(progress), target.of(first)
            if position is None or start is None:
                continue
            fraction = position / target.value if target.value else 1.0
            left = max(target.value - position, 0)
            elapsed = progress.wall_clock - first.wall_clock
            speed = (position - start) / elapsed if elapsed > 0 else 0
            eta = 0.0 if left == 0 else (left / speed if speed > 0 else None)
            key = (eta is None, eta if eta is not None else -fraction)
            if best is None or key < best[0]:
                best = (key, ((label, target), fraction, eta))
        return best[1] if best else None

    # ------------------------------------------------------------------ showing it
    def ready(self) -> bool:
        """Whether an update now would show anything: lets a caller skip reading the progress (a sync)."""
        if not self.enabled:
            return False
        wait = self.redraw_seconds if self.interactive else self.every_seconds
        return self._shown_at is None or time.monotonic() - self._shown_at >= wait

    def update(self, progress) -> None:
        """Show ``progress`` (a bar redraw, or a line if ``every_seconds`` have passed since the last)."""
        if not self.enabled:
            return
        if self._first is None:
            self._first = progress
        self._latest = progress
        if self.interactive:
            self._draw(progress)
        elif self._printed is None or progress.wall_clock - self._printed.wall_clock >= self.every_seconds:
            self._line(progress)

    def close(self) -> None:
        """End the display: the bar is left on screen; in lines, the latest progress is written once more."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._latest is not None and self._latest is not self._printed and not self.interactive:
            self._line(self._latest)

    def _line(self, progress) -> None:
        self._printed, self._shown_at = progress, time.monotonic()
        text = self.describe(progress)
        try:
            from tqdm import tqdm
        except ImportError:
            print(text, file=self.file, flush=True)
        else:
            tqdm.write(text, file=self.file)  # clears and redraws any bar on the same stream

    def _draw(self, progress) -> None:
        self._shown_at = time.monotonic()
        borrowed = self._borrowed() if self._borrowed is not None else None
        if borrowed is not None:
            # One bar: the owner's (the Trainer's steps, towards max_steps) with our fields after its
            # elapsed time. Its own time-left is dropped: the one ETA is ours, naming its target.
            borrowed.bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"
            borrowed.set_postfix_str(self.describe(progress, step=False), refresh=False)
            return  # the owner redraws it as its steps go by
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                raise ImportError("the progress bar needs tqdm: pip install tqdm") from None
            # No position: tqdm puts the bar on the first free line, below any other bar. The text
            # goes in the description (tqdm's postfix would start with an empty ", " field).
            self._bar = tqdm(total=1000 if self.targets else None, file=self.file, leave=True,
                             dynamic_ncols=True, mininterval=self.redraw_seconds,
                             bar_format="{percentage:3.0f}%|{bar:20}| {desc}" if self.targets else "{desc}")
        nearest = self._nearest(progress)
        self._bar.set_description_str(f"{self.desc}: {self.describe(progress)}", refresh=False)
        if nearest is not None:
            self._bar.update(max(0, min(1000, int(nearest[1] * 1000)) - self._bar.n))
        else:
            self._bar.update(0)
        if self._bar.n >= 1000 or time.monotonic() - self._bar.last_print_t >= self._bar.mininterval:
            self._bar.refresh()

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _amounts(targets) -> list:
    """Targets as a list of (label or None, Amount): one amount (``"2Btok"``, ``(1000, "ba")``), a list
    of them, a dict of label -> amount, or None. A None amount in a dict is left out."""
    if targets is None:
        return []
    if isinstance(targets, dict):
        return [(str(label), as_amount(t)) for label, t in targets.items() if t is not None]
    if isinstance(targets, (str, Amount)) or (isinstance(targets, tuple) and len(targets) == 2
                                               and isinstance(targets[1], str)):
        return [(None, as_amount(targets))]
    return [(None, as_amount(t)) for t in targets]


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


_COUNT_SUFFIXES = [(SUFFIXES[s], s) for s in ("T", "B", "M", "k")]


def _count(number: float) -> str:
    """3 significant digits with the amount suffixes: 245760 -> "246k", 2500000 -> "2.5M", 12 -> "12"."""
    if abs(number) >= 1e15:  # beyond the largest suffix (FLOPs): 1.5e+18, not 1.5e+06T
        return f"{number:.3g}"
    for scale, suffix in _COUNT_SUFFIXES:
        if abs(number) >= scale * 0.9995:  # 999.7k shows as 1M, not 1e+03k
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.3g}" if isinstance(number, float) else str(number)


# The unit of an amount as a reader says it ("3k steps", not "3kba").
_UNIT_WORDS = {"sp": "samples", "tok": "tokens", "ep": "epochs", "ba": "steps", "s": "s", "min": "min", "h": "h",
               "flop": "FLOPs"}


def _amount_text(amount: Amount) -> str:
    """``Amount(3000, "ba")`` -> "3k steps"; ``Amount(2e9, "tok")`` -> "2B tokens"; ``(30, "min")`` -> "30 min"."""
    return f"{_count(amount.value)} {_UNIT_WORDS.get(amount.unit, amount.unit)}"


def _duration(seconds: float) -> str:
    """1:02:03 for 3723 s; days as "2d 3:00:00"."""
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    text = f"{hours}:{seconds // 60:02d}:{seconds % 60:02d}"
    return f"{days}d {text}" if days else text
