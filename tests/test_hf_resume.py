"""Resuming a Trainer run, gracefully or after a SIGKILL, continues every axis and the same runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import ROOT, assert_conformant, needs_trainer_resume, wandb_rows, wandb_run_dirs, wandb_run_id
from streaming_trainer import build_trainer

from stream_metrics import schema
from stream_metrics.hf import StreamMetricsCallback

pytestmark = pytest.mark.slow
AXES = (schema.STEP, schema.SAMPLES, schema.TOKENS, schema.EPOCH, schema.WALL_CLOCK)


def the_mlflow_run(uri, experiment="Default"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs: a resume must continue the same run"
    return client, runs[0]


def never_decrease(rows, start=None):
    last = dict(start or {})
    for row in rows:
        for axis in AXES:
            if axis in row:
                assert row[axis] >= last.get(axis, 0) - 1e-9, f"{axis} went down: {last.get(axis)} -> {row[axis]}"
                last[axis] = row[axis]
    return last


def checkpoint_progress(folder) -> dict:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        stored = json.load(f)["stateful_callbacks"]["StreamMetricsCallback"]
    return stored["attributes"]["saved_state"]["progress"]


@needs_trainer_resume
@pytest.mark.parametrize("restore_callback_states, resume_at", [(False, 12), (True, 12), (False, 6)],
                         ids=["second-pass", "second-pass-restoring-callbacks", "first-pass"])
def test_resume_from_a_checkpoint_continues_every_axis_and_the_same_runs(workdir, corpus, restore_callback_states,
                                                                         resume_at, capsys):
    uri = f"sqlite:///{workdir}/mlflow.db"
    out = workdir / "out"

    def trainer(steps):
        callback = StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": uri})
        t, _ = build_trainer(str(out), max_steps=steps, batch_size=8, grad_accum=2, callbacks=[callback],
                             data=corpus["paths"], save_steps=6, logging_steps=3,
                             restore_callback_states_from_checkpoint=restore_callback_states)
        return t, callback

    first, cb1 = trainer(12)
    first.train()
    at_checkpoint = checkpoint_progress(out / f"checkpoint-{resume_at}")
    ids = cb1.run.run_ids

    second, cb2 = trainer(18)
    # Another Trainer's callback, built later in the process (a probe, a second stage): the restored
    # callback is still this Trainer's own.
    other = StreamMetricsCallback(backend="none")
    capsys.readouterr()
    second.train(resume_from_checkpoint=str(out / f"checkpoint-{resume_at}"))
    assert other.run is None
    resumed = cb2.run.progress
    # The Trainer's printed lines show our figures in the resumed session too (restored callbacks included).
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{'loss'")]
    assert printed and all("'samples': " in line and "'tokens': " in line for line in printed), printed
    assert cb2.run.run_ids == ids
    assert resumed.step == 18 and resumed.samples > at_checkpoint["samples"]
    assert resumed.tokens > at_checkpoint["tokens"] and resumed.wall_clock > at_checkpoint["wall_clock"]

    client, run = the_mlflow_run(uri)
    assert run.info.run_id == ids["mlflow"]
    assert_conformant("--mlflow-uri", uri, "--run-id", ids["mlflow"], "--expect-steps", 18,
                      "--expect-samples", resumed.samples, "--expect-tokens", resumed.tokens)
    folders = wandb_run_dirs(workdir)
    assert len(folders) == 2 and {wandb_run_id(f) for f in folders} == {ids["wandb"]}  # offline: a folder per session
    before, after = wandb_rows(folders[0]), wandb_rows(folders[1])
    last = never_decrease(before)
    never_decrease(after)
    assert after[0][schema.SAMPLES] > at_checkpoint["samples"]
    # Rows after the checkpoint are trained again; the clock never goes back.
    assert after[0][schema.WALL_CLOCK] >= last[schema.WALL_CLOCK]


def stored_rows(uri: str, experiment: str) -> int:
    """Rows MLflow holds for the experiment's run so far (0 before the run exists, or while SQLite is busy)."""
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        return len(client.get_metric_history(runs[0].info.run_id, schema.SAMPLES)) if runs else 0
    except Exception:  # the training process holds the database's lock: ask again
        return 0


@needs_trainer_resume
def test_a_killed_training_process_resumes_from_its_last_checkpoint(workdir):
    """SIGKILL after a checkpoint, then the same command with --resume last."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    # A fresh process, as a user would start it: not attached to this test process's W&B service.
    env = {k: v for k, v in os.environ.items() if not (k.startswith("WANDB") and "SERVICE" in k)}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "examples", "streaming_trainer.py")
    out = workdir / "out"
    cmd = [sys.executable, script, "--out", str(out), "--save-steps", "4", "--experiment", "crash"]
    proc = subprocess.Popen(cmd + ["--max-steps", "100000"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint-8" / "trainer_state.json").exists() or not stored_rows(uri, "crash"):
            assert proc.poll() is None, "training ended before its second checkpoint"
            assert time.monotonic() < deadline, "no checkpoint and no stored row within 180 s"
            time.sleep(0.2)
        time.sleep(1.0)  # let it log a few rows past the checkpoint before the crash
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client, run = the_mlflow_run(uri, "crash")
    crashed_id = run.info.run_id
    samples_before_crash = max(m.value for m in client.get_metric_history(crashed_id, schema.SAMPLES))
    clock_before_crash = max(m.value for m in client.get_metric_history(crashed_id, schema.WALL_CLOCK))

    # The newest checkpoint written whole (trainer_state.json comes last): the kill may land in a save.
    last = max(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if (d / "trainer_state.json").exists())
    done = subprocess.run(cmd + ["--max-steps", str(last + 12), "--resume", "last"], env=env, timeout=300,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    client, run = the_mlflow_run(uri, "crash")
    assert run.info.run_id == crashed_id and run.info.status == "FINISHED"
    history = client.get_metric_history(crashed_id, schema.SAMPLES)
    assert max(m.value for m in history) > samples_before_crash
    assert_conformant("--mlflow-uri", uri, "--run-id", crashed_id, "--expect-steps", last + 12)
    folders = wandb_run_dirs(out.parent)
    ids = {wandb_run_id(f) for f in folders}
    assert len(folders) == 2 and len(ids) == 1, folders
    resumed_rows = wandb_rows(folders[1])
    never_decrease(resumed_rows)
    # The time between the checkpoint and the crash was spent: the clock goes on from the last row.
    assert resumed_rows[0][schema.WALL_CLOCK] >= clock_before_crash
    assert resumed_rows[-1][schema.STEP] == last + 12


@needs_trainer_resume
def test_the_resumed_clock_goes_on_after_the_summary_row_of_the_session_before(workdir, corpus):
    """The Trainer's last entry (train_runtime ...) is a stored row with every axis (MLflow's summary row):
    a checkpoint saved slowly before it must not let the resumed session's clock start below it."""
    import time

    from transformers import TrainerCallback

    class SlowSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            time.sleep(1.5)  # a large checkpoint, written after the step's row and before the summary

    uri = f"sqlite:///{workdir}/mlflow.db"

    def trainer(steps):
        callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
        t, _ = build_trainer(str(workdir / "out"), max_steps=steps, batch_size=8, grad_accum=1, logging_steps=1,
                             save_steps=3, callbacks=[callback, SlowSave()], data=corpus["paths"])
        return t

    trainer(3).train()
    trainer(5).train(resume_from_checkpoint=str(workdir / "out" / "checkpoint-3"))
    client, run = the_mlflow_run(uri)
    clock = [(m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, "progress/wall_clock")]
    values = [value for _, value in sorted(clock)]
    assert values == sorted(values), values  # in the order they were logged, the clock never goes back
