"""The Trainer used the way people use it beyond one clean train(): a train() that raised and is run
again, auto_find_batch_size's retry, evaluate()'s and predict()'s metrics, eval_every without an eval
set, a pass that ends after the last row, a backend list beside report_to, a tokenizer without a pad
token, a resume that reads the data from elsewhere.

Counts are checked against what the data holds (test_hf.consumed); MLflow's SQLite store is read back.
"""
from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient
from transformers import TrainerCallback

import tiny
from conftest import needs_trainer_resume, wandb_rows
from streaming_trainer import build_trainer
from test_hf import consumed

from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow


class RaiseOnce(TrainerCallback):
    """Raise ``error`` once, at the step given: a Ctrl-C in a notebook, or an out-of-memory error."""

    def __init__(self, error: BaseException, at_step: int):
        self.error, self.at_step = error, at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.error is not None and state.global_step == self.at_step:
            error, self.error = self.error, None
            raise error


def runs_by_status(uri) -> dict[str, list[float]]:
    """Each MLflow run's status -> the samples of its rows (every run of the Default experiment)."""
    client = MlflowClient(uri)
    out: dict[str, list[float]] = {}
    for run in client.search_runs(["0"]):
        history = client.get_metric_history(run.info.run_id, "progress/samples")
        out.setdefault(run.info.status, []).append(max((m.value for m in history), default=None))
    return out


@pytest.mark.parametrize("how", ["train-again", "auto_find_batch_size"])
def test_a_train_that_raised_then_runs_again_counts_each_batch_once(workdir, corpus, how):
    """The first train() ends without on_train_end (its forward hook stays): the next one must not count twice."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
    if how == "train-again":  # interrupted at step 2 of a notebook's train(); train() is called again
        raiser = RaiseOnce(KeyboardInterrupt(), at_step=2)
        extra = {}
    else:  # the Trainer's own retry after an out-of-memory error, with a smaller batch (accelerate's rule)
        raiser = RaiseOnce(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), at_step=0)
        extra = {"auto_find_batch_size": True}
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=7, batch_size=8, grad_accum=2, logging_steps=3,
                               callbacks=[callback, raiser], data=corpus["paths"], **extra)
    if how == "train-again":
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    trainer.train()
    batch_size = trainer._train_batch_size
    assert batch_size == 8 if how == "train-again" else batch_size < 8  # accelerate's retry: 8 * 0.9 -> 7
    samples, tokens, _ = consumed(corpus["texts"], batch_size, 2, 7)
    progress = callback.run.last_progress
    assert (progress.step, progress.samples, progress.tokens) == (7, samples, tokens)
    stored = runs_by_status(uri)
    assert stored["FINISHED"] == [samples]  # the run the completed train() logged to
    assert list(stored) == ["FINISHED", "FAILED"] or list(stored) == ["FAILED", "FINISHED"], stored


def test_evaluate_returns_the_trainers_own_metrics_while_the_history_gets_our_axes(workdir, corpus):
    """hyperparameter_search's default objective sums what evaluate() returns (less epoch and timings)."""
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=3, batch_size=8, data=corpus["paths"],
                               callbacks=[StreamMetricsCallback(backend="none")], per_device_eval_batch_size=8)
    trainer.eval_dataset = tiny.streaming_dataset(corpus["paths"][:1], tiny.byte_tokenizer())
    trainer.train()
    metrics = trainer.evaluate()
    assert sorted(metrics) == ["epoch", "eval_loss", "eval_runtime", "eval_samples_per_second",
                               "eval_steps_per_second"]
    samples, tokens, _ = consumed(corpus["texts"], 8, 2, 3)
    entry = trainer.state.log_history[-1]
    assert (entry["samples"], entry["tokens"], entry["epoch"]) == (samples, tokens, metrics["epoch"])
    assert entry["eval_loss"] == metrics["eval_loss"]


def test_eval_every_without_an_eval_dataset_is_refused_before_the_first_step(workdir, corpus):
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=3, batch_size=8, data=corpus["paths"],
                               callbacks=[StreamMetricsCallback(backend="none", eval_every="20sp")])
    with pytest.raises(ValueError, match=r"eval_every='20sp'\) evaluates on the Trainer's eval_dataset, and this "
                                         r"Trainer has none: pass eval_dataset= to the Trainer, or leave eval_every"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_epoch_source_tag_follows_a_pass_that_ended_after_the_last_training_row(workdir):
    """22 examples, batches of 4: rows at steps 3 and 6 (epoch source 'none'), the pass ends while step 7
    fetches, training ends at step 8; the final (summary) row's epoch is measured from the pass."""
    paths = tiny.write_corpus(str(workdir / "data"), files=1, lines_per_file=(22,))
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=8, batch_size=4, grad_accum=1, logging_steps=3,
                               callbacks=[callback], data=paths)
    trainer.train()
    run = MlflowClient(uri).get_run(callback.run.run_ids["mlflow"])
    assert run.data.metrics["progress/samples"] == 4 * 8 - 2  # the pass's last batch holds 2
    assert run.data.metrics["progress/epoch"] == pytest.approx(30 / 22)
    assert run.data.tags["stream_metrics.epoch_source"] == "pass"


def test_a_backend_list_takes_over_only_its_own_integrations(workdir, corpus, monkeypatch):
    """report_to=["wandb", "mlflow"] with backend="mlflow": MLflow is ours (one run), W&B stays the Trainer's."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where the Trainer's own MLflowCallback would log too
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=4, batch_size=8, logging_steps=2, data=corpus["paths"],
                               callbacks=[StreamMetricsCallback(backend="mlflow")], report_to=["wandb", "mlflow"])
    trainer.train()
    import wandb

    # The Trainer's own run, wherever W&B's process-wide settings put it (an earlier test's WANDB_DIR).
    folder = os.path.dirname(wandb.run.dir)
    wandb.finish()  # the Trainer's WandbCallback leaves its run open
    client = MlflowClient(uri)
    [run] = client.search_runs(["0"])
    assert "progress/samples" in run.data.metrics
    rows = wandb_rows(folder)
    assert [row["train/global_step"] for row in rows if "train/loss" in row] == [2, 4]  # the Trainer's own rows


def test_padding_free_batches_from_a_tokenizer_without_a_pad_token_count_one_token_examples(workdir):
    """DataCollatorWithFlattening never pads, and marks every example's first label -100: with a tokenizer
    that has no pad token (GPT-2's), a one-token example first or last in a batch is an example."""
    import json

    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    texts = ["a", "stream data token", "b", "model train loss", "step batch", "c", "shard file metric", "d"]
    path = workdir / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = tiny.byte_tokenizer()
    tokenizer.pad_token = None  # as GPT-2's
    assert tokenizer.pad_token_id is None
    model = tiny.tiny_model()
    model.config.pad_token_id = None
    callback = StreamMetricsCallback(backend="none")
    args = TrainingArguments(str(workdir / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=tiny.streaming_dataset([str(path)], tokenizer),
                      data_collator=DataCollatorWithFlattening(), processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    progress = callback.run.last_progress
    assert (progress.samples, progress.tokens) == (len(texts), sum(len(t.encode()) for t in texts)) == (8, 64)


def test_predict_metrics_go_into_the_run_and_predict_returns_them_unchanged(workdir, corpus):
    """trainer.predict() only fires on_predict (the Trainer's W&B integration logged test/* there)."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=3, batch_size=8, data=corpus["paths"],
                               callbacks=[callback], per_device_eval_batch_size=8)
    trainer.train()
    output = trainer.predict(tiny.streaming_dataset(corpus["paths"][:1], tiny.byte_tokenizer()))
    assert sorted(output.metrics) == ["test_loss", "test_runtime", "test_samples_per_second",
                                      "test_steps_per_second"]
    callback.run.finish()
    [run] = MlflowClient(uri).search_runs(["0"])
    assert run.data.metrics["test/loss"] == pytest.approx(output.metrics["test_loss"])
    samples, _, _ = consumed(corpus["texts"], 8, 2, 3)
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "test/loss")
    assert [point.step for point in history] == [samples]  # where training ended (mlflow_step: samples)


@needs_trainer_resume
@pytest.mark.parametrize("change", ["ignore_data_skip", "batch-size"])
def test_a_resume_that_reads_the_data_from_elsewhere_measures_the_pass_from_there(workdir, change):
    """22 examples; 3 steps of 4 and a checkpoint (12 samples). The resumed session reads the stream again
    from its start (ignore_data_skip), or past 3 batches of 2 (6 examples, with batches of 2)."""
    paths = tiny.write_corpus(str(workdir / "data"), files=1, lines_per_file=(22,))
    uri = f"sqlite:///{workdir}/mlflow.db"

    def trainer(steps, batch_size, **extra):
        callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
        t, _ = build_trainer(str(workdir / "out"), max_steps=steps, batch_size=batch_size, grad_accum=1,
                             logging_steps=1, save_steps=3, callbacks=[callback], data=paths, **extra)
        return t, callback

    def fed(start, size, count, examples=22):
        """The batches a stream of ``examples`` feeds from ``start`` on, starting again at its end."""
        batches, position = [], start
        while len(batches) < count:
            batches.append(min(size, examples - position))
            position = (position + batches[-1]) % examples
        return batches

    trainer(3, 4)[0].train()
    if change == "ignore_data_skip":  # the whole pass (6 batches of 4, the last of 2), then one batch more
        second, callback = trainer(3 + 7, 4, ignore_data_skip=True)
    else:  # past 3 batches of 2, in 9 batches of 2 (older transformers keep the checkpoint's batch of 4)
        second, callback = trainer(3 + 9, 2)
    second.train(resume_from_checkpoint=str(workdir / "out" / "checkpoint-3"))
    size = second._train_batch_size
    skipped = 0 if change == "ignore_data_skip" else 3 * size
    samples = 12 + sum(fed(skipped, size, second.state.global_step - 3))
    assert samples == (12 + 22 + 4 if change == "ignore_data_skip" else 12 + 16 + 2 if size == 2 else samples)
    progress = callback.run.last_progress
    assert (progress.samples, progress.epoch_source) == (samples, "pass")
    assert progress.epoch == pytest.approx(samples / 22)  # the pass holds 22 examples


def test_label_smoothing_says_once_that_loss_tokens_cannot_be_counted_and_counts_the_rest(workdir, corpus):
    # The Trainer pops the labels before the model's forward where label smoothing is on: samples and
    # tokens are still exact (from the data alone), loss tokens are left out, and a warning says why.
    import warnings

    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=5, batch_size=8, grad_accum=2, logging_steps=2,
                               callbacks=[callback], data=corpus["paths"], label_smoothing_factor=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [w for w in caught if "progress/loss_tokens is left out" in str(w.message)]
    assert len(said) == 1 and "label_smoothing_factor" in str(said[0].message)
    samples, tokens, _ = consumed(corpus["texts"], 8, 2, 5)
    metrics = MlflowClient(uri).get_run(callback.run.run_ids["mlflow"]).data.metrics
    assert (metrics["progress/samples"], metrics["progress/tokens"]) == (samples, tokens)
    assert "progress/loss_tokens" not in metrics


@needs_trainer_resume
def test_a_checkpoint_holding_the_counts_of_an_earlier_step_says_so_when_resumed(workdir, corpus, caplog):
    # Several ranks take the state at a step's end that saves; a checkpoint written elsewhere (the
    # Trainer's JIT checkpoint on SIGTERM on several ranks) holds an earlier step's. Made here by moving
    # checkpoint-3's state into checkpoint-6: the resume says what it goes on from, and by how much.
    import json
    import logging

    out = workdir / "out"

    def trainer(steps):
        callback = StreamMetricsCallback(backend="none")
        t, _ = build_trainer(str(out), max_steps=steps, batch_size=4, grad_accum=1, logging_steps=1,
                             save_steps=3, callbacks=[callback], data=corpus["paths"])
        return t, callback

    trainer(6)[0].train()
    states = {step: json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text()) for step in (3, 6)}
    earlier = states[3]["stateful_callbacks"]["StreamMetricsCallback"]
    states[6]["stateful_callbacks"]["StreamMetricsCallback"] = earlier
    (out / "checkpoint-6" / "trainer_state.json").write_text(json.dumps(states[6]))
    second, callback = trainer(7)
    with caplog.at_level(logging.WARNING, logger="stream_metrics"):
        second.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    said = [r.getMessage() for r in caplog.records if "holds stream_metrics' counts as of step 3" in r.getMessage()]
    assert len(said) == 1 and "the checkpoint of step 6" in said[0] and "3 step(s) between" in said[0], said
    samples, _, _ = consumed(corpus["texts"], 4, 1, 3)
    assert callback.run.last_progress.samples == samples + 4  # step 3's counts, and the one step trained
