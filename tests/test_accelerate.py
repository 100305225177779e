"""The accelerate tracker on real accelerate loops: the same schema through ``accelerator.log``."""
from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

import tiny
from accelerate_loop import train
from conftest import assert_conformant, mlflow_rows, wandb_run_dirs

import stream_metrics
from stream_metrics.accelerate import StreamMetricsTracker


def consumed(texts, batch_size, grad_accum, passes):
    """(samples, tokens, optimizer steps) from the data alone: accelerate steps at each pass's end too."""
    batches = math.ceil(len(texts) / batch_size)
    return (passes * len(texts), passes * sum(tiny.token_count(t) for t in texts),
            passes * math.ceil(batches / grad_accum))


def only_run(uri):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("accelerate-example").experiment_id])
    return run


@pytest.mark.parametrize("batch_size, grad_accum", [(8, 2), (16, 3)])
def test_an_accelerate_loop_logs_exact_totals_to_both_backends(workdir, corpus, batch_size, grad_accum):
    uri = f"sqlite:///{workdir}/mlflow.db"
    tracker, steps = train(corpus["paths"], passes=2, batch_size=batch_size, grad_accum=grad_accum,
                           project="accelerate-example", mlflow={"tracking_uri": uri})
    samples, tokens, expected_steps = consumed(corpus["texts"], batch_size, grad_accum, passes=2)
    assert steps == expected_steps  # accelerate's own count of optimizer steps agrees with the data
    p = tracker.run.progress
    assert (p.samples, p.tokens) == (samples, tokens)
    assert p.epoch == 2.0 and p.epoch_source == "pass"

    # Each pass is whole accumulation windows here (accelerate also steps on a partial last window).
    assert p.step == steps

    run = only_run(uri)
    assert_conformant("--mlflow-uri", uri, "--run-id", run.info.run_id, "--expect-samples", samples,
                      "--expect-tokens", tokens, "--expect-steps", steps, "--expect-epoch", 2.0)
    [folder] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", folder, "--expect-samples", samples, "--expect-tokens", tokens,
                      "--expect-epoch", 2.0)
    rows = mlflow_rows(uri, run.info.run_id)
    assert all("train/loss" in row and "progress/epoch" in row for row in rows)
    assert run.data.params["learning_rate"] == "0.003"  # init_trackers(config=...) is the run's config
    assert run.data.tags["stream_metrics.epoch_source"] == "pass"


def test_init_trackers_config_is_redacted_and_get_tracker_gives_the_run(workdir, corpus):
    from accelerate import Accelerator

    uri = f"sqlite:///{workdir}/mlflow.db"
    tracker = StreamMetricsTracker(backend="mlflow", project="accelerate-example", mlflow={"tracking_uri": uri})
    accelerator = Accelerator(log_with=tracker, cpu=True)
    accelerator.init_trackers("ignored-for-custom-trackers",
                              config={"wandb_api_key": "planted-secret-1", "db": "postgresql://u:planted-secret-2@h/db"})
    assert accelerator.get_tracker("stream_metrics", unwrap=True) is tracker.run
    tracker.update(samples=3, tokens=30)
    accelerator.log({"train/loss": 1.0})
    accelerator.end_training()
    run = only_run(uri)
    assert "planted-secret" not in json.dumps(run.data.params)
    assert_conformant("--mlflow-uri", uri, "--run-id", run.info.run_id, "--expect-samples", 3, "--expect-tokens", 30)


def test_with_several_processes_accelerator_log_says_to_log_on_every_process(workdir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it; rank 0 is this process
    tracker = StreamMetricsTracker(backend="none")
    with pytest.raises(RuntimeError, match=r"tracker\.run\.log"):
        tracker.log({"train/loss": 1.0})
    tracker.finish()
    assert isinstance(tracker.run, stream_metrics.Run)
