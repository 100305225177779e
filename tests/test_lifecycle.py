"""However the process ends, every row logged is stored (or spilled, with the replay command) and the run is closed.

Each story runs a real training script in a child process, ends it the way it ends in real life
(interpreter exit, SIGTERM from a scheduler, an exception, Ctrl-C, a forked worker), and reads back
what MLflow's SQLite store and W&B's offline run folder hold.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

import stream_metrics
from conftest import ROOT, mlflow_rows, user_environment, wandb_rows, wandb_run_dirs

pytestmark = pytest.mark.slow  # child processes that start MLflow and W&B

#: transformers 5's Just-In-Time checkpoint on SIGTERM (TrainingArguments.enable_jit_checkpoint).
needs_jit_checkpoint = pytest.mark.skipif(
    "enable_jit_checkpoint" not in __import__("transformers").TrainingArguments.__dataclass_fields__,
    reason="this transformers has no enable_jit_checkpoint")

BATCH = 4  # samples per update() in every script: row i holds i * BATCH samples

PRELUDE = """
import os, signal, sys, time
import torch
import stream_metrics

BATCH = 4
URI = {uri!r}
BACKENDS = {backends!r}

def init():
    return stream_metrics.init(backend=BACKENDS, mlflow={{"tracking_uri": URI, "experiment": "lifecycle"}},
                               wandb={{"project": "lifecycle"}})

def step(run, i):
    run.update({{"input_ids": torch.ones(BATCH, 6, dtype=torch.long)}})
    run.log({{"loss": 1.0 / i}})
"""


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(workdir, body: str, uri: str, backends=("mlflow", "wandb"), **env) -> subprocess.Popen:
    """The script in a process group of its own (its pid), as a job a scheduler signals whole."""
    script = workdir / "train.py"
    script.write_text(PRELUDE.format(uri=uri, backends=list(backends)) + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=child_env(**env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    # A suite started in the background (`cmd &` in a script, some CI runners) has SIGINT and SIGQUIT
    # ignored, and a child inherits that: Python then never turns Ctrl-C into KeyboardInterrupt, and we
    # rightly leave an ignored signal ignored. The child starts as a program run from a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgid(0, 0)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def read_until(proc: subprocess.Popen, predicate, timeout: float = 240) -> list[str]:
    """Lines of the child's stdout up to the first one ``predicate`` accepts."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the child ended early: {proc.wait()} {proc.stderr.read()[-3000:]}")
        lines.append(line.strip())
        if predicate(line.strip()):
            return lines
    raise AssertionError("the child did not get there in time")


def the_mlflow_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs"
    return runs[0]


def stored_samples(uri=None, run_id=None, wandb_dir=None) -> list[int]:
    rows = mlflow_rows(uri, run_id) if wandb_dir is None else [
        row for folder in wandb_run_dirs(wandb_dir) for row in wandb_rows(folder)]
    return sorted(int(row["progress/samples"]) for row in rows)


def every_row(n: int) -> list[int]:
    return [BATCH * i for i in range(1, n + 1)]


# ----------------------------------------------------------------------------- interpreter exit
#: Python 3.12.0 and 3.12.1 start no thread once the script has ended (fixed in 3.12.2), and W&B's client
#: needs one to open a run: these quick scripts end before their W&B run has opened, so there its rows
#: go to the spill file at once, with the reason (test_backends_retry.py checks that part everywhere).
threads_at_exit = pytest.mark.skipif(sys.version_info[:3] in ((3, 12, 0), (3, 12, 1)),
                                     reason="Python 3.12.0 and 3.12.1 start no thread at interpreter exit")


@threads_at_exit
def test_a_run_never_finished_and_dropped_is_finished_at_exit_with_every_row(workdir, mlflow_uri):
    proc = start(workdir, """
        import gc

        def train():  # the run is made here, never finished, and dropped when train() returns
            run = init()
            for i in range(1, 101):
                step(run, i)

        train()
        gc.collect()
    """, mlflow_uri)
    code, out, err = finish(proc)
    assert code == 0, err
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(100)
    assert stored_samples(wandb_dir=workdir) == every_row(100)  # before W&B's own exit hook shut it down


@threads_at_exit
def test_an_uncaught_exception_leaves_the_run_failed_with_its_rows(workdir, mlflow_uri):
    proc = start(workdir, """
        run = init()
        for i in range(1, 11):
            step(run, i)
        raise RuntimeError("the loss went NaN")
    """, mlflow_uri)
    code, out, err = finish(proc)
    assert code == 1 and "the loss went NaN" in err
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "FAILED"
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(10)
    assert stored_samples(wandb_dir=workdir) == every_row(10)


def test_a_trainer_whose_collator_raises_leaves_the_run_failed(workdir, mlflow_uri):
    proc = start(workdir, """
        sys.path.insert(0, os.path.join({root!r}, "examples"))
        from streaming_trainer import build_trainer
        from stream_metrics.hf import StreamMetricsCallback

        callback = StreamMetricsCallback(backend="mlflow", mlflow={{"tracking_uri": URI, "experiment": "lifecycle"}})
        trainer, _ = build_trainer("out", max_steps=20, batch_size=4, grad_accum=1, logging_steps=2,
                                   callbacks=[callback])
        collate, calls = trainer.data_collator, []

        def broken(features):
            calls.append(1)
            if len(calls) == 7:
                raise ValueError("a corrupt example in the stream")
            return collate(features)

        trainer.data_collator = broken
        seen = []  # the samples the model trained on, counted apart from the library

        def count(module, args, kwargs):
            if module.training:
                seen.append(kwargs["input_ids"].shape[0])

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            trainer.train()
        finally:
            print("trained", len(seen), sum(seen), flush=True)
    """.format(root=ROOT), mlflow_uri, backends=("mlflow",))
    code, out, err = finish(proc)
    assert code == 1 and "a corrupt example in the stream" in err
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "FAILED"
    # accelerate reads one batch ahead, so the broken seventh batch stops training after five or six.
    batches, samples = map(int, re.search(r"trained (\d+) (\d+)", out).groups())
    assert batches in (5, 6)
    # Rows at steps 2 and 4 (logging_steps=2), then one at step 6 or the final totals after step 5.
    assert samples == 4 * batches
    assert stored_samples(mlflow_uri, run.info.run_id) == [8, 16, samples]


# ----------------------------------------------------------------------------- SIGTERM
SIGTERM_LOOP = """
run = init()
for i in range(1, 6):
    step(run, i)
run.flush()  # both runs are open: what follows is rows in flight
print("ready", flush=True)
i = 5
while True:
    i += 1
    step(run, i)
    print(i, flush=True)
    time.sleep(0.005)
"""

OWN_HANDLER = """
def own_handler(signum, frame):  # e.g. a job's own checkpoint-on-preemption handler
    with open("handler_ran", "w") as f:
        f.write(str(signum))
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

signal.signal(signal.SIGTERM, own_handler)
"""


WITH_A_WORKER = """
from torch.utils.data import DataLoader, IterableDataset

class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield 0

batches = iter(DataLoader(Endless(), batch_size=2, num_workers=1))
_step = step

def step(run, i):  # a DataLoader worker feeds the loop, and dies of the job's SIGTERM too
    next(batches)
    _step(run, i)
"""


@pytest.mark.parametrize("own_handler, group", [(False, False), (True, False), (False, True)],
                         ids=["default", "own-handler", "whole-job-with-a-dataloader-worker"])
def test_sigterm_stores_every_row_logged_closes_the_run_killed_and_still_ends_the_process(
        workdir, mlflow_uri, own_handler, group):
    """group: the signal goes to the job's process group (Slurm's scancel, torchrun's teardown), so the
    DataLoader worker dies with it and torch's SIGCHLD handler raises while the rows are delivered."""
    proc = start(workdir, (OWN_HANDLER if own_handler else "") + (WITH_A_WORKER if group else "") + SIGTERM_LOOP,
                 mlflow_uri, STREAM_METRICS_SIGNAL_TIMEOUT=60)
    read_until(proc, lambda line: line == "ready")
    logged = int(read_until(proc, lambda line: int(line) >= 45)[-1])  # rows still lingering in the sender
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == -signal.SIGTERM, err
    logged = max([logged] + [int(line) for line in out.split()])

    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "KILLED"
    mlflow_samples = stored_samples(mlflow_uri, run.info.run_id)
    # Every row logged before the signal, once each (a batch counted but not logged yet makes the last row).
    assert mlflow_samples == every_row(len(mlflow_samples)) and len(mlflow_samples) >= logged
    # (A handler that ends the process itself: W&B's run is finished by our W&B sender process once
    # the training process is gone, through W&B's service, which that process started and outlives it.)
    assert stored_samples(wandb_dir=workdir) == mlflow_samples
    assert "SIGTERM received" in err and not glob.glob(str(workdir / "undelivered" / "*"))
    if own_handler:
        assert (workdir / "handler_ran").read_text() == str(int(signal.SIGTERM))


GRACEFUL_HANDLER = """
stop = []

def own_handler(signum, frame):  # a job's graceful stop: the loop ends its step, then leaves
    stop.append(signum)

signal.signal(signal.SIGTERM, own_handler)
run = init()
for i in range(1, 6):
    step(run, i)
run.flush()
print("ready", flush=True)
i = 5
while not stop:
    i += 1
    step(run, i)
    print(i, flush=True)
    time.sleep(0.005)
for _ in range(5):  # on its way out, the program logs a few more rows (a checkpoint's, the last one)
    i += 1
    step(run, i)
print("last", i, flush=True)
run.finish()
"""


def test_sigterm_taken_by_a_handler_that_lets_the_program_go_on_keeps_its_last_rows_in_the_same_run(
        workdir, mlflow_uri):
    # The handler only asks the loop to stop: the rows logged after the signal belong in the run, which
    # ends KILLED (the signal cut it short) when the program finishes it.
    proc = start(workdir, GRACEFUL_HANDLER, mlflow_uri, STREAM_METRICS_SIGNAL_TIMEOUT=60)
    read_until(proc, lambda line: line == "ready")
    read_until(proc, lambda line: int(line) >= 30)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 0, err
    last = int(re.search(r"last (\d+)", out).group(1))
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "KILLED"
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(last)
    assert stored_samples(wandb_dir=workdir) == every_row(last)
    assert len(wandb_run_dirs(workdir)) == 1
    assert "SIGTERM received" in err and "log() after finish()" not in err


JIT_TRAINER = """
import json, signal, time
sys.path.insert(0, os.path.join({root!r}, "examples"))
from streaming_trainer import build_trainer
from stream_metrics.hf import StreamMetricsCallback
from transformers import TrainerCallback

seen = [0]  # samples the model trained on, counted apart from the library

class Say(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print("step", state.global_step, seen[0], flush=True)

    def on_substep_end(self, args, state, control, **kwargs):
        # SELF_SIGNAL: SIGTERM between a step's two micro-batches, then 3.5 s for the Trainer's
        # handler's 3 s: its checkpoint comes before the step's optimizer step (on_pre_optimizer_step).
        if os.environ.get("SELF_SIGNAL") and state.global_step >= 8 and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(3.5)

callback = StreamMetricsCallback(backend=BACKENDS, mlflow={{"tracking_uri": URI, "experiment": "lifecycle"}},
                                 wandb={{"project": "lifecycle"}})
resume = sys.argv[1] if len(sys.argv) > 1 else None
# The Trainer's own SIGTERM handler (transformers 5): training goes on for 3 s, then checkpoints and stops.
trainer, _ = build_trainer("out", max_steps=int(sys.argv[2]) if resume else 100000, batch_size=3, grad_accum=2,
                           logging_steps=4, callbacks=[callback, Say()], enable_jit_checkpoint=True,
                           data=[os.path.abspath(p) for p in sorted(os.listdir(".")) if p.endswith(".jsonl")])

def count(module, args, kwargs):
    if module.training:
        seen[0] += kwargs["input_ids"].shape[0]

trainer.model.register_forward_pre_hook(count, with_kwargs=True)
trainer.train(resume_from_checkpoint=resume)
print("trained", trainer.state.global_step, seen[0], flush=True)
"""


def start_jit_trainer(workdir, mlflow_uri, when) -> subprocess.Popen:
    """The JIT_TRAINER script on 40 examples in ``workdir``, started as start() starts every script."""
    import json

    for k, n in enumerate((23, 17)):  # 40 examples: a pass ends in the middle of a step's batches
        (workdir / f"part{k}.jsonl").write_text("".join(
            json.dumps({"text": f"example {k}-{i} " + "word " * (i % 7)}) + "\n" for i in range(n)))
    body = JIT_TRAINER.format(root=ROOT)
    extra = {"SELF_SIGNAL": "1"} if when == "mid_step" else {}
    return start(workdir, body, mlflow_uri, STREAM_METRICS_SIGNAL_TIMEOUT=60, **extra)


@pytest.fixture(scope="module")
def jit_mid_step_training(request, tmp_path_factory):
    """The "mid_step" case's training process, started with the first JIT case of this module and left to
    run by itself (it signals itself; nothing is sent to it), so it trains while the "signal" case's
    processes run: the two are independent, and most of each one's time is a single core's imports.
    Yields its folder, its MLflow URI and a dict that gets its exit code, stdout and stderr (None when
    the case is not selected)."""
    import threading

    if not any(item.name.endswith("[mid_step]") and getattr(item, "originalname", "") == JIT_TEST
               for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("jit-mid-step")
    with pytest.MonkeyPatch.context() as monkeypatch:  # the environment the workdir fixture gives a test
        user_environment(monkeypatch, folder)
        uri = f"sqlite:///{folder}/mlflow.db"
        proc = start_jit_trainer(folder, uri, "mid_step")
    ended: dict = {}

    def wait() -> None:
        try:
            ended["out"], ended["err"] = proc.communicate(timeout=240)  # as finish() waits
        except subprocess.TimeoutExpired:
            ended["err"] = "the mid_step training process did not end within 240 s"
        ended["code"] = proc.returncode

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        yield folder, uri, waiter, ended
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start())
            proc.wait(timeout=30)
        waiter.join(timeout=30)


JIT_TEST = "test_the_trainers_own_sigterm_checkpoint_keeps_counting_into_the_same_run_and_resumes_exactly"


@needs_jit_checkpoint
@pytest.mark.parametrize("when", ["signal", "mid_step"])
def test_the_trainers_own_sigterm_checkpoint_keeps_counting_into_the_same_run_and_resumes_exactly(
        workdir, mlflow_uri, when, jit_mid_step_training, monkeypatch):
    # transformers' enable_jit_checkpoint takes SIGTERM itself and trains on to a checkpoint: every row
    # until then lands in the run, the checkpoint holds the counts at its step, and a resume goes on
    # from them. "signal": a SIGTERM from outside, wherever the step is; "mid_step": the checkpoint is
    # written before a step's optimizer step, after its micro-batches were trained on (and counted).
    # (The "mid_step" process was started by jit_mid_step_training, in a folder of its own.)
    import json

    if when == "signal":
        proc = start_jit_trainer(workdir, mlflow_uri, when)
        before = read_until(proc, lambda line: line.startswith("step") and int(line.split()[1]) >= 8)
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
    else:
        workdir, mlflow_uri, waiter, ended = jit_mid_step_training
        user_environment(monkeypatch, workdir)  # this test's folder and environment are that process's
        waiter.join(timeout=300)
        code, out, err = ended.get("code"), ended.get("out") or "", ended.get("err") or ""
        lines = [line.strip() for line in out.splitlines()]
        # What read_until() would have read: the lines up to the first step >= 8 (the rest is `out`).
        reached = [i for i, line in enumerate(lines) if line.startswith("step") and int(line.split()[1]) >= 8]
        if not reached:
            raise AssertionError(f"the child ended early: {code} {err[-3000:]}")
        before = lines[:reached[0] + 1]
    assert code == 0, err
    steps = dict(map(int, line.split()[1:]) for line in before + out.splitlines() if line.startswith("step "))
    stopped, trained = map(int, re.search(r"trained (\d+) (\d+)", out).groups())
    assert stopped > 8  # trained on after the signal
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "KILLED"
    rows = stored_samples(mlflow_uri, run.info.run_id)
    logged = [steps[s] for s in range(4, stopped + 1, 4)]  # logging_steps=4, then the final totals
    assert rows == logged + ([trained] if trained != logged[-1] else [])
    # W&B's history also holds the Trainer's summary as a row at the final totals (MLflow: one per step).
    assert sorted(set(stored_samples(wandb_dir=workdir))) == rows
    [checkpoint] = (workdir / "out").glob("checkpoint-*")
    at = int(checkpoint.name.split("-")[1])
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["StreamMetricsCallback"]["attributes"]["saved_state"]["progress"]
    # Taken between steps (at == stopped; the Trainer may forward one more micro-batch before it
    # stops), or in the middle of the last step, before its optimizer step (at == stopped - 1): either
    # way the checkpoint's weights are those after step `at`, and so are its counts.
    assert at in ((stopped - 1,) if when == "mid_step" else (stopped, stopped - 1))
    assert (saved["step"], saved["samples"]) == (at, steps[at])

    script = workdir / "train.py"
    resumed = subprocess.run([sys.executable, str(script), str(checkpoint), str(at + 4)], cwd=workdir,
                             env=child_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    more = int(re.search(r"trained \d+ (\d+)", resumed.stdout).group(1))
    assert 4 * 4 < more <= 4 * 6  # 4 steps of up to 3 x 2 samples (fewer where a pass ends)
    run = the_mlflow_run(mlflow_uri)  # the same run, continued from the checkpoint's counts
    assert run.info.status == "FINISHED"
    assert stored_samples(mlflow_uri, run.info.run_id)[-1] == steps[at] + more


def test_sigterm_during_a_server_outage_spills_the_held_rows_and_replay_stores_each_once(
        workdir, mlflow_server):
    url = mlflow_server.url()
    proc = start(workdir, SIGTERM_LOOP, url, backends=("mlflow",), STREAM_METRICS_SIGNAL_TIMEOUT=3,
                 MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=5)
    read_until(proc, lambda line: line == "ready")
    mlflow_server.stop()
    logged = int(read_until(proc, lambda line: int(line) >= 60)[-1])
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == -signal.SIGTERM, err
    logged = max([logged] + [int(line) for line in out.split()])

    message = re.search(r"stream_metrics: (\d+) row\(s\) could not be delivered to mlflow .*`(stream-metrics replay "
                        r"[^`]+)`", err)
    assert message, err
    spilled, command = int(message.group(1)), message.group(2)
    mlflow_server.start()
    run = the_mlflow_run(url)
    before = stored_samples(url, run.info.run_id)
    assert before == every_row(len(before)) and len(before) + spilled >= logged

    done = subprocess.run(shlex.split(command), cwd=workdir, env=child_env(PATH=os.path.dirname(sys.executable)
                                                                          + os.pathsep + os.environ["PATH"]),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"sent {spilled} row(s)" in done.stdout
    after = stored_samples(url, run.info.run_id)
    assert after == every_row(len(before) + spilled)  # every row, none twice
    assert MlflowClient(url).get_run(run.info.run_id).info.status == "KILLED"


def test_sigterm_while_finish_waits_for_a_server_spills_within_the_signal_timeout(workdir):
    from support import free_port

    nobody = f"http://127.0.0.1:{free_port()}"  # no server: every call fails
    proc = start(workdir, """
        run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": URI}, flush_timeout=600)
        for i in range(1, 21):
            step(run, i)
        print("finishing", flush=True)
        run.finish()
    """, nobody, backends=("mlflow",), STREAM_METRICS_SIGNAL_TIMEOUT=2, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0)
    read_until(proc, lambda line: line == "finishing")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)  # within the signal's 2 s, not finish()'s 600 s
    assert code == -signal.SIGTERM, err
    assert "20 row(s) could not be delivered to mlflow" in err
    [path] = glob.glob(str(workdir / "undelivered" / "*.jsonl"))
    assert f"stream-metrics replay {path}" in err


# ----------------------------------------------------------------------------- SIGINT, forks
OWN_CTRL_C = """
def own_ctrl_c(signum, frame):  # a framework's handler: it says something, then interrupts as Python does
    print("stopping", flush=True)
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, own_ctrl_c)
"""


@pytest.mark.parametrize("own", [False, True], ids=["python-handler", "own-handler-raising-keyboardinterrupt"])
def test_ctrl_c_caught_by_the_program_flushes_and_training_goes_on_in_the_same_run(workdir, mlflow_uri, own):
    proc = start(workdir, (OWN_CTRL_C if own else "") + textwrap.dedent("""
        run = init()
        i = 0
        try:
            while True:
                i += 1
                step(run, i)
                print(i, flush=True)
                time.sleep(0.005)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        for _ in range(5):  # a notebook user goes on in the same run
            i += 1
            step(run, i)
        run.finish()
        print("rows", i, flush=True)
    """), mlflow_uri, backends=("mlflow",))
    read_until(proc, lambda line: line.isdigit() and int(line) >= 20)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 0, err
    assert "interrupted" in out and ("stopping" in out) == own
    rows = int(re.search(r"rows (\d+)", out).group(1))
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(rows)


def test_a_forked_worker_killed_by_sigterm_leaves_its_parents_run_alone(workdir, mlflow_uri):
    proc = start(workdir, """
        run = init()
        for i in range(1, 6):
            step(run, i)
        run.flush()
        pid = os.fork()  # as a DataLoader worker is made
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print("worker", os.WIFSIGNALED(status) and os.WTERMSIG(status), round(time.monotonic() - started), flush=True)
        for i in range(6, 11):
            step(run, i)
        run.finish()
    """, mlflow_uri, backends=("mlflow",), STREAM_METRICS_SIGNAL_TIMEOUT=30)
    code, out, err = finish(proc)
    assert code == 0, err
    worker, signal_number, seconds = out.split()
    assert int(signal_number) == signal.SIGTERM and int(seconds) < 5  # died at once, finishing nothing
    run = the_mlflow_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(10)
    assert "SIGTERM received" not in err and not glob.glob(str(workdir / "undelivered" / "*"))


# ----------------------------------------------------------------------------- in this process
def test_finish_writes_what_was_counted_after_the_last_row(mlflow_uri):
    updates, every = 10, 3  # rows after updates 3, 6, 9; the tenth batch only in the final row
    with stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}) as run:
        for i in range(1, updates + 1):
            run.update(samples=BATCH, tokens=7)
            if i % every == 0:
                run.log({"loss": 1.0 / i})
        run_id = run.run_ids["mlflow"]
    rows = mlflow_rows(mlflow_uri, run_id)
    assert [int(r["progress/samples"]) for r in rows] == [12, 24, 36, 40]
    assert [int(r["progress/tokens"]) for r in rows] == [21, 42, 63, 70]
    assert "train/loss" not in rows[-1] and "loss" not in rows[-1]


def test_log_after_finish_warns_that_the_row_is_not_stored(mlflow_uri):
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
    run.update(samples=BATCH)
    run.log({"loss": 1.0})
    run.finish()
    with pytest.warns(UserWarning, match=r"log\(\) after finish\(\).*not stored"):
        run.log({"loss": 0.5})
    assert len(mlflow_rows(mlflow_uri, run.run_ids["mlflow"])) == 1


def test_signal_handlers_are_installed_only_while_a_run_is_open_in_the_main_thread(mlflow_uri):
    import threading

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup: an ignored signal stays ignored
    try:
        run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        run.finish()
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]

        opened = []
        thread = threading.Thread(target=lambda: opened.append(
            stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})))
        thread.start()
        thread.join()
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]  # not installable from there
        opened[0].finish()
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_a_kill_right_after_a_checkpoint_loses_no_row_logged_before_it(workdir, mlflow_uri):
    """The resumed run writes only the rows after its checkpoint again: every row before it must be stored."""
    proc = start(workdir, """
        import json
        run = init()
        for i in range(1, 301):
            step(run, i)
            time.sleep(0.005)  # paced like training: the sender batches what comes within its window
        json.dump(run.state_dict(), open("checkpoint.json", "w"))
        os.kill(os.getpid(), signal.SIGKILL)  # an out-of-memory kill right after the checkpoint
        """, mlflow_uri)
    code, out, err = finish(proc)
    assert code == -signal.SIGKILL, err
    run = the_mlflow_run(mlflow_uri)
    assert stored_samples(mlflow_uri, run.info.run_id) == every_row(300)
    # W&B's service held the last rows unwritten (offline, its file's last block): our W&B sender
    # process, which started the service and outlives the training process, finishes the run it was
    # never told was finished, and the service writes them before it ends.
    deadline = time.monotonic() + 90
    while stored_samples(wandb_dir=workdir) != every_row(300) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stored_samples(wandb_dir=workdir) == every_row(300)
