"""MLflow: one run, every key of a row at one integer step (the row's mlflow_step axis).

The tracking URI is the one MLflow itself would use (``MLFLOW_TRACKING_URI``, else its default
``sqlite:///mlflow.db``); the experiment is ``MLFLOW_EXPERIMENT_NAME`` or the one given;
``MLFLOW_RUN_ID`` continues an existing run, as in the Hugging Face integration.

Every call may be retried after a failure (delivery.py): ``start`` creates one run whatever
fails after ``create_run`` and is tried again, parameters count as logged once MLflow has them,
and rows count as stored call by call (MLflow also keeps one copy of identical points).
"""
from __future__ import annotations

import logging
import os
import json
import re
import time

from .. import invisible, schema
from ..counting import warn_once
from ..redact import flat_params, redact_uri
from ..sanitize import KeyMap
from .base import Backend, Row, RunInfo

log = logging.getLogger("stream_metrics")

_MAX_PARAMS = 100  # MLflow's limits per log_batch call
_MAX_METRICS = 1000
_MAX_PARAM_LENGTH = 6000


class MLflowBackend(Backend):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, sender: str = "process"):
        if sender not in ("process", "thread"):
            raise ValueError(f"mlflow={{'sender': {sender!r}}}: use 'process' (the rows are written by a child "
                             "process, off the training process's GIL; the default) or 'thread'")
        self.sender = sender
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            raise ImportError("the mlflow backend needs MLflow: pip install 'stream_metrics[mlflow]'") from None
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if redact_uri(self.tracking_uri) != self.tracking_uri:
            # MLflow prints "View run ... at: <tracking URI>" when a run ends, password included.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        # A relative store path is taken from the folder the run starts in, for this process's client
        # and the sender process (which may have started elsewhere) alike. MLflow keeps one store per
        # URI text for the life of the process: given the relative text, a later run started in
        # another folder would open its run in the first folder's store and send its rows to its own.
        self.store_uri = absolute_store(self.tracking_uri)
        self.client = open_client(MlflowClient, self.store_uri)
        invisible.keep_mlflow_off_the_global_random()  # its own draws never consume the training's random
        self.run_id: str | None = None
        self.step_key = schema.SAMPLES  # the row's axis whose value is its MLflow step (RunInfo's mlflow_step tag)
        self._reopened = False  # the run was there before start(): its stored params are read once
        self._logged_params: dict[str, str] = {}
        # A run the user opened (mlflow.start_run) in this thread, in this store: the rows go into it,
        # as the Trainer's own MLflow integration does, and it is the user's to end. Read here, in the
        # caller's thread: MLflow's active run is the thread's own.
        active = mlflow.active_run()
        self._users_run = active.info.run_id if active is not None and absolute_store(
            mlflow.get_tracking_uri()) == self.store_uri else None
        # Parameter names go through the same sanitising as metric keys, and two config keys never
        # share a name (label2id with non-Latin labels would otherwise fail the whole log_batch).
        self._param_names = KeyMap(what="parameter")

    def start(self, info: RunInfo) -> str:
        if self.sender == "process":
            self._start_sender()  # MLflow's import in the child overlaps the opening of the run
        self.step_key = schema.axis_key(info.tags.get(schema.TAG_MLFLOW_STEP, schema.SAMPLES),
                                        allowed=schema.MLFLOW_STEP_AXES, what="mlflow_step")
        if self.run_id is None:
            run_id = self.run_to_continue(info)
            if run_id:
                self._continue(run_id)
            else:
                name = self.experiment or info.project or "Default"
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                # Kept at once: a retry after a later failure continues this run, never a second one.
                run_name = info.name or invisible.run_name()  # MLflow's default name draws from the global random
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        elif self._reopened:
            self._continue(self.run_id)
        self.set_tags(info.tags, user_tags())
        self._log_params(flat_params(info.config))
        assert self.run_id is not None  # set above, or start() raised
        return self.run_id

    def run_to_continue(self, info: RunInfo) -> str | None:
        # As the Hugging Face integration: MLFLOW_RUN_ID, else the run the user opened.
        return info.run_id or os.environ.get("MLFLOW_RUN_ID") or self._users_run or None

    def _continue(self, run_id: str) -> None:
        run = self.client.get_run(run_id)  # raises where the run does not exist: a clear failure at start
        self.run_id, self._reopened = run_id, True
        self._logged_params = dict(run.data.params)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self._reopened = False

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        fresh = {}
        for key, value in params.items():
            name = self._param_names(key)
            # A param cannot change once logged: a resumed run keeps the value it started with.
            if name not in self._logged_params:
                fresh[name] = value[:_MAX_PARAM_LENGTH]
        names = list(fresh)
        for i in range(0, len(names), _MAX_PARAMS):
            chunk = names[i:i + _MAX_PARAMS]
            self.client.log_batch(self._id(), params=[Param(n, fresh[n]) for n in chunk])
            self._logged_params.update((n, fresh[n]) for n in chunk)  # only once stored

    def _id(self) -> str:
        assert self.run_id is not None, "the run is opened (start) before anything is logged to it"
        return self.run_id

    def _step(self, row: Row) -> int:
        step = row.metrics.get(self.step_key)
        if step is None:
            warn_once("mlflow-step", f"mlflow_step={self.step_key!r} has no value (no token information); "
                                     "rows use progress/samples as their MLflow step")
            step = row.metrics.get(schema.SAMPLES, 0)
        return int(step)

    def log_rows(self, rows: list[Row]) -> None:
        sender = self._start_sender() if self.sender == "process" else None
        unstored = [[row.metrics, row.timestamp_ms, self._step(row), row.seq] for row in self.unstored(rows)]
        if not unstored:
            return
        if sender is None:  # in this thread, the way the child does it (_mlflow_child.log_rows)
            from ._mlflow_child import log_rows

            log_rows(self.client, self._id(), unstored, _MAX_METRICS, stored=self.mark_stored)
            return
        from .process import SenderError

        try:
            self.mark_stored(sender.call(self.store_uri, self._id(), unstored, _MAX_METRICS))
        except SenderError as exc:
            self.mark_stored(exc.stored)
            raise

    def _start_sender(self):
        from .process import SenderProcess, shared_or_none

        sender = shared_or_none(SenderProcess)
        if sender is None:
            self.sender = "thread"
        return sender

    def set_tags(self, tags: dict, users: dict | None = None) -> None:
        """Our metadata tags (``stream_metrics.<name>``), and ``users`` tags by their own names."""
        from mlflow.entities import RunTag

        self.client.log_batch(self._id(), tags=[RunTag(k, str(v)) for k, v in (users or {}).items()] + [
            RunTag(schema.tag_name(k), str(v)) for k, v in tags.items()])

    def log_summary(self, metrics: dict, row: Row) -> None:
        # MLflow has no summary: the figures are logged once, in a row with every axis.
        self.log_rows([Row({**row.metrics, **metrics}, row.timestamp_ms, row.seq)])

    def finish(self, status: str) -> None:
        if self.run_id == self._users_run and status == "FINISHED":
            return  # the user's `with mlflow.start_run()` ends it (a failure is said at once all the same)
        self.client.set_terminated(self._id(), status=status, end_time=int(time.time() * 1000))

    def show_status(self, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(self._id(), status="RUNNING")
        else:
            self.client.set_terminated(self._id(), status=status, end_time=int(time.time() * 1000))

    def where(self) -> str:
        uri = redact_uri(self.store_uri)  # a relative store path as the folder it is in
        if uri.startswith("sqlite:"):
            return f"MLflow run {self.run_id} in {uri}: look with `mlflow ui --backend-store-uri {uri}`"
        return f"MLflow run {self.run_id} at {uri}"

    def target(self) -> dict:
        # Absolute: a spill file is replayed from any folder (its message gives its full path). The
        # experiment too: a run that never opened is created in it by the replay, not in "Default".
        target = {"tracking_uri": redact_uri(self.store_uri)}
        if self.experiment:
            target["experiment"] = self.experiment
        return target

    @classmethod
    def for_replay(cls, target: dict, options: dict) -> "MLflowBackend":
        # The file's URI has no password: the environment's, with its credentials, comes first.
        uri = options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or target.get("tracking_uri")
        # A replay has no training to keep the GIL for.
        backend = cls(tracking_uri=uri, experiment=target.get("experiment"), sender="thread")
        meant, there = target.get("tracking_uri"), redact_uri(backend.store_uri)
        if not options.get("tracking_uri") and meant and there != meant:
            log.warning("stream_metrics: these rows were saved for %s, but MLFLOW_TRACKING_URI sends them to %s; "
                        "to send them where they were meant to go, unset it or pass --mlflow-uri %s",
                        meant, there, meant)
        return backend

    def reopen(self, info: RunInfo) -> None:
        if not info.run_id:
            self.start(info)
            return
        self.client.get_run(info.run_id)  # a clear error where the run is not on this server
        self.run_id = info.run_id  # continue it as it is: its status changes only with a "finish" op
        self.step_key = schema.axis_key(info.tags.get(schema.TAG_MLFLOW_STEP, schema.SAMPLES),
                                        allowed=schema.MLFLOW_STEP_AXES, what="mlflow_step")

    def complete_start(self, info: RunInfo) -> None:
        # The run was created, but its tags and parameters may not have gone in: put them in now
        # (a parameter already there keeps its value, as at any resume).
        self._logged_params = dict(self.client.get_run(self._id()).data.params)
        self.set_tags(info.tags)
        self._log_params(flat_params(info.config))


def user_tags() -> dict:
    """The run tags in ``MLFLOW_TAGS`` (a JSON object), as the Trainer's MLflow integration sets them."""
    text = os.environ.get("MLFLOW_TAGS", "").strip()
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        warn_once("mlflow-tags", f"MLFLOW_TAGS={text[:80]!r} is not a JSON object of tag names and values "
                                 "(e.g. '{\"team\": \"nlp\"}'); the run is opened without those tags")
        return {}
    return {str(k): v for k, v in tags.items()}


class MLflowStoreError(RuntimeError):
    """The tracking store cannot be opened by this MLflow (its schema is another release's)."""


def open_client(client_class, uri: str, *, writing: bool = True):
    """``client_class(tracking_uri=uri)``; a database store whose schema this MLflow cannot use
    raises ``MLflowStoreError`` naming whose it is and what to do, instead of MLflow's advice to
    upgrade (wrong, and unusable, for a store a newer MLflow wrote: two environments sharing the
    default ``sqlite:///mlflow.db``, one of them LLaMA-Factory's). ``writing``: a run is to be
    logged there (so a store of its own is a way out), not only read."""
    from mlflow.exceptions import MlflowException

    try:
        return client_class(tracking_uri=uri)
    except MlflowException as exc:
        message = schema_mismatch(str(exc), uri, writing)
        if message is None:
            raise
        raise MLflowStoreError(message) from exc


def schema_mismatch(error: str, uri: str, writing: bool = True) -> str | None:
    """What to say about MLflow's "out-of-date database schema" error, or None for another error."""
    import mlflow

    found = re.search(r"found version (\w+), but expected (\w+)", error)
    if found is None or found.group(1) == "None":  # no revision stamped: MLflow's own message
        return None
    store, expected = found.groups()
    where = redact_uri(uri)
    own_store = (", or give this run a store of its own (MLFLOW_TRACKING_URI=sqlite:///another.db, or "
                 "mlflow={'tracking_uri': ...})" if writing else "")
    newer = (f"Use that newer MLflow here (pip install -U mlflow, or the release of the environment that wrote "
             f"the store){own_store}. Do not run `mlflow db upgrade` with this release: it cannot go past its "
             "own revision")
    older = (f"Back the store up, then run `mlflow db upgrade {where}` (older MLflow releases cannot open it "
             f"afterwards){own_store}")
    known = known_revision(store)
    if known is False:
        what = (f"a newer MLflow has upgraded its schema (revision {store}, which this release does not know; it "
                f"expects {expected}). {newer}")
    elif known:
        what = f"its schema (revision {store}) is older than this release's ({expected}). {older}"
    else:
        what = (f"its schema is revision {store}, and this release expects {expected}. If a newer MLflow wrote it: "
                f"{newer}. If an older one did: {older}")
    return f"MLflow {mlflow.__version__} cannot open the tracking store {where}: {what}"


def known_revision(revision: str) -> bool | None:
    """Whether this MLflow's migrations know a schema revision (None: cannot tell)."""
    try:
        from mlflow.store import db_migrations

        folder = os.path.join(os.path.dirname(db_migrations.__file__), "versions")
        return any(name.startswith(revision + "_") for name in os.listdir(folder))
    except (ImportError, OSError, TypeError):
        return None


def absolute_store(uri: str) -> str:
    """``uri`` with a relative SQLite or file store path made absolute from the working folder."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme):]
            if path and not path.startswith("/") and ":memory:" not in path:
                return scheme + os.path.abspath(path)
    if uri and "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return os.path.abspath(uri)  # a bare folder: MLflow's file store
    return uri


def default_tracking_uri() -> str:
    """Where runs go and are read when no URI is given (the one rule: `compare` and `check` use it too).

    ``MLFLOW_TRACKING_URI``, else MLflow's own default; MLflow 2 defaults to a ./mlruns file
    store, where 3 uses sqlite:///mlflow.db.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:
        return uri
    if uri.startswith("file:") and not is_tracking_uri_set() and not os.path.isdir("mlruns"):
        return "sqlite:///mlflow.db"
    return uri
