"""`stream-metrics run -- COMMAND`: zero lines of code, for real commands in real child processes.

COMMAND replaces the `stream-metrics` process (exit status and signals are its own); every Python
process it starts (torchrun workers, console scripts) builds its Trainers with the callback; a
sitecustomize already on the path still runs; processes that build no Trainer import nothing more.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, assert_conformant
from support import run_together

BIN = os.path.dirname(sys.executable)
STREAM_METRICS = [os.path.join(BIN, "stream-metrics")] if os.path.exists(os.path.join(BIN, "stream-metrics")) \
    else [sys.executable, "-m", "stream_metrics"]
JOB_TIMEOUT = 300


def env(**extra) -> dict:
    # PYTHONPATH holds this checkout (as an installed package would be) and the examples' helpers.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "examples")]),
            "OMP_NUM_THREADS": "1", **extra}


def run(*command, timeout=JOB_TIMEOUT, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([*STREAM_METRICS, "run", *command], env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def run_at_once(*runs: tuple[tuple, dict], timeout=JOB_TIMEOUT) -> list[subprocess.CompletedProcess]:
    """What run(*command, **extra) gives for each (command, extra), the commands started together:
    independent ones, whose time is mostly start-up, end in about the time of one."""
    return run_together([[*STREAM_METRICS, "run", *command] for command, _ in runs], timeout,
                        env=[env(**extra) for _, extra in runs])


def test_a_process_that_builds_no_trainer_imports_nothing_more():
    out = run("--", sys.executable, "-c",
              "import sys; print(sorted(m for m in ('torch', 'transformers', 'stream_metrics') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_exit_status_is_the_commands():
    seven, missing = run_at_once((("--", sys.executable, "-c", "raise SystemExit(7)"), {}),
                                 (("--", "no-such-command-here"), {}))
    assert seven.returncode == 7
    assert missing.returncode == 127 and "cannot run 'no-such-command-here'" in missing.stderr


def test_a_bad_option_is_refused_before_the_command_runs(workdir):
    # Each command would create ./ran (the working folder): none may run.
    unknown, dataset_size, no_backend = run_at_once(
        (("--backend", "mlfow", "--", sys.executable, "-c", "open('ran', 'w')"), {}),
        (("--", sys.executable, "-c", "open('ran', 'w')"), {"STREAM_METRICS_DATASET_SIZE": "lots"}),
        (("--backend", ",", "--", sys.executable, "-c", "open('ran', 'w')"), {}))
    assert unknown.returncode == 2 and "backend='mlfow' is not known" in unknown.stderr
    assert dataset_size.returncode == 2 and "STREAM_METRICS_DATASET_SIZE='lots' is not a whole number" \
        in dataset_size.stderr
    assert no_backend.returncode == 2 and "STREAM_METRICS_BACKEND=',' names no backend" in no_backend.stderr, \
        no_backend.stderr
    assert not os.path.exists(workdir / "ran")


def test_sigterm_sent_to_stream_metrics_run_reaches_the_command(workdir):
    child = workdir / "child.py"
    child.write_text(textwrap.dedent("""
        import os, signal, sys, time
        def handler(signum, frame):
            open("handled", "w").write(str(signum))
            sys.exit(42)
        signal.signal(signal.SIGTERM, handler)
        open("ready.tmp", "w").write(str(os.getpid()))
        os.rename("ready.tmp", "ready")
        time.sleep(120)
    """))
    proc = subprocess.Popen([*STREAM_METRICS, "run", "--", sys.executable, str(child)], env=env(), cwd=workdir)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        assert int((workdir / "ready").read_text()) == proc.pid  # exec: the command is the same process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (workdir / "handled").read_text() == str(int(signal.SIGTERM))


TRAINER_SCRIPT = """
import sys

import torch.distributed as dist

from streaming_trainer import build_trainer

trainer, _ = build_trainer("trainer_out", max_steps={steps}, batch_size={batch_size}, grad_accum={grad_accum},
                           data={paths!r}, logging_steps=2, report_to=["mlflow"],
                           accelerator_config={{"dispatch_batches": False}})
assert "stream_metrics" not in sys.modules or "stream_metrics.autolog" in sys.modules
print("callbacks:", [type(cb).__name__ for cb in trainer.callback_handler.callbacks])
trainer.train()
if dist.is_initialized():  # leave together: a gloo group open at exit can abort the process
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_workers_of_a_script_that_never_imports_stream_metrics(workdir, mlflow_uri):
    from mlflow import MlflowClient
    from test_distributed import free_port, trainer_corpus
    from test_hf import consumed

    import tiny

    steps, batch_size, grad_accum = 5, 4, 3
    paths = trainer_corpus(workdir)  # rank r reads file r: 37 and 40 examples, texts of varied length
    script = workdir / "train.py"
    script.write_text(TRAINER_SCRIPT.format(steps=steps, batch_size=batch_size, grad_accum=grad_accum, paths=paths))
    out = run("--", os.path.join(BIN, "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", str(script), MLFLOW_TRACKING_URI=mlflow_uri,
              TOKENIZERS_PARALLELISM="false")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert out.stdout.count("'StreamMetricsCallback'") == 2  # in each worker
    # The script configures no logging: our lines are shown anyway, once (rank 0 has the runs).
    assert out.stderr.count("stream_metrics: autolog gives Trainer a StreamMetricsCallback") == 2, out.stderr[-3000:]
    assert out.stderr.count("stream_metrics: MLflow run ") == 1, out.stderr[-3000:]

    per_rank = [consumed(tiny.read_texts([path]), batch_size, grad_accum, steps) for path in paths]
    samples, tokens = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
    client = MlflowClient(mlflow_uri)
    [run_] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run_.data.metrics["progress/samples"] == samples and run_.data.metrics["progress/tokens"] == tokens
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_.info.run_id, "--expect-samples", samples,
                      "--expect-tokens", tokens, "--expect-steps", steps,
                      "--expect-epoch", samples / len(tiny.read_texts(paths)))


def test_a_sitecustomize_already_on_the_path_runs_too(workdir):
    own = workdir / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    code = textwrap.dedent("""
        import os, sys
        print("user's ran:", os.environ.get("USER_SITECUSTOMIZE_RAN"))
        print("import sitecustomize gives:", sys.modules["sitecustomize"].__file__)
        import torch
        from transformers import Trainer, TrainingArguments
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments("out", report_to="none", use_cpu=True))
        print("callbacks:", [type(cb).__name__ for cb in trainer.callback_handler.callbacks])
    """)
    out = subprocess.run([*STREAM_METRICS, "run", "--backend", "none", "--", sys.executable, "-c", code],
                         env={**env(), "PYTHONPATH": os.pathsep.join([str(own), ROOT])}, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "user's ran: 1" in out.stdout
    assert f"import sitecustomize gives: {own / 'sitecustomize.py'}" in out.stdout
    assert "'StreamMetricsCallback'" in out.stdout


def test_an_empty_pythonpath_entry_still_means_the_current_folder(workdir):
    """`export PYTHONPATH=$PYTHONPATH:/x` on an unset variable gives ':/x': Python reads '' as the current folder."""
    (workdir / "localmod.py").write_text("WHERE = 'here'\n")
    (workdir / "scripts").mkdir()
    script = workdir / "scripts" / "train.py"  # a script's own folder is first on sys.path, not the current one
    script.write_text("import localmod\nprint(localmod.WHERE)\n")
    out = subprocess.run([*STREAM_METRICS, "run", "--", sys.executable, str(script)],
                         env={**env(), "PYTHONPATH": os.pathsep + ROOT}, cwd=workdir, capture_output=True, text=True,
                         timeout=JOB_TIMEOUT)
    assert out.returncode == 0 and out.stdout.strip() == "here", out.stderr[-3000:]


def test_autolog_in_a_script_run_under_stream_metrics_run_gets_one_callback(workdir):
    """Two import hooks for transformers.trainer (the start-up one, and autolog()'s): no endless recursion."""
    code = textwrap.dedent("""
        import stream_metrics
        stream_metrics.autolog(backend="none")
        import torch
        from transformers import Trainer, TrainingArguments
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments("out", report_to="none", use_cpu=True))
        print("callbacks:", [type(cb).__name__ for cb in trainer.callback_handler.callbacks])
    """)
    out = subprocess.run([*STREAM_METRICS, "run", "--backend", "none", "--", sys.executable, "-c", code],
                         env=env(), cwd=workdir, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    callbacks = out.stdout.split("callbacks:")[1]
    assert callbacks.count("'StreamMetricsCallback'") == 1, out.stdout


@pytest.mark.slow
def test_trls_command_line_offline(workdir, mlflow_uri):
    """`trl sft` on a local tiny model and a local JSONL file: samples from the data, tokens TRL's own count."""
    import tiny
    from mlflow import MlflowClient

    tiny.tiny_model().save_pretrained(str(workdir / "model"))
    tiny.byte_tokenizer().save_pretrained(str(workdir / "model"))
    [path] = tiny.write_corpus(str(workdir / "data"), files=1, lines_per_file=(40,))
    os.rename(path, workdir / "data" / "train.jsonl")
    steps, batch_size = 4, 4
    out = run("--backend", "mlflow", "--", os.path.join(BIN, "trl"), "sft", "--model_name_or_path",
              str(workdir / "model"), "--dataset_name", str(workdir / "data"), "--output_dir", str(workdir / "out"),
              "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size), "--report_to", "none",
              "--use_cpu", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
              MLFLOW_TRACKING_URI=mlflow_uri)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    client = MlflowClient(mlflow_uri)
    [run_] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run_.data.metrics
    assert metrics["progress/samples"] == steps * batch_size
    assert metrics["progress/epoch"] == pytest.approx(steps * batch_size / 40)  # a sized dataset: exact
    tokens = {m.step: m.value for m in client.get_metric_history(run_.info.run_id, "progress/tokens")}
    theirs = client.get_metric_history(run_.info.run_id, "train/num_tokens")
    assert theirs and all(tokens[m.step] == m.value for m in theirs)
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_.info.run_id,
                      "--expect-samples", steps * batch_size, "--expect-steps", steps)
