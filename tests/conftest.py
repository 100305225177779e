"""Shared fixtures: every test runs in its own folder, with W&B offline and MLflow on SQLite there."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The independent checker beside the project, used as a cross-check where it is there; the suite never
# needs it. STREAM_METRICS_CHECK_RUN names another path, or "none" to leave it out (CI does).
CHECK_RUN = os.environ.get("STREAM_METRICS_CHECK_RUN",
                           os.path.join(os.path.dirname(ROOT), "shared", "conformance", "check_run.py"))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def _trainer_resume_refusal() -> str | None:
    """transformers' own reason it will not resume a Trainer from a checkpoint here, or None.

    Recent transformers (4.55 and 5 among them) load a checkpoint's optimizer state with ``torch.load``
    only on torch 2.6 or newer (CVE-2025-32434) and raise before resuming otherwise, whatever the
    callbacks: the oldest set on the oldest torch (scripts/test-python-ends) meets that.
    """
    try:
        from transformers.utils.import_utils import check_torch_load_is_safe
    except ImportError:  # no transformers, or one without the rule
        return None
    try:
        check_torch_load_is_safe()
    except ValueError as exc:
        import torch

        return f"transformers refuses to resume a Trainer with torch {torch.__version__} ({str(exc)[:80]}...)"
    return None


#: A test that resumes a Trainer from a checkpoint: skipped where transformers itself refuses to.
_RESUME_REFUSAL = _trainer_resume_refusal()
needs_trainer_resume = pytest.mark.skipif(_RESUME_REFUSAL is not None, reason=_RESUME_REFUSAL or "")


def user_environment(monkeypatch, folder) -> None:
    """``folder`` as the working directory, and the environment of a user with no accounts."""
    monkeypatch.chdir(folder)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY",
                "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("STREAM_METRICS_SPILL_DIR", str(folder / "undelivered"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session):
    """The heap the test modules imported (torch, transformers, MLflow, W&B: about half a million
    objects) is frozen: the garbage collector leaves it alone from here on (gc.freeze). Each
    Trainer.train() ends with a full collection (accelerate's free_memory), which otherwise walks all of
    it, and a later one the heap the earlier tests left (caches, stores): most of a second each, late
    in the suite. Only objects alive now are frozen, after a collection, so no garbage is kept."""
    _freeze_what_lives()


_frozen_at: list = [None]


def pytest_runtest_setup(item):
    """At each test module's first test, what the earlier modules left alive is frozen too (after a
    collection: garbage still goes). A test that unfreezes (test_overhead.py) is healed here."""
    module = getattr(item, "module", None)
    if module is not _frozen_at[0]:
        _frozen_at[0] = module
        _freeze_what_lives()


def _freeze_what_lives() -> None:
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """A fresh folder as the working directory, and the environment of a user with no accounts."""
    user_environment(monkeypatch, tmp_path)
    from stream_metrics import _checks

    _checks.reset_warnings()  # one-time warnings are process-wide: each test sees its own
    yield tmp_path
    _end_leftover_runs()


def _end_leftover_runs() -> None:
    """A test that failed with a W&B or MLflow run still active would hand it to the next test, whose
    rows would land in it: end it here, so one failure stays one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.run.finish()
        except Exception:  # a run whose service a test stopped: nothing left to end
            pass
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        try:
            for _ in range(8):  # nested runs end one a call
                if mlflow.active_run() is None:
                    break
                mlflow.end_run()
        except Exception:
            pass


@pytest.fixture(scope="session")
def _servers_started_ahead():
    """The MLflow servers started ahead of the tests that will use them, by test id; any a test
    did not take (it was skipped, or the session stopped) is stopped at the end of the session."""
    started: dict = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(autouse=True)
def _start_the_next_tests_server_ahead(request, tmp_path_factory, _servers_started_ahead):
    """A server's start is about 5 s of one core, most of it imports: where one of the next 3 tests asks
    for ``mlflow_server``, the first of them without one yet has its server started now (one a test), in a
    folder of its own, and it is up when that test begins."""
    from support import MlflowServer

    items = request.session.items
    try:
        index = items.index(request.node)
    except ValueError:
        return
    for following in items[index + 1:index + 4]:
        if "mlflow_server" in getattr(following, "fixturenames", ()) \
                and following.nodeid not in _servers_started_ahead:
            server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
            server.start(wait=False)
            _servers_started_ahead[following.nodeid] = server
            break


@pytest.fixture
def mlflow_server(request, workdir, _servers_started_ahead):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, an empty one of its own), stopped at the end of
    the test. Its folder (``.folder``: the store and the server's log) is under ``workdir`` or, where the
    server was started during the test before (_start_the_next_tests_server_ahead), a folder of its own."""
    from support import MlflowServer

    server = _servers_started_ahead.pop(request.node.nodeid, None)
    try:
        if server is not None:
            try:
                server.wait_healthy()
            except RuntimeError:  # it did not come up (its port taken meanwhile, say): start one here
                server.stop()
                server = None
        if server is None:
            server = MlflowServer(workdir / "server")
            server.start()
        yield server
    finally:
        if server is not None:
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


def _our_arguments(args) -> list[str]:
    """check_run.py's arguments as `stream-metrics check` takes them: runs are named, not flagged.

    ``--run-id ID`` and ``--wandb-run DIR`` become RUN arguments; ``--no-tokens`` is dropped, because
    the check finds by itself that no row carries tokens.
    """
    runs, options, args = [], [], [str(a) for a in args]
    while args:
        arg = args.pop(0)
        if arg in ("--run-id", "--wandb-run"):
            runs.append(args.pop(0))
        elif arg != "--no-tokens":
            options.append(arg)
    return runs + options


def check_run(*args) -> tuple[int, str]:
    """`stream-metrics check`, given check_run.py-style arguments; returns (exit code, output)."""
    import contextlib
    import io

    from stream_metrics.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["check", *_our_arguments(args)])
    return code, out.getvalue()


def _cross_check(*args) -> None:
    """The independent checker beside the project (see CHECK_RUN), where there is one."""
    if CHECK_RUN == "none" or not os.path.isfile(CHECK_RUN):
        # Beside the clone it is optional; a path given on purpose must be there.
        assert CHECK_RUN == "none" or "STREAM_METRICS_CHECK_RUN" not in os.environ, f"no checker at {CHECK_RUN}"
        return
    proc = subprocess.run([sys.executable, CHECK_RUN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{CHECK_RUN} disagrees:\n{proc.stdout}{proc.stderr}"


def assert_conformant(*args) -> None:
    """The stored run(s) conform to the contract, by our own check (and the independent one where present)."""
    code, out = check_run(*args)
    assert code == 0 and out.rstrip().splitlines()[-1].startswith("conformant"), out
    _cross_check(*args)


def _dumped_rows(*args) -> list[dict]:
    code, out = check_run(*args, "--dump")
    # Reading is what counts here (exit 2: the run could not be read); whether the run conforms is
    # assert_conformant's question, asked by the tests that mean it (some store hand-made runs).
    assert code in (0, 1), f"stream-metrics check {' '.join(map(str, args))} --dump exited {code}:\n{out}"
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows, f"no rows stored ({' '.join(map(str, args))}):\n{out}"
    return rows


def wandb_rows(run_dir) -> list[dict]:
    """The history rows W&B stored, in logging order, read back by `stream-metrics check --dump`."""
    return _dumped_rows("--wandb-run", run_dir)


def mlflow_rows(uri, run_id) -> list[dict]:
    """MLflow's stored rows, one per step (the latest value of each key there), in step order, with ``_step``."""
    return _dumped_rows("--mlflow-uri", uri, "--run-id", run_id)


@pytest.fixture
def corpus(workdir):
    """Three JSONL files of texts, and the ground truth computed from the files alone."""
    import tiny

    paths = tiny.write_corpus(str(workdir / "data"))
    texts = tiny.read_texts(paths)
    return {"paths": paths, "texts": texts, "samples": len(texts),
            "tokens": sum(tiny.token_count(t) for t in texts)}
