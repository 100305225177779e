"""A tracking server that goes away, and W&B without an account, never stop training or lose a row.

Each test runs a real ``mlflow server`` (SQLite store) on 127.0.0.1 and stops it mid-run, or runs a
real script in a subprocess with no terminal; what arrived is read back from the server.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import stream_metrics
from stream_metrics.backends import delivery, spill
from conftest import assert_conformant, wandb_run_dirs
from support import free_port, wait_for

BIN = os.path.dirname(sys.executable)


pytestmark = pytest.mark.slow  # real servers and subprocesses: about 20 s per server start on a busy machine


@pytest.fixture
def fail_fast(monkeypatch):
    """The MLflow HTTP settings docs/reliability.md recommends: stream_metrics retries, MLflow need not."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


BATCH, WIDTH, PADDING = 4, 8, 2


def train(run, rows: int) -> None:
    """A plain training loop: one batch and one row per iteration; every call must return."""
    ids = torch.ones(BATCH, WIDTH, dtype=torch.long)
    mask = torch.ones(BATCH, WIDTH, dtype=torch.long)
    mask[:, WIDTH - PADDING:] = 0
    for i in range(rows):
        run.update({"input_ids": ids, "attention_mask": mask})
        run.log({"loss": 1.0 / (i + 1)})


def history(url, run_id, key="loss"):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url).get_metric_history(run_id, key)


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stream_metrics" and text in r.getMessage()]


def spill_files(workdir) -> list[str]:
    return sorted(glob.glob(str(workdir / "undelivered" / "*.jsonl")))


def spilled_rows(path) -> list[dict]:
    with open(path) as f:
        lines = [json.loads(line) for line in f][1:]
    return [line for line in lines if "op" not in line]


def test_a_server_outage_holds_rows_back_and_delivers_them_when_it_returns(mlflow_server, fail_fast, caplog,
                                                                           workdir):
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    url = mlflow_server.url()
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": url, "experiment": "outage"})
    try:
        train(run, 5)
        assert run.flush(60)
        run_id = run.run_ids["mlflow"]

        mlflow_server.stop()
        train(run, 10)  # training goes on: every update() and log() returns
        assert wait_for(lambda: messages(caplog, "held back"), 30)
        held = [int(n) for m in messages(caplog, "mlflow is failing")
                for n in re.findall(r"(\d+) row\(s\) held back", m)]
        assert held and all(1 <= n <= 10 for n in held), messages(caplog, "held back")

        mlflow_server.start()
        assert run.flush(60)
    finally:
        run.finish()

    points = history(url, run_id)
    assert sorted(p.step for p in points) == [BATCH * i for i in range(1, 16)]  # every row, once
    assert messages(caplog, "mlflow is reachable again")
    assert not messages(caplog, "could not be delivered") and not spill_files(workdir)
    assert_conformant("--mlflow-uri", url, "--run-id", run_id, "--expect-samples", 15 * BATCH,
                      "--expect-tokens", 15 * BATCH * (WIDTH - PADDING), "--expect-steps", 15)


def test_rows_past_the_buffer_go_to_a_spill_file_that_replay_delivers(mlflow_server, fail_fast, caplog, workdir):
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    url = mlflow_server.url()
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": url}, buffer_rows=20)
    try:
        train(run, 2)
        assert run.flush(60)
        run_id = run.run_ids["mlflow"]
        mlflow_server.stop()
        train(run, 50)

        # While the run goes on, the oldest rows past the bound of 20 are already in the file.
        [path] = spill_files(workdir)
        assert 30 <= len(spilled_rows(path)) <= 50 - 20 + 2
        [full] = messages(caplog, "the buffer of 20 rows for mlflow is full")
        assert path in full and f"stream-metrics replay {path}" in full

        mlflow_server.start()
        assert run.flush(60)  # the rows still in memory arrive
    finally:
        run.finish()
    in_file = len(spilled_rows(path))
    [final] = messages(caplog, "could not be delivered")
    assert f"{in_file} row(s) could not be delivered to mlflow" in final and path in final
    assert len(history(url, run_id)) == 52 - in_file

    assert spill.replay(path) == in_file
    points = history(url, run_id)
    assert sorted(p.step for p in points) == [BATCH * i for i in range(1, 53)]
    assert os.path.exists(path + ".replayed") and not os.path.exists(path)
    from mlflow import MlflowClient

    assert MlflowClient(url).get_run(run_id).info.status == "FINISHED"


def test_finish_with_the_server_down_saves_the_rows_and_says_how_to_replay(mlflow_server, fail_fast, caplog,
                                                                           workdir):
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    url = mlflow_server.url()
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": url}, flush_timeout=3)
    train(run, 3)
    assert run.flush(60)
    run_id = run.run_ids["mlflow"]
    mlflow_server.stop()
    train(run, 7)
    run.finish()  # returns after flush_timeout

    [message] = messages(caplog, "could not be delivered")
    assert "7 row(s) could not be delivered to mlflow" in message
    command = re.search(r"`(stream-metrics replay [^`]+)`", message).group(1)
    [path] = spill_files(workdir)
    assert command == f"stream-metrics replay {path}"
    from mlflow import MlflowClient

    mlflow_server.start()
    assert len(history(url, run_id)) == 3
    assert MlflowClient(url).get_run(run_id).info.status == "RUNNING"  # its end was not delivered either

    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(shlex.split(command), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert "sent 7 row(s)" in done.stdout
    assert sorted(p.step for p in history(url, run_id)) == [BATCH * i for i in range(1, 11)]
    assert MlflowClient(url).get_run(run_id).info.status == "FINISHED"
    assert_conformant("--mlflow-uri", url, "--run-id", run_id, "--expect-samples", 10 * BATCH)


def test_a_run_that_never_opened_is_replayed_into_its_own_experiment(fail_fast, caplog, workdir):
    """The server was down from the start: the replay creates the run where the training would have."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": down, "experiment": "never-opened"},
                              name="late", flush_timeout=3)
    train(run, 3)
    run.finish()
    [path] = spill_files(workdir)
    assert os.path.basename(path).startswith("mlflow-unstarted-")

    store = f"sqlite:///{workdir}/replayed.db"
    from stream_metrics.cli import main

    assert main(["replay", path, "--mlflow-uri", store]) == 0
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("never-opened")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    [stored] = client.search_runs([experiment.experiment_id])
    assert stored.info.run_name == "late" and stored.info.status == "FINISHED"
    assert sorted(p.step for p in client.get_metric_history(stored.info.run_id, "loss")) == [BATCH, 2 * BATCH,
                                                                                           3 * BATCH]
    assert_conformant("--mlflow-uri", store, "--run-id", stored.info.run_id, "--expect-samples", 3 * BATCH)
    # The file names the run the replay made (a replay cut short goes on into it), and is not sent twice.
    with open(path + ".replayed") as f:
        assert {"op": "run", "run_id": stored.info.run_id} in [json.loads(line) for line in f]
    assert main(["replay", path + ".replayed", "--mlflow-uri", store]) == 1
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_rows_saved_before_the_run_opened_are_replayed_into_that_run(mlflow_server, fail_fast, caplog, workdir):
    """The buffer overflowed while the server was down; then it came up and the run opened."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    url = mlflow_server.url()
    mlflow_server.stop()
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": url, "experiment": "late-open"},
                              buffer_rows=5, flush_timeout=60)
    train(run, 12)  # 7 rows past the buffer go to the spill file, before any run exists
    [path] = spill_files(workdir)
    mlflow_server.start()
    train(run, 3)
    assert run.flush(60)
    run_id = run.run_ids["mlflow"]
    run.finish()
    [message] = messages(caplog, "could not be delivered")
    # 7 rows or more (the sender may still be backing off while the last 3 are logged)
    spilled = re.match(r"stream_metrics: (\d+) row\(s\) could not be delivered to mlflow \(the buffer of 5 rows "
                       r"was full while it failed: MlflowException", message)
    assert spilled and 7 <= int(spilled.group(1)) <= 10, message

    from stream_metrics.cli import main

    assert main(["replay", path]) == 0
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("late-open")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert sorted(p.step for p in history(url, run_id)) == [BATCH * i for i in range(1, 16)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_conformant("--mlflow-uri", url, "--run-id", run_id, "--expect-samples", 15 * BATCH)


@pytest.mark.parametrize("how", ["resume", "MLFLOW_RUN_ID"])
def test_a_continued_run_whose_server_was_down_is_replayed_into_it(mlflow_uri, fail_fast, caplog, workdir,
                                                                 monkeypatch, how):
    """The first session wrote to a store; the second, continuing its run, found its server down."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    first = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri, "experiment": "continued"})
    train(first, 3)
    state = first.state_dict()
    run_id = state["run_ids"]["mlflow"]
    first.finish()
    if how == "MLFLOW_RUN_ID":
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        state = dict(state, run_ids={})  # the environment alone names the run
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    second = stream_metrics.init(resume=state, backend="mlflow",
                                 mlflow={"tracking_uri": down, "experiment": "continued"}, flush_timeout=3)
    train(second, 3)
    second.finish()
    [path] = spill_files(workdir)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    from stream_metrics.cli import main

    assert main(["replay", path, "--mlflow-uri", mlflow_uri]) == 0  # the store, back (here: the first one's)
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("continued")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert sorted(p.step for p in history(mlflow_uri, run_id)) == [BATCH * i for i in range(1, 7)]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_id, "--expect-samples", 6 * BATCH)


def test_an_unwritable_spill_folder_loses_rows_with_a_count_and_never_stops_training(fail_fast, caplog, workdir,
                                                                                    monkeypatch):
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    (workdir / "a_file").write_text("not a folder")
    monkeypatch.setenv("STREAM_METRICS_SPILL_DIR", str(workdir / "a_file" / "spill"))
    down = f"http://127.0.0.1:{free_port()}"
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": down}, buffer_rows=5, flush_timeout=2)
    train(run, 30)  # every call returns, though rows past the buffer cannot be saved
    run.finish()
    [full] = messages(caplog, "the spill file cannot be written")  # once, not once per row
    assert "set STREAM_METRICS_SPILL_DIR to a writable folder, training goes on" in full
    [message] = messages(caplog, "are lost")
    assert message.startswith("stream_metrics: 30 row(s) for mlflow could not be delivered (")
    assert "nor saved (NotADirectoryError: " in message and "STREAM_METRICS_SPILL_DIR" in message


def test_replay_finishes_an_undelivered_start_and_skips_a_last_line_cut_short(mlflow_uri, workdir, caplog):
    """The run was created but its tags and parameters never went in; the file's last row is torn."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="stream_metrics")
    client = MlflowClient(mlflow_uri)
    experiment_id = client.create_experiment("half-started")
    run_id = client.create_run(experiment_id, run_name="half").info.run_id
    run = stream_metrics.init(backend="none")
    rows = []
    for i in range(4):
        run.update(samples=BATCH, tokens=BATCH * WIDTH)
        p = run.log()
        rows.append({"metrics": {**p.axes(), "loss": 1.0 / (i + 1)}, "timestamp_ms": 1000 + i, "seq": i + 1})
    start = {"name": "half", "project": None, "run_id": run_id, "config": {"lr": 0.1},
             "tags": {"version": stream_metrics.__version__, "x_axis": "progress/samples", "data_parallel": "1",
                      "epoch_source": "none", "mlflow_step": "progress/samples"},
             "x_axis": "progress/samples", "axes": list(schema_axes())}
    path = workdir / "mlflow-half.jsonl"
    lines = [json.dumps({"header": {"backend": "mlflow", "run_id": run_id, "start": start,
                                    "target": {"tracking_uri": mlflow_uri}}}), json.dumps({"op": "start"})]
    lines += [json.dumps(row) for row in rows]
    lines[-1] = lines[-1][:25]  # the last row, cut short (no newline after it)
    path.write_text("\n".join(lines))

    sent, where = spill.replay_file(str(path))
    assert sent == 3 and where.startswith(f"MLflow run {run_id} in {mlflow_uri}")
    assert messages(caplog, "was cut short")
    stored = client.get_run(run_id)
    assert stored.data.params == {"lr": "0.1"}
    assert stored.data.tags["stream_metrics.x_axis"] == "progress/samples"
    assert sorted(p.step for p in history(mlflow_uri, run_id)) == [BATCH, 2 * BATCH, 3 * BATCH]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_id, "--expect-samples", 3 * BATCH)


def schema_axes():
    from stream_metrics import schema

    return (*schema.AXES.values(), schema.LOSS_TOKENS)


def test_a_spill_file_keeps_where_a_run_that_never_opened_belongs(workdir):
    """W&B's project and entity, MLflow's experiment: the header keeps them for the replay."""
    from stream_metrics.backends.mlflow import MLflowBackend
    from stream_metrics.backends.wandb import WandbBackend

    wandb_target = WandbBackend(project="proj", entity="team", sender="thread").target()
    assert wandb_target == {"project": "proj", "entity": "team"}
    again = WandbBackend.for_replay(wandb_target, {})
    assert (again.project, again.entity) == ("proj", "team")
    mlflow_target = MLflowBackend(tracking_uri="http://127.0.0.1:9", experiment="exp", sender="thread").target()
    assert mlflow_target == {"tracking_uri": "http://127.0.0.1:9", "experiment": "exp"}
    assert MLflowBackend.for_replay(mlflow_target, {}).experiment == "exp"


def test_finish_keeps_to_flush_timeout_even_while_mlflow_retries_a_call_for_minutes(monkeypatch, caplog, workdir):
    # MLflow's own defaults (7 HTTP retries with backoff) hold one call for minutes; nothing listens here.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setattr(delivery, "STALL_SECONDS", 1.0)
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"},
                              flush_timeout=2)
    train(run, 3)
    time.sleep(1.5)
    train(run, 2)
    [stalled] = messages(caplog, "mlflow has not answered for")
    assert "row(s) held back" in stalled
    started = time.monotonic()
    run.finish()
    assert time.monotonic() - started < 30  # flush_timeout=2, not MLflow's minutes of retries

    [path] = spill_files(workdir)
    assert len(spilled_rows(path)) == 5
    with open(path) as f:
        header = json.loads(f.readline())["header"]
        ops = [json.loads(line).get("op") for line in f]
    assert header["run_id"] is None and header["start"]["tags"]  # replay will open the run
    assert ops[0] == "start" and ops[-1] == "finish"
    assert messages(caplog, "5 row(s) could not be delivered to mlflow")


# ----------------------------------------------------------------------------- W&B without an account
WANDB_SCRIPT = """
import torch
import stream_metrics

run = stream_metrics.init(backend="wandb", wandb={"project": "no-account"})
print("training starts", flush=True)
for i in range(3):
    run.update({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)})
    run.log({"loss": 1.0 / (i + 1)})
run.finish()
print("training done", flush=True)
"""


def run_wandb_script(workdir, mode: str | None):
    home = workdir / "empty_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"),
               WANDB_DIR=str(workdir), WANDB_SILENT="true", XDG_CONFIG_HOME=str(home / ".config"))
    if mode:
        env["WANDB_MODE"] = mode
    script = workdir / "train.py"
    script.write_text(WANDB_SCRIPT)
    # No terminal, as in CI: a prompt would read EOF, a hang would hit the timeout.
    return subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("mode", ["online", None])
def test_wandb_online_without_an_api_key_fails_before_training_with_a_clear_message(workdir, mode):
    done = run_wandb_script(workdir, mode)
    assert done.returncode != 0
    assert "training starts" not in done.stdout
    assert "WandbCredentialsError" in done.stderr
    assert "set WANDB_API_KEY" in done.stderr and "WANDB_MODE=offline" in done.stderr
    assert "wandb login" in done.stderr and not wandb_run_dirs(workdir)


def test_wandb_offline_works_without_an_account(workdir):
    done = run_wandb_script(workdir, "offline")
    assert done.returncode == 0, done.stderr
    assert "training done" in done.stdout
    [run_dir] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", run_dir, "--expect-samples", 6, "--expect-tokens", 30)
