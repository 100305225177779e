"""MLflow: one run, every key of a row at one integer step (the row's mlflow_step axis).

The tracking URI is the one MLflow itself would use (``MLFLOW_TRACKING_URI``, else its default
``sqlite:///mlflow.db``); the experiment is ``MLFLOW_EXPERIMENT_NAME`` or the one given;
``MLFLOW_RUN_ID`` continues an existing run, as in the Hugging Face integration.
"""
from __future__ import annotations

import os
import time

from .. import invisible, schema
from ..redact import flat_params, redact_uri
from .base import Backend, Row, RunInfo

_MAX_PARAMS = 100  # MLflow's limit per log_batch call
_MAX_PARAM_LENGTH = 6000


class MLflowBackend(Backend):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            raise ImportError("the mlflow backend needs MLflow: pip install 'stream_metrics[mlflow]'") from None
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri(mlflow)
        if redact_uri(self.tracking_uri) != self.tracking_uri:
            # MLflow prints "View run ... at: <tracking URI>" when a run ends, password included.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        invisible.keep_mlflow_off_the_global_random()  # its own draws never consume the training's random
        self.run_id = None
        self._logged_params: dict[str, str] = {}

    def start(self, info: RunInfo) -> str:
        run_id = info.run_id or os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            run = self.client.get_run(run_id)  # raises where the run does not exist: a clear failure at start
            self._logged_params = dict(run.data.params)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            name = self.experiment or info.project or "Default"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_name = info.name or invisible.run_name()  # MLflow's default name draws from the global random
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id = run_id
        self.set_tags(info.tags)
        self._log_params(flat_params(info.config))
        return run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        fresh = []
        for key, value in params.items():
            value = value[:_MAX_PARAM_LENGTH]
            # A param cannot change once logged: a resumed run keeps the value it started with.
            if key not in self._logged_params:
                fresh.append(Param(_param_key(key), value))
                self._logged_params[key] = value
        for i in range(0, len(fresh), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=fresh[i:i + _MAX_PARAMS])

    def log_rows(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), row.timestamp_ms, row.step)
                   for row in rows for key, value in row.metrics.items()]
        for i in range(0, len(metrics), self.max_rows_per_call):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.max_rows_per_call])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(schema.tag_name(k), str(v)) for k, v in tags.items()])

    def log_summary(self, metrics: dict, row: Row) -> None:
        # MLflow has no summary: the figures are logged once, in a row with every axis.
        self.log_rows([Row({**row.metrics, **metrics}, row.timestamp_ms, row.step)])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=int(time.time() * 1000))

    def where(self) -> str:
        uri = redact_uri(self.tracking_uri)
        if uri.startswith("sqlite:"):
            return f"MLflow run {self.run_id} in {uri}: look with `mlflow ui --backend-store-uri {uri}`"
        return f"MLflow run {self.run_id} at {uri}"


def _default_uri(mlflow) -> str:
    """MLflow's own default; MLflow 2 defaults to a ./mlruns file store, where 3 uses sqlite:///mlflow.db."""
    uri = mlflow.get_tracking_uri()
    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:
        return uri
    if uri.startswith("file:") and not is_tracking_uri_set() and not os.path.isdir("mlruns"):
        return "sqlite:///mlflow.db"
    return uri


def _param_key(key: str) -> str:
    from ..sanitize import sanitize_key

    return sanitize_key(key)
