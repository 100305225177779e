"""The Trainer's lifecycle around training: checkpoints however they are decided, evaluation before training."""
from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

import tiny
from conftest import mlflow_rows, needs_trainer_resume, wandb_rows, wandb_run_dirs, wandb_run_id
from test_hf import consumed

from stream_metrics import schema
from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow


def eval_set(corpus):
    import datasets

    tokenizer = tiny.byte_tokenizer()
    return datasets.Dataset.from_dict({"text": corpus["texts"][:16]}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])


def build_trainer(out, *, max_steps, callbacks, data, eval_dataset=None, **training_args):
    """The demo's Trainer (examples/streaming_trainer.py) with the save and eval settings given here."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = tiny.byte_tokenizer()
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, report_to="none", use_cpu=True,
                             seed=0, disable_tqdm=True, **training_args)
    trainer = Trainer(model=tiny.tiny_model(), args=args, train_dataset=tiny.streaming_dataset(data, tokenizer),
                      eval_dataset=eval_dataset, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      processing_class=tokenizer, callbacks=callbacks)
    return trainer, data


def the_mlflow_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs: one run is expected"
    return client, runs[0]


def saved_progress(checkpoint) -> dict:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        stored = json.load(f)["stateful_callbacks"]["StreamMetricsCallback"]
    saved = stored["attributes"]["saved_state"]
    assert saved is not None, f"{checkpoint} holds no stream_metrics state"
    return saved["progress"]


@needs_trainer_resume
def test_save_strategy_best_checkpoints_hold_the_state_and_a_resume_continues_the_same_runs(workdir, corpus):
    uri = f"sqlite:///{workdir}/mlflow.db"
    out = workdir / "out"

    def trainer(steps):
        callback = StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": uri})
        t, _ = build_trainer(str(out), max_steps=steps, callbacks=[callback], data=corpus["paths"],
                             eval_dataset=eval_set(corpus), logging_steps=3, eval_strategy="steps", eval_steps=4,
                             save_strategy="best", metric_for_best_model="loss")
        return t, callback

    first, cb1 = trainer(12)
    first.train()
    ids = cb1.run.run_ids
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints, "save_strategy='best' wrote no checkpoint"
    for step in checkpoints:
        # The state as of the checkpoint's step, though the save was decided after the evaluation.
        samples, tokens, _ = consumed(corpus["texts"], 8, 2, step)
        progress = saved_progress(out / f"checkpoint-{step}")
        assert (progress["step"], progress["samples"], progress["tokens"]) == (step, samples, tokens)

    # transformers 4.x leaves best_model_checkpoint unset here: every checkpoint was written by "best".
    best = first.state.best_model_checkpoint or str(out / f"checkpoint-{checkpoints[-1]}")
    at = int(best.rsplit("-", 1)[1])
    second, cb2 = trainer(16)
    second.train(resume_from_checkpoint=best)
    assert cb2.run.run_ids == ids  # the same MLflow and W&B runs
    client, run = the_mlflow_run(uri)
    rows = [r for r in mlflow_rows(uri, run.info.run_id) if "train/loss" in r]
    resumed = [r for r in rows if r[schema.STEP] > 12]
    assert resumed, "no training rows after the resume"
    samples, _, _ = consumed(corpus["texts"], 8, 2, resumed[0][schema.STEP])
    # Axes continue from the checkpoint: the first resumed row counts everything since step 0, not since the resume.
    assert resumed[0][schema.SAMPLES] == samples and resumed[0][schema.STEP] > at
    folders = wandb_run_dirs(workdir)
    assert len(folders) == 2 and {wandb_run_id(f) for f in folders} == {ids["wandb"]}
    after = [r for r in wandb_rows(folders[1]) if "train/loss" in r]
    assert after[0][schema.SAMPLES] == samples


def test_evaluate_before_train_logs_its_row_at_progress_zero_in_the_same_run(workdir, corpus):
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": uri})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=6, callbacks=[callback], data=corpus["paths"],
                               logging_steps=3)
    trainer.evaluate(eval_set(corpus))
    trainer.train()
    client, run = the_mlflow_run(uri)
    rows = mlflow_rows(uri, run.info.run_id)
    assert "eval/loss" in rows[0] and rows[0][schema.SAMPLES] == 0 and rows[0][schema.STEP] == 0
    samples, tokens, _ = consumed(corpus["texts"], 8, 2, 6)
    training = [r for r in rows if "train/loss" in r]
    assert [r[schema.STEP] for r in training] == [3, 6] and training[-1][schema.SAMPLES] == samples
    assert run.data.params["learning_rate"] == "0.003"  # the run has the Trainer's arguments
    assert run.info.status == "FINISHED"
    [folder] = wandb_run_dirs(workdir)
    stored = wandb_rows(folder)
    assert "eval/loss" in stored[0] and stored[0][schema.SAMPLES] == 0
    assert [r[schema.TOKENS] for r in stored if "train/loss" in r][-1] == tokens
