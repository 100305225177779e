"""The spill file: rows (and tags, the run's end) a backend could not take, saved for ``replay``.

A spill file is JSON lines: a header naming the backend, its run and where it lives (never a
credential), then one line per operation in order. Rows carry their sequence number, and lines
``{"op": "stored", "seqs": [...]}`` name rows that reached the backend after all (a call that was
in flight when the file was written, or an earlier replay cut short), so a replay stores each point
once, however often it is run.

    >>> from stream_metrics.backends.spill import replay
    >>> replay("stream_metrics_undelivered/mlflow-1a2b-x7.jsonl")   # doctest: +SKIP
    120
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

from ..redact import redact_uri
from .base import Backend, Row, RunInfo

SPILL_DIR = "stream_metrics_undelivered"
log = logging.getLogger("stream_metrics")
REPLAY_COMMAND = "stream-metrics replay"  # cli.py; also `python -m stream_metrics replay`


def spill_dir() -> str:
    return os.environ.get("STREAM_METRICS_SPILL_DIR") or SPILL_DIR


class SpillFile:
    """One backend's spill file, created on the first write; not thread-safe (delivery.py holds its lock)."""

    def __init__(self, backend: Backend, folder: str | None = None):
        self.backend = backend
        self.folder = folder or spill_dir()
        self.path: str | None = None
        self.rows = 0  # rows written to the file

    def write(self, ops: list, start: RunInfo | None) -> None:
        """Append operations ``(kind, payload)``; names the run where it has opened since the header."""
        if self.path is None:
            os.makedirs(self.folder, exist_ok=True)
            run_id = self.backend.run_id
            fd, path = tempfile.mkstemp(prefix=f"{self.backend.name}-{run_id or 'unstarted'}-", suffix=".jsonl",
                                        dir=self.folder)
            self.path = os.path.abspath(path)
            target = {k: redact_uri(v) if isinstance(v, str) else v for k, v in self.backend.target().items() if v}
            # The run to replay into: the open one, else the one the start continues (a resume, MLFLOW_RUN_ID).
            header = {"backend": self.backend.name,
                      "run_id": run_id or (self.backend.run_to_continue(start) if start else None),
                      "start": start and dataclasses.asdict(start), "target": target}
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"header": header}) + "\n")
        lines = [_op_json(kind, payload) for kind, payload in ops]
        if self.backend.run_id:  # the run may have opened after the header was written
            lines.append({"op": "run", "run_id": self.backend.run_id})
        self._append(lines)
        self.rows += sum(1 for kind, _ in ops if kind == "rows")

    def mark_stored(self, seqs: list[int]) -> None:
        """Rows of the file that reached the backend after all: replay leaves them out."""
        if seqs and self.path:
            self._append([{"op": "stored", "seqs": seqs}])

    def mark_run(self, run_id: str) -> None:
        """The run opened after the file was written: replay continues it rather than opening another."""
        if self.path:
            self._append([{"op": "run", "run_id": run_id}])

    def command(self) -> str:
        return f"{REPLAY_COMMAND} {self.path}"

    def _append(self, lines: list[dict]) -> None:
        assert self.path is not None  # callers write only to a file that was named
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))


def _op_json(kind: str, payload) -> dict:
    if kind == "rows":
        return payload.to_json()
    if kind == "tags":
        return {"op": "tags", "tags": payload}
    if kind == "summary":
        figures, row = payload
        return {"op": "summary", "metrics": figures, "row": row.to_json()}
    if kind == "finish":
        return {"op": "finish", "status": payload}
    return {"op": kind}  # "start": its RunInfo is in the header; "status": not replayed (the finish op is)


class SpillFileError(ValueError):
    """The file is not one replay can send: not a spill file, damaged, or sent already."""


def _load(path: str) -> tuple[dict, list[dict]]:
    """The header and the operations of a spill file. A last line cut short (the process was killed
    while writing it) is cut off the file with a warning, so lines added later start on their own;
    any other damage is a ``SpillFileError``."""
    if path.endswith(".replayed"):
        raise SpillFileError(f"{path} was replayed already (replay renames a file once every row in it is sent)")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last = lines.pop()  # after the last newline: b"" unless the last line has none
    torn = False
    if last.strip():
        try:
            json.loads(last)
            lines.append(last)  # whole, only without its newline (a file written by hand)
        except ValueError:
            torn = True  # cut short: the process ended while writing it
    try:
        header = json.loads(lines[0])["header"] if lines else None
    except (ValueError, KeyError, TypeError):
        header = None
    if not isinstance(header, dict) or "backend" not in header:
        raise SpillFileError(f"{path} is not a stream_metrics spill file (its first line is not a spill header)")
    ops = []
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            try:
                ops.append(json.loads(line))
            except ValueError:
                raise SpillFileError(f"{path} is damaged at line {number}: it is not JSON") from None
    if torn:
        os.truncate(path, len(data) - len(last))
        log.warning("stream_metrics: the last line of %s was cut short (the process ended while writing it): "
                    "it is left out, and cut off the file", path)
    elif last.strip():
        with open(path, "a") as f:
            f.write("\n")  # so that what replay notes in the file starts on a line of its own
    return header, ops


def replay(path: str, tracking_uri: str | None = None) -> int:
    """Send a spill file's rows (and any undelivered tags and end of run) into their run.

    Returns how many rows were sent, and renames the file to ``<path>.replayed``. The target
    comes from the file; credentials from the environment (``MLFLOW_TRACKING_URI``,
    ``WANDB_API_KEY``), since the file never holds them. A run that never opened is created, and
    the file notes it at once, so a replay cut short goes on into that run when it is run again.
    Rows already stored (named by a "stored" line) are left out; a replay cut short by a failure
    notes in the file what it stored, so running it again sends only the rest.
    """
    return replay_file(path, tracking_uri)[0]


def replay_file(path: str, tracking_uri: str | None = None) -> tuple[int, str]:
    """``replay``, and where the rows went (the backend's ``where()``)."""
    from . import backend_class

    header, ops = _load(path)
    start = dict(header.get("start") or {})
    # The run the training continued (a resume, MLFLOW_RUN_ID) where it never opened it itself.
    run_id = header.get("run_id") or start.get("run_id")
    stored: set[int] = set()
    for op in ops:
        if op.get("op") == "run":
            run_id = op["run_id"]
        elif op.get("op") == "stored":
            stored.update(op["seqs"])
    # Files written before the header had "target" kept its keys at the top.
    target = header.get("target") or {k: header[k] for k in ("tracking_uri", "project") if header.get(k)}
    backend = backend_class(header["backend"]).for_replay(target, {"tracking_uri": tracking_uri} if tracking_uri
                                                          else {})
    info = RunInfo(**{**start, "run_id": run_id, "axes": tuple(start.get("axes") or ())})
    backend.reopen(info)
    spill = SpillFile(backend)
    spill.path = path
    if backend.run_id and backend.run_id != run_id:
        spill.mark_run(backend.run_id)  # the run this replay created: a second replay continues it

    sent, finished = 0, False
    pending: list = []

    def send_pending():
        nonlocal sent
        for i in range(0, len(pending), backend.max_rows_per_call):
            chunk = pending[i:i + backend.max_rows_per_call]
            try:
                backend.log_rows(chunk)
            finally:
                done = [row.seq for row in chunk if row.seq <= backend.stored_seq]
                spill.mark_stored(done)
                sent += len(done)
        pending.clear()

    for op in ops:
        kind = op.get("op")
        if kind is None:
            row = Row.from_json(op)
            if row.seq not in stored:
                pending.append(row)
            continue
        send_pending()
        if kind == "start" and run_id:
            backend.complete_start(info)  # the run was there, its start undelivered: tags, parameters
        elif kind == "tags":
            backend.set_tags(op["tags"])
        elif kind == "summary":
            backend.log_summary(op["metrics"], Row.from_json(op["row"]))
        elif kind == "finish":
            backend.finish(op["status"])
            finished = True
    send_pending()
    backend.release(finished)
    os.replace(path, path + ".replayed")
    return sent, backend.where()
