"""Reading runs back from where the backends stored them: MLflow's tracking store, and W&B's
offline transaction log (the ``.wandb`` file ``wandb sync`` uploads), never our own notes.

    runs = read_runs(["bs8", "wandb/offline-run-20260101_120000-abc123"], mlflow_uri="sqlite:///mlflow.db")
    runs[0].rows[-1]["progress/samples"]

``compare``, ``show`` and ``check`` all read through here.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

from .. import schema
from ..redact import redact_uri


class CompareError(Exception):
    """Something the user can fix, said in one sentence (the command prints it and exits non-zero)."""


@dataclass
class RunHistory:
    """One run as its backend stored it: rows in logging order, each a dict of key -> number."""

    run_id: str
    name: str
    backend: str            # "mlflow" or "wandb"
    where: str              # the tracking URI (credentials removed) or the W&B run folder
    rows: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)      # stream_metrics tags, without the prefix
    summary: dict = field(default_factory=dict)   # W&B's end-of-run figures
    label: str = ""         # the name shown in charts and tables, unique among compared runs
    steps: list = field(default_factory=list)          # MLflow: each row's step ([] for W&B)
    step_metrics: dict = field(default_factory=dict)   # W&B: define_metric name or glob -> its step metric
    damaged: str = ""       # W&B: where the run file could not be read further, and why ("" if whole)
    running: bool = False   # MLflow: the run's status is RUNNING (training, or ended without a word)
    ended: bool = True      # W&B: the file has the record W&B writes when the run ends

    def keys(self) -> set:
        return {key for row in self.rows for key in row}

    def points(self, metric: str, axis_key: str, finite: bool = True) -> tuple[list, list]:
        """The metric against the axis, from every row that has both (finite values only, unless
        ``finite`` is False: then a NaN or infinite value stays, as a diverging run logged it)."""
        xs, ys = [], []
        for row in self.rows:
            x, y = row.get(axis_key), row.get(metric)
            if x is not None and y is not None and math.isfinite(x) and (math.isfinite(y) or not finite):
                xs.append(x)
                ys.append(y)
        return xs, ys


# ---------------------------------------------------------------------------- reading runs

def default_mlflow_uri() -> str:
    """The store runs are read from when none is given: the same rule the MLflow backend writes by."""
    from ..backends.mlflow import default_tracking_uri

    return default_tracking_uri()


def mlflow_store(uri: str | None) -> str:
    """A tracking URI to read from; a bare path to a SQLite file is accepted too."""
    from ..backends.mlflow import absolute_store

    uri = uri or default_mlflow_uri()
    if not re.match(r"[A-Za-z][\w+.-]*:", uri) and uri != "databricks":
        uri = "sqlite:///" + os.path.abspath(uri)
    # From this folder, now: MLflow keeps a store per URI text, so a relative one read again after a
    # change of folder (a notebook) would be the earlier folder's.
    uri = absolute_store(uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        # MLflow would create an empty store at a mistyped path; say what is missing instead.
        if not os.path.isfile(path):
            raise CompareError(f"there is no MLflow store at {path}: pass --mlflow-uri sqlite:///PATH/TO/mlflow.db "
                               "or a server URL")
    return uri


def read_runs(refs=(), mlflow_uri: str | None = None, experiments=()) -> list[RunHistory]:
    """Read runs named by the user, each read once, with unique labels.

    A ref is a W&B run folder, its ``.wandb`` file, or a folder of run folders (``wandb/``);
    anything else is an MLflow run id or run name at ``mlflow_uri``. ``experiments`` adds every
    run of each named MLflow experiment.
    """
    runs, mlflow = [], None
    for ref in refs:
        files = wandb_files(ref)
        if files:
            runs += [read_wandb_run(f) for f in files]
            continue
        if os.path.isdir(ref):
            raise CompareError(f"the folder {ref!r} holds no W&B run (no .wandb file in it or in its run folders)")
        mlflow = mlflow or _MlflowReader(mlflow_uri)
        runs += [mlflow.read(r) for r in mlflow.find(ref)]
    for name in experiments:
        mlflow = mlflow or _MlflowReader(mlflow_uri)
        found = mlflow.experiment_runs(name)
        if not found:
            raise CompareError(f"the MLflow experiment {name!r} at {redact_uri(mlflow.uri)} has no runs")
        runs += [mlflow.read(r) for r in found]
    if not runs:
        raise CompareError("name the runs: MLflow run ids or names, W&B run folders, or --experiment NAME")
    unique, seen = [], set()
    for run in runs:
        if (run.backend, run.where, run.run_id) not in seen:
            seen.add((run.backend, run.where, run.run_id))
            unique.append(run)
    _label(unique)
    return unique


def _label(runs: list[RunHistory]) -> None:
    # The run name where it is unique; the backend, then the id, where several runs share a name
    # (a run logged to both backends has the same name in each).
    for run in runs:
        run.label = run.name or run.run_id
    for extra in (lambda r: r.backend, lambda r: f"{r.backend} {r.run_id[:8]}", lambda r: r.where):
        names = [r.label for r in runs]
        for run in runs:
            if names.count(run.label) > 1:
                run.label = f"{run.name or run.run_id} ({extra(run)})"


class _MlflowReader:
    def __init__(self, uri: str | None):
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise CompareError("reading MLflow runs needs MLflow: pip install 'stream_metrics[mlflow]'") from None
        from ..backends.mlflow import MLflowStoreError, open_client

        self.uri = mlflow_store(uri)
        try:
            self.client = open_client(MlflowClient, self.uri, writing=False)
        except MLflowStoreError as exc:
            raise CompareError(str(exc)) from None
        self._missing = MlflowException

    def find(self, ref: str) -> list:
        """The run with this id, else the one run with this name in any experiment."""
        try:
            return [self.client.get_run(ref)]
        except self._missing:
            pass
        experiment_ids = [e.experiment_id for e in self.client.search_experiments()]
        quoted = json.dumps(ref) if "'" in ref else f"'{ref}'"
        found = self.client.search_runs(experiment_ids, filter_string=f"attributes.run_name = {quoted}",
                                        max_results=100) if experiment_ids else []
        if len(found) > 1:
            ids = ", ".join(r.info.run_id for r in found)
            raise CompareError(f"the run name {ref!r} matches {len(found)} MLflow runs ({ids}): name one by its id")
        if not found:
            raise CompareError(f"there is no run {ref!r} (by MLflow id or name at {redact_uri(self.uri)}, or as a "
                               "W&B run folder)")
        return found

    def experiment_runs(self, name: str) -> list:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(e.name for e in self.client.search_experiments()) or "none"
            raise CompareError(f"there is no MLflow experiment {name!r} at {redact_uri(self.uri)} "
                               f"(experiments: {known})")
        runs: list = []
        token = None
        while True:
            page = self.client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs

    def read(self, run) -> RunHistory:
        run_id = run.info.run_id
        # Every key of a row shares the row's step (SCHEMA section 4), so the step rebuilds the rows.
        # Where a step was logged again (a run resumed from an earlier checkpoint trains that data
        # again), the latest value of each key counts, as the resumed run's own view of that point;
        # and the rows an earlier session logged beyond where a later one went back to are left out
        # (the resumed session may log at other amounts: those rows are of a discarded branch).
        histories = {key: self.client.get_metric_history(run_id, key) for key in run.data.metrics}
        rewinds = _rewinds(histories.get(schema.SAMPLES, [])) + _resumes(run.data.tags)
        latest: dict = {}
        reached: dict = {}  # key -> the last step it was logged at
        for key, points in histories.items():
            for point in points:
                if rewinds and _superseded(point, rewinds):
                    continue
                reached[key] = max(reached.get(key, point.step), point.step)
                row = latest.setdefault(point.step, {})
                if key not in row or point.timestamp >= row[key][0]:
                    row[key] = (point.timestamp, _stored_value(point.value))
        tags = {k[len(schema.TAG_PREFIX):]: v for k, v in run.data.tags.items() if k.startswith(schema.TAG_PREFIX)}
        steps = sorted(latest)
        running = run.info.status == "RUNNING"
        if running and steps:
            # Each key's history is its own query: a row logged while they were read is in some of them.
            # Rows past the last step that every axis of every row has reached are still being written.
            ends = [reached[key] for key in _EVERY_ROW if key in reached]
            if ends:
                steps = [step for step in steps if step <= min(ends)]
        return RunHistory(run_id=run_id, name=run.info.run_name or "", backend="mlflow",
                          where=redact_uri(self.uri),
                          rows=[{k: v for k, (_, v) in latest[step].items()} for step in steps],
                          tags=tags, steps=steps, running=running)


# The axes every row carries (progress/tokens may be missing from every row).
_EVERY_ROW = (schema.STEP, schema.SAMPLES, schema.EPOCH, schema.WALL_CLOCK)


def _rewinds(points) -> list[tuple[int, int]]:
    """(timestamp, step) of each point where the run's samples went back: a session resumed from a
    checkpoint behind where the last one had logged. Only stream_metrics logs progress/samples, one
    point a row, so a user's own metrics at steps of their own cannot look like a resume."""
    found, most = [], None
    for point in sorted(points, key=lambda p: p.timestamp):
        if most is not None and point.step < most:
            found.append((point.timestamp, point.step))
            most = point.step
        else:
            most = point.step if most is None else max(most, point.step)
    return found


def _resumes(tags: dict) -> list[tuple[int, int]]:
    """(timestamp, step) of each session that went on from a checkpoint (schema.TAG_RESUMED_AT)."""
    prefix, found = schema.tag_name(schema.TAG_RESUMED_AT), []
    for name, value in tags.items():
        if name.startswith(prefix):
            try:
                found.append((int(value), int(name[len(prefix):])))
            except ValueError:
                continue  # not one of ours
    return found


def _superseded(point, rewinds: list[tuple[int, int]]) -> bool:
    """Logged before a later session went back to a step below this point's."""
    return any(point.timestamp < when and point.step > step for when, step in rewinds)


def _stored_value(value: float) -> float:
    """A value as logged: MLflow's SQL store keeps +/-inf as +/- the largest float, read back as inf."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def wandb_files(ref: str) -> list[str]:
    """The .wandb files a path names: a run folder's, the file itself, or every run's in a ``wandb/`` folder."""
    if os.path.isfile(ref) and ref.endswith(".wandb"):
        return [ref]
    if not os.path.isdir(ref):
        return []
    own = sorted(glob.glob(os.path.join(ref, "*.wandb")))
    if own:
        return own[-1:]
    # offline-run-* and run-* folders; latest-run is a link to one of them.
    found = {os.path.realpath(f): f for pattern in ("offline-run-*", "run-*")
             for f in glob.glob(os.path.join(ref, pattern, "*.wandb"))}
    return sorted(found.values())


def read_wandb_run(path: str) -> RunHistory:
    """One W&B run from its transaction log (the file ``wandb sync`` uploads); no account needed."""
    run_id = name = ""
    rows, config, summary, step_metrics = [], {}, {}, {}
    damage: list[str] = []
    ended = False
    for record in _settled_records(path, damage):
        kind = record.WhichOneof("record_type")
        ended = ended or kind == "exit"
        if kind == "metric":  # a define_metric call: a glob ("train/*") or an exact name
            defined = record.metric.glob_name or record.metric.name
            if defined and (record.metric.step_metric or defined not in step_metrics):
                step_metrics[defined] = record.metric.step_metric
        elif kind == "run":
            run_id, name = record.run.run_id or run_id, record.run.display_name or name
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            row = {k: v for k, v in _items(record.history.item).items() if not k.startswith("_")}
            rows.append({k: float(v) for k, v in row.items() if _is_number(v)})
        elif kind == "summary":
            summary.update({k: float(v) for k, v in _items(record.summary.update).items()
                            if not k.startswith("_") and _is_number(v)})
    tags = config.get(schema.CONFIG_KEY) or {}
    if isinstance(tags, dict) and isinstance(tags.get("value"), dict):
        tags = tags["value"]  # the config as W&B writes it to disk wraps each entry in {"value": ...}
    # The summary's figures that the history already holds are its last row; keep only the rest.
    summary = {k: v for k, v in summary.items() if not any(k in row for row in rows)}
    return RunHistory(run_id=run_id or os.path.basename(path), name=name, backend="wandb",
                      where=os.path.dirname(os.path.abspath(path)), rows=rows,
                      tags=tags if isinstance(tags, dict) else {}, summary=summary, step_metrics=step_metrics,
                      damaged=damage[0] if damage else "", ended=ended)


#: W&B's service may still be writing a run's log after ``wandb.finish()`` has returned (seen with
#: wandb 0.31 offline: a file holding only its header just after finish). A log written in the last
#: minute without its closing exit record is given this long to be completed.
SETTLE_SECONDS = 10.0


def _settled_records(path: str, damage: list[str]) -> list:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        damage.clear()
        records = list(wandb_records(path, damage))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline \
                or time.time() - os.path.getmtime(path) > 60:
            return records  # complete, or a run still going or killed: read as it is
        time.sleep(0.2)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _items(items) -> dict:
    out = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        try:
            out[key] = json.loads(item.value_json)
        except ValueError:
            out[key] = item.value_json
    return out


def wandb_records(path: str, damage: list[str] | None = None):
    """The records of a .wandb file: a LevelDB-style log of 32 KiB blocks holding protobuf records.

    Reading stops where the file is damaged (a record whose checksum does not match, or that does not
    parse): ``damage`` gets one sentence saying where. A record cut short at the end (the writer was
    killed, or is still writing) ends the reading without a word: the records before it are whole.
    """
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        raise CompareError("reading W&B runs needs wandb: pip install 'stream_metrics[wandb]'") from None
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise CompareError(f"{path} is not a W&B transaction log")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        if pos + 7 + length > len(data):
            return  # cut short: the writer is still running or was killed mid-write
        payload = data[pos + 7:pos + 7 + length]
        # The checksum covers the piece's kind and bytes (W&B's datastore: CRC-32 seeded with the kind).
        if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
            if damage is not None:
                damage.append(f"the file is damaged at byte {pos} of {len(data)} (a record's checksum does not "
                              "match): what follows it is not read")
            return
        pos += 7 + length
        if kind == 1:      # a whole record
            whole = payload
        elif kind == 2:    # first, middle and last pieces of a record split across blocks
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            whole, pending = pending + payload, b""
        else:
            continue
        record = pb.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(whole)
        except Exception:
            if damage is not None:
                damage.append(f"the file is damaged before byte {pos} of {len(data)} (a record does not parse): "
                              "what follows it is not read")
            return
        yield record

