"""`stream-metrics check`: a user asks "is this run's data-seen axis sound?" of what MLflow and W&B stored.

Runs are real (a plain loop and a Trainer, logged through stream_metrics to MLflow on SQLite and
W&B offline); the totals they should end at are computed from the data files alone. Runs that
break the contract are written straight into the stores with MLflow's and W&B's own clients.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from mlflow import MlflowClient

import tiny
from conftest import ROOT, wandb_run_dirs
from support import run_together

import stream_metrics
from stream_metrics.cli import main


def run_check(capsys, *args) -> tuple[int, list[str]]:
    """The exit status and the lines printed (stdout; a usage error's one sentence is on stderr)."""
    code = main(["check", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines() or [line for line in captured.err.splitlines() if "stream-metrics" in line]


def plain_loop_run(workdir, corpus, mlflow_uri) -> tuple[dict, dict]:
    """A plain loop over the streamed files, batches of 8 (the last one partial), 2 to a step."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    tokenizer = tiny.byte_tokenizer()
    loader = DataLoader(tiny.streaming_dataset(corpus["paths"], tokenizer), batch_size=8,
                        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with stream_metrics.init(backend=["mlflow", "wandb"], gradient_accumulation_steps=2, name="plain",
                             mlflow={"tracking_uri": mlflow_uri}) as run:
        for i, _ in enumerate(run.iterate(loader)):
            if i % 5 == 4:
                run.log({"train/loss": 1.0 / (i + 1)})
        run.log({"train/loss": 0.0})
        ids = run.run_ids
    batches = -(-corpus["samples"] // 8)
    assert corpus["samples"] % 8 and batches % 2 == 0  # a partial last batch; whole accumulation windows
    return ids, {"samples": corpus["samples"], "tokens": corpus["tokens"], "steps": batches // 2}


def test_a_plain_loop_run_is_conformant_with_the_counts_from_the_data_and_not_with_one_sample_more(
        workdir, corpus, mlflow_uri, capsys):
    ids, truth = plain_loop_run(workdir, corpus, mlflow_uri)
    [folder] = wandb_run_dirs(workdir)
    expect = ["--expect-samples", truth["samples"], "--expect-tokens", truth["tokens"],
              "--expect-steps", truth["steps"]]

    code, lines = run_check(capsys, ids["mlflow"], folder, "--mlflow-uri", mlflow_uri, *expect)
    assert code == 0 and lines[-1] == "conformant: 2 run(s)", lines
    # Each run is named with the totals of its last row, so the user can compare with what training printed.
    for backend, run_id in (("mlflow", ids["mlflow"]), ("wandb", ids["wandb"])):
        [line] = [line for line in lines if line.startswith(f"{backend} run {run_id}")]
        assert f"samples {truth['samples']}, tokens {truth['tokens']}" in line and f"step {truth['steps']}" in line

    expect[1] = truth["samples"] + 1
    code, lines = run_check(capsys, ids["mlflow"], folder, "--mlflow-uri", mlflow_uri, *expect)
    assert code == 1 and "NOT conformant, 2 problem(s):" in lines, lines
    wrong = f"the last row's progress/samples is {truth['samples']}, expected {truth['samples'] + 1}"
    assert [line.strip() for line in lines[lines.index("NOT conformant, 2 problem(s):") + 1:]] == [
        f"mlflow run {ids['mlflow']}: {wrong}", f"wandb run {ids['wandb']}: {wrong}"]


@pytest.mark.slow
def test_a_trainer_run_checked_as_a_program(workdir, corpus, mlflow_uri):
    from streaming_trainer import build_trainer
    from test_hf import consumed  # what the Trainer feeds the model, from the data alone

    from stream_metrics.hf import StreamMetricsCallback

    steps = 11  # past the end of the stream (9 steps a pass), so it starts again
    callback = StreamMetricsCallback(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri})
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=steps, batch_size=8, grad_accum=2,
                               callbacks=[callback], data=corpus["paths"])
    trainer.train()
    samples, tokens, _ = consumed(corpus["texts"], 8, 2, steps)
    [folder] = wandb_run_dirs(workdir)

    def program(*expect) -> list[str]:
        return [sys.executable, "-m", "stream_metrics", "check", callback.run.run_ids["mlflow"], folder,
                "--mlflow-uri", mlflow_uri, *map(str, expect)]

    # The two checks only read the runs: they run at once (most of their time is start-up).
    ok, off = run_together([program("--expect-samples", samples, "--expect-tokens", tokens, "--expect-steps", steps),
                            program("--expect-samples", samples - 1, "--expect-tokens", tokens,
                                    "--expect-steps", steps)], timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "conformant: 2 run(s)", ok.stdout + ok.stderr
    assert off.returncode == 1 and "NOT conformant, 2 problem(s):" in off.stdout, off.stdout + off.stderr


def test_a_run_that_breaks_the_contract_gets_one_line_per_problem(workdir, mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("hand-made")).info.run_id
    client.set_tag(run_id, "stream_metrics.x_axis", "progress/samples")
    client.set_tag(run_id, "stream_metrics.epoch_source", "guess")
    rows = [  # (step, metrics): a fractional count, an axis going down, a step that is not the samples
        (8, {"progress/step": 1, "progress/samples": 8, "progress/tokens": 80, "progress/epoch": 0.1,
             "progress/wall_clock": 1.0, "train/loss": 2.0}),
        (16, {"progress/step": 2, "progress/samples": 16, "progress/tokens": 150.5, "progress/epoch": 0.2,
              "progress/wall_clock": 2.0}),
        (24, {"progress/step": 1, "progress/samples": 24, "progress/tokens": 200, "progress/epoch": 0.3,
              "progress/wall_clock": 3.0}),
        (30, {"progress/step": 4, "progress/samples": 32, "progress/tokens": 300, "progress/epoch": 0.4,
              "progress/wall_clock": 4.0}),
        (40, {"train/loss": 1.0}),
    ]
    for i, (step, metrics) in enumerate(rows):
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=step, timestamp=1000 + i)
    client.set_terminated(run_id)  # ended (a RUNNING run's last row may still be being written)
    code, lines = run_check(capsys, run_id, "--mlflow-uri", mlflow_uri)
    assert code == 1
    assert problems(lines) == [
        "tag stream_metrics.version is missing",
        "tag stream_metrics.mlflow_step is missing",
        "epoch source 'guess' is not one of pass, sized, user, metadata, shards, none",
        "row 1: progress/tokens = 150.5 is not a whole number",
        "row 2: progress/step went down from 2 to 1",
        "row 4 lacks progress/step, progress/samples, progress/tokens, progress/epoch, progress/wall_clock "
        "(it has train/loss)",
        # without a stream_metrics.mlflow_step tag the step must be the default, progress/samples
        "row 3: the MLflow step is 30, but progress/samples is 32",
    ]


def test_a_run_resumed_from_a_checkpoint_at_other_amounts_reads_as_the_resumed_session_logged_it(
        workdir, mlflow_uri, capsys):
    """The first session logs every 10 samples to 100, checkpointing at 40, and dies; the resumed one
    logs every 15 from the checkpoint to 115. Read back (check, compare), the run is the first
    session's rows up to where the second went on, then the second's: none of the first session's
    rows beyond that sits between the second's (they trained a branch the checkpoint discarded)."""
    from stream_metrics.compare import read_runs

    first = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}, x_axis="samples")
    for samples in range(10, 101, 10):
        first.update(samples=10)
        first.log({"train/loss": 1.0, "train/session": 1})
        if samples == 40:
            state = json.loads(json.dumps(first.state_dict()))
    first.finish("FAILED")  # as a crash leaves it (lifecycle.py would)
    second = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}, resume=state)
    for _ in range(5):
        second.update(samples=15)
        second.log({"train/loss": 0.5, "train/session": 2})
    second.finish()
    run_id = state["run_ids"]["mlflow"]

    [run] = read_runs([run_id], mlflow_uri=mlflow_uri)
    assert [(row["progress/samples"], row["train/session"]) for row in run.rows] == [
        (10, 1), (20, 1), (30, 1), (40, 1), (55, 2), (70, 2), (85, 2), (100, 2), (115, 2)]
    assert MlflowClient(mlflow_uri).get_run(run_id).data.tags["stream_metrics.resumed_at.40"].isdigit()
    code, lines = run_check(capsys, run_id, "--mlflow-uri", mlflow_uri, "--expect-samples", 115)
    assert code == 0 and lines[-1] == "conformant: 1 run(s)", lines


def test_a_damaged_w_and_b_file_is_not_conformant_and_a_cut_short_one_says_it_has_no_end(workdir, capsys):
    """A real offline run of 10 rows; one copy with a byte of its fifth row changed (a disk or copy
    error), one cut off inside its fifth row (what a kill leaves): check must not call the first
    conformant on the rows before the damage, and says the second has no end."""
    from stream_metrics.compare import compare, read_runs

    with stream_metrics.init(backend="wandb", project="damage") as run:
        for _ in range(10):
            run.update(samples=4)
            run.log({"train/loss": 1.0})
    [folder] = wandb_run_dirs(workdir)
    [log] = [os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".wandb")]
    [whole] = read_runs([folder])  # waits for W&B's service to have written the whole file
    assert len(whole.rows) == 10 and whole.ended
    data = open(log, "rb").read()
    fifth = [i for i in range(len(data)) if data.startswith(b"train/loss", i)][4]
    damaged, cut = str(workdir / "damaged.wandb"), str(workdir / "cut.wandb")
    with open(damaged, "wb") as f:
        f.write(data[:fifth] + bytes([data[fifth] ^ 0x20]) + data[fifth + 1:])
    with open(cut, "wb") as f:
        f.write(data[:fifth])
    for path in (damaged, cut):
        os.utime(path, (0, 0))  # an old file: read as it is, not waited on to be completed

    code, lines = run_check(capsys, damaged)
    assert code == 1 and "NOT conformant, 1 problem(s):" in lines, lines
    assert "the file is damaged at byte" in lines[-1] and "what follows it is not read" in lines[-1], lines
    [read] = read_runs([damaged])
    assert 0 < len(read.rows) < 10
    assert any("damaged at byte" in note for note in compare([read], ["train/loss"]).notes)

    code, lines = run_check(capsys, cut)
    assert code == 0 and lines[-1] == "conformant: 1 run(s)", lines
    assert "the run file has no end: the run was killed, or is still running" in lines[0], lines
    code, lines = run_check(capsys, folder)
    assert code == 0 and "no end" not in lines[0], lines


def test_a_row_half_read_from_a_running_mlflow_run_is_left_out_and_reported_once_the_run_has_ended(
        workdir, mlflow_uri, capsys):
    """Each key's history is its own query, so a row logged while check reads a training run can be
    in some histories only: here the next row's progress/samples is in, its other axes not yet."""
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("live")).info.run_id  # RUNNING
    for name, value in (("version", "1"), ("x_axis", "progress/samples"), ("mlflow_step", "progress/samples"),
                        ("epoch_source", "none")):
        client.set_tag(run_id, f"stream_metrics.{name}", value)
    for i in range(1, 4):
        for key, value in (("progress/step", i), ("progress/samples", 8 * i), ("progress/epoch", 0.0),
                           ("progress/wall_clock", float(i)), ("train/loss", 1.0 / i)):
            client.log_metric(run_id, key, value, step=8 * i, timestamp=1000 * i)
    client.log_metric(run_id, "progress/samples", 32, step=32, timestamp=4000)  # the row being written

    code, lines = run_check(capsys, run_id, "--mlflow-uri", mlflow_uri, "--expect-samples", 24)
    assert code == 0 and lines[-1] == "conformant: 1 run(s)", lines
    assert "3 row(s)" in lines[0] and "(RUNNING: still training" in lines[0], lines
    client.set_terminated(run_id)  # ended like that: the row is the run's last, and it lacks axes
    code, lines = run_check(capsys, run_id, "--mlflow-uri", mlflow_uri)
    assert code == 1 and problems(lines) == [
        "row 3 lacks progress/step, progress/epoch, progress/wall_clock (it has progress/samples)"], lines


def problems(lines: list[str]) -> list[str]:
    """The problem lines after "NOT conformant, N problem(s):", without the run they are about."""
    [head] = [i for i, line in enumerate(lines) if line.startswith("NOT conformant, ")]
    found = [line.strip().split(": ", 1)[1] for line in lines[head + 1:]]
    assert lines[head] == f"NOT conformant, {len(found)} problem(s):"
    return found


def test_a_w_and_b_run_logged_without_stream_metrics_is_not_conformant(workdir, capsys):
    import wandb

    # wandb keeps settings from an earlier run in this process: name the folder
    with wandb.init(project="hand-made", mode="offline", config={"lr": 0.1}, dir=str(workdir)) as run:
        run.log({"progress/samples": 8, "loss": 1.0})
    [folder] = wandb_run_dirs(workdir)
    code, lines = run_check(capsys, folder)
    assert code == 1
    assert problems(lines) == [
        "config entry stream_metrics.version is missing",
        "config entry stream_metrics.x_axis is missing",
        "config entry stream_metrics.epoch_source is missing",
        # no row carries tokens: a run whose batches have no token information leaves them out everywhere
        "row 0 lacks progress/step, progress/epoch, progress/wall_clock (it has loss, progress/samples)",
        "loss is plotted against the W&B step, not the x-axis progress/samples",
        "progress/epoch is not defined with define_metric",
        "progress/samples is not defined with define_metric",
        "progress/step is not defined with define_metric",
        "progress/wall_clock is not defined with define_metric",
    ]


def test_dump_prints_every_stored_row_and_a_run_without_tokens_is_conformant(workdir, mlflow_uri, capsys):
    with pytest.warns(UserWarning, match="token"):
        with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
            for i in range(1, 4):
                run.update(samples=3)
                run.log({"train/loss": 1.0 / i})
            ids = run.run_ids
    [folder] = wandb_run_dirs(workdir)
    code, lines = run_check(capsys, ids["mlflow"], folder, "--mlflow-uri", mlflow_uri, "--expect-samples", 9,
                            "--expect-steps", 3, "--expect-epoch", 0, "--dump")
    assert code == 0 and lines[-1] == "conformant: 2 run(s)", lines
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    for run_id in ids.values():
        mine = [row for row in rows if row["run"] == run_id]
        assert [(row["progress/samples"], row["progress/step"], row["train/loss"]) for row in mine] == [
            (3, 1, 1.0), (6, 2, 0.5), (9, 3, 1 / 3)]
        assert not any("progress/tokens" in row for row in mine)
    assert [row["_step"] for row in rows if row["run"] == ids["mlflow"]] == [3, 6, 9]  # MLflow's step: samples


@pytest.mark.parametrize("args, message", [
    ([], "name the runs"),
    (["nope"], "there is no run 'nope'"),
    (["--experiment", "nope"], "there is no MLflow experiment 'nope'"),
    (["x", "--expect-samples", "1.5"], "'1.5' is not a whole number >= 0"),
    (["x", "--expect-epoch", "-1"], "'-1' is not a number >= 0"),
], ids=["no-runs", "run", "experiment", "samples", "epoch"])
def test_a_check_that_cannot_be_made_exits_2_with_one_sentence(workdir, mlflow_uri, capsys, args, message):
    MlflowClient(mlflow_uri).create_experiment("exists")  # the store is there, the run is not
    code, lines = run_check(capsys, *args, "--mlflow-uri", mlflow_uri)
    assert code == 2 and message in lines[-1], lines


def test_a_server_that_does_not_answer_is_one_sentence_without_the_password_in_bounded_time(workdir):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["PYTHONPATH"] = ROOT
    # The two commands are independent: both run at once (most of their time is imports), each checked on its own.
    commands = (["check", "0123456789abcdef"], ["compare", "0123456789abcdef"])
    started = time.monotonic()
    done = run_together([[sys.executable, "-m", "stream_metrics", *command, "--mlflow-uri",
                          f"http://alice:s3cretpw@127.0.0.1:{port}"] for command in commands], timeout=240, env=env)
    ended = time.monotonic()  # both have ended: each took at most this long
    for command, out in zip(commands, done):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == (2 if command[0] == "check" else 1), out.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("stream-metrics: could not read the runs"), lines[-5:]
        assert "s3cretpw" not in out.stderr and "alice" not in out.stderr
        assert ended - started < 120  # MLflow's own retries took 500 s
