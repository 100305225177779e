"""What every backend does, in a handful of methods; delivery and retries live in delivery.py."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One written row: stored metric names to numbers, with when it was written (ms since the epoch)."""

    metrics: dict
    timestamp_ms: int
    step: int  # the MLflow step: the integer value of the row's mlflow_step axis

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "timestamp_ms": self.timestamp_ms, "step": self.step}

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        return cls(dict(d["metrics"]), int(d["timestamp_ms"]), int(d["step"]))


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
    before training starts; every method may raise, and delivery.py retries what failed.
    """

    name = "backend"
    max_rows_per_call = 1000  # rows handed to one log_rows call
    run_id: str | None = None  # set by start()

    def start(self, info: RunInfo) -> str:
        """Open or continue the run; return its id."""
        raise NotImplementedError

    def log_rows(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def set_tags(self, tags: dict) -> None:
        raise NotImplementedError

    def log_summary(self, metrics: dict, row: Row) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        """status: "FINISHED", "FAILED" or "KILLED"."""
        raise NotImplementedError

    def where(self) -> str:
        """One line telling the user where to look at the run."""
        return ""
