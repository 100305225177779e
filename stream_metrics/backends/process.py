"""A prototype (not wired into ``create`` yet): MLflow's metric writes in a child process, off the GIL.

Why: profiled with both backends on and a row every ~10 ms step, MLflow's SQLAlchemy store spends
about 0.8 ms of CPU per row (some 11 metrics) in our sender thread, inside the training process,
mostly in Python, so it holds the GIL the training thread needs (W&B: about 0.1 ms per row). The
figures are in benchmarks/README.md ("Where the time goes").

How: the run stays in the training process (``start``, tags, params, ``finish`` go through the
parent's client as before, so the run is the one MLflow's own calls see there); only the bulk, the
rows, goes to a child process with its own ``MlflowClient``. The child is a fresh interpreter
(``python -c``), not ``multiprocessing``, whose spawn would re-run an unguarded training script.
The tracking URI (which may hold credentials) is passed on the child's stdin, never on its command
line. A failure in the child comes back as an exception from ``log_rows``, so delivery's retries,
buffer and spill file work as for the in-process backend; a child that died is started again.

    >>> from stream_metrics.backends.process import MLflowProcessBackend   # doctest: +SKIP
    >>> backend = MLflowProcessBackend(tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import subprocess
import sys

from .base import Row
from .mlflow import MLflowBackend

_CHILD = "from stream_metrics.backends.process import serve; serve()"


class MLflowProcessBackend(MLflowBackend):
    """The MLflow backend, with ``log_rows`` done by a child process (one JSON line each way per call)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        super().__init__(tracking_uri=tracking_uri, experiment=experiment)
        self._child = None

    def log_rows(self, rows: list[Row]) -> None:
        child = self._ensure_child()
        try:
            child.stdin.write(json.dumps([[r.metrics, r.timestamp_ms, self._step(r)] for r in rows]) + "\n")
            child.stdin.flush()
            answer = child.stdout.readline()  # waits in a system call: the GIL is free meanwhile
        except (BrokenPipeError, OSError) as exc:
            self._stop_child()
            raise RuntimeError(f"the MLflow sender process stopped ({exc})") from None
        if not answer:
            self._stop_child()
            raise RuntimeError("the MLflow sender process stopped without answering")
        error = json.loads(answer)
        if error is not None:
            raise RuntimeError(f"MLflow (sender process): {error}")

    def finish(self, status: str) -> None:
        self._stop_child()  # every row it was given has been answered: nothing is left in it
        super().finish(status)

    def _ensure_child(self):
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, bufsize=1)
            self._child.stdin.write(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id,
                                                "per_call": self.max_rows_per_call}) + "\n")
            self._child.stdin.flush()
        return self._child

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            try:
                child.stdin.close()  # end of input: the child returns
                child.wait(timeout=30)
            except Exception:
                child.kill()


def serve() -> None:
    """The child: read the target, then one JSON list of rows per line; answer null or the error text."""
    import os

    # Answers go to the real stdout; anything MLflow prints goes to stderr instead of into them.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    target = json.loads(sys.stdin.readline())
    client = MlflowClient(tracking_uri=target["tracking_uri"])
    for line in sys.stdin:
        try:
            metrics = [Metric(key, float(value), timestamp_ms, step)
                       for row_metrics, timestamp_ms, step in json.loads(line)
                       for key, value in row_metrics.items()]
            for i in range(0, len(metrics), target["per_call"]):
                client.log_batch(target["run_id"], metrics=metrics[i:i + target["per_call"]])
            answer = None
        except Exception as exc:  # sent back: the parent's delivery retries and reports
            answer = f"{type(exc).__name__}: {exc}"[:500]
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
