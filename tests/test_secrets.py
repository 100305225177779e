"""Secrets a user has about them never reach a stored parameter, tag, config value, file or log line.

A real training script runs in a subprocess with a hub token in its config, ``WANDB_API_KEY`` in
its environment (W&B offline) and a password inside ``MLFLOW_TRACKING_URI`` (a real MLflow server
that ignores it); a second run points at a server that is down, so the failure warnings, the spill
file and the final message are written too. Then every byte it left is searched.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import wandb_run_dirs
from support import free_port

HUB_TOKEN = "hf_PlantedHubToken0123456789abcdef"
WANDB_KEY = "PlantedWandbKey0123456789abcdef012345678"
PASSWORD = "PlantedPassw0rd"
SECRETS = (HUB_TOKEN, WANDB_KEY, PASSWORD, base64.b64encode(f"alice:{PASSWORD}".encode()).decode())

SCRIPT = """
import logging, os, sys
import torch
import stream_metrics

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every library's log lines, to be searched
uri = os.environ["MLFLOW_TRACKING_URI"]
config = {"hub_token": "%(hub)s", "learning_rate": 1e-3, "report": {"endpoint": uri, "API_KEY": "%(key)s"},
          "notes": "pushed to " + uri}

def train(run):
    for i in range(3):
        run.update({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)})
        run.log({"loss": 1.0 / (i + 1)})

with stream_metrics.init(backend=["mlflow", "wandb"], config=config, mlflow={"experiment": "secrets"}) as run:
    train(run)
    print("run ids:", run.run_ids)
    print("\\n".join(run.where()))

down = "http://alice:%(password)s@127.0.0.1:%(down_port)d"
with stream_metrics.init(backend="mlflow", config=config, mlflow={"tracking_uri": down}, flush_timeout=2) as run:
    train(run)
"""


@pytest.mark.slow
def test_planted_secrets_appear_nowhere(mlflow_server, workdir):
    server = mlflow_server
    env = {**os.environ, "WANDB_API_KEY": WANDB_KEY, "WANDB_MODE": "offline",
           "MLFLOW_TRACKING_URI": server.url(f"alice:{PASSWORD}"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    script = workdir / "train.py"
    script.write_text(SCRIPT % {"hub": HUB_TOKEN, "key": WANDB_KEY, "password": PASSWORD, "down_port": free_port()})
    done = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # The runs happened, with the secrets' names kept and their values redacted (asked of the server
    # while it still runs; the files are searched once it has stopped).
    client = MlflowClient(server.url())
    [run] = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    params = run.data.params
    assert params["hub_token"] == "<redacted>" and params["report.API_KEY"] == "<redacted>"
    assert params["report.endpoint"] == server.url("<redacted>")
    assert params["notes"] == "pushed to " + server.url("<redacted>")
    server.stop()  # so its log and database are complete
    [run_dir] = wandb_run_dirs(workdir)
    [log] = [os.path.join(run_dir, f) for f in os.listdir(run_dir) if f.endswith(".wandb")]
    with open(log, "rb") as f:
        transactions = f.read()
    assert b"hub_token" in transactions and b"<redacted>" in transactions  # W&B's config, redacted
    assert "could not be delivered" in done.stderr  # the failure path ran and was logged

    # Nothing anywhere holds a secret: output, log lines, W&B files, the MLflow database, spill files.
    found = [("output", line[:300]) for line in (done.stdout + done.stderr).splitlines()
             if any(s in line for s in SECRETS)]
    # (The server's folder, with its database and log, is under workdir or one of its own: see mlflow_server.)
    roots = [str(workdir)] + ([server.folder] if not os.path.abspath(server.folder).startswith(str(workdir) + os.sep)
                              else [])
    searched = []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if path == str(script):
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                searched.append(path)
                found += [(os.path.relpath(path, workdir), s) for s in SECRETS if s.encode() in data]
    assert not found
    assert server.store.endswith("/srv.db") and server.store[len("sqlite:///"):] in searched  # the server's database
    assert os.listdir(workdir / "undelivered")  # the spill file was searched too


def test_secrets_are_known_by_the_end_of_their_name_or_their_shape_and_settings_stay_readable():
    from stream_metrics.redact import REDACTED, redact_config

    hf_key, openai_key, aws_id = "hf_" + "a1B2" * 9, "sk-" + "x9_Y" * 8, "AKIAIOSFODNN7EXAMPLE"
    wandb_key = "0123456789abcdef" * 2 + "01234567"
    config = {
        # names ending (after the last _ . - /) with a secret's word, in any case
        "hub_token": "t", "HUB_TOKEN": "t", "report": {"API_KEY": "k"}, "wandb/apikey": "k", "db-password": "p",
        "smtp.passwd": "p", "client_secret": "s", "aws_secret_access_key": "k", "ssh.private_key": "k", "token": "t",
        # values shaped like credentials, whatever their name
        "notes": hf_key, "extra": [openai_key], "wandb": wandb_key, "cloud": f"key {aws_id} in use",
        # a URI's user and password
        "endpoint": "http://alice:pw@host:5000/x",
        # settings that are not secrets
        "include_num_input_tokens_seen": "no", "pad_token": "<pad>", "eos_token": "</s>", "max_tokens": "512",
        "tokenizer": "gpt2", "hub_model_id": "org/model", "tokens_seen": 3, "learning_rate": 1e-3,
        "run_name": "bs8-lr3e-4", "commit": "abc123",
    }
    stored = redact_config(config)
    for name in ("hub_token", "HUB_TOKEN", "wandb/apikey", "db-password", "smtp.passwd", "client_secret",
                 "aws_secret_access_key", "ssh.private_key", "token", "notes", "wandb", "cloud"):
        assert stored[name] == REDACTED, name
    assert stored["report"] == {"API_KEY": REDACTED} and stored["extra"] == [REDACTED]
    assert stored["endpoint"] == "http://<redacted>@host:5000/x"
    for name in ("include_num_input_tokens_seen", "pad_token", "eos_token", "max_tokens", "tokenizer", "hub_model_id",
                 "tokens_seen", "learning_rate", "run_name", "commit"):
        assert stored[name] == config[name], name
