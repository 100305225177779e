"""MLflow's rows are written by a child process (backends/process.py): checked on a real child,
real SQLite stores and a real unreachable server, with real signals; what MLflow stored is read back."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

import stream_metrics
from stream_metrics import schema
from stream_metrics.backends.process import SenderError, SenderProcess, WandbSenderProcess

from conftest import ROOT
from support import wait_for


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((p.step, p.value) for p in MlflowClient(uri).get_metric_history(run_id, key))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie of ours is gone too
            return f.read().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile (the library waits for its children)
        return True


def test_rows_are_stored_by_a_child_process_each_exactly_once(mlflow_uri):
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]  # ground truth: the running sums below
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
    for i, n in enumerate(sizes):
        run.update(samples=n, tokens=10 * n)
        run.log({"loss": 1.0 / (i + 1)})
    run.finish()
    run_id = run.run_ids["mlflow"]
    sums = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert history(mlflow_uri, run_id, "loss") == [(s, pytest.approx(1.0 / (i + 1))) for i, s in enumerate(sums)]
    assert [v for _, v in history(mlflow_uri, run_id, schema.TOKENS)] == [10.0 * s for s in sums]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"

    sender = SenderProcess.shared()
    assert sender.pid != os.getpid()
    with open(f"/proc/{sender.pid}/cmdline") as f:
        assert "_mlflow_child.py" in f.read()


#: (samples, loss) of the rows ``kill_the_sender_between_rows`` logs: the ground truth to read back.
KILLED_BETWEEN_ROWS = [(2 * i, 1.0) for i in range(1, 6)] + [(2 * i, 2.0) for i in range(6, 11)]


def kill_the_sender_between_rows(run, kind) -> None:
    """Five rows stored, the child of ``kind`` killed with SIGKILL between calls, five more rows; the run
    finished. What the backend stored must be KILLED_BETWEEN_ROWS."""
    for _ in range(5):
        run.update(samples=2)
        run.log({"loss": 1.0})
    assert run.flush()
    first = kind.shared().pid
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: gone(first), 10)
    for _ in range(5):
        run.update(samples=2)
        run.log({"loss": 2.0})
    run.finish()
    assert kind.shared().pid != first


def test_a_killed_sender_is_started_again_and_no_row_is_lost_or_stored_twice(mlflow_uri):
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}, flush_timeout=120)
    kill_the_sender_between_rows(run, SenderProcess)
    assert history(mlflow_uri, run.run_ids["mlflow"], "loss") == KILLED_BETWEEN_ROWS


def test_a_failure_in_the_child_comes_back_as_an_error_with_what_was_stored(mlflow_uri):
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
    run.update(samples=1)
    run.log({"loss": 1.0})
    run.finish()
    rows = [[{"loss": float(i)}, 1000 + i, i, i] for i in range(1, 4)]
    sender = SenderProcess.shared()
    assert sender.call(mlflow_uri, run.run_ids["mlflow"], rows, 1) == 3  # a call per row: all three stored
    with pytest.raises(SenderError, match="sender process") as failed:
        sender.call(mlflow_uri, "f" * 32, rows, 1)  # no such run: nothing stored
    assert failed.value.stored is None
    assert [v for _, v in history(mlflow_uri, run.run_ids["mlflow"], "loss")] == [1.0, 1.0, 2.0, 3.0]


def test_mlflow_settings_changed_after_the_sender_started_reach_it(monkeypatch):
    from support import free_port

    sender = SenderProcess.shared()  # started with the settings of whatever came first
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    started = time.monotonic()
    with pytest.raises(SenderError, match="MLflow \\(sender process\\)"):
        sender.call(f"http://127.0.0.1:{free_port()}", "0" * 32, [[{"a": 1.0}, 1, 1, 1]], 1000)
    assert time.monotonic() - started < 20  # not MLflow's default retries, which take minutes


def test_a_relative_sqlite_store_is_the_one_in_the_folder_where_the_run_started(workdir):
    (workdir / "elsewhere").mkdir()
    sender = SenderProcess.shared()
    os.chdir(workdir / "elsewhere")  # the sender started in another folder (an earlier test's, or /)
    try:
        run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": "sqlite:///relative.db"})
        run.update(samples=3)
        run.log({"loss": 0.5})
        run.finish()
    finally:
        os.chdir(workdir)
    assert sender.alive()
    uri = f"sqlite:///{workdir}/elsewhere/relative.db"
    assert history(uri, run.run_ids["mlflow"], "loss") == [(3, 0.5)]
    assert not (workdir / "relative.db").exists()


@pytest.mark.parametrize("sender", ["process", "thread"])
def test_runs_started_in_two_folders_with_one_relative_store_each_write_to_their_own(workdir, sender):
    """MLflow keeps one store per URI text for the life of a process: two runs of one process (a sweep,
    a notebook), each started in its own folder with ``sqlite:///same.db``, each land whole in their
    own folder's store: the run, its rows, a user's own ``mlflow.log_metric`` into the active run,
    and its status. (The second used to be opened in the first folder's store, and its rows sent to
    its own, where the run was not found.)"""
    import mlflow
    from mlflow.exceptions import MlflowException

    from stream_metrics import conventions

    runs = {}
    for name, sizes in (("first", [3, 4]), ("second", [2, 5, 1])):
        (workdir / name).mkdir()
        os.chdir(workdir / name)
        try:
            run = stream_metrics.init(backend="mlflow", flush_timeout=30,
                                      mlflow={"tracking_uri": "sqlite:///same.db", "sender": sender})
            started = conventions.make_active(run)  # as the Trainer callback does
            mlflow.log_metric("mine", len(sizes))
            for n in sizes:
                run.update(samples=n)
                run.log({"loss": 1.0 / n})
            conventions.end_active(started)
            run.finish()
            runs[name] = (run.run_ids["mlflow"], sizes)
        finally:
            os.chdir(workdir)
    for name, (run_id, sizes) in runs.items():
        uri = f"sqlite:///{workdir}/{name}/same.db"
        steps = [sum(sizes[:i + 1]) for i in range(len(sizes))]  # progress/samples: MLflow's step
        assert history(uri, run_id, "loss") == sorted(zip(steps, [1.0 / n for n in sizes]))
        assert [v for _, v in history(uri, run_id, "mine")] == [len(sizes)]
        assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException):  # the second run is not in the first folder's store
        MlflowClient(f"sqlite:///{workdir}/first/same.db").get_run(runs["second"][0])
    assert not (workdir / "same.db").exists()


def test_a_relative_store_is_named_and_replayed_as_the_folder_it_is_in(workdir):
    """A spill file names its run's store, and its message gives the file's full path, so a replay
    may run from any folder: a relative store path is kept as the folder it was in."""
    from stream_metrics.backends.mlflow import MLflowBackend

    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    os.chdir(workdir / "a")
    try:
        backend = MLflowBackend(tracking_uri="sqlite:///rel.db")
        target = backend.target()
        backend.run_id = "0" * 32
        where = backend.where()
        os.chdir(workdir / "b")
        again = MLflowBackend.for_replay(target, {})
    finally:
        os.chdir(workdir)
    assert target == {"tracking_uri": f"sqlite:///{workdir}/a/rel.db"}
    assert f"--backend-store-uri sqlite:///{workdir}/a/rel.db" in where
    assert again.store_uri == f"sqlite:///{workdir}/a/rel.db"


def test_sender_thread_writes_from_the_training_process_and_a_bad_sender_is_named(mlflow_uri):
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri, "sender": "thread"})
    run.update(samples=4)
    run.log({"loss": 0.25})
    run.finish()
    assert history(mlflow_uri, run.run_ids["mlflow"], "loss") == [(4, 0.25)]
    with pytest.raises(ValueError, match="'process'.*'thread'"):
        stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri, "sender": "subprocess"})


def collector() -> tuple:
    return gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()


@pytest.mark.parametrize("sender", ["process", "thread"])
def test_the_training_process_s_garbage_collector_is_left_as_it_is(mlflow_uri, sender):
    """MLflow's child freezes its own heap after its first rows (gc.freeze); the thread sender runs the same
    log_rows in the training process, whose collector must stay as the training set it. The rows sent
    before and after the child froze are all stored, once each."""
    before = collector()
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri, "sender": sender})
    for i in range(6):
        run.update(samples=3, tokens=30)
        run.log({"loss": float(i)})
        assert run.flush()  # a request of its own each: the first, then those after the freeze
    run.finish()
    assert history(mlflow_uri, run.run_ids["mlflow"], "loss") == [(3 * (i + 1), float(i)) for i in range(6)]
    enabled, threshold, frozen = collector()
    # Nothing frozen here: the count of frozen objects never grows (it shrinks as frozen objects are
    # freed: the suite freezes the heap its modules left, conftest.py), and the settings are the same.
    assert (enabled, threshold) == before[:2] and frozen <= before[2]


def test_the_mlflow_child_freezes_its_heap_once():
    program = os.path.join(ROOT, "stream_metrics", "backends", "_mlflow_child.py")
    code = textwrap.dedent(f"""
        import gc, runpy
        child = runpy.run_path({program!r})
        before = gc.get_freeze_count()  # 0, or the interpreter's own (375 objects on Python 3.12.1)
        child["freeze_heap"]()
        frozen = gc.get_freeze_count()
        kept = [[i] for i in range(1000)]  # made after the first freeze: they stay the collector's
        child["freeze_heap"]()
        print(frozen > before, gc.get_freeze_count() == frozen)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_never_writes_into_its_parents_sender():
    kinds = (SenderProcess, WandbSenderProcess)  # MLflow's child and W&B's
    for kind in kinds:
        kind.shared()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, say
        inherited = any(kind._shared is not None for kind in kinds)
        os.write(write, b"inherited" if inherited else b"none")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 20) == b"none"
    assert all(kind.shared().alive() for kind in kinds)


SCRIPT = textwrap.dedent("""
    import os, sys, time
    import stream_metrics
    from stream_metrics.backends.process import SenderProcess

    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": sys.argv[1]})
    for _ in range(5):
        run.update(samples=2)
        run.log({"loss": 1.0})
    run.flush()
    try:  # the pid is printed inside: the test's Ctrl-C may come at once
        print(SenderProcess.shared().pid, flush=True)
        time.sleep(120)
    except KeyboardInterrupt:  # a Ctrl-C the script catches: it logs on, then finishes
        for _ in range(3):
            run.update(samples=2)
            run.log({"loss": 2.0})
        run.finish()
        print(run.run_ids["mlflow"], flush=True)
""")


def start_script(mlflow_uri, workdir):
    path = workdir / "train.py"
    path.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own process group, like a terminal's foreground job; SIGINT as a terminal leaves it.
    child = subprocess.Popen([sys.executable, str(path), mlflow_uri], stdout=subprocess.PIPE, text=True, env=env,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sender_pid = int(child.stdout.readline())
    return child, sender_pid


def test_a_ctrl_c_to_the_terminals_group_reaches_the_script_not_the_sender(mlflow_uri, workdir):
    child, sender_pid = start_script(mlflow_uri, workdir)
    try:
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0
    run_id = out.split()[-1]
    assert history(mlflow_uri, run_id, "loss") == [(2 * i, 1.0) for i in range(1, 6)] + [
        (2 * i, 2.0) for i in range(6, 9)]
    assert wait_for(lambda: gone(sender_pid), 30)  # and it ends with the script


def test_the_sender_ends_when_the_training_process_is_killed(mlflow_uri, workdir):
    child, sender_pid = start_script(mlflow_uri, workdir)
    assert not gone(sender_pid)
    child.kill()
    child.wait(30)
    assert wait_for(lambda: gone(sender_pid), 30)


def test_a_store_s_thread_in_the_child_leaves_when_idle_and_comes_back_for_its_next_rows(workdir, monkeypatch):
    """One thread per tracking URI in the child, not kept for ever: a process that logs to many stores
    keeps none of them once idle, and a store's next rows are stored all the same."""
    from mlflow import MlflowClient

    monkeypatch.setattr(SenderProcess, "idle_seconds", 1.0)
    sender = SenderProcess()  # a child of this test's own, with a 1 s idle time
    try:
        def threads() -> int:
            return len(os.listdir(f"/proc/{sender.pid}/task"))

        stores = [f"sqlite:///{workdir}/store{i}.db" for i in range(3)]
        runs = []
        for uri in stores:
            client = MlflowClient(uri)
            runs.append(client.create_run(client.create_experiment("idle")).info.run_id)
        for uri, run_id in zip(stores, runs):
            assert sender.call(uri, run_id, [[{"loss": 1.0}, 1000, 1, 1]], 1000) == 1
        busy = threads()  # the main thread, MLflow's own, and a thread per store
        # Every store's thread leaves after 1 s idle; MLflow's own threads stay.
        assert wait_for(lambda: threads() == busy - len(stores), 20)
        for i, (uri, run_id) in enumerate(zip(stores, runs)):
            assert sender.call(uri, run_id, [[{"loss": 2.0}, 2000, 2, 2]], 1000) == 2  # a new thread for it
            assert history(uri, run_id, "loss") == [(1, 1.0), (2, 2.0)], i
    finally:
        sender.close()
