"""The tracking runs a ``Run`` writes to: one ``Delivery`` per backend, on the main process only.

The runs open with the first row (or ``open()``), in the background; each row is handed to every
backend's queue (backends/delivery.py) and the training thread goes on. The run's tags, its
epoch-source tag as it changes, the summary, the run ids for checkpoints and the close live here.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import distributed, flops, schema
from .backends import RunInfo, create
from .backends.base import Backend, Row
from .backends.delivery import Delivery, close_all
from .progress import Progress, ProgressFile

log = logging.getLogger("stream_metrics")


#: The longest a checkpoint waits for the rows before it to be delivered (Tracking.deliver_before_checkpoint).
CHECKPOINT_WAIT = 5.0


class Tracking:
    """The backends' runs of one ``Run``: empty (``active`` False) on ranks other than the main one."""

    def __init__(self, names: list[str], options: dict, *, buffer_rows: int | None = None, name: str | None = None,
                 project: str | None = None, config: dict | None = None, tags: dict | None = None,
                 mlflow_step: str = schema.SAMPLES, x_axis: str = schema.SAMPLES, progress_file: str | None = None):
        backends = [create(n, options.get(n) or {}) for n in names] if distributed.is_main() else []
        self.deliveries = [Delivery(b, buffer_rows=buffer_rows) if buffer_rows else Delivery(b) for b in backends]
        self.active = bool(self.deliveries)
        self.name, self.project, self.config = name, project, config or {}
        self.tags, self.mlflow_step, self.x_axis = dict(tags or {}), mlflow_step, x_axis
        self.run_ids: dict[str, str] = {}  # known ids: from a checkpoint, or the runs once open
        self.started = False
        self.epoch_source: str | None = None  # the one the backends were told
        self.progress_file = ProgressFile(progress_file) if progress_file else None
        self.resumed: dict[str, str] = {}  # MLflow's resumed_at tag of this session, if it resumes

    def resuming(self, progress: Progress) -> None:
        """This session goes on from a checkpoint at ``progress``: MLflow's run notes where and since
        when (schema.TAG_RESUMED_AT), so readers leave out what an earlier session logged past it."""
        step = progress.axes().get(self.mlflow_step)
        if step is None:
            return
        self.resumed = {f"{schema.TAG_RESUMED_AT}{int(step)}": str(int(time.time() * 1000))}
        if self.started:
            for d in self.deliveries:
                if d.backend.name == "mlflow":
                    d.submit("tags", dict(self.resumed))

    @property
    def names(self) -> list[str]:
        return [d.backend.name for d in self.deliveries]

    def start(self, epoch_source: str) -> None:
        """Open (or continue) every backend's run, in the background: the first row does it."""
        if self.started:
            return
        self.started = True
        self.epoch_source = epoch_source
        for d in self.deliveries:
            tags = {**self.tags, schema.TAG_EPOCH_SOURCE: epoch_source}
            if d.backend.name == "mlflow":
                tags[schema.TAG_MLFLOW_STEP] = self.mlflow_step
                tags.update(self.resumed)
            d.submit("start", RunInfo(name=self.name, project=self.project, run_id=self.run_ids.get(d.backend.name),
                                      config=self.config, tags=tags, x_axis=self.x_axis,
                                      axes=(*schema.AXES.values(), schema.LOSS_TOKENS)))

    def submit_row(self, metrics: dict | Callable[[], dict], progress: Progress) -> None:
        """Hand one row to every backend (a queue append each); the epoch-source tag follows the row.

        ``metrics``: the row's values, or a function making them, called by the first sender thread
        that reads the row (Row.later), so the training thread only hands the row over.
        """
        if not self.started:
            self.start(progress.epoch_source)
        # MLflow takes its step from the row's mlflow_step axis.
        row = Row(metrics, int(time.time() * 1000)) if isinstance(metrics, dict) else Row.later(
            metrics, int(time.time() * 1000))
        for d in self.deliveries:
            d.submit("rows", row)
        self._follow_epoch_source(progress)
        self._note_wall_clock(progress)

    def summary(self, figures: dict, progress: Progress) -> None:
        self.start(progress.epoch_source)
        row = Row(progress.axes(), int(time.time() * 1000))
        for d in self.deliveries:
            d.submit("summary", (figures, row))
        self._follow_epoch_source(progress)
        self._note_wall_clock(progress)  # a stored row too (MLflow's, with every axis): a resume goes on after it

    def _note_wall_clock(self, progress: Progress) -> None:
        if self.progress_file is not None:
            # The wall-clock of the latest row, beside the checkpoints (progress.py says why).
            self.progress_file.write({d.backend.name: d.backend.run_id for d in self.deliveries if d.backend.run_id},
                                     progress.wall_clock)

    def _follow_epoch_source(self, progress: Progress) -> None:
        """The epoch-source tag says how the epoch of the latest row (or summary row) was estimated."""
        if progress.epoch_source != self.epoch_source:
            self.epoch_source = progress.epoch_source
            for d in self.deliveries:
                d.submit("tags", {schema.TAG_EPOCH_SOURCE: progress.epoch_source})

    def ids(self, timeout: float, epoch_source: str) -> dict[str, str]:
        """The runs' ids, once open (waits up to ``timeout`` seconds for each)."""
        self.start(epoch_source)
        for d in self.deliveries:
            if d.backend.run_id is None:
                d.flush(timeout)
            if d.backend.run_id is not None:
                self.run_ids[d.backend.name] = d.backend.run_id
        return dict(self.run_ids)

    def open(self, timeout: float, epoch_source: str) -> list[Backend]:
        """Open the runs now and wait up to ``timeout`` seconds; the backends whose run is open."""
        if not self.active:
            return []
        self.ids(timeout, epoch_source)
        return [d.backend for d in self.deliveries if d.backend.run_id is not None]

    def where(self) -> list[str]:
        return [d.backend.where() for d in self.deliveries if d.backend.run_id]

    def flush(self, timeout: float) -> bool:
        return all([d.flush(timeout) for d in self.deliveries])

    def show_status(self, status: str, timeout: float | None) -> None:
        """Show ``status`` on the open runs (``Backend.show_status``); waits up to ``timeout`` seconds, if given.
        A run not opened yet (no row so far) has nothing to show it on."""
        if not self.started:
            return
        for d in self.deliveries:
            d.submit("status", status)
        if timeout is not None:
            self.flush(timeout)

    def deliver_before_checkpoint(self, timeout: float = CHECKPOINT_WAIT) -> None:
        """The rows logged before a checkpoint go out before it is kept: a kill right after it
        (SIGKILL, out of memory) would lose them, and the resumed run writes only the rows after it.
        A short wait in all, skipped for a backend that is failing (its rows are held and saved)."""
        deadline = time.monotonic() + timeout
        for d in self.deliveries:
            if not d.failing:
                d.flush(max(0.0, deadline - time.monotonic()))

    def close(self, status: str, timeout: float) -> None:
        """Deliver what is queued and end every run (all at once, one deadline); report what was not."""
        for message in close_all(self.deliveries, status, timeout):
            if message:
                log.warning(message)


def row(progress: Progress, last: Progress, metrics: dict, peak: "flops.Peak | None", devices: int | None) -> dict:
    """A row's values: every axis, the throughput since ``last`` (the previous row), then ``metrics``."""
    values = progress.axes()
    elapsed = progress.wall_clock - last.wall_clock
    if elapsed > 0:
        values[schema.SAMPLES_PER_S] = (progress.samples - last.samples) / elapsed
        tokens_per_s = None
        if progress.tokens is not None:
            tokens_per_s = values[schema.TOKENS_PER_S] = (progress.tokens - (last.tokens or 0)) / elapsed
        if progress.flops is not None or tokens_per_s is not None:
            values.update(flops.throughput(progress, last, elapsed, tokens_per_s, peak, devices))
    values.update(metrics)
    return values
