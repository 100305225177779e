"""Rows go to a backend from a background thread: the training loop only appends to a queue.

A backend that fails (server down, disk full) never stops training: its rows wait in a bounded
buffer and are retried with backoff, and a warning says how many are held back. Rows past the
buffer's bound, and rows still undelivered when the run finishes, are written to a local file
(JSON lines) that ``stream-metrics replay FILE`` sends into the run later. Nothing is dropped
without a message saying how many rows and where they are.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import threading
import time

from ..redact import redact_uri
from .base import Backend, Row

log = logging.getLogger("stream_metrics")

#: Rows held in memory per backend while it fails; past this they are written to the spill file.
BUFFER_ROWS = 10_000
_RETRY_FIRST, _RETRY_MAX = 0.5, 30.0
SPILL_DIR = "stream_metrics_undelivered"


class Delivery:
    """One backend's queue and sender thread."""

    def __init__(self, backend: Backend, *, buffer_rows: int = BUFFER_ROWS, spill_dir: str | None = None):
        self.backend = backend
        self.buffer_rows = buffer_rows
        self.spill_dir = spill_dir or os.environ.get("STREAM_METRICS_SPILL_DIR") or SPILL_DIR
        self._queue: collections.deque = collections.deque()  # (kind, payload)
        self._lock = threading.Condition()
        self._thread = None
        self._closing = False
        self._failing_since = None
        self._last_error = None
        self.delivered_rows = 0
        self.spilled_rows = 0
        self.spill_path = None
        self._next_warning = 0.0

    # ---------------------------------------------------------------- training thread side
    def submit(self, kind: str, payload) -> None:
        """Queue an operation; O(1), never blocks on the backend."""
        with self._lock:
            self._queue.append((kind, payload))
            if len(self._queue) > self.buffer_rows:
                self._spill_oldest(len(self._queue) - self.buffer_rows)
            self._lock.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"stream_metrics-{self.backend.name}",
                                            daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is delivered, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def close(self, status: str, timeout: float) -> str | None:
        """Deliver what is queued, finish the backend's run, and report anything left undelivered."""
        self.submit("finish", status)
        self.flush(timeout)
        with self._lock:
            self._closing = True
            left = [(k, p) for k, p in self._queue if k == "rows"]
            self._queue.clear()
            self._lock.notify_all()
            if left:
                self._write_spill([p for _, p in left])
        if self.spilled_rows:
            return (f"stream_metrics: {self.spilled_rows} row(s) could not be delivered to {self.backend.name} "
                    f"({self._last_error}); they are saved in {self.spill_path}: send them with "
                    f"`stream-metrics replay {self.spill_path}`")
        return None

    # ---------------------------------------------------------------- sender thread side
    _busy = False

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                kind, payload = self._queue[0]
                batch = [payload]
                if kind == "rows":
                    for k, p in itertools.islice(self._queue, 1, self.backend.max_rows_per_call):
                        if k != "rows":
                            break
                        batch.append(p)
                self._busy = True
            try:
                self._send(kind, payload, batch)
            except Exception as exc:  # the backend failed: keep the rows, wait, retry
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()
                self._on_failure(exc)
                continue
            with self._lock:
                for _ in batch:
                    if self._queue:
                        self._queue.popleft()
                self._busy = False
                self._lock.notify_all()
            if kind == "rows":
                self.delivered_rows += len(batch)
            if self._failing_since is not None:
                log.warning("stream_metrics: %s is reachable again after %.0f s; held-back rows are being delivered",
                            self.backend.name, time.monotonic() - self._failing_since)
                self._failing_since = None
            if kind == "finish":
                return

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

    def _on_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        self._last_error = redact_uri(f"{type(exc).__name__}: {exc}")[:300]
        if self._failing_since is None:
            self._failing_since = now
            self._next_warning = 0.0
        if now >= self._next_warning:
            held = sum(1 for k, _ in list(self._queue) if k == "rows")
            log.warning("stream_metrics: %s is failing (%s); %d row(s) held back and retried, training goes on",
                        self.backend.name, self._last_error, held)
            self._next_warning = now + 30.0
        wait = min(_RETRY_MAX, _RETRY_FIRST * 2 ** min(10, int((now - self._failing_since) // 5)))
        with self._lock:
            if not self._closing:
                self._lock.wait(wait)

    # ---------------------------------------------------------------- the spill file
    def _spill_oldest(self, count: int) -> None:
        # Called with the lock held. The head may be in flight: leave it in place.
        keep_head = 1 if self._busy and self._queue else 0
        rows, kept = [], collections.deque()
        items = list(self._queue)
        head, rest = items[:keep_head], items[keep_head:]
        for kind, payload in rest:
            if kind == "rows" and len(rows) < count:
                rows.append(payload)
            else:
                kept.append((kind, payload))
        if rows:
            self._queue = collections.deque(head + list(kept))
            self._write_spill(rows)

    def _write_spill(self, rows: list[Row]) -> None:
        if self.spill_path is None:
            os.makedirs(self.spill_dir, exist_ok=True)
            run_id = getattr(self.backend, "run_id", None) or getattr(getattr(self.backend, "run", None), "id", "run")
            self.spill_path = os.path.abspath(os.path.join(
                self.spill_dir, f"{self.backend.name}-{run_id}-{os.getpid()}.jsonl"))
            header = {"backend": self.backend.name, "run_id": run_id, **self.backend_target()}
            with open(self.spill_path, "w") as f:
                f.write(json.dumps({"header": header}) + "\n")
        with open(self.spill_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row.to_json()) + "\n")
        self.spilled_rows += len(rows)
        log.warning("stream_metrics: %d row(s) for %s written to %s (buffer of %d rows full or run finished); "
                    "replay with `stream-metrics replay %s`", len(rows), self.backend.name, self.spill_path,
                    self.buffer_rows, self.spill_path)

    def backend_target(self) -> dict:
        # Where the rows belong, with credentials left out: replay takes them from the environment.
        uri = getattr(self.backend, "tracking_uri", None)
        project = getattr(getattr(self.backend, "run", None), "project", None)
        return {k: v for k, v in (("tracking_uri", uri and redact_uri(uri)), ("project", project)) if v}


def replay(path: str, tracking_uri: str | None = None) -> int:
    """Send the rows saved in a spill file into their run; returns how many were sent."""
    with open(path) as f:
        header = json.loads(f.readline())["header"]
        rows = [Row.from_json(json.loads(line)) for line in f if line.strip()]
    if header["backend"] == "mlflow":
        from .mlflow import MLflowBackend

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header.get("tracking_uri")
        backend = MLflowBackend(tracking_uri=uri)
        backend.run_id = header["run_id"]
        backend.client.get_run(backend.run_id)
        backend.log_rows(rows)
    elif header["backend"] == "wandb":
        import wandb

        run = wandb.init(id=header["run_id"], project=header.get("project"), resume="allow")
        for row in rows:
            run.log(row.metrics)
        run.finish()
    else:
        raise ValueError(f"{path}: unknown backend {header['backend']!r}")
    return len(rows)
