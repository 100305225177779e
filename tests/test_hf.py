"""The Trainer integration on real Trainer runs: exact counts, one run per backend, the epoch, the schema."""
from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

import tiny
from conftest import assert_conformant, mlflow_rows, wandb_rows, wandb_run_dirs
from streaming_trainer import build_trainer

from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow


def consumed(texts, batch_size, grad_accum, max_steps):
    """What the Trainer feeds the model, computed from the data alone: (samples, tokens, passes ended).

    Per pass the stream is cut into micro-batches of ``batch_size`` (the last one partial); each
    full window of ``grad_accum`` micro-batches is one optimizer step; a partial window at the end
    of a pass is trained on without a step. Training stops when ``max_steps`` steps are done.
    """
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    samples = tokens = steps = passes = 0
    while True:
        windows = [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
        for window in windows:
            for batch in window:
                samples += len(batch)
                tokens += sum(tiny.token_count(t) for t in batch)
            if len(window) == grad_accum:
                steps += 1
                if steps == max_steps:
                    return samples, tokens, passes
        passes += 1


def only_run(uri, experiment="Default"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs"
    return client, runs[0]


def train(workdir, corpus, *, steps, batch_size=8, grad_accum=2, workers=0, callback=None, **kwargs):
    callback = callback or StreamMetricsCallback(backend=["mlflow", "wandb"],
                                                 mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                               workers=workers, callbacks=[callback], data=corpus["paths"], **kwargs)
    trainer.train()
    return trainer, callback


@pytest.mark.parametrize("batch_size, grad_accum, workers, steps", [
    (8, 2, 0, 13),   # a pass and part of the next: the stream restarts; a partial last batch
    (8, 3, 2, 12),   # two dataloader workers: whole passes (6 steps each), so the order does not matter
])
def test_trainer_counts_exactly_what_the_model_saw(workdir, corpus, batch_size, grad_accum, workers, steps):
    _, callback = train(workdir, corpus, steps=steps, batch_size=batch_size, grad_accum=grad_accum, workers=workers)
    samples, tokens, passes = consumed(corpus["texts"], batch_size, grad_accum, steps)
    p = callback.run.progress
    assert (p.step, p.samples, p.tokens) == (steps, samples, tokens)
    assert p.epoch_source == "pass"
    assert math.floor(p.epoch + 1e-9) == max(passes, math.floor(samples / corpus["samples"]))
    uri = f"sqlite:///{workdir}/mlflow.db"
    _, run = only_run(uri)
    assert_conformant("--mlflow-uri", uri, "--run-id", run.info.run_id, "--expect-samples", samples,
                      "--expect-tokens", tokens, "--expect-steps", steps)
    [folder] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", folder, "--expect-samples", samples, "--expect-tokens", tokens)
    assert run.data.tags["stream_metrics.epoch_source"] == "pass"


def test_tokens_equal_the_trainers_own_non_padding_count(workdir, corpus):
    _, callback = train(workdir, corpus, steps=12, include_num_input_tokens_seen="non_padding")
    uri = f"sqlite:///{workdir}/mlflow.db"
    _, run = only_run(uri)
    rows = [r for r in mlflow_rows(uri, run.info.run_id) if "train/num_input_tokens_seen" in r]
    assert rows
    for row in rows:
        assert row["progress/tokens"] == row["train/num_input_tokens_seen"]


def test_report_to_both_plus_the_callback_gives_one_run_each_and_every_metric_once(workdir, corpus):
    callback = StreamMetricsCallback(mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})
    _, callback = train(workdir, corpus, steps=10, callback=callback, report_to=["wandb", "mlflow"])
    assert sorted(callback.run_backends()) == ["mlflow", "wandb"]
    _, run = only_run(f"sqlite:///{workdir}/mlflow.db")
    assert "loss" not in run.data.metrics and "train/loss" in run.data.metrics
    assert run.data.params["learning_rate"] == "0.003"
    [folder] = wandb_run_dirs(workdir)
    keys = set().union(*wandb_rows(folder))
    assert "train/loss" in keys and not keys & {"loss", "train/global_step", "train/epoch", "epoch"}
    assert_conformant("--wandb-run", folder)


def test_hub_token_and_other_secrets_are_redacted(workdir, corpus):
    _, callback = train(workdir, corpus, steps=2, hub_token="hf_planted_secret_123")
    client, run = only_run(f"sqlite:///{workdir}/mlflow.db")
    assert "hf_planted_secret_123" not in json.dumps(run.data.params)
    [folder] = wandb_run_dirs(workdir)
    for path in (workdir / "wandb").rglob("*"):
        if path.is_file():
            assert b"hf_planted_secret_123" not in path.read_bytes(), path


def test_a_sized_dataset_uses_the_trainers_exact_epoch(workdir, corpus):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    import datasets

    tokenizer = tiny.byte_tokenizer()
    ds = datasets.Dataset.from_dict({"text": corpus["texts"]}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})
    args = TrainingArguments(output_dir=str(workdir / "out"), max_steps=5, per_device_train_batch_size=8,
                             logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=tiny.tiny_model(), args=args, train_dataset=ds, callbacks=[callback],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    p = callback.run.progress
    assert p.epoch_source == "sized"
    assert p.epoch == pytest.approx(5 / math.ceil(len(ds) / 8))


def test_packed_batches_count_every_example(workdir, corpus):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    tokenizer = tiny.byte_tokenizer()
    stream = tiny.streaming_dataset(corpus["paths"], tokenizer).remove_columns(["attention_mask"])
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})
    args = TrainingArguments(output_dir=str(workdir / "out"), max_steps=9, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, logging_steps=3, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=tiny.tiny_model(), args=args, train_dataset=stream, callbacks=[callback],
                      data_collator=DataCollatorWithFlattening())
    trainer.train()
    samples, tokens, _ = consumed(corpus["texts"], 8, 2, 9)
    p = callback.run.progress
    assert (p.samples, p.tokens) == (samples, tokens)


def test_the_plain_loop_and_the_trainer_write_the_same_axes(workdir, corpus):
    """One stream, trained once through the Trainer and once through the plain-loop helper."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    import stream_metrics

    uri = f"sqlite:///{workdir}/mlflow.db"
    cb = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri, "experiment": "trainer"})
    train(workdir, corpus, steps=12, callback=cb, logging_steps=3)

    tokenizer = tiny.byte_tokenizer()
    loader = DataLoader(tiny.streaming_dataset(corpus["paths"], tokenizer), batch_size=8,
                        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    model = tiny.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with stream_metrics.init(backend="mlflow", gradient_accumulation_steps=2, pad_token_id=0,
                             mlflow={"tracking_uri": uri, "experiment": "plain"}) as run:
        micro = 0
        while run.progress.step < 12:
            for batch in run.iterate(loader):
                model(**batch).loss.backward()
                micro += 1
                if micro % 2 == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                    if (micro // 2) % 3 == 0:
                        run.log({"train/loss": 0.0})
                    if micro // 2 == 12:
                        break
            micro -= micro % 2  # a partial window at the end of a pass makes no step (as in the Trainer)
    axes = ("progress/step", "progress/samples", "progress/tokens", "progress/loss_tokens", "progress/epoch")
    client = MlflowClient(uri)

    def rows(experiment):
        [r] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return {row["progress/step"]: tuple(round(row[a], 9) for a in axes) for row in mlflow_rows(uri, r.info.run_id)}

    trainer_rows, plain_rows = rows("trainer"), rows("plain")
    assert set(trainer_rows) == set(plain_rows) == {3, 6, 9, 12}
    assert trainer_rows == plain_rows


class Recorder:
    """A callback after ours, as a framework's own logger is (LLaMA-Factory's LogCallback): what it sees."""

    def __init__(self):
        from transformers import TrainerCallback

        self.seen = []
        recorder = self

        class _Recorder(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                recorder.seen.append(dict(logs))

        self.callback = _Recorder()


def printed_logs(text: str) -> list[dict]:
    """The dicts the Trainer's PrinterCallback printed (``disable_tqdm=True``): its console lines."""
    import ast

    return [ast.literal_eval(line) for line in text.splitlines() if line.startswith("{'loss'")]


def two_passes(workdir, corpus, capsys, logger_first=False, **options):
    """Two full passes over the stream (9 steps each), logged every 3 steps; (trainer, printed, seen, truth)."""
    recorder = Recorder()
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"},
                                     **options)
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=18, batch_size=8, grad_accum=2, logging_steps=3,
                               callbacks=[recorder.callback, callback] if logger_first
                               else [callback, recorder.callback],
                               data=corpus["paths"])
    capsys.readouterr()
    trainer.train()
    printed = printed_logs(capsys.readouterr().out)
    truth = {step: consumed(corpus["texts"], 8, 2, step) for step in range(3, 19, 3)}
    return trainer, callback, printed, recorder.seen, truth


@pytest.mark.parametrize("logger_first", [False, True], ids=["callback-first", "logger-first"])
def test_the_trainers_printed_log_lines_show_our_epoch_samples_and_tokens(workdir, corpus, capsys, logger_first):
    # logger-first: a framework's logger given before ours (as autolog adds ours last) still sees our figures.
    trainer, callback, printed, seen, truth = two_passes(workdir, corpus, capsys, logger_first=logger_first)
    assert len(printed) == 6
    pass_size = corpus["samples"]
    for step, line in zip(range(3, 19, 3), printed):
        samples, tokens, passes = truth[step]
        assert (line["samples"], line["tokens"]) == (samples, tokens)
        if step > 9:  # the first pass has ended (at step 9): the estimate is exact from the data
            # transformers 5 prints "1.338"; 4.x prints the float itself
            assert float(line["epoch"]) == pytest.approx(samples / pass_size, rel=1e-3)
    assert float(printed[-1]["epoch"]) == 2.0  # two full passes (the Trainer's own epoch says 1.5 here)
    training = [entry for entry in seen if "loss" in entry]
    assert [e["samples"] for e in training] == [truth[s][0] for s in range(3, 19, 3)]
    assert training[-1]["epoch"] == pytest.approx(2.0)
    # The Trainer decides with its own epoch: untouched.
    assert trainer.state.epoch == pytest.approx(1.5, abs=0.1)


def test_log_history_agrees_with_the_epoch_stored_in_mlflow_at_every_logged_step(workdir, corpus, capsys):
    trainer, callback, printed, seen, truth = two_passes(workdir, corpus, capsys)
    uri = f"sqlite:///{workdir}/mlflow.db"
    _, run = only_run(uri)
    stored = {row["progress/step"]: row for row in mlflow_rows(uri, run.info.run_id) if "train/loss" in row}
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [e["step"] for e in history] == sorted(stored) == list(range(3, 19, 3))
    for entry in history:
        row = stored[entry["step"]]
        assert entry["epoch"] == pytest.approx(row["progress/epoch"], abs=1e-9)
        assert (entry["samples"], entry["tokens"]) == (row["progress/samples"], row["progress/tokens"])
    # The end-of-training entry too, and the checkpoint-style JSON the frameworks read.
    assert trainer.state.log_history[-1]["epoch"] == pytest.approx(2.0)
    trainer.state.save_to_json(str(workdir / "trainer_state.json"))
    with open(workdir / "trainer_state.json") as f:
        assert json.load(f)["log_history"][-2]["epoch"] == pytest.approx(2.0)


def test_with_rewrite_logs_off_the_trainers_own_log_lines_are_left_alone(workdir, corpus, capsys):
    trainer, callback, printed, seen, truth = two_passes(workdir, corpus, capsys, rewrite_logs=False)
    assert len(printed) == 6 and not any("samples" in line or "tokens" in line for line in printed)
    # The Trainer's epoch: progress towards max_steps over the steps of one pass (9 of 9 + 9 of 18).
    assert float(printed[-1]["epoch"]) == pytest.approx(trainer.state.log_history[-2]["epoch"])
    assert all("samples" not in entry for entry in trainer.state.log_history)
    assert callback.run.progress.epoch == pytest.approx(2.0)  # our charts have it all the same


def _has_repeat() -> bool:
    import datasets

    return hasattr(datasets.IterableDataset, "repeat")


@pytest.mark.skipif(not _has_repeat(), reason="IterableDataset.repeat() came with datasets 3.3")
def test_a_stream_repeated_inside_datasets_counts_each_repetition_as_a_pass(workdir, corpus):
    """``train_dataset.repeat(2)``: each of the Trainer's epochs holds two passes over the data. The
    loader's run (284 examples in batches of 7: a last partial batch, and an odd number of batches,
    so its last window is cut short) ends after step 20; past it the epoch is the samples over one
    pass of the files, exact, not over the repeated stream."""
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=30, batch_size=7, grad_accum=2, logging_steps=5,
                               callbacks=[callback], data=corpus["paths"])
    trainer.train_dataset = trainer.train_dataset.repeat(2)
    trainer.train()
    repeated = corpus["texts"] * 2
    samples, tokens, loader_runs = consumed(repeated, 7, 2, 30)
    assert loader_runs == 1
    p = callback.run.progress
    assert (p.step, p.samples, p.tokens) == (30, samples, tokens)
    assert (p.epoch, p.epoch_source) == (pytest.approx(samples / corpus["samples"], rel=1e-12), "pass")
    assert 2 < p.epoch < 3
    uri = f"sqlite:///{workdir}/mlflow.db"
    _, run = only_run(uri)
    rows = {row["progress/step"]: row for row in mlflow_rows(uri, run.info.run_id) if "train/loss" in row}
    assert sorted(rows) == [5, 10, 15, 20, 25, 30]
    for step, row in rows.items():
        assert row["progress/samples"] == consumed(repeated, 7, 2, step)[0]
        if step > 20:  # after the loader's first end: two passes measured
            assert row["progress/epoch"] == pytest.approx(row["progress/samples"] / corpus["samples"], rel=1e-12)
        else:
            assert row["progress/epoch"] == 0.0
    assert run.data.tags["stream_metrics.epoch_source"] == "pass"
