"""What every backend does, in a handful of methods; delivery and retries live in delivery.py."""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

# Every row gets the next number, process-wide: a retried call, a close-time spill and a replay
# use it to tell which rows a backend already stored, so no point is stored twice.
_next_seq = itertools.count(1).__next__


class Row:
    """One written row: stored metric names to numbers, when it was written (ms since the epoch), its number.

    ``Row.later(build, timestamp_ms)`` is a row whose metrics are built where they are first read (a
    sender thread), not on the training thread that writes it: ``build`` must only read what it was
    given. Reads from several threads build it once.
    """

    __slots__ = ("_metrics", "_build", "timestamp_ms", "seq")

    def __init__(self, metrics: dict, timestamp_ms: int, seq: int | None = None):
        self._metrics: dict | None = metrics
        self._build: Callable[[], dict] | None = None
        self.timestamp_ms = timestamp_ms
        self.seq = _next_seq() if seq is None else seq

    @classmethod
    def later(cls, build: Callable[[], dict], timestamp_ms: int) -> "Row":
        row = cls.__new__(cls)
        row._metrics, row._build, row.timestamp_ms, row.seq = None, build, timestamp_ms, _next_seq()
        return row

    @property
    def metrics(self) -> dict:
        metrics = self._metrics
        if metrics is None:
            with _BUILDING:
                metrics = self._metrics
                if metrics is None:
                    metrics = self._metrics = self._build()  # type: ignore[misc]  # set by later()
                    self._build = None
        return metrics

    def __eq__(self, other) -> bool:
        return isinstance(other, Row) and (self.metrics, self.timestamp_ms, self.seq) == (
            other.metrics, other.timestamp_ms, other.seq)

    def __repr__(self) -> str:
        return f"Row(metrics={self.metrics!r}, timestamp_ms={self.timestamp_ms}, seq={self.seq})"

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "timestamp_ms": self.timestamp_ms, "seq": self.seq}

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        seq = d.get("seq")
        return cls(dict(d["metrics"]), int(d["timestamp_ms"]), int(seq) if seq is not None else None)


_BUILDING = threading.Lock()  # rows built by sender threads (Row.later): each once


@dataclass
class RunInfo:
    """What a backend needs to open (or reopen) its run."""

    name: str | None = None
    project: str | None = None          # W&B project / MLflow experiment
    run_id: str | None = None           # set to continue a run (resume)
    config: dict = field(default_factory=dict)   # hyperparameters, already redacted
    tags: dict = field(default_factory=dict)     # {"x_axis": "progress/samples", ...} without prefix
    x_axis: str = ""
    axes: tuple = ()


class Backend:
    """A tracking backend, called from its delivery thread only, never from the training loop.

    The constructor runs in the caller's thread, so a missing library or missing credentials fail
    before training starts; every method may raise, and delivery.py retries what failed. So every
    method must be safe to call again after it raised: ``start`` opens one run however often it is
    retried, and ``log_rows`` sets ``stored_seq`` as rows are stored, so a retry starts after them.
    """

    name = "backend"
    max_rows_per_call = 1000  # rows handed to one log_rows call
    run_id: str | None = None  # set by start()
    stored_seq = 0  # the seq of the last row stored; rows up to it are never sent again

    def start(self, info: RunInfo) -> str:
        """Open or continue the run; return its id. Called again after a failure: opens one run only."""
        raise NotImplementedError

    def log_rows(self, rows: list[Row]) -> None:
        """Store rows in order, setting ``stored_seq`` to each one's seq once it is stored."""
        raise NotImplementedError

    def unstored(self, rows: list[Row]) -> list[Row]:
        """The rows not stored yet: what a (retried) ``log_rows`` sends."""
        return [row for row in rows if row.seq > self.stored_seq]

    def mark_stored(self, seq: int | None) -> None:
        """Rows up to ``seq`` are stored (None: no news, e.g. a call that failed before storing any)."""
        if seq is not None:
            self.stored_seq = seq

    def set_tags(self, tags: dict) -> None:
        raise NotImplementedError

    def log_summary(self, metrics: dict, row: Row) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        """status: "FINISHED", "FAILED" or "KILLED"."""
        raise NotImplementedError

    def show_status(self, status: str) -> None:
        """Show ``status`` on the run while it stays open ("KILLED" while a signal is in the program's own
        handler, "RUNNING" once the program goes on); its end sets the final one. Where a backend shows
        a status only at the run's end (W&B), nothing."""

    def where(self) -> str:
        """One line telling the user where to look at the run."""
        return ""

    # ---------------------------------------------------------------- replay of a spill file (spill.py)
    def target(self) -> dict:
        """Where this backend's rows go, without credentials: kept in a spill file's header."""
        return {}

    @classmethod
    def for_replay(cls, target: dict, options: dict) -> "Backend":
        """A backend aimed at ``target`` (from ``target()``); ``options`` given to replay win."""
        return cls(**options)

    def reopen(self, info: RunInfo) -> None:
        """Continue the run ``info.run_id`` (or open a new one without it) to replay rows into it."""
        self.start(info)

    def run_to_continue(self, info: RunInfo) -> str | None:
        """The existing run ``start(info)`` continues (None: it opens a new one)."""
        return info.run_id

    def complete_start(self, info: RunInfo) -> None:
        """Replay of a start that was not delivered, into the run ``reopen`` continued: whatever of
        ``start`` (tags, parameters) ``reopen`` left out. ``start`` itself did it all here."""

    def release(self, finished: bool) -> None:
        """Let go of a run after a replay; ``finished``: the replay has already recorded its end."""
