"""A Trainer user evaluates, saves and stops by samples and tokens: real Trainer runs, checked on disk and in MLflow."""
from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

import tiny
from conftest import mlflow_rows, needs_trainer_resume
from streaming_trainer import build_trainer
from test_hf import consumed

from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow
BATCH, ACCUM = 8, 2  # 16 samples a step


def per_step(texts, steps):
    """(samples, tokens) after each optimizer step 1..steps, computed from the data alone."""
    return {k: consumed(texts, BATCH, ACCUM, k)[:2] for k in range(1, steps + 1)}


def crossing_steps(counts, interval, axis):
    """The steps at which ``axis`` (0: samples, 1: tokens) crosses a multiple of ``interval``."""
    return [k for k in counts if counts[k][axis] // interval > (counts[k - 1][axis] if k > 1 else 0) // interval]


def train(workdir, corpus, *, steps, eval_texts=None, out="out", resume=None, **options):
    callback = StreamMetricsCallback(backend="mlflow", mlflow={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"},
                                     **options)
    trainer, _ = build_trainer(str(workdir / out), max_steps=steps, batch_size=BATCH, grad_accum=ACCUM,
                               callbacks=[callback], data=corpus["paths"])
    if eval_texts:
        import datasets

        tokenizer = tiny.byte_tokenizer()
        trainer.eval_dataset = datasets.Dataset.from_dict({"text": eval_texts}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def stored_rows(workdir):
    uri = f"sqlite:///{workdir}/mlflow.db"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    return mlflow_rows(uri, run.info.run_id)


def checkpoint_steps(workdir, out="out"):
    return sorted(int(name.split("-")[1]) for name in os.listdir(workdir / out) if name.startswith("checkpoint-"))


def test_evaluation_and_checkpoints_come_at_the_right_sample_and_token_counts(workdir, corpus):
    steps = 14
    counts = per_step(corpus["texts"], steps)
    token_interval = 2000
    eval_steps = crossing_steps(counts, 40, axis=0)
    save_steps = crossing_steps(counts, token_interval, axis=1)
    assert 3 <= len(eval_steps) < steps and 2 <= len(save_steps) < steps  # the test means something

    trainer, callback = train(workdir, corpus, steps=steps, eval_texts=corpus["texts"][:8],
                              eval_every="40sp", save_every=f"{token_interval // 1000}ktok")

    # MLflow stored one evaluation row at each crossing, at the exact samples and tokens of that step.
    evaluated = [(r["progress/step"], r["progress/samples"], r["progress/tokens"])
                 for r in stored_rows(workdir) if "eval/loss" in r]
    assert evaluated == [(k, *counts[k]) for k in eval_steps]
    # A checkpoint folder at each token crossing, and none elsewhere (save_strategy is "no").
    assert checkpoint_steps(workdir) == save_steps
    # Each checkpoint keeps the schedules' counts, so a resume does not fire again.
    last = save_steps[-1]
    with open(workdir / "out" / f"checkpoint-{last}" / "trainer_state.json") as f:
        stored = json.load(f)["stateful_callbacks"]["StreamMetricsCallback"]
    stored = stored[0] if isinstance(stored, list) else stored
    schedules = stored["attributes"]["saved_state"]["schedules"]
    assert schedules["save_every"] == {"every": "2000tok", "boundaries": counts[last][1] // token_interval}
    assert schedules["eval_every"]["boundaries"] == counts[last][0] // 40


@needs_trainer_resume
def test_a_resumed_run_saves_at_the_remaining_boundaries_only(workdir, corpus):
    steps, token_interval = 14, 2000
    counts = per_step(corpus["texts"], steps)
    save_steps = crossing_steps(counts, token_interval, axis=1)
    train(workdir, corpus, steps=steps, save_every="2ktok")
    assert checkpoint_steps(workdir) == save_steps
    # Resume from the first checkpoint into a new folder: the boundaries it had passed do not fire again.
    first = save_steps[0]
    _, callback = train(workdir, corpus, steps=steps, save_every="2ktok", out="resumed",
                        resume=str(workdir / "out" / f"checkpoint-{first}"))
    assert checkpoint_steps(workdir, "resumed") == save_steps[1:]
    p = callback.run.progress
    assert (p.step, p.samples, p.tokens) == (steps, *counts[steps])


def test_stop_at_ends_training_with_a_checkpoint_at_the_amount(workdir, corpus):
    counts = per_step(corpus["texts"], 40)
    stop_step = min(k for k in counts if counts[k][1] >= 5000)
    trainer, callback = train(workdir, corpus, steps=1000, stop_at="5ktok")
    assert trainer.state.global_step == stop_step
    assert checkpoint_steps(workdir) == [stop_step]
    rows = stored_rows(workdir)
    assert (rows[-1]["progress/step"], rows[-1]["progress/samples"], rows[-1]["progress/tokens"]) == \
        (stop_step, *counts[stop_step])
    p = callback.run.progress
    assert p.tokens >= 5000 > counts[stop_step - 1][1]


def test_an_interval_smaller_than_a_step_fires_once_per_step_and_counts_every_boundary(workdir, corpus):
    # 16 samples a step and an interval of 5: every step jumps over three or four boundaries.
    steps = 6
    counts = per_step(corpus["texts"], steps)
    trainer, callback = train(workdir, corpus, steps=steps, eval_texts=corpus["texts"][:4], eval_every="5sp")
    evaluated = [r["progress/step"] for r in stored_rows(workdir) if "eval/loss" in r]
    assert evaluated == list(range(1, steps + 1))  # one evaluation per step, not one per boundary
    assert callback.run.schedule("5sp", name="eval_every").boundaries == counts[steps][0] // 5


@pytest.mark.parametrize("options, target", [({"stop_at": "80sp"}, "80 samples (stop_at)"),
                                             ({}, "5 steps (max_steps)")])
def test_progress_lines_in_a_log_file(workdir, corpus, capsys, options, target):
    # stderr is captured, so not a terminal: plain lines, the first at step 1 and the last at the end.
    train(workdir, corpus, steps=5 if not options else 1000, progress=True, **options)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    counts = per_step(corpus["texts"], 5)
    assert lines[0].startswith(f"step 1 | 16 samples | {counts[1][1]} tokens | epoch ")
    assert lines[-1].startswith(f"step 5 | 80 samples | {counts[5][1] / 1000:.3g}k tokens | epoch ")
    assert "tok/s" in lines[-1] and lines[-1].endswith(f"| 100% of {target} | ETA 0:00:00")


def test_the_last_progress_line_is_where_training_ended_between_logging_steps(workdir, corpus, capsys):
    # 7 steps, a row every 5: the last line is step 7's (the end), not the last row's step 5.
    train(workdir, corpus, steps=7, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    counts = per_step(corpus["texts"], 7)
    assert lines[-1].startswith(f"step 7 | {counts[7][0]} samples | {counts[7][1] / 1000:.3g}k tokens | epoch "), lines
    assert lines[-1].endswith("| 100% of 7 steps (max_steps) | ETA 0:00:00"), lines


def test_bad_amounts_fail_when_the_callback_is_made(workdir):
    with pytest.raises(ValueError, match="500ksp"):
        StreamMetricsCallback(backend="none", eval_every="500 samples")
    with pytest.raises(ValueError, match="more than 0"):
        StreamMetricsCallback(backend="none", save_every="0tok")
