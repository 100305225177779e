"""A backend call that fails and is retried stores everything once: one run, every parameter, every point once.

The data goes to real stores (MLflow on SQLite, W&B offline); the failures are injected by a thin
wrapper around the real MLflow client or W&B run, which raises where a server could.
"""
from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from conftest import mlflow_rows, wandb_rows, wandb_run_dirs
from stream_metrics import schema
from stream_metrics.backends import RunInfo, Row
from stream_metrics.backends.delivery import Delivery
from stream_metrics.backends.mlflow import MLflowBackend
from stream_metrics.backends.spill import replay
from stream_metrics.backends.wandb import WandbBackend

AXES = (*schema.AXES.values(), schema.LOSS_TOKENS)


class Flaky:
    """Wraps a real object; the calls of ``method`` numbered in ``failing`` (from 1) raise instead."""

    def __init__(self, real, method: str, failing):
        self._real, self._method, self._failing, self.calls = real, method, set(failing), 0

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls in self._failing:
                raise ConnectionError(f"injected failure of {name} call {self.calls}")
            return attr(*args, **kwargs)
        return call


def info(backend: str, config=None) -> RunInfo:
    tags = {schema.TAG_X_AXIS: schema.SAMPLES}
    if backend == "mlflow":
        tags[schema.TAG_MLFLOW_STEP] = schema.SAMPLES
    return RunInfo(name="retry", config=config or {}, tags=tags, x_axis=schema.SAMPLES, axes=AXES)


def rows(n: int, batch: int = 4) -> list[Row]:
    return [Row({schema.STEP: i, schema.SAMPLES: batch * i, schema.EPOCH: 0.0, schema.WALL_CLOCK: float(i),
                 "train/loss": 1.0 / i}, 1_700_000_000_000 + i) for i in range(1, n + 1)]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    from stream_metrics.backends import delivery

    monkeypatch.setattr(delivery, "_RETRY_FIRST", 0.05)


def label_config():
    # A model's label2id with non-Latin labels: both keys sanitise to the same parameter name.
    return {"learning_rate": 0.001, "model": {"label2id": {"正": 0, "負": 1}, "id2label": {"0": "正", "1": "負"}}}


def test_duplicate_parameter_names_and_a_failure_after_create_run_give_one_run_with_every_parameter(mlflow_uri):
    backend = MLflowBackend(tracking_uri=mlflow_uri, experiment="retry", sender="thread")  # faults injected here
    backend.client = Flaky(backend.client, "log_batch", failing={1, 3})  # the tags, then the first params
    delivery = Delivery(backend)
    with pytest.warns(UserWarning, match="parameter 'model.label2id"):
        delivery.submit("start", info("mlflow", label_config()))
        for row in rows(10):
            delivery.submit("rows", row)
        assert delivery.close("FINISHED", 60) is None

    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("retry").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == backend.run_id
    params = run.data.params
    assert params["learning_rate"] == "0.001"
    label_values = sorted(v for k, v in params.items() if k.startswith("model.label2id"))
    assert label_values == ["0", "1"]  # two names, each stored
    assert sorted(v for k, v in params.items() if k.startswith("model.id2label")) == ["正", "負"]
    assert run.data.tags[schema.tag_name(schema.TAG_X_AXIS)] == schema.SAMPLES
    stored = mlflow_rows(mlflow_uri, backend.run_id)
    assert [r[schema.SAMPLES] for r in stored] == [4 * i for i in range(1, 11)]


def test_a_failed_metrics_call_is_retried_without_a_second_copy(mlflow_uri, monkeypatch):
    from stream_metrics.backends import mlflow as mlflow_backend

    monkeypatch.setattr(mlflow_backend, "_MAX_METRICS", 10)  # two rows a log_batch call
    backend = MLflowBackend(tracking_uri=mlflow_uri, experiment="retry", sender="thread")  # faults injected here
    delivery = Delivery(backend)
    delivery.submit("start", info("mlflow"))
    assert delivery.flush(60)
    backend.client = Flaky(backend.client, "log_batch", failing={2, 3})
    for row in rows(7):
        delivery.submit("rows", row)
    assert delivery.close("FINISHED", 60) is None
    points = MlflowClient(mlflow_uri).get_metric_history(backend.run_id, "train/loss")
    assert sorted(p.step for p in points) == [4 * i for i in range(1, 8)]


def test_a_wandb_batch_failing_halfway_is_retried_without_a_duplicated_point(workdir):
    backend = WandbBackend(project="retry", sender="thread")  # faults injected here
    delivery = Delivery(backend)
    delivery.submit("start", info("wandb"))
    assert delivery.flush(120)
    real_run = backend.run
    backend.run = Flaky(real_run, "log", failing={4})  # rows 1-3 of the batch stored, then a failure
    for row in rows(10):
        delivery.submit("rows", row)
    assert delivery.flush(60)
    backend.run = real_run
    assert delivery.close("FINISHED", 120) is None

    [run_dir] = wandb_run_dirs(workdir)
    assert [r[schema.SAMPLES] for r in wandb_rows(run_dir)] == [4 * i for i in range(1, 11)]


def test_the_spill_at_close_holds_only_rows_not_stored_and_replay_stores_each_point_once(workdir, caplog):
    import wandb

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    backend = WandbBackend(project="retry", sender="thread")  # faults injected here
    delivery = Delivery(backend)
    delivery.submit("start", info("wandb"))
    assert delivery.flush(120)
    real_run = backend.run
    backend.run = Flaky(real_run, "log", failing=range(5, 10_000))  # W&B takes 4 rows, then fails
    for row in rows(10):
        delivery.submit("rows", row)
    message = delivery.close("FINISHED", 2)
    assert "6 row(s) could not be delivered to wandb" in message
    with open(delivery.spill_path) as f:
        assert f.read().count('"train/loss"') == 6  # rows 5-10 only: 1-4 are stored

    backend.run = real_run
    try:
        assert replay(delivery.spill_path) == 6  # into the same W&B run, still open in this process
    finally:
        wandb.finish()
    [run_dir] = wandb_run_dirs(workdir)
    assert [r[schema.SAMPLES] for r in wandb_rows(run_dir)] == [4 * i for i in range(1, 11)]


def test_a_replay_cut_short_and_run_again_sends_only_the_rest(mlflow_uri, workdir):
    backend = MLflowBackend(tracking_uri=mlflow_uri, experiment="retry", sender="thread")  # faults injected here
    delivery = Delivery(backend, spill_dir=str(workdir / "undelivered"))
    delivery.submit("start", info("mlflow"))
    assert delivery.flush(60)
    backend.client = Flaky(backend.client, "log_batch", failing=range(1, 10_000))
    for row in rows(6):
        delivery.submit("rows", row)
    assert "6 row(s)" in delivery.close("FINISHED", 1)
    path = delivery.spill_path

    original = MLflowBackend.log_rows
    calls = []

    def fail_second_call(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise ConnectionError("injected failure during replay")
        return original(self, chunk)

    MLflowBackend.max_rows_per_call = 2  # replay hands rows over two at a time
    MLflowBackend.log_rows = fail_second_call
    try:
        with pytest.raises(ConnectionError):
            replay(path)
        assert replay(path) == 4  # the first two were noted as stored in the file
    finally:
        MLflowBackend.log_rows = original
        del MLflowBackend.max_rows_per_call
    points = MlflowClient(mlflow_uri).get_metric_history(backend.run_id, "train/loss")
    assert sorted(p.step for p in points) == [4 * i for i in range(1, 7)]
    assert MlflowClient(mlflow_uri).get_run(backend.run_id).info.status == "FINISHED"


def test_finish_waits_for_every_backend_at_once_with_one_deadline(monkeypatch, workdir):
    import time

    from stream_metrics.backends.delivery import close_all
    from support import free_port

    # Nothing listens there, and MLflow's own HTTP retries hold each call for minutes.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    deliveries = [Delivery(MLflowBackend(tracking_uri=f"http://127.0.0.1:{free_port()}")) for _ in range(2)]
    for d in deliveries:
        d.submit("start", info("mlflow"))
        for row in rows(3):
            d.submit("rows", row)
    started = time.monotonic()
    messages = close_all(deliveries, "FINISHED", 3)
    waited = time.monotonic() - started
    assert 3 <= waited < 5.5  # one deadline for both, not 3 s each
    assert all("3 row(s) could not be delivered to mlflow" in m for m in messages)
    assert len({d.spill_path for d in deliveries}) == 2


def test_a_backend_refused_a_thread_at_interpreter_exit_spills_at_once_with_the_reason(workdir, caplog):
    """Python 3.12.0 and 3.12.1 start no thread once a script has ended, and W&B's client needs one to
    open a run: a run that had not opened by then can never open. Its rows go to the spill file at
    once, with why and what to do, not after retrying until the deadline."""
    import time

    from support import InMemory

    class RefusedAtExit(InMemory):
        name = "wandb"

        def start(self, info):
            raise RuntimeError("can't create new thread at interpreter shutdown")  # Python's own words

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    delivery = Delivery(RefusedAtExit())
    delivery.submit("start", info("wandb"))
    for row in rows(5):
        delivery.submit("rows", row)
    started = time.monotonic()
    message = delivery.close("FINISHED", 30)
    assert time.monotonic() - started < 5  # not the 30 s deadline
    assert "5 row(s) could not be delivered to wandb (RuntimeError: can't create new thread at interpreter " \
           "shutdown)" in message and "stream-metrics replay" in message
    with open(delivery.spill_path) as f:
        assert f.read().count('"train/loss"') == 5
    warnings = [r.getMessage() for r in caplog.records if "while the interpreter exits" in r.getMessage()]
    assert len(warnings) == 1 and "run.finish() before the script ends" in warnings[0]
