"""W&B's rows are logged by a child process attached to the training process's run (backends/process.py,
_wandb_child.py): checked with real W&B (offline), a real child and a real kill; what W&B stored is
read back from its transaction log."""
from __future__ import annotations

import logging
import os

import pytest

import stream_metrics
from stream_metrics import schema
from stream_metrics.backends.process import WandbSenderProcess
from stream_metrics.backends.wandb import ATTACH_SINCE, _version

from conftest import wandb_rows, wandb_run_dirs
from support import wait_for
from test_sender_process import KILLED_BETWEEN_ROWS, gone, kill_the_sender_between_rows

wandb = pytest.importorskip("wandb")
if _version(wandb) < ATTACH_SINCE:
    pytest.skip(f"W&B {wandb.__version__} logs from a thread (no sender process before {ATTACH_SINCE})",
                allow_module_level=True)


def child_program(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read()


def test_rows_are_logged_by_a_child_attached_to_the_run_and_a_users_own_log_lands_in_it(workdir):
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # ground truth: the running sums below
    run = stream_metrics.init(backend="wandb", wandb={"project": "sender"}, flush_timeout=120)
    for i, n in enumerate(sizes):
        run.update(samples=n, tokens=10 * n)
        run.log({"loss": 1.0 / (i + 1)})
        if i == 4:
            assert run.flush()
            assert wandb.run is not None and wandb.run.id == run.run_ids["wandb"]  # the process's own run
            wandb.log({"user/metric": 7.0})  # a user's own call, in the training process
    sender = WandbSenderProcess.shared()
    assert sender.pid != os.getpid() and "_wandb_child.py" in child_program(sender.pid)
    run.finish()
    assert wandb.run is None  # ours, and finished here

    [run_dir] = wandb_run_dirs(workdir)
    rows = wandb_rows(run_dir)
    ours = [r for r in rows if "loss" in r]
    sums = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert [r[schema.SAMPLES] for r in ours] == sums  # each row once, in order
    assert [r[schema.TOKENS] for r in ours] == [10 * s for s in sums]
    assert [r["loss"] for r in ours] == pytest.approx([1.0 / (i + 1) for i in range(len(sizes))])
    assert [r["user/metric"] for r in rows if "user/metric" in r] == [7.0]
    # The user's row came after the five rows flushed before it (W&B orders rows as they arrive).
    assert [i for i, r in enumerate(rows) if "user/metric" in r][0] >= 5


def test_a_killed_wandb_sender_is_started_again_and_no_row_is_lost_or_stored_twice(workdir):
    run = stream_metrics.init(backend="wandb", wandb={"project": "sender"}, flush_timeout=120)
    kill_the_sender_between_rows(run, WandbSenderProcess)
    [run_dir] = wandb_run_dirs(workdir)
    assert [(r[schema.SAMPLES], r["loss"]) for r in wandb_rows(run_dir) if "loss" in r] == KILLED_BETWEEN_ROWS


def test_a_run_the_child_cannot_attach_to_is_logged_by_a_thread_with_one_warning(workdir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="stream_metrics")
    run = stream_metrics.init(backend="wandb", wandb={"project": "sender"}, flush_timeout=120)
    run.update(samples=1)
    run.log({"loss": 1.0})
    assert run.flush()  # the run is open, in W&B's real service
    # The child now looks for W&B's service at an address where there is none: it cannot attach.
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/nonexistent/socket")
    sender = WandbSenderProcess.shared()
    sender.close()
    assert wait_for(lambda: gone(sender.pid), 10)
    for i in range(2, 6):
        run.update(samples=1)
        run.log({"loss": float(i)})
    run.finish()
    if WandbSenderProcess._shared is not None:
        WandbSenderProcess._shared.close()  # the child that looked in the wrong place: not for the next test
    warnings = [r.getMessage() for r in caplog.records if "cannot attach" in r.getMessage()]
    assert len(warnings) == 1 and "thread of the training process" in warnings[0], warnings
    [run_dir] = wandb_run_dirs(workdir)
    assert [(r[schema.SAMPLES], r["loss"]) for r in wandb_rows(run_dir) if "loss" in r] == [
        (i, float(i)) for i in range(1, 6)]


def test_a_bad_wandb_sender_is_named():
    with pytest.raises(ValueError, match=r"wandb=\{'sender': 'subprocess'\}: use 'process'"):
        stream_metrics.init(backend="wandb", wandb={"sender": "subprocess"})


def test_a_run_after_wandb_teardown_and_its_services_end_starts_a_new_service_and_stores_every_row(workdir):
    # Our sender process starts W&B's service detached (it outlives a killed training process), and this
    # process's runs find it at the address in WANDB_SERVICE. Where this process has left it
    # (wandb.teardown()) and it has ended since (killed here), a new run must not look for it there.
    import glob
    import signal

    def rows_of(run, n):
        for i in range(1, n + 1):
            run.update(samples=i)
            run.log({"loss": float(i)})
        run.finish()

    rows_of(stream_metrics.init(backend="wandb", wandb={"project": "sender"}, flush_timeout=120), 3)
    address = os.environ.get("WANDB_SERVICE", "")
    starter = address.split("-")[1].encode()  # "3-<pid of the process that started it>-unix-<socket>"

    def services() -> list[int]:  # W&B's service processes (wandb-core) started by that process
        found = []
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(cmdline, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"wandb-core") for a in args) and b"--pid" in args \
                    and args[args.index(b"--pid") + 1] == starter:
                found.append(int(cmdline.split("/")[2]))
        return found

    [service] = services()
    wandb.teardown()
    WandbSenderProcess.shared().close()
    try:
        os.kill(service, signal.SIGKILL)
    except ProcessLookupError:  # it ended already (nobody was connected to it for its idle time)
        pass
    assert wait_for(lambda: not services(), 30)
    rows_of(stream_metrics.init(backend="wandb", wandb={"project": "sender"}, flush_timeout=120), 4)
    dirs = wandb_run_dirs(workdir)
    assert len(dirs) == 2
    assert [[r[schema.SAMPLES] for r in wandb_rows(d) if "loss" in r] for d in dirs] == [[1, 3, 6], [1, 3, 6, 10]]
