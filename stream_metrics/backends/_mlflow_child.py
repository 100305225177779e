"""The MLflow sender process's program (process.py starts it): rows in on stdin, answers out on stdout.

It imports nothing of stream_metrics (whose package imports torch): only MLflow, from the training
process's own ``sys.path``, sent in the first line. Protocol, one JSON text per line:

- in, first: ``{"sys_path": [...], "idle_seconds": ...}``;
- in, then: ``{"id": n, "uri": ..., "run_id": ..., "per_call": 1000,
  "rows": [[metrics, timestamp_ms, step, seq], ...]}``, with ``"environment"`` where MLflow's
  variables changed;
- out: ``{"id": n, "stored": seq or null, "error": text or null}``; ``stored`` is the last row stored,
  also when a later call failed, so a retry sends only the rest.

Each tracking URI has its own thread and client here, so a server that hangs holds back its own
rows only; a URI's thread leaves after ``IDLE_SECONDS`` without rows. The process ends when its
stdin closes (the training process ended or let it go), once every request it has read is
answered; it ignores SIGINT (a Ctrl-C is for the training process, which finishes its runs
through this process) and SIGTERM (the training process's handler delivers its rows through it
first; it then ends with its stdin).

Once MLflow is loaded and has stored its first rows, the process's objects (MLflow's and
SQLAlchemy's modules, about 270,000) are moved out of the garbage collector's way (``gc.freeze``):
each collection would otherwise walk them all again, and the SQLAlchemy objects a row makes set one
off every few rows. It cuts the CPU a row costs here by a tenth to a fifth (benchmarks/README.md);
the training process's own collector is left as it is (the thread sender's ``log_rows`` never freezes).
"""
import gc
import json
import os
import queue
import signal
import sys
import threading
import time

FINAL_SECONDS = 30.0
#: A tracking URI's thread (and its client) leaves after this long without rows; the next row for
#: that URI starts another. A training process that logs to many stores keeps no thread for each.
IDLE_SECONDS = 300.0
ENVIRONMENT = ("MLFLOW_", "DATABRICKS_")  # the variables MLflow's client reads (process.py sends them)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    answers = sys.stdout
    sys.stdout = sys.stderr  # anything MLflow prints goes to stderr, never into the answers
    hello = json.loads(sys.stdin.readline() or "{}")
    if hello.get("sys_path"):
        sys.path[:] = hello["sys_path"]
    write_lock = threading.Lock()

    def answer(request_id, stored, error) -> None:
        line = json.dumps({"id": request_id, "stored": stored, "error": error}) + "\n"
        with write_lock:
            try:
                answers.write(line)
                answers.flush()
            except (BrokenPipeError, ValueError):  # the training process is gone: store the rest all the same
                pass

    idle = float(hello.get("idle_seconds") or IDLE_SECONDS)
    workers: dict = {}  # uri -> (inbox, thread); a thread idle for `idle` seconds leaves, under the lock
    workers_lock = threading.Lock()
    for line in sys.stdin:
        request = json.loads(line)
        if "environment" in request:  # MLflow's settings as the training process has them now
            for name in [n for n in os.environ if n.startswith(ENVIRONMENT) and n not in request["environment"]]:
                del os.environ[name]
            os.environ.update(request["environment"])
        uri = request["uri"]
        with workers_lock:
            if uri not in workers:
                inbox: queue.Queue = queue.Queue()
                thread = threading.Thread(target=serve_uri, args=(uri, inbox, answer, idle, workers, workers_lock),
                                          daemon=True)
                thread.start()
                workers[uri] = (inbox, thread)
            workers[uri][0].put(request)
    # The training process let go: answer what was read, for a bounded time (a server that hangs
    # would otherwise keep this process for minutes); the training process kept every unanswered row.
    deadline = time.monotonic() + FINAL_SECONDS
    with workers_lock:
        left = list(workers.values())
        for inbox, _ in left:
            inbox.put(None)
    for _, thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))


def serve_uri(uri: str, inbox: "queue.Queue", answer, idle: float, workers: dict, workers_lock) -> None:
    """Store the rows sent for ``uri``, one request after another; leave after ``idle`` seconds without any."""
    client = None
    while True:
        try:
            request = inbox.get(timeout=idle)
        except queue.Empty:
            with workers_lock:  # the reader puts requests under this lock: none can be left behind
                if inbox.empty():
                    del workers[uri]
                    return
            continue
        if request is None:
            return
        stored: list = []  # the rows stored, call by call: the last one counts, also when a later call fails
        error = None
        try:
            if client is None:
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=uri)
            log_rows(client, request["run_id"], request["rows"], int(request["per_call"]), stored=stored.append)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        answer(request["id"], stored[-1] if stored else None, error)
        if stored:
            freeze_heap()


_frozen = threading.Lock()  # held for good by the first thread to freeze: once per process


def freeze_heap() -> None:
    """Once per process, after MLflow's first rows: collect what is garbage, then ``gc.freeze()`` the rest
    (what MLflow has loaded stays alive as long as this process, so later collections skip it)."""
    if _frozen.acquire(blocking=False):
        gc.collect()
        gc.freeze()


def log_rows(client, run_id: str, rows: list, per_call: int, stored=lambda seq: None) -> None:
    """Store ``rows`` ([metrics, timestamp_ms, step, seq] each) in order; the one way both senders do it.

    Whole rows go in each ``log_batch`` call (a row of more than ``per_call`` points alone, in parts),
    and ``stored(seq)`` is called once a call has stored the rows up to ``seq``: a retry after a
    failed call sends only what is not stored. A failure is raised as it comes. MLflowBackend's
    thread sender calls this too (this file imports nothing of stream_metrics, so it may).
    """
    from mlflow.entities import Metric

    batch: list = []
    last = None

    def send() -> None:
        for i in range(0, len(batch), per_call):
            client.log_batch(run_id, metrics=batch[i:i + per_call])
        stored(last)

    for metrics, timestamp_ms, step, seq in rows:
        points = [Metric(key, float(value), int(timestamp_ms), int(step)) for key, value in metrics.items()]
        if batch and len(batch) + len(points) > per_call:
            send()
            batch = []
        batch.extend(points)
        last = seq
    if batch:
        send()


if __name__ == "__main__":
    main()
