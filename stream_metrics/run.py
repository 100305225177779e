"""The plain-loop helper: ``Run`` counts batches, writes rows, and keeps its state for checkpoints.

Data flows one way: batch -> counts (counting.py) -> progress (one collective per row) -> row ->
backends (each in its own thread).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import distributed, flops, layout as layouts, lifecycle, schema, tracking
from ._checks import non_negative, warn_once, whole_number
from .backends import backend_names
from .backends.base import Backend
from .epoch import DatasetProbe, EpochEstimator
from .progress import Progress
from .redact import redact_config
from .sanitize import KeyMap, clean_metrics, resolve
from .schedule import Every, Schedules
from .tally import Tally
from .version import __version__

log = logging.getLogger("stream_metrics")

STATE_FORMAT = "stream_metrics.run"
STATE_VERSION = 1
STATUSES = ("FINISHED", "FAILED", "KILLED")  # how a run ends, in every backend


class Run:
    """One training run's progress and its tracking runs. Create it with ``stream_metrics.init``.

    >>> import stream_metrics, torch
    >>> with stream_metrics.init(backend="none") as run:
    ...     run.update({"input_ids": torch.ones(4, 8, dtype=torch.long)}, tokens=30)
    ...     p = run.log({"loss": 1.5})
    >>> p.samples, p.tokens
    (4, 30)

    Where several ranks work on one batch (tensor, context or pipeline parallelism), say which
    ranks read different data, so that each example and token counts once (docs/distributed.md);
    the Trainer's and accelerate's layouts are detected:

    >>> run = stream_metrics.init(data_parallel_group=mesh["dp"],            # doctest: +SKIP
    ...                           context_parallel_group=mesh["cp"], context_parallel_sliced=True)
    """

    def __init__(self, backend="mlflow", x_axis: str = "samples", dataset_size=None,
                 gradient_accumulation_steps: int = 1, config=None, *, dataset=None, pad_token_id=None,
                 name: str | None = None, project: str | None = None, mlflow_step: str = "samples",
                 resume: dict | None = None, mlflow: dict | None = None, wandb: dict | None = None,
                 flush_timeout: float = 60.0, buffer_rows: int | None = None, progress_file: str | None = None,
                 data_parallel_group=None, context_parallel_group=None, context_parallel_sliced: bool = True,
                 layout: "layouts.Layout | None" = None,
                 model=None, flops_per_token: float | None = None, peak_flops: float | None = None,
                 precision: str | None = None):
        names = backend_names(backend)
        # Which ranks read different data (layout.py): given, else detected, else every rank.
        self.layout = (layouts.given(data_parallel_group, context_parallel_group, context_parallel_sliced)
                       or layout or layouts.detect() or layouts.Layout.every_rank())
        self.x_axis = schema.axis_key(x_axis)
        self.mlflow_step = schema.axis_key(mlflow_step, allowed=schema.MLFLOW_STEP_AXES, what="mlflow_step")
        self.gradient_accumulation_steps = whole_number(
            "gradient_accumulation_steps", gradient_accumulation_steps, minimum=1,
            hint="the micro-batches that make one optimizer step")
        self.flush_timeout = non_negative("flush_timeout", flush_timeout, unit="seconds", infinite=True)
        # FLOPs (flops.py): the formula from the model or flops_per_token; the peak behind throughput/mfu.
        flops.check_peak_options(peak_flops, precision)
        self.flop_formula = flops.formula_for(model, flops_per_token)
        self.peak = flops.resolve_peak(peak_flops, model, precision) if self.flop_formula else None
        if self.x_axis == schema.FLOPS and self.flop_formula is None and names:
            raise ValueError("x_axis='flops' needs FLOPs counted: pass model= (the model being trained) or "
                             "flops_per_token= to init()")
        self.estimator = EpochEstimator(dataset_size)
        # The counts and the row's one gather (tally.py).
        self.tally = Tally(self.layout, self.gradient_accumulation_steps, pad_token_id, self.flop_formula,
                           self.estimator, DatasetProbe.of(dataset))
        self._keys = KeyMap(reserved=(*schema.AXES.values(), schema.LOSS_TOKENS, schema.SAMPLES_PER_S,
                                      schema.TOKENS_PER_S, schema.FLOPS_PER_S, schema.TOKENS_PER_S_PER_DEVICE,
                                      schema.MFU))
        tags = {schema.TAG_VERSION: __version__, schema.TAG_X_AXIS: self.x_axis,
                schema.TAG_DATA_PARALLEL: self.layout.describe()}
        if self.flop_formula is not None:
            tags[schema.TAG_FLOPS_METHOD] = self.flop_formula.method
            tags[schema.TAG_PEAK_FLOPS] = str(self.peak) if self.peak else "unknown: throughput/mfu is not logged"
        # The backends' runs (tracking.py), on the main process only; the others count and join the gather.
        self.tracking = tracking.Tracking(names, {"mlflow": mlflow, "wandb": wandb}, buffer_rows=buffer_rows,
                                          name=name, project=project, config=redact_config(config), tags=tags,
                                          mlflow_step=self.mlflow_step, x_axis=self.x_axis,
                                          progress_file=progress_file)
        self._at_finish: list[Callable[[str], Any]] = []  # at_finish(): called with the status, however the run ends
        self._finished = False
        self._schedules = Schedules()  # name -> Every, kept in state_dict()
        self._last = self.tally.latest  # the progress of the last row stored
        if resume is not None:
            self.load_state_dict(resume)
        if self.tracking.active:
            lifecycle.opened(self)  # finished however the process ends (lifecycle.py)

    @property
    def config(self) -> dict:
        """The run's hyperparameters (redacted), logged when the runs open: fixed from the first row on."""
        return self.tracking.config

    @config.setter
    def config(self, values: dict) -> None:
        self.tracking.config = dict(values)

    # ------------------------------------------------------------------ counting (tally.py)
    def update(self, batch: Any = None, *, samples: Any = None, tokens: Any = None, loss_tokens: Any = None) -> None:
        """Account for one micro-batch; explicit counts override what is read from ``batch``.

        Costs no host-device synchronisation: device counts are summed on the device and read
        when a row is written. Every ``gradient_accumulation_steps`` calls make one step, and a
        pass's end (``iterate``, ``end_pass``) closes a window it cut short, as optimizers step there.
        """
        if self._finished:
            warn_once("update-after-finish", "update() after finish() (or after the `with` block): the run is "
                                             "closed, so no later row will show these counts; start a new run")
        self.tally.update(batch, samples=samples, tokens=tokens, loss_tokens=loss_tokens)

    def iterate(self, loader: Iterable, *, count: bool = True) -> Iterator:
        """Yield the batches of one pass over ``loader``, counting each; the pass's end is seen.

        >>> for batch in run.iterate(loader):   # doctest: +SKIP
        ...     loss = model(**batch).loss
        """
        self._watch(loader, yields_batches=True)  # its length, if any, counts batches
        for batch in loader:
            if count:
                self.tally.update(batch)
            yield batch
        self.end_pass()

    @property
    def probe(self) -> DatasetProbe:
        """What this rank can tell about the dataset it reads (epoch.py)."""
        return self.tally.probe

    def watch(self, dataset: Any) -> None:
        """Use ``dataset`` (a dataset or loader) for the epoch estimate, and expect pass ends."""
        self._watch(dataset)

    def _watch(self, dataset: Any, yields_batches: bool = False) -> None:
        if self.tally.probe.dataset is None:
            self.tally.probe = DatasetProbe.of(dataset, yields_batches=yields_batches)
        self.estimator.watching = True

    def end_pass(self) -> None:
        """Say that a full pass over the training data has ended (for loops that don't use ``iterate``).

        A gradient-accumulation window the pass's end cut short makes its step here, as the Trainer
        and accelerate step at the end of the data. The end of a ``datasets`` stream repeated ``n``
        times (``repeat(n)``) is ``n`` passes, where the dataset is known (``iterate``, ``watch``,
        ``dataset=``).
        """
        self.tally.end_pass()
        self.estimator.watching = True

    # ------------------------------------------------------------------ rows
    @property
    def progress(self) -> Progress:
        """The axes as of now (brings the ranks together, like a row: call it on every rank)."""
        return self.tally.sync("progress")

    def log(self, metrics: dict | None = None) -> Progress:
        """Write one row: ``metrics`` plus every progress axis. Call it on every rank.

        Values: numbers, bools, NumPy scalars, 0-d/1-element tensors; nested dicts become
        '/'-joined keys; None, text and arrays are skipped with a one-time warning.
        """
        if metrics is not None and type(metrics) is not dict and not isinstance(metrics, Mapping):
            raise TypeError(f"log() takes a dict of metrics, such as {{'loss': loss}}, not a {type(metrics).__name__}")
        if self._finished:
            warn_once("log-after-finish", "log() after finish() (or after the `with` block): the run is closed, "
                                          "so this row is not stored; log before finishing, or start a new run")
            return self._last
        # Tensor metrics are read in the row's one host sync, with the counts (main process only).
        pending: list = []
        active = self.tracking.active
        metrics = clean_metrics(metrics, self._keys, pending) if metrics and active else {}
        progress = self.tally.sync("log", pending)
        if active:
            if progress.tokens is None:
                warn_once("no-tokens-row", "no batch has carried token information, so progress/tokens is left "
                                           "out of the rows; pass tokens= to update() to count them")
            # The metrics are checked here (a warning is the caller's); the axes and rates are added by
            # the sender thread that first reads the row, unless MFU is computed (its check may warn).
            values = resolve(metrics, pending) if metrics else {}
            last, peak, layout = self._last, self.peak, self.layout

            def build() -> dict:
                return tracking.row(progress, last, values, peak, layout.distinct_devices)

            self.tracking.submit_row(build if peak is None else build(), progress)
        self._last = progress
        return progress

    def summary(self, metrics: dict) -> None:
        """End-of-run figures: W&B's run summary; in MLflow, logged once beside every axis."""
        progress = self.tally.sync("summary")
        self._last = progress  # a stored row with every axis (on every rank): finish() need not write it again
        if self.tracking.active:
            self.tracking.summary(clean_metrics(metrics, self._keys), progress)

    # ------------------------------------------------------------------ state
    @property
    def run_ids(self) -> dict[str, str]:
        """{"mlflow": id, "wandb": id} of the tracking runs (waits briefly for them to open)."""
        return self.tracking.ids(self.flush_timeout, self.tally.latest.epoch_source)

    def state_dict(self) -> dict:
        """Plain, JSON-safe state for checkpoints; brings the ranks together like a row (every rank).

        >>> state = run.state_dict()   # doctest: +SKIP
        >>> if torch.distributed.get_rank() == 0:   # doctest: +SKIP
        ...     json.dump(state, open("stream_metrics.json", "w"))
        """
        progress = self.tally.sync("state_dict")
        if self.tracking.started:
            self.tracking.deliver_before_checkpoint()
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "library_version": __version__,
            "progress": progress.to_dict(),
            "rows": self.tally.rows_total, "batches": self.tally.batches_total,
            "epoch": self.estimator.state_dict(),
            "run_ids": self.run_ids if distributed.is_main() else dict(self.tracking.run_ids),
            "schedules": self._schedules.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``: every axis goes on from its saved value, and the same runs."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a stream_metrics state dict (no format 'stream_metrics.run'): pass the dict "
                             "that Run.state_dict() returned")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream_metrics state version {state.get('version')!r} is not {STATE_VERSION}, the "
                             f"one this release ({__version__}) reads")
        try:
            base = Progress.from_dict(state["progress"])
            rows, batches = (whole_number(f"state {key}", state.get(key, 0)) for key in ("rows", "batches"))
            run_ids = {str(k): str(v) for k, v in dict(state.get("run_ids") or {}).items()}
            self.estimator.load_state_dict(dict(state.get("epoch") or {}), base.samples)
            schedules = Schedules.read_state(state.get("schedules"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"corrupt stream_metrics state dict: {exc}") from None
        if self.tracking.started:
            # The rows go on into the runs already open: only their own state may continue them.
            open_ids = self.run_ids  # waits briefly for runs still opening
            if run_ids != open_ids:
                raise ValueError(f"load_state_dict() after the first log() takes only a state of the runs already "
                                 f"open ({open_ids or 'none open'}), not of {run_ids or 'no run'}: load a "
                                 "checkpoint's state before the first log(), or pass it as init(resume=state)")
        known = self.tracking.run_ids
        known.update(run_ids)
        if self.tracking.progress_file is not None:
            wall_clock = self.tracking.progress_file.wall_clock_at_last_row(run_ids)
            base = dataclasses.replace(base, wall_clock=max(base.wall_clock, wall_clock))
        self.tally.reset(base, rows, batches)
        self._last = base
        self._schedules.kept = schedules
        if run_ids:
            self.tracking.resuming(base)

    # ------------------------------------------------------------------ schedules (schedule.py)
    def due(self, every: Any, progress: Progress | None = None) -> bool:
        """True once each time the run crosses a multiple of ``every`` (``"1Mtok"``, ``"500ksp"``, ``"30min"``).

        A call that jumps over several multiples answers True once. The answer is a pure function of
        the progress, the same on every rank. Without ``progress`` call it on every rank, at the same
        points of the loop: most calls cost nothing (no collective, no host sync); near a multiple
        (judged from the last row and the pace between rows, docs/schedule.md) the ranks sync to
        decide. Passing the Progress ``log()`` returned never syncs.

        >>> if run.due("1Mtok", run.log({"loss": loss})):   # doctest: +SKIP
        ...     evaluate()
        """
        return self._schedules.due(every, progress, self.tally)

    def schedule(self, every: Any, name: str | None = None) -> Every:
        """The ``Every`` kept under ``name`` (default: the amount's text) and in ``state_dict()``.

        A schedule new to this session (or changed across a resume) counts from where the session
        started, so it does not fire for boundaries passed before.
        """
        return self._schedules.get(every, name, self.tally.base)

    # ------------------------------------------------------------------ the end
    def where(self) -> list[str]:
        """Where each backend's run is, and how to look at it."""
        _ = self.run_ids  # waits for the runs to open
        return self.tracking.where()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row written so far has been delivered (or ``timeout`` passes)."""
        return self.tracking.flush(self.flush_timeout if timeout is None else timeout)

    def finish(self, status: str = "FINISHED", *, timeout: float | None = None) -> None:
        """Write the final totals, deliver every row and close the runs (all backends at once, within
        ``timeout``, default ``flush_timeout`` seconds); what cannot be delivered is saved and reported.

        ``status``: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``. A run never finished is finished when
        the process ends, however it ends (lifecycle.py). Starts no collective.
        """
        if status not in STATUSES:
            raise ValueError(f"finish(status={status!r}): the status is one of {', '.join(map(repr, STATUSES))}")
        if status == "FINISHED" and lifecycle.signalled(self):
            status = "KILLED"  # the program's own handler let it go on after a SIGTERM: it was cut short
        if self._finished:
            if self.tracking.active and lifecycle.is_open(self):
                # A signal came while finish() waited for the backends: deliver or spill now, in its time.
                self._close(status, timeout)
            return
        # What was counted after the last row goes in one more row: the last row holds the totals.
        # One process reads its counts (no collective); several ranks use the latest totals they
        # brought together (the Trainer's end does), since finish() starts no collective.
        if self.tracking.active:
            try:
                progress, last = (self.tally.sync() if distributed.world_size() == 1 else self.tally.latest), self._last
                # The epoch too: a pass that ended after the last row (the loop's last batch) makes
                # the epoch whole and its source 'pass' without another sample.
                if (progress.samples, progress.tokens, progress.loss_tokens, progress.step, progress.epoch,
                        progress.epoch_source) != (last.samples, last.tokens, last.loss_tokens, last.step,
                                                   last.epoch, last.epoch_source):
                    self.tracking.submit_row(progress.axes(), progress)
                    self._last = progress
            except Exception:
                log.exception("stream_metrics: could not write the final row; the runs are closed without it")
            self.tracking.start(self.tally.latest.epoch_source)
        self._finished = True
        self._close(status, timeout)

    def show_status(self, status: str, timeout: float | None = None) -> None:
        """For lifecycle.py: show ``status`` on the open runs (MLflow) while they stay open."""
        if self.tracking.active and not self._finished:
            self.tracking.show_status(status, timeout)

    def _close(self, status: str, timeout: float | None) -> None:
        self.tracking.close(status, self.flush_timeout if timeout is None else timeout)
        for fn in self._at_finish:
            try:
                fn(status)
            except Exception:  # an integration's clean-up never stops the close
                log.exception("stream_metrics: a clean-up at finish failed")
        lifecycle.closed(self)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        self.finish(status)

    # ------------------------------------------------------------------ for integrations (hf.py, accelerate.py)
    def set_step(self, step: int) -> None:
        """Rows carry ``step`` as ``progress/step`` from now on: for loops that count optimizer steps
        themselves (the Trainer's ``global_step``), instead of the micro-batches counted here."""
        self.tally.step_override = int(step)

    def set_epoch(self, epoch: float) -> None:
        """The exact epoch, where the caller knows it (the Trainer on a sized dataset): ``sized`` source."""
        self.estimator.sized_epoch = float(epoch)

    def resume_data_at(self, rows: int) -> None:
        """The data this session reads starts ``rows`` rows into the pass (a resume that skips another
        amount than the checkpoint read: the Trainer's ``ignore_data_skip``, or another batch size):
        the first pass measured from here counts the samples before it in that proportion."""
        saved = self.tally.base_rows
        if rows != saved and self.estimator.pass_size is None and self.estimator.passes == 0:
            samples = self.estimator.samples_at_start
            self.estimator.samples_at_start = round(samples * rows / saved) if saved else rows

    def watch_passes(self) -> None:
        """Say that the end of every pass over the data will be reported (``end_pass()``), so the
        estimate may rely on it, even before the first pass has ended."""
        self.estimator.watching = True

    @property
    def finished(self) -> bool:
        """Whether ``finish()`` has been called (rows after it are not delivered)."""
        return self._finished

    @property
    def started(self) -> bool:
        """Whether the tracking runs were opened (by the first row): ``config`` is fixed from then on."""
        return self.tracking.started

    def open(self, timeout: float | None = None) -> list[Backend]:
        """Open the tracking runs now (otherwise they open with the first row) and wait up to
        ``timeout`` seconds (default ``flush_timeout``) for them; returns the backends whose run is
        open, so an integration can make those runs the process's active ones."""
        return self.tracking.open(self.flush_timeout if timeout is None else timeout, self.tally.latest.epoch_source)

    def at_finish(self, fn: Callable[[str], Any]) -> None:
        """Call ``fn(status)`` once the runs are closed, however the run ends (``finish()``, the
        interpreter's exit, an uncaught exception, a signal): integrations undo what they set up."""
        self._at_finish.append(fn)

    @property
    def last_progress(self) -> Progress:
        """The axes as of the latest time the ranks met (a row, a state, ``progress``): no new sync."""
        return self.tally.latest

    @property
    def backends(self) -> list[str]:
        """The backends in use on this process (``[]`` on ranks other than the main one)."""
        return self.tracking.names


def init(backend="mlflow", x_axis: str = "samples", dataset_size=None, gradient_accumulation_steps: int = 1,
         config=None, **options) -> Run:
    """Start tracking a run. See ``Run`` for the options; usable as a context manager.

    >>> import stream_metrics
    >>> run = stream_metrics.init(backend="none", dataset_size=1000)
    >>> run.update(samples=250, tokens=9000)
    >>> run.log({"loss": 2.0}).epoch
    0.25
    """
    return Run(backend, x_axis, dataset_size, gradient_accumulation_steps, config, **options)
