"""A SQLite store whose schema is another MLflow release's: init() and the readers say whose it is
and what to do, before any training.

The common way in: two environments (LLaMA-Factory's own and the user's) share the default
``sqlite:///mlflow.db`` and have different MLflow releases; the newer one upgrades the store's
schema, and the older one then refuses it with advice to upgrade that it cannot follow. A store is
made by the installed MLflow in a child process, then its alembic revision stamp is set to what
another release would have left: a revision this MLflow does not know (a newer release's), or an
older one of its own migrations.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest
from support import run_together

import stream_metrics
from stream_metrics.backends.mlflow import MLflowStoreError

mlflow = pytest.importorskip("mlflow")

MAKE_STORE = "import sys; from mlflow import MlflowClient; MlflowClient(tracking_uri=sys.argv[1]).search_experiments()"


@pytest.fixture(scope="module")
def made_store(tmp_path_factory) -> str:
    """A store made by this MLflow in another process (this one keeps no cached copy of it), once for
    the module (the child's start-up is most of a test's time): each test changes a copy of it."""
    path = tmp_path_factory.mktemp("made") / "made.db"
    subprocess.run([sys.executable, "-c", MAKE_STORE, f"sqlite:///{path}"], check=True, capture_output=True,
                   timeout=120)
    return str(path)


def make_store(path, made: str) -> tuple[str, str]:
    """The store made_store made, copied to ``path``: its URI and the revision it was stamped with."""
    shutil.copyfile(made, path)
    uri = f"sqlite:///{path}"
    with sqlite3.connect(path) as db:
        [(revision,)] = db.execute("SELECT version_num FROM alembic_version").fetchall()
    return uri, revision


def stamp(path, revision: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def migrations() -> list[str]:
    """The revisions this MLflow's migrations know, read from its own folder of them."""
    from mlflow.store import db_migrations

    folder = os.path.join(os.path.dirname(db_migrations.__file__), "versions")
    return [found.group(1) for found in (re.match(r"([0-9a-f]+)_.*\.py$", name) for name in os.listdir(folder))
            if found]


def runs_in(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def test_a_store_a_newer_mlflow_upgraded_fails_in_init_saying_to_use_that_mlflow(workdir, made_store):
    path = workdir / "shared.db"
    uri, head = make_store(path, made_store)
    newer = "f00dfeed1234"  # not among this release's migrations, as a later release's would not be
    assert newer not in migrations() and head in migrations()
    stamp(path, newer)
    with pytest.raises(MLflowStoreError) as caught:
        stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": uri, "experiment": "shared"})
    message = str(caught.value)
    assert f"MLflow {mlflow.__version__} cannot open the tracking store {uri}" in message
    assert f"a newer MLflow has upgraded its schema (revision {newer}" in message and head in message
    assert "pip install -U mlflow" in message and "MLFLOW_TRACKING_URI=sqlite:///another.db" in message
    assert "Do not run `mlflow db upgrade`" in message
    # Nothing was written: the store is as the newer release left it.
    assert runs_in(path) == 0
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(newer,)]


def test_a_store_an_older_mlflow_made_fails_in_init_saying_how_to_upgrade_it(workdir, made_store):
    path = workdir / "old.db"
    uri, head = make_store(path, made_store)
    older = sorted(r for r in migrations() if r != head)[0]
    stamp(path, older)
    with pytest.raises(MLflowStoreError) as caught:
        stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": uri})
    message = str(caught.value)
    assert f"its schema (revision {older}) is older than this release's ({head})" in message
    assert f"Back the store up, then run `mlflow db upgrade {uri}`" in message
    assert "MLFLOW_TRACKING_URI=sqlite:///another.db" in message and "newer MLflow" not in message
    assert runs_in(path) == 0


def test_reading_a_newer_store_says_so_in_one_line(workdir, made_store):
    path = workdir / "shared.db"
    uri, _ = make_store(path, made_store)
    stamp(path, "f00dfeed1234")
    commands = (["check", "--mlflow-uri", uri, "--experiment", "any"],
                ["compare", "--mlflow-uri", uri, "--experiment", "any", "--out", str(workdir / "compared")])
    # Both only read the store: they run at once (most of their time is start-up), each checked on its own.
    for done in run_together([[sys.executable, "-m", "stream_metrics", *command] for command in commands], timeout=120):
        assert done.returncode != 0, done.stdout
        assert "Traceback" not in done.stderr, done.stderr
        assert f"stream-metrics: MLflow {mlflow.__version__} cannot open the tracking store {uri}: a newer MLflow" \
            in done.stderr, done.stderr
        # Reading only: no store of its own to suggest.
        assert "Use that newer MLflow here" in done.stderr and "another.db" not in done.stderr
