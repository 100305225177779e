"""The plain-loop helper: ``Run`` counts batches, writes rows, and keeps its state for checkpoints.

Data flows one way: batch -> counts (counting.py) -> progress (one collective per row) -> row ->
backends (each in its own thread).
"""
from __future__ import annotations

import dataclasses
import json
import os
import logging
import math
import numbers
import time
import weakref

import torch

from . import distributed, flops, layout as layouts, lifecycle, schema
from .backends import RunInfo, backend_names, create
from .backends.base import Row
from .backends.delivery import Delivery, close_all
from .counting import BatchError, Count, Total, read_batch, warn_once
from .epoch import DatasetProbe, EpochEstimator
from .progress import Progress
from .redact import redact_config
from .sanitize import KeyMap, clean_metrics, resolve
from .version import __version__

log = logging.getLogger("stream_metrics")

STATE_FORMAT = "stream_metrics.run"
STATE_VERSION = 1


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
        if (isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int)
                or gradient_accumulation_steps < 1):
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be a whole "
                             "number >= 1: the micro-batches that make one optimizer step")
        if isinstance(flush_timeout, bool) or not isinstance(flush_timeout, (int, float)) or flush_timeout < 0:
            raise ValueError(f"flush_timeout={flush_timeout!r} must be a number of seconds >= 0")
        self.gradient_accumulation_steps = gradient_accumulation_steps
        # FLOPs (flops.py): the formula from the model or flops_per_token; the peak behind throughput/mfu.
        self.flop_formula = flops.formula_for(model, flops_per_token)
        self.peak = flops.resolve_peak(peak_flops, model, precision) if self.flop_formula else None
        if self.x_axis == schema.FLOPS and self.flop_formula is None and names:
            raise ValueError("x_axis='flops' needs FLOPs counted: pass model= (the model being trained) or "
                             "flops_per_token= to init()")
        self.pad_token_id = pad_token_id
        self.estimator = EpochEstimator(dataset_size)
        self.probe = DatasetProbe.of(dataset)
        self.flush_timeout = flush_timeout
        self.progress_file = progress_file
        self.name, self.project = name, project
        self.config = redact_config(config)
        self._keys = KeyMap(reserved=(*schema.AXES.values(), schema.LOSS_TOKENS, schema.SAMPLES_PER_S,
                                      schema.TOKENS_PER_S, schema.FLOPS_PER_S, schema.TOKENS_PER_S_PER_DEVICE,
                                      schema.MFU))
        # Backends exist on the main process only; the others count and join the row's collective.
        options = {"mlflow": mlflow or {}, "wandb": wandb or {}}
        backends = [create(n, options[n]) for n in names] if distributed.is_main() else []
        self._deliveries = [Delivery(b, **({"buffer_rows": buffer_rows} if buffer_rows else {}))
                            for b in backends]
        self._run_ids: dict[str, str] = {}
        self._started = self._finished = False
        self._step_override = None
        self._reset_session(Progress(), rows=0, batches=0)
        if resume is not None:
            self.load_state_dict(resume)
        if self._deliveries:
            lifecycle.opened(self)  # finished however the process ends (lifecycle.py)

    # ------------------------------------------------------------------ counting (hot path)
    def _reset_session(self, base: Progress, rows: int, batches: int) -> None:
        self._base, self._base_rows, self._base_batches = base, rows, batches
        self._samples, self._tokens, self._loss_tokens = Total(), Total(), Total()
        self._flops = flops.FlopCount(self.flop_formula) if self.flop_formula else None
        self._rows = self._micro_batches = self._steps = self._in_window = 0
        self._has_tokens = self._has_loss_tokens = False
        self._passes, self._first_pass, self._pass_start = 0, None, Total()
        self._t0 = time.monotonic()
        self._last = base
        self._progress = base

    def update(self, batch=None, *, samples=None, tokens=None, loss_tokens=None) -> None:
        """Account for one micro-batch; explicit counts override what is read from ``batch``.

        Costs no host-device synchronisation: device counts are summed on the device and read
        when a row is written. Every ``gradient_accumulation_steps`` calls make one step, and a
        pass's end (``iterate``, ``end_pass``) closes a window it cut short, as optimizers step there.
        """
        # Explicit counts are checked first: a bad one is a clear error at once, not hours later.
        samples, tokens, loss_tokens = (None if value is None else _check_count(name, value) for name, value in
                                        (("samples", samples), ("tokens", tokens), ("loss_tokens", loss_tokens)))
        counts = None
        if batch is not None:
            try:
                counts = read_batch(batch, self.pad_token_id)
            except BatchError as exc:
                if samples is None:
                    warn_once("batch:" + exc.what, f"{exc}; this batch is not counted")
                    self._micro_batch_done()  # it was still trained on: the optimizer's steps go on
                    return
        elif samples is None:
            raise TypeError("update() needs a batch or samples=")
        if counts is not None:
            samples = counts.samples if samples is None else samples
            tokens = counts.tokens if tokens is None else tokens
            loss_tokens = counts.loss_tokens if loss_tokens is None else loss_tokens
        # Sliced context parallelism: every rank of the group holds the same rows (the group's first
        # rank counts them), while example starts read from position_ids are split between the ranks.
        from_starts = counts is not None and samples is counts.samples and isinstance(samples, torch.Tensor)
        self._samples.add(samples if from_starts or not self.layout.rows_counted_elsewhere else 0)
        if self._flops is not None:
            self._flops.add(batch, tokens)
        self._rows += counts.rows if counts is not None else (samples if isinstance(samples, int) else 0)
        if tokens is not None:
            self._tokens.add(tokens)
            self._has_tokens = True
        if loss_tokens is not None:
            self._loss_tokens.add(loss_tokens)
            self._has_loss_tokens = True
        self._micro_batch_done()

    def _micro_batch_done(self) -> None:
        self._micro_batches += 1
        self._in_window += 1
        if self._in_window == self.gradient_accumulation_steps:
            self._steps += 1
            self._in_window = 0

    def iterate(self, loader, *, count: bool = True):
        """Yield the batches of one pass over ``loader``, counting each; the pass's end is seen.

        >>> for batch in run.iterate(loader):   # doctest: +SKIP
        ...     loss = model(**batch).loss
        """
        self.watch(loader)
        for batch in loader:
            if count:
                self.update(batch)
            yield batch
        self.end_pass()

    def watch(self, dataset) -> None:
        """Use ``dataset`` (a dataset or loader) for the epoch estimate, and expect pass ends."""
        if self.probe.dataset is None:
            self.probe = DatasetProbe.of(dataset)
        self.estimator.watching = True

    def end_pass(self) -> None:
        """Say that a full pass over the training data has ended (for loops that don't use ``iterate``).

        A gradient-accumulation window the pass's end cut short makes its step here, as the Trainer
        and accelerate step at the end of the data.
        """
        if self._in_window:
            self._steps += 1
            self._in_window = 0
        self._passes += 1
        if self._first_pass is None:
            self._first_pass = self._samples.snapshot()
        self._pass_start = self._samples.snapshot()
        self.estimator.watching = True

    # ------------------------------------------------------------------ rows
    _calls = 0  # collectives this Run has joined: each rank's count rides in the gather

    def _sync(self, call: str = "log", pending=()) -> Progress:
        """Bring every rank's counts together: the one collective and host sync of a row.

        ``pending``: this rank's tensor metrics (``sanitize.Pending``), read in the same sync.

        ``call`` (``"log"``, ``"progress"``, ``"state_dict"``, ``"summary"``) and this rank's count of
        calls go with the gather, so a call that only some ranks make (``if rank == 0:
        run.state_dict()``) stops every rank with a clear error instead of pairing with another
        rank's next row and mixing up their counts.
        """
        now = time.monotonic()
        self._calls += 1
        base = self._base
        in_pass = self._samples.value() if self._passes == 0 else _minus(self._samples, self._pass_start)
        if self._passes == 0 and self.estimator.passes == 0 and not self.layout.rows_counted_elsewhere:
            # The restored samples were all in the first pass, read by the data-parallel ranks.
            in_pass = in_pass + base.samples / self.layout.data_parallel_size
        main = distributed.is_main()
        fields = {
            "samples": self._samples.value(),
            "tokens": self._tokens.value(),
            "loss_tokens": self._loss_tokens.value(),
            "has_tokens": int(self._has_tokens),
            "has_loss_tokens": int(self._has_loss_tokens),
            "steps": self._steps,
            "wall_clock": base.wall_clock + (now - self._t0),
            "passes": self._passes,
            "first_pass_samples": self._first_pass.value() if self._first_pass is not None else -1,
            "samples_in_pass": in_pass,
            **self.probe.local(rows=self._rows + (self._base_rows if main else 0),
                               batches=self._micro_batches + (self._base_batches if main else 0)),
            **self.layout.fields(), "call": _CALLS[call], "call_seq": self._calls,
            **(self._flops.local() if self._flops is not None else {}),
        }
        ranks = [{k: (v if type(v) is int else int(v) if float(v).is_integer() else v) for k, v in r.items()}
                 for r in distributed.gather(fields, pending)]
        _check_same_call(ranks)
        # Replicas (tensor-parallel peers, later pipeline stages, ranks sharing a batch) add nothing.
        weights = layouts.weights(ranks)
        samples = base.samples + sum(w * r["samples"] for r, w in zip(ranks, weights))
        tokens = sum(w * r["tokens"] for r, w in zip(ranks, weights))
        loss_tokens = sum(w * r["loss_tokens"] for r, w in zip(ranks, weights))
        reading = layouts.readers(ranks, weights)  # one per distinct batch: the epoch's ranks
        has_tokens = base.tokens is not None or any(r["has_tokens"] for r in ranks)
        has_loss = base.loss_tokens is not None or any(r["has_loss_tokens"] for r in ranks)
        step = self._step_override if self._step_override is not None else base.step + max(r["steps"] for r in ranks)
        epoch, source = self.estimator.estimate(samples, reading)
        self._progress = Progress(
            step=int(step), samples=int(samples),
            tokens=int((base.tokens or 0) + tokens) if has_tokens else None,
            loss_tokens=int((base.loss_tokens or 0) + loss_tokens) if has_loss else None,
            epoch=float(epoch), wall_clock=float(max(r["wall_clock"] for r in ranks)), epoch_source=source,
            # FLOPs are weighed like tokens: replicas (tensor-parallel peers) do not add their batch again.
            flops=base.flops if self._flops is None else (base.flops or 0) + self._flops.total(
                ranks, weights))
        return self._progress

    @property
    def progress(self) -> Progress:
        """The axes as of now (brings the ranks together, like a row: call it on every rank)."""
        return self._sync("progress")

    def log(self, metrics: dict | None = None) -> Progress:
        """Write one row: ``metrics`` plus every progress axis. Call it on every rank.

        Values: numbers, bools, NumPy scalars, 0-d/1-element tensors; nested dicts become
        '/'-joined keys; None, text and arrays are skipped with a one-time warning.
        """
        if self._finished:
            warn_once("log-after-finish", "log() after finish() (or after the `with` block): the run is closed, "
                                          "so this row is not stored; log before finishing, or start a new run")
            return self._last
        # Tensor metrics are read in the row's one host sync, with the counts (main process only).
        pending = []
        metrics = clean_metrics(metrics or {}, self._keys, pending) if self._deliveries else {}
        progress = self._sync("log", pending)
        row = progress.axes()
        if not self._deliveries:
            self._last = progress
            return progress
        if progress.tokens is None:
            warn_once("no-tokens-row", "no batch has carried token information, so progress/tokens is left out "
                                       "of the rows; pass tokens= to update() to count them")
        elapsed = progress.wall_clock - self._last.wall_clock
        if elapsed > 0:
            row[schema.SAMPLES_PER_S] = (progress.samples - self._last.samples) / elapsed
            if progress.tokens is not None:
                row[schema.TOKENS_PER_S] = (progress.tokens - (self._last.tokens or 0)) / elapsed
            row.update(flops.throughput(progress, self._last, elapsed, row.get(schema.TOKENS_PER_S), self.peak,
                                        self.layout.distinct_devices))
        row.update(resolve(metrics, pending))
        self._last = progress
        self._submit_row(row, progress)
        if self.progress_file:
            self._write_progress_file(progress)
        return progress

    def _write_progress_file(self, progress: Progress) -> None:
        # The wall-clock of the latest row, beside the checkpoints: a run resumed from an older
        # checkpoint (after a crash) goes on from here, so wall_clock never goes back. Every row, so
        # it must be cheap: one pwrite at offset 0 into a file kept open, padded with spaces to a
        # width that never shrinks, so the file always holds one whole JSON text (a write of a few
        # hundred bytes to a regular file is not cut short by the process being killed).
        ids = {d.backend.name: d.backend.run_id for d in self._deliveries if d.backend.run_id}
        writer = self.__dict__.get("_progress_writer")
        try:
            if writer is None:
                writer = self._progress_writer = _ProgressFile(self.progress_file)
            writer.write(ids, progress.wall_clock)
        except OSError as exc:
            warn_once("progress-file", f"cannot write {self.progress_file} ({exc}); a resumed run's "
                                       "wall_clock goes on from its checkpoint")

    def _wall_clock_at_last_row(self, run_ids: dict) -> float:
        try:
            with open(self.progress_file) as f:
                last = json.load(f)
        except (OSError, ValueError, TypeError):
            return 0.0
        same_run = run_ids and all(last.get("run_ids", {}).get(k) == v for k, v in run_ids.items())
        wall = last.get("wall_clock")
        return float(wall) if same_run and isinstance(wall, (int, float)) and math.isfinite(wall) else 0.0

    def summary(self, metrics: dict) -> None:
        """End-of-run figures: W&B's run summary; in MLflow, logged once beside every axis."""
        progress = self._sync("summary")
        self._last = progress  # a stored row with every axis (on every rank): finish() need not write it again
        if self._deliveries:
            self._start()
            figures = clean_metrics(metrics, self._keys)
            row = self._row(progress.axes(), progress)
            for d in self._deliveries:
                d.submit("summary", (figures, row))

    def _row(self, metrics: dict, progress: Progress) -> Row:
        return Row(metrics, int(time.time() * 1000))  # MLflow takes its step from the row's mlflow_step axis

    def _submit_row(self, metrics: dict, progress: Progress) -> None:
        self._start()
        row = self._row(metrics, progress)
        for d in self._deliveries:
            d.submit("rows", row)
        if progress.epoch_source != self._epoch_source:
            self._set_epoch_source(progress.epoch_source)

    def _tags(self, backend_name: str) -> dict:
        tags = {schema.TAG_VERSION: __version__, schema.TAG_X_AXIS: self.x_axis,
                schema.TAG_EPOCH_SOURCE: self._progress.epoch_source,
                schema.TAG_DATA_PARALLEL: self.layout.describe()}
        if backend_name == "mlflow":
            tags[schema.TAG_MLFLOW_STEP] = self.mlflow_step
        if self.flop_formula is not None:
            tags[schema.TAG_FLOPS_METHOD] = self.flop_formula.method
            tags[schema.TAG_PEAK_FLOPS] = str(self.peak) if self.peak else "unknown: throughput/mfu is not logged"
        return tags

    _epoch_source = None

    def _set_epoch_source(self, source: str) -> None:
        self._epoch_source = source
        for d in self._deliveries:
            d.submit("tags", {schema.TAG_EPOCH_SOURCE: source})

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._epoch_source = self._progress.epoch_source
        for d in self._deliveries:
            info = RunInfo(name=self.name, project=self.project, run_id=self._run_ids.get(d.backend.name),
                           config=self.config, tags=self._tags(d.backend.name), x_axis=self.x_axis,
                           axes=(*schema.AXES.values(), schema.LOSS_TOKENS))
            d.submit("start", info)

    # ------------------------------------------------------------------ state
    @property
    def run_ids(self) -> dict[str, str]:
        """{"mlflow": id, "wandb": id} of the tracking runs (waits briefly for them to open)."""
        self._start()
        for d in self._deliveries:
            if d.backend.run_id is None:
                d.flush(self.flush_timeout)
            if d.backend.run_id is not None:
                self._run_ids[d.backend.name] = d.backend.run_id
        return dict(self._run_ids)

    def state_dict(self) -> dict:
        """Plain, JSON-safe state for checkpoints; brings the ranks together like a row (every rank).

        >>> state = run.state_dict()   # doctest: +SKIP
        >>> if torch.distributed.get_rank() == 0:   # doctest: +SKIP
        ...     json.dump(state, open("stream_metrics.json", "w"))
        """
        progress = self._sync("state_dict")
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "library_version": __version__,
            "progress": progress.to_dict(),
            "rows": self._base_rows + self._rows, "batches": self._base_batches + self._micro_batches,
            "epoch": self.estimator.state_dict(),
            "run_ids": self.run_ids if distributed.is_main() else dict(self._run_ids),
            "schedules": self._schedules_state(),
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
            rows, batches = int(state.get("rows", 0)), int(state.get("batches", 0))
            run_ids = {str(k): str(v) for k, v in dict(state.get("run_ids") or {}).items()}
            self.estimator.load_state_dict(dict(state.get("epoch") or {}), base.samples)
            schedules = self._load_schedules(state.get("schedules"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"corrupt stream_metrics state dict: {exc}") from None
        if self._started and run_ids != {k: v for k, v in self._run_ids.items() if k in run_ids}:
            raise ValueError("load_state_dict() must come before the first log(): the tracking runs are open")
        self._run_ids.update(run_ids)
        if self.progress_file:
            base = dataclasses.replace(base, wall_clock=max(base.wall_clock, self._wall_clock_at_last_row(run_ids)))
        self._reset_session(base, rows, batches)
        self._schedules = schedules

    # ------------------------------------------------------------------ schedules (schedule.py)
    _schedules: dict | None = None  # name -> Every, made on first use; kept in state_dict()

    def due(self, every, progress: Progress | None = None) -> bool:
        """True once each time the run crosses a multiple of ``every`` (``"1Mtok"``, ``"500ksp"``, ``"30min"``).

        A call that jumps over several multiples answers True once. The answer is a pure function of
        the progress, the same on every rank. Without ``progress`` call it on every rank, at the same
        points of the loop: most calls cost nothing (no collective, no host sync); near a multiple
        (judged from the last row and the pace between rows, docs/schedule.md) the ranks sync to
        decide. Passing the Progress ``log()`` returned never syncs.

        >>> if run.due("1Mtok", run.log({"loss": loss})):   # doctest: +SKIP
        ...     evaluate()
        """
        schedule = self.schedule(every)
        if progress is not None:
            return schedule.crossed(progress) > 0
        look = self._lookahead(str(schedule.amount), schedule.amount)
        # The clock is this schedule's calls, the same on every rank; a sync seen now (a row) was made
        # after the previous call.
        look.observe(self._progress, clock=look.calls)
        look.calls += 1
        from .schedule import next_boundary

        if look.near(next_boundary(schedule), look.calls):
            return schedule.crossed(self._sync("progress")) > 0
        return schedule.crossed(self._progress) > 0  # below the boundary: 0 (warns where an axis is missing)

    def _lookahead(self, name: str, amount):
        from .schedule import Lookahead

        looks = self.__dict__.setdefault("_lookaheads", {})  # name -> (session, Lookahead)
        session, look = looks.get(name, (None, None))
        if look is None or session is not self._base or look.amount != amount:  # new, or after a resume
            look = Lookahead(amount)
            looks[name] = (self._base, look)
        return look

    def schedule(self, every, name: str | None = None):
        """The ``Every`` kept under ``name`` (default: the amount's text) and in ``state_dict()``.

        A schedule new to this session (or changed across a resume) counts from where the session
        started, so it does not fire for boundaries passed before.
        """
        from .schedule import Every

        every = Every(every, after=self._base)
        name = str(every.amount) if name is None else name
        if self._schedules is None:
            self._schedules = {}
        kept = self._schedules.get(name)
        if kept is None or kept.amount != every.amount:
            kept = self._schedules[name] = every
        return kept

    def _schedules_state(self) -> dict:
        return {name: every.state_dict() for name, every in (self._schedules or {}).items()}

    @staticmethod
    def _load_schedules(state) -> dict:
        from .schedule import Every

        return {str(name): Every.from_state_dict(s) for name, s in dict(state or {}).items()}

    # ------------------------------------------------------------------ the end
    def where(self) -> list[str]:
        """Where each backend's run is, and how to look at it."""
        self.run_ids  # wait for the runs to open
        return [d.backend.where() for d in self._deliveries if d.backend.run_id]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row written so far has been delivered (or ``timeout`` passes)."""
        timeout = self.flush_timeout if timeout is None else timeout
        return all([d.flush(timeout) for d in self._deliveries])

    def finish(self, status: str = "FINISHED", *, timeout: float | None = None) -> None:
        """Write the final totals, deliver every row and close the runs (all backends at once, within
        ``timeout``, default ``flush_timeout`` seconds); what cannot be delivered is saved and reported.

        ``status``: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``. A run never finished is finished when
        the process ends, however it ends (lifecycle.py). Starts no collective.
        """
        if self._finished:
            if self._deliveries and lifecycle.is_open(self):
                # A signal came while finish() waited for the backends: deliver or spill now, in its time.
                self._close(status, timeout)
            return
        # What was counted after the last row goes in one more row: the last row holds the totals.
        # One process reads its counts (no collective); several ranks use the latest totals they
        # brought together (the Trainer's end does), since finish() starts no collective.
        if self._deliveries:
            try:
                progress, last = (self._sync() if distributed.world_size() == 1 else self._progress), self._last
                if (progress.samples, progress.tokens, progress.loss_tokens, progress.step) != (
                        last.samples, last.tokens, last.loss_tokens, last.step):
                    self._submit_row(progress.axes(), progress)
                    self._last = progress
            except Exception:
                log.exception("stream_metrics: could not write the final row; the runs are closed without it")
        self._finished = True
        if self._deliveries:
            self._start()
        self._close(status, timeout)

    def _close(self, status: str, timeout: float | None) -> None:
        for message in close_all(self._deliveries, status, self.flush_timeout if timeout is None else timeout):
            if message:
                log.warning(message)
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
        self._step_override = int(step)

    def set_epoch(self, epoch: float) -> None:
        """The exact epoch, where the caller knows it (the Trainer on a sized dataset): ``sized`` source."""
        self.estimator.sized_epoch = float(epoch)

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
        return self._started

    @property
    def backends(self) -> list[str]:
        """The backends in use on this process (``[]`` on ranks other than the main one)."""
        return [d.backend.name for d in self._deliveries]


# The collectives a Run joins, as sent in the gather (run.progress and due() are the same call).
_CALLS = {"log": 1, "progress": 2, "state_dict": 3, "summary": 4}
_CALL_TEXT = {1: "log()", 2: "run.progress (or due())", 3: "state_dict()", 4: "summary()"}


def _check_same_call(ranks: list[dict]) -> None:
    """Every rank must be in the same call: otherwise raise, on every rank alike (they all see this)."""
    if len({(r["call"], r["call_seq"]) for r in ranks}) == 1:
        return
    where = ", ".join(f"rank {i} in {_CALL_TEXT.get(r['call'], '?')} (its call {r['call_seq']})"
                      for i, r in enumerate(ranks))
    raise RuntimeError(
        f"stream_metrics: the ranks met in different calls: {where}. state_dict() and progress bring the "
        "ranks together: call them on every rank, as log() (e.g. state = run.state_dict() on every rank, "
        "then save it on rank 0). These counts were not used.")


class _ProgressFile:
    """The progress file, open for the run: ``write`` is one ``os.pwrite`` of a padded JSON text."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._closer = weakref.finalize(self, os.close, self.fd)
        self.width = os.fstat(self.fd).st_size  # cover whatever an earlier run left there
        self._ids, self._head = None, b""

    def write(self, run_ids: dict, wall_clock: float) -> None:
        if run_ids != self._ids:  # the ids change once or twice a run: encode them then only
            self._ids = dict(run_ids)
            self._head = b'{"run_ids": ' + json.dumps(run_ids).encode() + b', "wall_clock": '
        text = self._head + repr(float(wall_clock)).encode() + b"}"
        if len(text) > self.width:
            self.width = len(text) + 64
        os.pwrite(self.fd, text.ljust(self.width), 0)


def _minus(total: Total, start: Total):
    return total.value() - start.value()


def _check_count(name: str, value) -> Count:
    """An explicit count as ``update`` adds it; a clear error for a Python value that is not a count.

    Tensors are taken on their device without reading them (that would wait for the device): a
    one-element tensor counts, a float or bool one is rounded to int64 there (one warning).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"update({name}=<tensor of shape {tuple(value.shape)}>): a count must be a number "
                             "or a one-element tensor; pass its sum (e.g. mask.sum())")
        value = value.reshape(())
        if value.dtype != torch.int64:
            if torch.is_floating_point(value) or value.is_complex():
                warn_once(f"float-count:{name}", f"update({name}=...) got a {value.dtype} tensor: counts are taken "
                                                 "as whole numbers, rounded on the device; pass an integer tensor "
                                                 "(e.g. mask.sum()) to silence this")
                value = torch.nan_to_num(value.real if value.is_complex() else value, nan=0.0).round()
            value = value.to(torch.int64)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (isinstance(value, float) and (
            not math.isfinite(value) or not value.is_integer())) or value < 0:
        raise ValueError(f"update({name}={value!r}): a count must be a whole number >= 0 (or a 0-d tensor)")
    return int(value)


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
