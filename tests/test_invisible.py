"""Invisible to training: the same seeded run gives bit-identical weights with stream_metrics and without.

The runs draw from every global generator a training uses: a shuffled map-style dataset (torch),
dropout (torch), a collator that corrupts tokens with Python's ``random`` (as masking and
span-corruption collators do), and, in the plain loop, ``numpy.random`` too. MLflow's and W&B's
runs are created on a background thread while training goes on, so a single draw from a global
generator there would shift every later draw and change the weights.
"""
from __future__ import annotations

import copy
import random
import shutil

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import tiny
from conftest import wandb_run_dirs

from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow


class CorruptingCollator:
    """Pads for causal LM, then replaces ~15% of input tokens with random bytes, drawn from Python's random."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForLanguageModeling

        self.pad = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def __call__(self, examples):
        batch = self.pad(examples)
        ids = batch["input_ids"]
        for i in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                if random.random() < 0.15:
                    ids[i, j] = random.randrange(2, 258)
        return batch


class OpenEarly:
    """Waits at step 2 until the tracking runs are open, so their opening lands mid-training whatever the timing."""

    def __new__(cls, callback):
        from transformers import TrainerCallback

        class _OpenEarly(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    _ = callback.run.run_ids

        return _OpenEarly()


def model_with_dropout():
    model = tiny.tiny_model()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2  # dropout draws from torch's generator at every forward
    return model


def train(workdir, corpus, name, *, callback=None, steps=8, save_steps=0, resume=None, collator=None, **kwargs):
    """A seeded Trainer run on a shuffled map-style dataset; returns its final weights."""
    import datasets
    from transformers import Trainer, TrainingArguments

    tokenizer = tiny.byte_tokenizer()
    data = datasets.Dataset.from_dict({"text": corpus["texts"]}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(workdir / name), max_steps=steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, seed=7,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             report_to="none", use_cpu=True, disable_tqdm=True, **kwargs)
    trainer = Trainer(model=model_with_dropout(), args=args, train_dataset=data,
                      data_collator=(collator or CorruptingCollator)(tokenizer), processing_class=tokenizer,
                      callbacks=[callback, OpenEarly(callback)] if callback else [])
    trainer.train(resume_from_checkpoint=resume)
    if callback is not None:
        callback.run.finish()  # every row delivered: MLflow and W&B have done all they will do
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {len(different)} tensors, e.g. {different[:3]}"


def both_backends(uri):
    return StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": uri})


def test_trainer_weights_are_bit_identical_with_and_without_the_callback(workdir, corpus, mlflow_uri):
    without = train(workdir, corpus, "without")
    assert_bit_identical(without, train(workdir, corpus, "again"))  # the run itself is reproducible
    with_both = train(workdir, corpus, "with", callback=both_backends(mlflow_uri))
    assert_bit_identical(without, with_both)
    # The runs really were made, named by us, with rows: MLflow's own name generator was never needed.
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.run_name and client.get_metric_history(run.info.run_id, "train/loss")
    assert len(wandb_run_dirs(workdir)) == 1


def test_trainer_weights_are_bit_identical_against_an_mlflow_server(workdir, corpus, mlflow_server):
    without = train(workdir, corpus, "without")
    with_server = train(workdir, corpus, "with", callback=both_backends(mlflow_server.url()))
    assert_bit_identical(without, with_server)
    client = MlflowClient(mlflow_server.url())
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert client.get_metric_history(run.info.run_id, "train/loss")


def test_a_resumed_trainer_run_is_bit_identical_with_and_without_the_callback(workdir, corpus, mlflow_uri):
    train(workdir, corpus, "first", callback=both_backends(mlflow_uri), steps=8, save_steps=4)
    checkpoint = workdir / "first" / "checkpoint-4"
    # Each resumed run reads its own copy of the mid-run checkpoint (stream_metrics state included).
    for name in ("without", "with"):
        shutil.copytree(checkpoint, workdir / f"{name}-checkpoint")
    without = train(workdir, corpus, "without", steps=8, resume=str(workdir / "without-checkpoint"))
    with_both = train(workdir, corpus, "with", callback=both_backends(mlflow_uri), steps=8,
                      resume=str(workdir / "with-checkpoint"))
    assert_bit_identical(without, with_both)
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])  # the same run
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "progress/step")) > 0


def plain_loop(corpus, run=None, steps=10, save_at=None, resume=None):
    """A seeded loop drawing from random, numpy.random and torch in the loop; returns (final weights, checkpoint).

    ``save_at``: the step whose checkpoint (model, optimizer, every generator, the run's state) is returned;
    ``resume``: such a checkpoint to go on from (the generators restored as a loop's own checkpoint would).
    """
    from torch.utils.data import DataLoader

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    tokenizer = tiny.byte_tokenizer()
    examples = [tokenizer(t, truncation=True, max_length=64) for t in corpus["texts"]]
    loader = DataLoader(examples, batch_size=8, shuffle=True, collate_fn=CorruptingCollator(tokenizer))
    model = model_with_dropout()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step, checkpoint = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(copy.deepcopy(resume["optimizer"]))  # Adam updates its moments in place
        random.setstate(resume["random"])
        np.random.set_state(resume["numpy"])
        torch.set_rng_state(resume["torch"])
        step = resume["step"]
    while step < steps:
        for batch in (run.iterate(loader) if run is not None else loader):
            noise = float(np.random.rand()) * 0.01 + random.random() * 0.01
            loss = model(**batch).loss * (1 + noise) + torch.rand(()) * 0.0
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if run is not None:
                run.log({"loss": loss.detach()})
                if step == 2:  # the runs are open by now, mid-training (as when a user prints where they are)
                    _ = run.run_ids
            if step == save_at:
                checkpoint = {"model": copy.deepcopy(model.state_dict()), "step": step,
                              "optimizer": copy.deepcopy(optimizer.state_dict()), "random": random.getstate(),
                              "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                              "stream_metrics": run.state_dict() if run is not None else None}
            if step == steps:
                break
    if run is not None:
        run.finish()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, checkpoint


def test_the_plain_loop_is_bit_identical_with_and_without_a_run(workdir, corpus, mlflow_uri):
    import stream_metrics

    without, _ = plain_loop(corpus)
    run = stream_metrics.init(backend=["mlflow", "wandb"], pad_token_id=0, mlflow={"tracking_uri": mlflow_uri})
    with_run, _ = plain_loop(corpus, run)
    assert_bit_identical(without, with_run)
    client = MlflowClient(mlflow_uri)
    [stored] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert len(client.get_metric_history(stored.info.run_id, "loss")) == 10


def test_two_unnamed_runs_get_different_names_even_with_the_trainers_seed_fixed(workdir, corpus, mlflow_uri):
    from transformers import DataCollatorForLanguageModeling

    def deterministic(tokenizer):  # nothing else draws: both runs reach MLflow with the same global random state
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)

    for name in ("one", "two"):
        train(workdir, corpus, name, steps=2, collator=deterministic,
              callback=StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}))
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == 2 and all(names) and names[0] != names[1], names


def test_a_resumed_plain_loop_is_bit_identical_with_and_without_a_run(workdir, corpus, mlflow_uri):
    import stream_metrics

    def a_run(resume=None):
        return stream_metrics.init(backend=["mlflow", "wandb"], pad_token_id=0, resume=resume,
                                   mlflow={"tracking_uri": mlflow_uri})

    _, checkpoint = plain_loop(corpus, a_run(), steps=10, save_at=5)
    without, _ = plain_loop(corpus, steps=10, resume=checkpoint)
    with_run, _ = plain_loop(corpus, a_run(checkpoint["stream_metrics"]), steps=10, resume=checkpoint)
    assert_bit_identical(without, with_run)
    client = MlflowClient(mlflow_uri)
    [stored] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])  # the same run
    assert max(m.value for m in client.get_metric_history(stored.info.run_id, "progress/step")) == 10


def global_generators():
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()


def test_a_whole_run_leaves_every_global_generator_where_it_was(workdir, mlflow_uri):
    """The direct check: open runs in both backends, log, finish; not one draw from random, numpy or torch."""
    import stream_metrics

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = global_generators()
    for _ in range(2):  # two unnamed runs: each gets a name of its own
        with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
            for i in range(30):
                run.update(samples=4, tokens=100)
                run.log({"loss": 1.0 / (i + 1)})
    after = global_generators()
    assert after[0] == before[0], "something drew from Python's global random"
    assert after[1] == before[1], "something drew from numpy's global generator"
    assert torch.equal(after[2], before[2]), "something drew from torch's global generator"
    import mlflow.telemetry.client as telemetry

    assert telemetry.random is not random  # its rollout draw, on its own thread, uses our generator
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert len({r.info.run_name for r in runs}) == 2
