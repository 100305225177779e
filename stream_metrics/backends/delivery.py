"""Rows go to a backend from a background thread: the training loop only appends to a queue.

A backend that fails (server down, disk full) never stops training: its rows wait in a bounded
buffer and are retried with backoff, and a warning says how many are held back. Rows past the
buffer's bound, and everything still undelivered when the run finishes, are written to a spill
file (spill.py) that ``stream-metrics replay FILE`` sends into the run later. Nothing is dropped
without a message saying how many rows and where they are. A retried call never stores a row
twice: each row has a sequence number, and the backend's ``stored_seq`` says which it has.

Every warning goes to the ``stream_metrics`` logger; docs/reliability.md quotes them.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

from ..redact import redact_uri
from .base import Backend, RunInfo
from .spill import REPLAY_COMMAND, SpillFile

log = logging.getLogger("stream_metrics")

#: Rows held in memory per backend while it fails; past this the oldest go to the spill file.
BUFFER_ROWS = 10_000
#: A call that has not answered for this long counts as failing (MLflow's own HTTP retries can
#: hold one call for minutes), and failure warnings repeat at most this often.
STALL_SECONDS = 30.0
_RETRY_FIRST, _RETRY_MAX = 0.5, 30.0
#: Rows arriving within this many seconds go to the backend in one call: one MLflow log_batch of
#: ten rows costs far less than ten calls, and the sender then takes the CPU (and the GIL) from
#: the training loop far less often. flush() and finish() do not wait for it, nor does an ending
#: process (lifecycle.py finishes open runs at exit and on SIGTERM/SIGINT).
LINGER_SECONDS = 1.0


class Delivery:
    """One backend's queue of operations ("start", "rows", "tags", "summary", "status", "finish") and its
    sender thread."""

    def __init__(self, backend: Backend, *, buffer_rows: int = BUFFER_ROWS, spill_dir: str | None = None):
        self.backend = backend
        self.buffer_rows = max(1, int(buffer_rows))
        self.spill = SpillFile(backend, spill_dir)
        self._queue: collections.deque = collections.deque()  # (kind, payload), oldest first
        # The training thread takes the lock itself (a C call); the condition around it is for waiting.
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._held_rows = 0          # "rows" operations in the queue
        self._in_flight = 0          # operations at the head of the queue being sent right now
        self._sending_since: float | None = None   # when the call in flight started
        self._retry_now = False      # flush() asks a backing-off sender to try again at once
        self._idle = False           # the sender waits for the queue to fill, with no deadline
        self._lingering = False      # the sender waits (until its deadline) for a batch to fill
        self._failures = 0
        self._stopped = False        # the sender gave up for good (no thread can start at interpreter exit)
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._next_warning = 0.0
        self._start_info: RunInfo | None = None
        self._finish_queued = False
        self.delivered_rows = 0
        self.lost_rows = 0           # rows neither delivered nor saved: the spill file could not be written
        self._spill_error: str | None = None
        self._spill_reason: str | None = None  # why rows went to the file before the run's end

    # ---------------------------------------------------------------- training thread side
    def submit(self, kind: str, payload) -> None:
        """Queue an operation; never waits for the backend (past the buffer, rows go to the spill file)."""
        with self._mutex:
            if kind == "start":
                self._start_info = payload
            self._queue.append((kind, payload))
            if kind == "rows":
                self._held_rows += 1
                if self._held_rows > self.buffer_rows:
                    # In chunks of a tenth of the buffer, so the file is opened once per many rows.
                    self._spill_oldest(self._held_rows - self.buffer_rows + self.buffer_rows // 10)
            if self._sending_since is not None:
                self._warn_if_stalled()
            # Wake the sender only when it has something to do now: a notify per row would wake a
            # lingering sender every row, to take the GIL from the training thread and wait again.
            # Lingering, it wakes at its deadline by itself; backing off, new rows must not cut it short.
            if self._idle or kind != "rows" or (self._lingering and self._held_rows >= self.backend.max_rows_per_call):
                self._lock.notify_all()
        if self._thread is None:
            thread = self._thread = threading.Thread(target=self._work, name=f"stream_metrics-{self.backend.name}",
                                                     daemon=True)
            thread.start()

    @property
    def spilled_rows(self) -> int:
        return self.spill.rows

    @property
    def spill_path(self) -> str | None:
        return self.spill.path

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is delivered, at most ``timeout`` seconds."""
        self._hurry(True)
        try:
            return self._wait_delivered(time.monotonic() + timeout)
        finally:
            self._hurry(False)

    @property
    def failing(self) -> bool:
        """The backend's last attempt failed (its rows are held, retried, and saved at the end)."""
        return self._last_error is not None

    def _hurry(self, on: bool) -> None:
        with self._lock:
            self._retry_now = on  # no backoff, no lingering while someone waits
            self._lock.notify_all()

    def _wait_delivered(self, deadline: float) -> bool:
        with self._lock:
            while self._queue and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
            return not self._queue

    def close(self, status: str, timeout: float) -> str | None:
        """Deliver what is queued and finish the backend's run, waiting at most ``timeout`` seconds.

        Whatever is still undelivered then (rows, tags, the run's end) goes to the spill file;
        returns the message saying how many rows, where, and how to replay them, or None.
        """
        return close_all([self], status, timeout)[0]

    def _begin_close(self, status: str) -> None:
        if not self._finish_queued:  # a second close (a signal during the first) only waits again
            self._finish_queued = True
            self.submit("finish", status)
        self._hurry(True)  # stays on: nothing lingers or backs off once the run is ending

    def _end_close(self) -> str | None:
        with self._lock:
            self._closing = True
            # A call still in flight is included (its outcome is unknown; the sender notes in the
            # file what it stored after all); rows the backend has already stored are not.
            left = [(kind, payload) for kind, payload in self._queue
                    if not (kind == "rows" and payload.seq <= self.backend.stored_seq)]
            self._queue.clear()
            self._held_rows = 0
            self._lock.notify_all()
            saved = self._write_spill(left, warn=False) if left else True  # the message below says what was lost
        if not (self.spilled_rows or self.lost_rows or left):
            return None
        reason = self._last_error or self._spill_reason or "no answer in time"
        if self.lost_rows or not saved:
            what = f"{self.lost_rows} row(s)" if self.lost_rows else "the end of the run"
            are = "are" if self.lost_rows else "is"
            kept = (f"; {self.spilled_rows} other row(s) are saved in {self.spill_path}: send them with "
                    f"`{self.spill.command()}`") if self.spilled_rows else ""
            return (f"stream_metrics: {what} for {self.backend.name} could not be delivered ({reason}) nor saved "
                    f"({self._spill_error}), and {are} lost; set STREAM_METRICS_SPILL_DIR to a writable folder{kept}")
        what = f"{self.spilled_rows} row(s)" if self.spilled_rows else "the end of the run"
        return (f"stream_metrics: {what} could not be delivered to {self.backend.name} "
                f"({reason}); saved in {self.spill_path}: send them with `{self.spill.command()}`")

    def _warn_if_stalled(self) -> None:
        # With the lock held. Failures the sender sees are warned about in _on_failure; this catches
        # a call that blocks without failing (a server that accepts connections but never answers).
        now = time.monotonic()
        if self._sending_since is not None and now - self._sending_since > STALL_SECONDS and now >= self._next_warning:
            self._next_warning = now + STALL_SECONDS
            log.warning("stream_metrics: %s has not answered for %.0f s; %s, training goes on",
                        self.backend.name, now - self._sending_since, self._held_text())

    def _held_text(self) -> str:
        text = f"{self._held_rows} row(s) held back and retried"
        if self.spilled_rows:
            text += f", {self.spilled_rows} more saved in {self.spill_path}"
        return text

    # ---------------------------------------------------------------- sender thread side
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._lock.wait()
                self._idle = False
                if self._closing:
                    return
                kind, payload = self._queue[0]
                if kind == "rows":
                    self._linger()
                batch = [payload]
                if kind == "rows":
                    for k, p in itertools.islice(self._queue, 1, self.backend.max_rows_per_call):
                        if k != "rows":
                            break
                        batch.append(p)
                self._in_flight, self._sending_since = len(batch), time.monotonic()
            try:
                self._send(kind, payload, batch)
            except Exception as exc:  # the backend failed: keep everything queued, wait, retry
                with self._lock:
                    self._in_flight, self._sending_since = 0, None
                    self._lock.notify_all()
                    if self._closing:
                        self._note_late_outcome(kind, batch, ok=False)
                        return
                if refused_at_exit(exc):
                    self._give_up(exc)
                    return
                self._on_failure(exc)
                continue
            with self._lock:
                if self._closing:  # close() gave up waiting and saved the queue, this call included
                    self._note_late_outcome(kind, batch, ok=True)
                    return
                for _ in batch:
                    self._queue.popleft()  # the in-flight head is never spilled, so these are ours
                if kind == "rows":
                    self._held_rows -= len(batch)
                    self.delivered_rows += len(batch)
                elif kind == "start" and self.spill.path is not None and self.backend.run_id:
                    # Rows saved before the run opened: their replay goes into this run, not a new one.
                    self._mark_run(self.backend.run_id)
                self._in_flight, self._sending_since = 0, None
                self._lock.notify_all()
            del batch, payload  # delivered: not kept while the sender waits for more
            if self._failing_since is not None:
                log.warning("stream_metrics: %s is reachable again after %.0f s; held-back rows are being delivered",
                            self.backend.name, time.monotonic() - self._failing_since)
                self._failing_since, self._failures, self._next_warning = None, 0, 0.0
                self._last_error = None  # a later message names a later failure, not this one
            if kind == "finish":
                return

    def _note_late_outcome(self, kind: str, batch: list, ok: bool) -> None:
        # With the lock held, after close() saved this call's operations to the spill file: say
        # what reached the backend after all, so replay stores each point once.
        if kind in ("rows", "summary"):
            rows = batch if kind == "rows" else [batch[0][1]]
            try:
                self.spill.mark_stored([row.seq for row in rows if row.seq <= self.backend.stored_seq])
            except OSError as exc:  # replay may then store those rows twice: say so
                log.error("stream_metrics: could not note in %s which rows %s stored after all (%s); a replay may "
                          "store them twice", self.spill_path, self.backend.name, _error_text(exc))
        elif kind == "start" and ok and self.backend.run_id:
            self._mark_run(self.backend.run_id)

    def _linger(self) -> None:
        # With the lock held: let a few more rows arrive, so they go out in one call.
        deadline = time.monotonic() + LINGER_SECONDS
        self._lingering = True
        try:
            while (not self._closing and not self._retry_now and self._failing_since is None
                   and self._held_rows < self.backend.max_rows_per_call):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._lock.wait(left)
        finally:
            self._lingering = False

    def _send(self, kind, payload, batch) -> None:
        if kind == "rows":
            self.backend.log_rows(batch)
        elif kind == "start":
            self.backend.start(payload)
        elif kind == "tags":
            self.backend.set_tags(payload)
        elif kind == "summary":
            self.backend.log_summary(*payload)
        elif kind == "finish":
            self.backend.finish(payload)
        elif kind == "status":
            self.backend.show_status(payload)

    def _give_up(self, exc: Exception) -> None:
        # The interpreter is exiting and refuses a thread the backend's client needs: no retry can
        # succeed, so the run's end spills what is queued at once, not after retrying for flush_timeout.
        error = _error_text(exc)
        log.warning("stream_metrics: %s cannot go on while the interpreter exits (%s: Python starts no new thread "
                    "then; 3.12.0 and 3.12.1 refuse from the moment the script ends): its undelivered rows go to "
                    "the spill file at once. Call run.finish() before the script ends", self.backend.name, error)
        with self._lock:  # after the warning: the run's end, waiting for this, then spills and says where
            self._last_error = error
            self._stopped = True
            self._lock.notify_all()

    def _on_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_error = _error_text(exc)
            if self._failing_since is None:
                self._failing_since = now
            if now >= self._next_warning:
                self._next_warning = now + STALL_SECONDS
                log.warning("stream_metrics: %s is failing (%s); %s, training goes on",
                            self.backend.name, self._last_error, self._held_text())
            deadline = now + min(_RETRY_MAX, _RETRY_FIRST * 2 ** min(self._failures, 10))
            self._failures += 1
            self._retry_now = False
            # Backoff: new rows arriving do not cut it short; flush() and close() do.
            while not self._closing and not self._retry_now and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())

    # ---------------------------------------------------------------- the spill file
    def _spill_oldest(self, count: int) -> None:
        # With the lock held. The operations being sent stay at the head of the queue.
        items = list(self._queue)
        head, rest = items[:self._in_flight], items[self._in_flight:]
        spilled: list = []
        kept: list = []
        for kind, payload in rest:
            if kind == "rows" and len(spilled) < count:
                spilled.append((kind, payload))
            else:
                kept.append((kind, payload))
        if not spilled:
            return
        self._queue = collections.deque(head + kept)
        self._held_rows -= len(spilled)
        first = self.spill_path is None
        why = f"failed: {self._last_error}" if self._last_error else "did not answer"
        self._spill_reason = f"the buffer of {self.buffer_rows} rows was full while it {why}"
        if not self._write_spill(spilled, warn=True):
            return
        now = time.monotonic()
        if first or now >= self._next_warning:
            self._next_warning = now + STALL_SECONDS
            log.warning("stream_metrics: the buffer of %d rows for %s is full: %d row(s) so far saved in %s; "
                        "replay them with `%s %s`", self.buffer_rows, self.backend.name, self.spilled_rows,
                        self.spill_path, REPLAY_COMMAND, self.spill_path)

    def _write_spill(self, ops: list, warn: bool) -> bool:
        """With the lock held: save ``ops`` to the spill file. Where the file cannot be written (a
        read-only folder, a full disk) its rows are lost: counted, and said, never raised to training."""
        try:
            self.spill.write(ops, self._start_info)
            return True
        except OSError as exc:
            rows = sum(1 for kind, _ in ops if kind == "rows")
            self.lost_rows += rows
            first = self._spill_error is None
            self._spill_error = _error_text(exc)
            now = time.monotonic()
            if warn and (first or now >= self._next_warning):
                self._next_warning = now + STALL_SECONDS
                log.error("stream_metrics: the buffer of %d rows for %s is full and the spill file cannot be written "
                          "(%s): %d row(s) lost so far; set STREAM_METRICS_SPILL_DIR to a writable folder, training "
                          "goes on", self.buffer_rows, self.backend.name, self._spill_error, self.lost_rows)
            return False

    def _mark_run(self, run_id: str) -> None:
        # With the lock held: the spill file names the run that opened (a failed write is only said).
        try:
            self.spill.mark_run(run_id)
        except OSError as exc:
            log.error("stream_metrics: could not note %s's run %s in %s (%s); replay it with the run's id in mind",
                      self.backend.name, run_id, self.spill_path, _error_text(exc))


def _error_text(exc: BaseException) -> str:
    """A backend's error as warnings and the spill message quote it: its type and text, any URI's secrets redacted."""
    return redact_uri(f"{type(exc).__name__}: {exc}")[:300]


def refused_at_exit(exc: BaseException) -> bool:
    """Whether ``exc`` is Python refusing a new thread because the interpreter is exiting."""
    return isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc)


def close_all(deliveries: list[Delivery], status: str, timeout: float) -> list[str | None]:
    """Finish every backend's run at once, with one deadline ``timeout`` seconds away.

    Each backend has its own thread, so they deliver in parallel; whatever is not delivered by the
    deadline goes to its spill file. Returns each backend's message (see ``Delivery.close``).
    """
    deadline = time.monotonic() + timeout
    for d in deliveries:
        d._begin_close(status)
    for d in deliveries:
        d._wait_delivered(deadline)
    return [d._end_close() for d in deliveries]
