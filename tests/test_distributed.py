"""Distributed training: real torchrun jobs of 2 CPU ranks over gloo, with uneven data per rank.

Counts are summed over every rank in the one collective a row costs; only rank 0 writes to the
backends, so a job makes one MLflow run and one W&B run; the epoch counts passes over the whole
dataset; a resumed job continues every axis. Each test launches the workers in tests/dist/.
With 4 ranks: tensor, context and pipeline parallel layouts (given or detected) count each example
and token once; a call that rank 0 makes alone stops every rank with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, assert_conformant, user_environment, wandb_run_dirs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKERS = os.path.join(ROOT, "tests", "dist")
JOB_TIMEOUT = 240  # seconds; a hung collective must not hang the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, *args, nproc: int = 2) -> list[dict]:
    """Run tests/dist/<worker>.py on ``nproc`` ranks; return what each rank reported, in rank order."""
    out = tempfile.mkdtemp(prefix=f"out-{worker}-", dir=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(WORKERS, f"{worker}.py"), "--out", out, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: this job's own process group
        output, _ = proc.communicate()
        pytest.fail(f"{worker} did not finish in {JOB_TIMEOUT}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{worker} failed:\n{output[-6000:]}"
    reports = []
    for r in range(nproc):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    return reports


def progress_rows(report: dict) -> list[dict]:
    """The progress a rank held at each row (without what the worker noted about its own rank)."""
    return [{k: v for k, v in row.items() if not k.startswith("rank_")} for row in report["rows"]]


def mlflow_run_ids(uri: str, experiment: str = "distributed") -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [r.info.run_id for r in client.search_runs([exp.experiment_id])] if exp else []


def uneven_corpus(workdir, files=2, lines_per_file=(37, 50)):
    """Rank r reads file r: different numbers of batches, a partial last batch on each, texts of varied length."""
    import tiny

    paths = tiny.write_corpus(str(workdir / "data"), files=files, lines_per_file=lines_per_file)
    texts = tiny.read_texts(paths)
    return paths, len(texts), sum(tiny.token_count(t) for t in texts)


def test_the_plain_loop_counts_every_rank_into_one_run(workdir, mlflow_uri):
    paths, samples, tokens = uneven_corpus(workdir)
    reports = torchrun("plain_loop", "--mlflow-uri", mlflow_uri, "--batch-size", 4, *paths)

    # Every rank holds the same global values at every row (so decisions taken from them agree).
    assert progress_rows(reports[0]) == progress_rows(reports[1])
    final = reports[0]["rows"][-1]
    steps = max(-(-r["batches"] // 2) for r in reports)  # accumulation 2; 10 and 13 batches; a pass end steps
    assert (final["samples"], final["tokens"], final["loss_tokens"]) == (samples, tokens, tokens)
    assert (final["step"], final["epoch"], final["epoch_source"]) == (steps, 1.0, "pass")

    # One run per backend, written by rank 0 only; what they stored conforms and has the totals.
    run_ids = mlflow_run_ids(mlflow_uri)
    assert run_ids == [reports[0]["run_ids"]["mlflow"]]
    assert reports[1]["run_ids"] == {}
    expected = ["--expect-samples", samples, "--expect-tokens", tokens, "--expect-steps", steps,
                "--expect-epoch", 1.0]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_ids[0], *expected)
    [wandb_dir] = wandb_run_dirs(workdir)
    assert reports[0]["run_ids"]["wandb"] in wandb_dir
    assert_conformant("--wandb-run", wandb_dir, *expected)


def test_a_row_costs_one_collective_and_counting_between_rows_none(workdir, mlflow_uri):
    reports = torchrun("collectives", "--mlflow-uri", mlflow_uri)
    for rank, report in enumerate(reports):
        calls = report["calls"]
        for row in range(3):
            assert calls[f"between_rows_{row}"] == [], (rank, calls)
            assert calls[f"row_{row}"] == ["all_gather"], (rank, calls)
        assert calls["state_dict"] == ["all_gather"], (rank, calls)
        assert calls["finish"] == [], (rank, calls)
    assert reports[0]["progress"] == reports[1]["progress"]
    assert reports[0]["progress"]["samples"] == sum(r["expected_samples"] for r in reports)


@pytest.mark.parametrize("fmt, files, split", [
    ("jsonl", 4, "by_node"),    # split_dataset_by_node, whole shards per rank
    ("jsonl", 3, "by_node"),    # split_dataset_by_node, one example in two per rank
    ("parquet", 4, "by_node"),  # and the footers' row counts before a pass ends
    ("parquet", 3, "by_node"),
    ("parquet", 4, "shard"),    # IterableDataset.shard, as accelerate does: each rank's footers count its share
    ("parquet", 1, "reshard"),  # ... of a shard per row group: each rank its own 2 of one file's 4 row groups
])
def test_the_epoch_counts_passes_over_the_whole_dataset_split_between_ranks(workdir, fmt, files, split):
    import pyarrow.parquet as pq
    import tiny

    paths = tiny.write_corpus(str(workdir / "data"), files=files, lines_per_file=(23, 31, 17, 29), fmt=fmt)
    if split == "reshard":  # 23 rows in row groups of 6, 6, 6 and 5
        pq.write_table(pq.read_table(paths[0]), paths[0], row_group_size=6)
    total = len(tiny.read_texts(paths))
    reports = torchrun("epoch_split", "--passes", 2, "--split", split, *paths)
    # Each rank's examples of each file (by_node): whole files in turn with 4, one in two of each with 3;
    # and the file a rank's c-th example is in (a row every 2 batches of 4: 8 examples a rank).
    sizes = (23, 31, 17, 29)[:files]
    starts = [sum(sizes[:k]) for k in range(files)]
    shares = [[sizes[k] if k % 2 == rank else 0 for k in range(files)] if files == 4 else
              [sum(1 for i in range(starts[k], starts[k] + sizes[k]) if i % 2 == rank) for k in range(files)]
              for rank in range(2)]

    def file_of(rank, c):
        return next(k for k in range(files) if c <= sum(shares[rank][:k + 1]))
    assert progress_rows(reports[0]) == progress_rows(reports[1])
    assert [r["num_shards"] for r in reports] == ([2, 2] if files in (1, 4) else [3, 3])

    for mine, theirs in zip(reports[0]["rows"], reports[1]["rows"]):
        passes = min(mine["rank_passes"], theirs["rank_passes"])  # passes over the whole dataset
        epoch, samples = mine["epoch"], mine["samples"]
        if passes:  # the measured pass holds every rank's share: the integer part is exact
            assert (epoch, mine["epoch_source"]) == (samples / total, "pass"), mine
            assert passes <= epoch <= passes + 1, mine  # the next whole number once every sample is in
        else:  # no estimate claims a pass before every rank has finished its share
            assert 0 <= epoch < 1, mine
            if mine["epoch_source"] == "shards":  # whole files read, scaled by the file count: a pass
                sizes = (23, 31, 17, 29)[:files]  # between files x the smallest and x the largest
                assert samples / (files * max(sizes)) <= epoch <= samples / (files * min(sizes)), mine
            # Once each rank is past its first file, its position (in its own examples, where it reads
            # one in two of every file) gives an estimate, and a rank that has ended its share measured it:
            # rank 0 reads 12 of the first file's 23 examples with 3 files; with 4, rank 1's first file has 31.
            # But for a rank's first row in a file: there the state reads alike at the file's first example
            # and further in its first table (the file), and no earlier row saw the reader in that file.
            if fmt == "jsonl" and split == "by_node" and samples / 2 > {3: 12, 4: 31}[files]:
                first_in_a_file = any(file_of(rank, samples // 2) != file_of(rank, samples // 2 - 8)
                                      for rank in range(2) if samples // 2 <= sum(shares[rank]))
                assert mine["epoch_source"] == "shards" or (first_in_a_file and mine["epoch_source"] == "none"), mine
            if fmt == "parquet" and samples < total:  # the footers count the whole dataset, on every rank
                assert (epoch, mine["epoch_source"]) == (samples / total, "metadata"), mine
    final = reports[0]["rows"][-1]
    assert (final["samples"], final["epoch"], final["epoch_source"]) == (2 * total, 2.0, "pass")


@pytest.mark.parametrize("fmt, files", [
    ("jsonl", 3),    # one example in two of the repeated stream per rank: a rank's share differs by repetition
    ("parquet", 4),  # whole files per rank, repeated; the footers give one pass's size throughout
])
def test_a_stream_repeated_before_the_split_ends_as_that_many_passes_on_every_rank(workdir, fmt, files):
    import tiny

    paths = tiny.write_corpus(str(workdir / "data"), files=files, lines_per_file=(23, 31, 17, 29), fmt=fmt)
    total = len(tiny.read_texts(paths))
    reports = torchrun("epoch_split", "--passes", 1, "--repeat", 3, *paths)
    assert progress_rows(reports[0]) == progress_rows(reports[1])
    for mine, theirs in zip(reports[0]["rows"], reports[1]["rows"]):
        epoch, samples = mine["epoch"], mine["samples"]
        if min(mine["rank_passes"], theirs["rank_passes"]) == 0:
            if fmt == "parquet":
                assert (epoch, mine["epoch_source"]) == (pytest.approx(samples / total), "metadata"), mine
            else:  # no size known, no pass seen to end: the repetitions inside are not claimed
                assert (epoch, mine["epoch_source"]) == (0.0, "none"), mine
            assert epoch < 3
    assert max(r["epoch"] for r in reports[0]["rows"][:-1]) > (1.5 if fmt == "parquet" else -1)
    final = reports[0]["rows"][-1]
    assert (final["samples"], final["epoch"], final["epoch_source"]) == (3 * total, 3.0, "pass")


def test_a_resumed_torchrun_job_continues_every_axis_in_the_same_runs(workdir, mlflow_uri):
    paths, samples, tokens = uneven_corpus(workdir)
    first = torchrun("plain_loop", "--mlflow-uri", mlflow_uri, "--stop", 4, "--save-state", "state.json", *paths)
    second = torchrun("plain_loop", "--mlflow-uri", mlflow_uri, "--resume", "state.json", "--skip", 4, *paths)

    assert progress_rows(second[0]) == progress_rows(second[1])
    before, after = first[0]["rows"][-1], second[0]["rows"][0]
    for axis in ("step", "samples", "tokens", "loss_tokens", "epoch", "wall_clock"):
        assert after[axis] >= before[axis], axis
    final = second[0]["rows"][-1]
    steps = 4 // 2 + max(-(-r["batches"] // 2) for r in second)  # a window cut by the pass end steps
    assert (final["samples"], final["tokens"], final["step"], final["epoch"]) == (samples, tokens, steps, 1.0)

    # The same runs continue: one MLflow run holding both jobs' rows, and W&B's id kept.
    run_id = first[0]["run_ids"]["mlflow"]
    assert mlflow_run_ids(mlflow_uri) == [run_id] and second[0]["run_ids"]["mlflow"] == run_id
    expected = ["--expect-samples", samples, "--expect-tokens", tokens, "--expect-steps", steps,
                "--expect-epoch", 1.0]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_id, *expected)
    assert second[0]["run_ids"]["wandb"] == first[0]["run_ids"]["wandb"]
    folders = wandb_run_dirs(workdir)  # offline, each job writes a folder of the same run (FACTS.md)
    assert len(folders) == 2 and all(folder.endswith(first[0]["run_ids"]["wandb"]) for folder in folders)
    assert_conformant("--wandb-run", folders[-1], *expected)


def trainer_job(mlflow_uri, paths, steps, *args) -> tuple[list[dict], list]:
    """The Trainer worker, micro-batches of 4, 3 to a step; (reports, the checks for check_run.py)."""
    from test_hf import consumed  # what one process's Trainer feeds its model, from the data alone

    import tiny

    batch_size, grad_accum = 4, 3
    reports = torchrun("trainer", "--mlflow-uri", mlflow_uri, "--max-steps", steps, "--batch-size", batch_size,
                       "--grad-accum", grad_accum, *args, *paths)
    per_rank = [consumed(tiny.read_texts([path]), batch_size, grad_accum, steps) for path in paths]
    samples, tokens = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
    total = len(tiny.read_texts(paths))
    return reports, ["--expect-samples", samples, "--expect-tokens", tokens, "--expect-steps", steps,
                     "--expect-epoch", samples / total]


def trainer_corpus(workdir):
    # accelerate gives rank r file r: 37 and 40 examples, texts of varied length, so ranks see different
    # samples and tokens and only rank 0 has a partial last batch. Both hold 10 batches a pass: DDP
    # needs every rank to run the same number of backward passes (the Trainer has no Join).
    paths, _, _ = uneven_corpus(workdir, lines_per_file=(37, 40))
    return paths


def assert_final(reports, expected) -> None:
    """Every rank ends with the ground truth's totals (check_run.py's arguments), its pass measured:
    after 5 steps each rank has ended its pass (3 steps and a partial window) and restarted the stream."""
    want = dict(zip(expected[::2], expected[1::2]))
    final = [r["state"]["progress"] for r in reports]
    assert final[0] == final[1]
    assert (final[0]["samples"], final[0]["tokens"], final[0]["step"], final[0]["epoch"], final[0]["epoch_source"]) \
        == (want["--expect-samples"], want["--expect-tokens"], want["--expect-steps"], want["--expect-epoch"], "pass")


def test_the_trainer_under_torchrun_counts_every_rank_into_one_run(workdir, mlflow_uri):
    reports, expected = trainer_job(mlflow_uri, trainer_corpus(workdir), 5)
    assert [r["world_size"] for r in reports] == [2, 2]
    assert_final(reports, expected)

    run_ids = mlflow_run_ids(mlflow_uri)
    assert run_ids == [reports[0]["state"]["run_ids"]["mlflow"]]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_ids[0], *expected)
    [wandb_dir] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", wandb_dir, *expected)


@pytest.fixture(scope="module")
def trainer_saved_at_step_3(tmp_path_factory):
    """The first job of both Trainer resume tests below, which is the same job in each (3 steps of 3
    micro-batches of 4 a rank on trainer_corpus, a checkpoint at step 3), run once for the module: a
    function that copies what the job left (its checkpoints, MLflow store and W&B folder) into a test's
    working folder, as if the job had run there, and returns the job's reports."""
    folder = tmp_path_factory.mktemp("trainer-saved-at-step-3")
    with pytest.MonkeyPatch.context() as monkeypatch:  # the environment the workdir fixture gives a test
        user_environment(monkeypatch, folder)
        reports = torchrun("trainer", "--mlflow-uri", f"sqlite:///{folder}/mlflow.db", "--batch-size", 4,
                           "--max-steps", 3, "--grad-accum", 3, "--save-steps", 3, *trainer_corpus(folder))

    def into(workdir) -> list[dict]:
        shutil.copytree(folder / "trainer_out", workdir / "trainer_out")  # the worker's output_dir
        shutil.copyfile(folder / "mlflow.db", workdir / "mlflow.db")  # the mlflow_uri fixture's store
        if (folder / "wandb").exists():
            try:
                shutil.copytree(folder / "wandb", workdir / "wandb")
            except shutil.Error as errors:  # only a file W&B removed meanwhile (its tmp/) may be missing
                if any(os.path.exists(source) for source, _, _ in errors.args[0]):
                    raise
        return reports

    return into


def test_the_trainer_resumed_under_torchrun_continues_every_axis(workdir, mlflow_uri, trainer_saved_at_step_3):
    paths = trainer_corpus(workdir)
    # The first job: 3 steps, saved at step 3, as trainer_job(mlflow_uri, paths, 3, "--save-steps", 3) runs it.
    first = trainer_saved_at_step_3(workdir)
    second, expected = trainer_job(mlflow_uri, paths, 5, "--resume")
    assert_final(second, expected)  # the skipped batches are not counted twice

    run_id = first[0]["state"]["run_ids"]["mlflow"]
    assert mlflow_run_ids(mlflow_uri) == [run_id] and second[0]["state"]["run_ids"]["mlflow"] == run_id
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", run_id, *expected)
    assert second[0]["state"]["run_ids"]["wandb"] == first[0]["state"]["run_ids"]["wandb"]


def test_the_trainer_resumed_with_another_accumulation_measures_the_pass_it_reads(workdir, mlflow_uri,
                                                                                 trainer_saved_at_step_3):
    # Saved after 3 steps of 3 micro-batches of 4 (36 rows a rank); resumed with accumulation 2, the
    # Trainer skips 3 x 2 batches a rank and reads rows 24-35 again. The pass measured after the resume
    # must hold what each rank's file holds (37 + 40), not the 72 samples before the checkpoint plus
    # the rest of the pass read after it (72 + 29).
    import tiny

    paths = trainer_corpus(workdir)
    job = ("--mlflow-uri", mlflow_uri, "--batch-size", 4)
    # The first job: torchrun("trainer", *job, "--max-steps", 3, "--grad-accum", 3, "--save-steps", 3, *paths).
    trainer_saved_at_step_3(workdir)
    second = torchrun("trainer", *job, "--max-steps", 7, "--grad-accum", 2, "--resume", *paths)
    shares = [tiny.read_texts([path]) for path in paths]
    samples = tokens = 0
    for texts in shares:
        batches = [texts[i:i + 4] for i in range(0, len(texts), 4)]
        assert len(batches) == 10
        # Steps 1-3: batches 0-8. Steps 4-5: batches 6-9 (the pass ends). Steps 6-7: batches 0-3 again.
        trained = batches[:9] + batches[6:] + batches[:4]
        samples += sum(len(b) for b in trained)
        tokens += sum(tiny.token_count(t) for b in trained for t in b)
    final = [r["state"]["progress"] for r in second]
    assert final[0] == final[1]
    assert (final[0]["samples"], final[0]["tokens"], final[0]["step"], final[0]["epoch_source"]) == \
        (samples, tokens, 7, "pass")
    assert final[0]["epoch"] == pytest.approx(samples / sum(len(texts) for texts in shares))


# ---------------------------------------------------------------------- several ranks on one batch
def layout_truth(paths) -> dict:
    """What data-parallel ranks reading a file each see: 37 and 50 examples (and 37, 50 again for 4 files)."""
    import math

    import tiny

    shares = [tiny.read_texts([path]) for path in paths]
    texts = [t for share in shares for t in share]
    # Batches of 4, accumulation 2; the window a pass end cuts short still makes a step (SCHEMA section 1).
    steps = max(math.ceil(math.ceil(len(share) / 4) / 2) for share in shares)
    return {"samples": len(texts), "tokens": sum(tiny.token_count(t) for t in texts), "steps": steps}


def assert_one_collective_per_row(reports) -> None:
    for rank, report in enumerate(reports):
        assert all(calls == [] for calls in report["between_rows"]), (rank, report["between_rows"])
        assert all(calls == ["all_gather"] for calls in report["at_rows"]), (rank, report["at_rows"])


LAYOUTS = {  # layout -> the tag saying how ranks were counted
    "tp-mesh": "2 (given: data_parallel_group=DeviceMesh)",     # (dp=2, tp=2): TP pairs feed identical batches
    "tp-group": "2 (given: data_parallel_group=ProcessGroup)",  # the same, given as mesh.get_group("dp")
    "cp-sliced": "2 (given: data_parallel_group=DeviceMesh, context_parallel_group=DeviceMesh; "
                 "context parallel 2, sliced)",                # each rank of a pair counts half of each row
    "cp-packed": "2 (given: data_parallel_group=DeviceMesh, context_parallel_group=DeviceMesh; "
                 "context parallel 2, sliced)",                # packed rows: example starts on both ranks
    "cp-whole": "2 (given: data_parallel_group=DeviceMesh, context_parallel_group=DeviceMesh; "
                "context parallel 2, whole batch)",            # each rank counts the batch before the split
    "pp": "2 (given: data_parallel_group=DeviceMesh)",          # only the first stage reads batches
    # No option: detected from the Trainer's arguments holding accelerate's ParallelismConfig, with
    # batches shared as accelerate's own device mesh says (the Trainer refuses it on CPU: see the worker).
    "accelerate-tp": "2 (detected: ParallelismConfig(dp_shard=2, tp=2))",
    "accelerate-cp": "2 (detected: ParallelismConfig(dp_shard=2, cp=2); context parallel 2, sliced)",
    "dp": "4 (every rank)",                                     # pure data parallelism: 4 files, 4 readers
}


@pytest.fixture(scope="module")
def layout_job(tmp_path_factory):
    """Every layout in one 4-rank job (a job's start-up is most of its time): per layout, what each rank
    saw (rank order); the MLflow URI the runs went to; the truth for the 2 files a pair-sharing layout
    reads and for the 4 that ``dp`` reads."""
    import tiny

    folder = tmp_path_factory.mktemp("layouts")
    with pytest.MonkeyPatch.context() as monkeypatch:
        user_environment(monkeypatch, folder)
        paths = tiny.write_corpus(str(folder / "data"), files=4, lines_per_file=(37, 50))
        uri = f"sqlite:///{folder}/mlflow.db"
        reports = torchrun("layouts", "--layouts", ",".join(LAYOUTS), "--mlflow-uri", uri, *paths, nproc=4)
    return {layout: [r[layout] for r in reports] for layout in LAYOUTS}, uri, layout_truth(paths[:2]), \
        layout_truth(paths)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "dp"])
def test_ranks_sharing_a_batch_count_it_once(layout_job, layout):
    jobs, mlflow_uri, truth, _ = layout_job
    reports, tag = jobs[layout], LAYOUTS[layout]

    assert all(progress_rows(r) == progress_rows(reports[0]) for r in reports)  # the same values everywhere
    final = reports[0]["rows"][-1]
    assert (final["samples"], final["tokens"], final["loss_tokens"], final["step"]) == \
        (truth["samples"], truth["tokens"], truth["tokens"], truth["steps"])
    assert (final["epoch"], final["epoch_source"]) == (1.0, "pass")  # the pass holds each example once
    # FLOPs count each batch once too (10 per token of its shape): the first rank of each pair's share.
    readers = [r for r in reports if r["stage"] == 0 and r["peer"] == 0]
    assert final["flops"] == 10 * sum(r["fed"] for r in readers)
    assert_one_collective_per_row(reports)
    assert [r["distinct_devices"] for r in reports] == [4] * 4
    assert [r["tag"] for r in reports] == [tag] * 4
    if layout == "tp-mesh":  # the whole mesh given where mesh["dp"] was meant: refused, saying what to pass
        assert all("dimension(s) ['tp']" in r["whole_mesh_refused"] and "mesh['dp']" in r["whole_mesh_refused"]
                   for r in reports)

    # What MLflow stored: the totals, and the tag saying how ranks were counted.
    from mlflow import MlflowClient

    [run_id] = mlflow_run_ids(mlflow_uri, f"layouts-{layout}")
    assert run_id == reports[0]["run_ids"]["mlflow"]
    stored = MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).data
    assert (stored.metrics["progress/samples"], stored.metrics["progress/tokens"]) == \
        (truth["samples"], truth["tokens"])
    assert stored.tags["stream_metrics.data_parallel"] == tag


def test_pure_data_parallelism_on_four_ranks_adds_every_rank(layout_job):
    jobs, _, _, truth = layout_job
    reports = jobs["dp"]
    final = reports[0]["rows"][-1]
    assert (final["samples"], final["tokens"], final["step"], final["epoch"]) == \
        (truth["samples"], truth["tokens"], truth["steps"], 1.0)
    assert final["flops"] == 10 * sum(r["fed"] for r in reports)  # every rank's own batches: all added
    assert_one_collective_per_row(reports)
    assert reports[0]["tag"] == LAYOUTS["dp"]


@pytest.mark.parametrize("call", ["state_dict", "progress"])
def test_a_call_made_on_rank_0_alone_stops_every_rank_with_a_clear_error(workdir, mlflow_uri, call):
    from mlflow import MlflowClient

    reports = torchrun("rank0_only", "--mlflow-uri", mlflow_uri, "--call", call)
    for report in reports:  # both ranks: the rows before were right, then the error, and no wrong row
        assert report["rows"] == [40, 80], report
        assert "call them on every rank, as log()" in report["error"], report
    assert "rank 0 in state_dict()" in reports[1]["error"] if call == "state_dict" else \
        "rank 0 in run.progress" in reports[1]["error"]
    [run_id] = mlflow_run_ids(mlflow_uri, "rank0")
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run_id, "progress/samples")
    assert [m.value for m in history] == [40, 80]


@pytest.mark.parametrize("sizes, counted, rows_counted, tag", [
    # accelerate's mesh order puts tp (then sp, cp) fastest: ranks 0 and 1 share a batch.
    ({"dp_shard_size": 2, "tp_size": 2}, [1, 0, 1, 0], [1, 1, 1, 1],
     "2 (detected: ParallelismConfig(dp_shard=2, tp=2))"),
    # Sliced: every rank's counts are added, and the rows only by each CP group's first rank.
    ({"dp_shard_size": 2, "sp_size": 2}, [1, 1, 1, 1], [1, 0, 1, 0],
     "2 (detected: ParallelismConfig(dp_shard=2, sp=2); context parallel 2, sliced)"),
    ({"dp_shard_size": 2, "cp_size": 2}, [1, 1, 1, 1], [1, 0, 1, 0],
     "2 (detected: ParallelismConfig(dp_shard=2, cp=2); context parallel 2, sliced)"),
    ({"dp_replicate_size": 2, "dp_shard_size": 2}, [1, 1, 1, 1], [1, 1, 1, 1], "4 (every rank)"),  # HSDP
])
def test_the_trainer_arguments_parallelism_config_is_read_for_every_rank(monkeypatch, sizes, counted, rows_counted,
                                                                         tag):
    """The layout read from real TrainingArguments holding a real ParallelismConfig, as each of 4 ranks
    (told by the launcher's RANK and WORLD_SIZE) would read it, and which ranks' counts are then added."""
    from accelerate import ParallelismConfig
    from transformers import TrainingArguments

    from stream_metrics import layout as layouts
    from stream_metrics.hf import detect_layout

    args = TrainingArguments("out", parallelism_config=ParallelismConfig(**sizes), use_cpu=True, report_to="none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    found = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        layout = detect_layout(args, None) or layouts.Layout.every_rank()
        found.append({**layout.fields(), "tag": layout.describe(), "rows": int(not layout.rows_counted_elsewhere)})
    assert layouts.weights(found) == counted
    assert [f["rows"] for f in found] == rows_counted
    assert {f["tag"] for f in found} == {tag}
