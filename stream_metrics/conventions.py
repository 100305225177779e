"""What users of the Trainer's W&B and MLflow integrations rely on, kept when the callback takes them over.

- The run is the process's active run: a user's own ``wandb.log(...)`` or ``mlflow.log_param(...)``
  during training lands in the run stream_metrics writes, as it did in the built-in's run. W&B's
  ``wandb.run`` is global, set when the run opens; MLflow's active run is per thread, so it is set
  on the training thread once the run has opened (rows still go from the background sender).
- ``WANDB_LOG_MODEL`` (``end``, ``checkpoint``) and ``HF_MLFLOW_LOG_ARTIFACTS``: the built-in callback
  stays where it stood, doing only that (its ``on_save`` and ``on_train_end``), into our run. It
  logs no metric and starts no run of its own.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("stream_metrics")

_TRUE = ("1", "ON", "YES", "TRUE")  # transformers' ENV_VARS_TRUE_VALUES
#: Flushing the opening of the runs waits at most this long at train begin (a server may be away:
#: training goes on, and user calls then go where they would without us).
OPEN_TIMEOUT = 10.0


def kept_duties(original) -> list[str]:
    """What the built-in ``original`` still does after the takeover, as the settings users set."""
    name = type(original).__name__
    if name == "WandbCallback":
        setting = os.environ.get("WANDB_LOG_MODEL", "false")
        enabled = getattr(getattr(original, "_log_model", None), "is_enabled", False)
        return [f"WANDB_LOG_MODEL={setting} (model artifacts)"] if enabled else []
    if name == "MLflowCallback":
        if os.environ.get("HF_MLFLOW_LOG_ARTIFACTS", "FALSE").upper() in _TRUE:
            return ["HF_MLFLOW_LOG_ARTIFACTS (checkpoints as artifacts)"]
    return []


def artifacts_only(original) -> None:
    """Ready a built-in for its artifact duty without its setup (which would start its own run and log
    parameters): its own guards then pass, and it logs into the active run, ours."""
    original._initialized = True
    if type(original).__name__ == "MLflowCallback":
        original._log_artifacts = True
        original._auto_end_run = False  # the run is ours to end


def make_active(run) -> list:
    """Make the tracking runs of ``run`` (a stream_metrics Run) the process's active runs, on this thread.

    Returns what to undo at the end (see ``end_active``).
    """
    started = []
    # Runs open lazily, at the first row; here they open now, so the user's calls find them.
    for backend in run.open(OPEN_TIMEOUT):
        if backend.name == "mlflow":
            import mlflow

            if mlflow.active_run() is None:
                restore = None
                if mlflow.get_tracking_uri() != backend.store_uri:
                    # The callback was given its own tracking URI (or a relative store path, taken from
                    # where the run started): the fluent API follows it during training, and goes back
                    # to what it was (global and MLFLOW_TRACKING_URI) after.
                    from mlflow.tracking._tracking_service import utils

                    restore = (utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"))
                    mlflow.set_tracking_uri(backend.store_uri)
                mlflow.start_run(run_id=backend.run_id)
                started.append(("mlflow", restore))
    return started


def end_active(started: list, status: str = "FINISHED") -> None:
    """Pop the active runs ``make_active`` set, with the status stream_metrics closed them with (left
    active, MLflow's own exit hook would mark a crashed run FINISHED)."""
    for name, restore in started:
        if name == "mlflow" and "mlflow" in sys.modules:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
            if restore is not None:
                uri, variable = restore
                mlflow.set_tracking_uri(uri)  # None unsets MLFLOW_TRACKING_URI too
                if variable is not None:
                    os.environ["MLFLOW_TRACKING_URI"] = variable
    started.clear()
