"""Shared fixtures: every test runs in its own folder, with W&B offline and MLflow on SQLite there."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_RUN = os.environ.get("STREAM_METRICS_CHECK_RUN",
                           os.path.join(os.path.dirname(ROOT), "shared", "conformance", "check_run.py"))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """A fresh folder as the working directory, and the environment of a user with no accounts."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY",
                "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("STREAM_METRICS_SPILL_DIR", str(tmp_path / "undelivered"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    from stream_metrics import counting, sanitize

    counting._warned.clear()
    sanitize._warned_values.clear()
    yield tmp_path


@pytest.fixture
def mlflow_server(workdir):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store), stopped at the end of the test."""
    from support import MlflowServer

    server = MlflowServer(workdir / "server")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_uri(workdir):
    return f"sqlite:///{workdir}/mlflow.db"


def wandb_run_dirs(root) -> list[str]:
    """The offline W&B run folders under ``root``, oldest first."""
    return sorted(glob.glob(os.path.join(str(root), "wandb", "offline-run-*")))


def wandb_run_id(run_dir) -> str:
    """The run id in an offline run folder's name (W&B adds "-1" when two start in the same second)."""
    import re

    return re.match(r"offline-run-\d+_\d+-([a-z0-9]+)", os.path.basename(str(run_dir))).group(1)


def check_run(*args) -> tuple[int, str]:
    """Run shared/conformance/check_run.py; returns (exit code, output)."""
    proc = subprocess.run([sys.executable, CHECK_RUN, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def assert_conformant(*args) -> None:
    code, out = check_run(*args)
    assert code == 0 and "conformant" in out and "NOT" not in out, out


def wandb_rows(run_dir) -> list[dict]:
    """The history rows W&B stored, read back by check_run.py --dump."""
    code, out = check_run("--wandb-run", run_dir, "--dump")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def mlflow_rows(uri, run_id) -> list[dict]:
    """MLflow's stored rows grouped by step, as check_run.py --dump reads them."""
    code, out = check_run("--mlflow-uri", uri, "--run-id", run_id, "--dump")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def corpus(workdir):
    """Three JSONL files of texts, and the ground truth computed from the files alone."""
    import tiny

    paths = tiny.write_corpus(str(workdir / "data"))
    texts = tiny.read_texts(paths)
    return {"paths": paths, "texts": texts, "samples": len(texts),
            "tokens": sum(tiny.token_count(t) for t in texts)}
