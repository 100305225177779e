"""stream_metrics.autolog(): every Trainer built afterwards gets one StreamMetricsCallback, first among
the callbacks it is given; and the takeover keeps the built-in integrations' conventions (the active
run, WANDB_LOG_MODEL, HF_MLFLOW_LOG_ARTIFACTS), checked in what W&B and MLflow stored."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import Trainer, TrainerCallback

import stream_metrics
import tiny
from conftest import ROOT, wandb_run_dirs
from streaming_trainer import build_trainer

from stream_metrics.hf import StreamMetricsCallback


@pytest.fixture(autouse=True)
def autolog_off():
    yield
    stream_metrics.autolog(disable=True)


class Mine(TrainerCallback):
    """A user's own callback (a framework's logger stands here too: LLaMA-Factory's LogCallback)."""


def given_callbacks(trainer) -> list:
    """The handler's callbacks after the Trainer's own defaults and reporting integrations."""
    return [type(cb).__name__ for cb in trainer.callback_handler.callbacks
            if not type(cb).__module__.startswith("transformers.") and type(cb).__name__ != "TakenOver"]


def build(workdir, callbacks=(), **kwargs):
    paths = tiny.write_corpus(str(workdir / "data"))
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=2, batch_size=8, callbacks=callbacks, data=paths,
                               **kwargs)
    return trainer


def test_autolog_twice_gives_one_callback_first_among_the_given_ones(workdir):
    stream_metrics.autolog(backend="none")
    stream_metrics.autolog(backend="none", x_axis="tokens")  # the later options replace the earlier
    trainer = build(workdir, callbacks=[Mine()])
    assert given_callbacks(trainer) == ["StreamMetricsCallback", "Mine"]
    [ours] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StreamMetricsCallback)]
    assert ours.x_axis == "tokens"


def test_a_trainer_given_its_own_callback_gets_no_second(workdir):
    stream_metrics.autolog(backend="none")
    mine = StreamMetricsCallback(backend="none", x_axis="step")
    trainer = build(workdir, callbacks=[Mine(), mine])
    assert given_callbacks(trainer) == ["Mine", "StreamMetricsCallback"]
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StreamMetricsCallback)] == [mine]


def test_a_callback_added_after_the_trainer_is_built_is_the_one_that_logs(workdir):
    """trainer.add_callback(StreamMetricsCallback(...)) under autolog (or `stream-metrics run`): one run, not two."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/mlflow.db"
    stream_metrics.autolog(backend="mlflow", mlflow={"tracking_uri": uri})
    trainer = build(workdir)
    mine = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri}, name="mine")
    trainer.add_callback(mine)
    trainer.train()
    [run] = MlflowClient(uri).search_runs(["0"])
    assert run.info.run_name == "mine" and run.info.run_id == mine.run.run_ids["mlflow"]
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StreamMetricsCallback)] == [mine]


def test_disable_undoes_it(workdir):
    stream_metrics.autolog(backend="none")
    stream_metrics.autolog(disable=True)
    assert Trainer.__init__.__name__ == "__init__" and not hasattr(Trainer.__init__,
                                                                   "__stream_metrics_autolog_original__")
    assert given_callbacks(build(workdir, callbacks=[Mine()])) == ["Mine"]


def test_a_subclass_with_its_own_init_gets_one_callback(workdir):
    class MyTrainer(Trainer):
        def __init__(self, *args, extra=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = extra

    stream_metrics.autolog(backend="none")
    base = build(workdir)
    trainer = MyTrainer(model=base.model, args=base.args, train_dataset=base.train_dataset,
                        data_collator=base.data_collator, callbacks=[Mine()], extra=1)
    assert given_callbacks(trainer) == ["StreamMetricsCallback", "Mine"]


def test_a_bad_option_fails_at_autolog_with_the_callbacks_message():
    with pytest.raises(ValueError, match="backend='mlfow' is not known"):
        stream_metrics.autolog(backend="mlfow")
    with pytest.raises(ValueError):
        stream_metrics.autolog(eval_every="ten minutes")


def test_autolog_before_transformers_is_imported_wraps_it_on_import(workdir):
    """A fresh interpreter: autolog() imports no transformers; the wrap happens when transformers.trainer loads."""
    code = """if True:
        import sys
        import stream_metrics
        stream_metrics.autolog(backend="none")
        assert "transformers" not in sys.modules, "autolog imported transformers"
        from transformers import Trainer, TrainingArguments
        import torch
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments("out", report_to="none", use_cpu=True))
        print(sorted(type(cb).__name__ for cb in trainer.callback_handler.callbacks))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "StreamMetricsCallback" in out.stdout.splitlines()[-1]


class UserCalls(TrainerCallback):
    """User code during training: its own wandb.log and mlflow.log_param, as with the built-in integrations."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            import mlflow
            import wandb

            if wandb.run is not None:
                wandb.log({"my/own": 1})
            mlflow.log_param("my_param", "mine")


def wandb_artifacts(folder) -> list[tuple[str, str]]:
    """(name, type) of every artifact the run's transaction log holds."""
    from stream_metrics.compare import wandb_records, wandb_files

    [path] = wandb_files(folder)
    return [(r.artifact.name, r.artifact.type) for r in wandb_records(path)
            if r.WhichOneof("record_type") == "artifact"]


@pytest.mark.slow
def test_the_runs_are_the_active_ones_and_model_artifacts_are_still_logged(workdir, monkeypatch):
    uri = f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_LOG_MODEL", "end")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "1")
    stream_metrics.autolog()  # backend "auto": the integrations report_to names, taken over
    trainer = build(workdir, callbacks=[UserCalls()], report_to=["wandb", "mlflow"], save_steps=2)
    trainer.train()

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["my_param"] == "mine"  # mlflow.log_param went into our run
    assert run.data.params["learning_rate"] == "0.003" and "progress/samples" in run.data.metrics
    assert run.info.status == "FINISHED"
    # HF_MLFLOW_LOG_ARTIFACTS: the checkpoint, logged as a model of our run (MLflow 3: a LoggedModel).
    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("checkpoint-2", run.info.run_id)]

    [folder] = wandb_run_dirs(workdir)  # one W&B run: ours, with the user's key and the model
    from stream_metrics.compare import read_wandb_run, wandb_files

    [path] = wandb_files(folder)
    history = read_wandb_run(path)
    assert {"my/own", "progress/samples"} <= set().union(*history.rows)
    assert wandb_artifacts(folder) == [(f"model-{history.run_id}", "model")]


@pytest.mark.slow
def test_a_tracking_uri_given_to_the_callback_is_active_during_training_only(workdir):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/own.db"
    before = mlflow.get_tracking_uri()
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri})
    build(workdir, callbacks=[callback, UserCalls()]).train()
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["my_param"] == "mine"
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.active_run() is None


def test_a_run_the_user_opened_gets_the_rows_and_the_user_ends_it(workdir, monkeypatch):
    """`with mlflow.start_run(run_name="mine"): trainer.train()`, as with the Trainer's own MLflow integration."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    callback = StreamMetricsCallback(backend="mlflow")
    trainer = build(workdir, callbacks=[callback])
    with mlflow.start_run(run_name="mine") as mine:
        trainer.train()
        mlflow.log_param("after_training", "yes")  # the user's run is still theirs to use
        assert MlflowClient(uri).get_run(mine.info.run_id).info.status == "RUNNING"
    [run] = MlflowClient(uri).search_runs(["0"])
    assert run.info.run_id == mine.info.run_id == callback.run.run_ids["mlflow"] and run.info.status == "FINISHED"
    assert run.data.metrics["progress/samples"] == 2 * 2 * 8 and run.data.params["after_training"] == "yes"


def test_mlflow_tags_from_the_environment_are_on_the_run(workdir, monkeypatch):
    """MLFLOW_TAGS, which the Trainer's MLflow integration applies, is applied when the callback takes over."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "nlp", "release.version": "2.2.0"}')
    callback = StreamMetricsCallback()
    build(workdir, callbacks=[callback], report_to="mlflow").train()
    [run] = MlflowClient(uri).search_runs(["0"])
    assert run.info.run_id == callback.run.run_ids["mlflow"]
    assert (run.data.tags["team"], run.data.tags["release.version"]) == ("nlp", "2.2.0")
    assert run.data.tags["stream_metrics.x_axis"] == "progress/samples"
