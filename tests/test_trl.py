"""The TRL recipe: SFTTrainer on a streamed JSONL dataset, packed and unpacked, plus the callback."""
from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from conftest import assert_conformant, wandb_run_dirs
from trl_sft import build_sft_trainer

from stream_metrics.hf import StreamMetricsCallback

pytest.importorskip("trl")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("packing, options", [
    (True, {}),
    (False, {}),
    # Padding-free batches padded to a multiple of 16 with pad == eos, as TRL does for a tokenizer without a
    # pad token: the pad tail is neither samples nor tokens, and every example's eos token counts.
    (True, {"pad_to_multiple_of": 16, "pad_token": "<eos>"}),
], ids=["packed", "unpacked", "packed-pad_to_multiple_of-pad==eos"])
def test_sft_counts_every_example_once_per_pass_packed_or_not(workdir, corpus, packing, options):
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": uri})
    probe = build_sft_trainer(corpus["paths"], str(workdir / "probe"), packing=packing, max_steps=1, **options)
    rows = sum(1 for _ in probe.train_dataset)  # packed: far fewer rows than examples
    assert (rows < corpus["samples"]) if packing else (rows == corpus["samples"])
    steps = math.ceil(rows / 8)  # exactly one pass over the stream
    trainer = build_sft_trainer(corpus["paths"], str(workdir / "out"), packing=packing, max_steps=steps,
                                callbacks=[callback], include_num_input_tokens_seen="non_padding", **options)
    if options:
        batch = next(iter(trainer.get_train_dataloader()))
        assert "cu_seq_lens_q" in batch and batch["input_ids"].shape[1] % 16 == 0
    trainer.train()

    # Ground truth from the files: every example once; TRL adds an end-of-sequence token to each.
    samples, tokens = corpus["samples"], sum(len(t.encode("utf-8")) + 1 for t in corpus["texts"])
    p = callback.run.progress
    assert (p.step, p.samples, p.tokens) == (steps, samples, tokens)
    if not options:  # (the Trainer's own count reads input_ids != pad: with pad == eos it drops every eos)
        assert p.tokens == trainer.state.num_input_tokens_seen  # the Trainer's own non-padding count agrees
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert_conformant("--mlflow-uri", uri, "--run-id", run.info.run_id, "--expect-samples", samples,
                      "--expect-tokens", tokens, "--expect-steps", steps)
    [folder] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", folder, "--expect-samples", samples, "--expect-tokens", tokens)
