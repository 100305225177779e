"""Only training forwards count: no-grad reference passes and ``generate`` in train mode do not.

A Trainer subclass running a DPO-style reference pass of the policy itself (no gradients, train mode)
and a ``generate`` call, and TRL's own DPOTrainer (tiny model and tokenizer built in code, a preference
dataset written to disk). Truths come from the data; counts are read back from MLflow's store.
"""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

import tiny
from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow


def stored_totals(uri) -> dict:
    """The last value of each progress axis that MLflow stored."""
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    return {k: v for k, v in run.data.metrics.items() if k.startswith("progress/")}


def test_reference_passes_and_generate_in_train_mode_do_not_count(workdir, corpus):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    extra = {"reference": 0, "generate": 0}

    class ReferencePassTrainer(Trainer):
        """DPO without a reference model and GRPO do this: more forwards of the policy, in train mode."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            assert model.training
            with torch.no_grad():
                model(**inputs)
                extra["reference"] += 1
            model.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
            extra["generate"] += 1
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    uri = f"sqlite:///{workdir}/mlflow.db"
    tokenizer = tiny.byte_tokenizer()
    steps, batch_size, grad_accum = 6, 8, 2
    args = TrainingArguments(output_dir=str(workdir / "out"), max_steps=steps, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, logging_steps=2, report_to="none", use_cpu=True,
                             disable_tqdm=True, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = ReferencePassTrainer(model=tiny.tiny_model(), args=args,
                                   train_dataset=tiny.streaming_dataset(corpus["paths"], tokenizer),
                                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                                   processing_class=tokenizer,
                                   callbacks=[StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri})])
    trainer.train()

    # Truth from the files: 12 micro-batches of 8 texts, in file order (a stream is not shuffled), once each.
    micro_batches = steps * grad_accum
    texts = corpus["texts"][:micro_batches * batch_size]
    assert extra == {"reference": micro_batches, "generate": micro_batches}
    stored = stored_totals(uri)
    assert stored["progress/samples"] == len(texts)
    assert stored["progress/tokens"] == sum(tiny.token_count(t) for t in texts) == trainer.state.num_input_tokens_seen
    assert stored["progress/step"] == steps


def write_preferences(path, pairs: int) -> list[dict]:
    import random

    rng = random.Random(7)
    words = tiny.WORDS
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + ":",
             "chosen": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))),
             "rejected": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))} for _ in range(pairs)]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def test_dpo_counts_each_pair_as_its_two_sequences_once(workdir):
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig, DPOTrainer

    uri = f"sqlite:///{workdir}/mlflow.db"
    pairs = write_preferences(workdir / "prefs.jsonl", 12)
    dataset = datasets.load_dataset("json", data_files=str(workdir / "prefs.jsonl"), split="train")
    args = DPOConfig(output_dir=str(workdir / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                     logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                     learning_rate=1e-3)
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri})
    trainer = DPOTrainer(model=tiny.tiny_model(), ref_model=tiny.tiny_model(seed=1), args=args,
                         train_dataset=dataset, processing_class=tiny.byte_tokenizer(256), callbacks=[callback])
    trainer.train()

    # Truth from the file: one byte is one token, and TRL ends each completion with one eos token. Each pair
    # is trained as two sequences, prompt+chosen and prompt+rejected, in one forward; the reference model's
    # forward (no gradients) does not count.
    def length(text):
        return len(text.encode("utf-8"))

    samples = 2 * len(pairs)
    tokens = sum(2 * length(p["prompt"]) + length(p["chosen"]) + 1 + length(p["rejected"]) + 1 for p in pairs)
    loss_tokens = sum(length(p["chosen"]) + 1 + length(p["rejected"]) + 1 for p in pairs)
    stored = stored_totals(uri)
    assert (stored["progress/samples"], stored["progress/tokens"], stored["progress/loss_tokens"]) == (
        samples, tokens, loss_tokens)
    assert stored["progress/step"] == len(pairs) // 4
    # The sized epoch: one pass (kept just below 1.0 here; the Trainer's last epoch end is not taken as a pass end).
    assert stored["progress/epoch"] == pytest.approx(1.0, abs=1e-6)


def test_grpo_counts_each_completion_once_per_gradient_pass_and_never_generation(workdir):
    pytest.importorskip("trl")
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    uri = f"sqlite:///{workdir}/mlflow.db"
    prompts = [p["prompt"] for p in write_preferences(workdir / "prompts.jsonl", 8)]
    dataset = datasets.load_dataset("json", data_files=str(workdir / "prompts.jsonl"), split="train")
    generated = []

    def reward(prompts, completions, completion_ids, **kwargs):
        generated.extend(zip(prompts, completion_ids))  # what was generated, as the trainer saw it
        return [float(len(ids)) for ids in completion_ids]

    steps, batch_size, generations = 3, 4, 2
    args = GRPOConfig(output_dir=str(workdir / "out"), max_steps=steps, per_device_train_batch_size=batch_size,
                      num_generations=generations, max_completion_length=6, logging_steps=1, report_to="none",
                      use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-3, beta=0.0)
    tokenizer = tiny.byte_tokenizer(256)
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": uri})
    trainer = GRPOTrainer(model=tiny.tiny_model(), reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    # Truth: every generated completion is trained on once (num_iterations=1), with its prompt; generation
    # itself (one forward per new token, under no_grad) does not count.
    assert len(generated) == steps * batch_size
    samples = len(generated)
    tokens = sum(len(p.encode("utf-8")) + len(ids) for p, ids in generated)
    assert all(p in prompts for p, _ in generated)
    stored = stored_totals(uri)
    assert (stored["progress/samples"], stored["progress/tokens"], stored["progress/step"]) == (samples, tokens, steps)
