"""The plain-loop helper: the example end to end, every epoch source, state, both backends alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

import stream_metrics
import tiny
from conftest import ROOT, assert_conformant, mlflow_rows, wandb_rows, wandb_run_dirs


def texts_loader(dataset, batch_size=10):
    return DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: {"text": [x["text"] for x in b]})


def stream(paths):
    import datasets

    fmt = "json" if paths[0].endswith(".jsonl") else "parquet"
    return datasets.load_dataset(fmt, data_files=paths, split="train", streaming=True)


def epochs_during_a_pass(run, loader):
    seen = []
    for i, _ in enumerate(run.iterate(loader)):
        if i % 5 == 4:
            p = run.progress
            seen.append((p.samples, p.epoch, p.epoch_source))
    return seen


@pytest.mark.slow
def test_the_example_trains_and_both_runs_conform_with_the_ground_truth(workdir):
    env = {k: v for k, v in os.environ.items() if not (k.startswith("WANDB") and "SERVICE" in k)}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "plain_loop.py"), "--out", "out",
                           "--passes", "2"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = tiny.read_texts(sorted(str(p) for p in (workdir / "out" / "data").glob("*.jsonl")))
    samples, tokens = 2 * len(texts), 2 * sum(tiny.token_count(t) for t in texts)
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout and "wandb sync" in done.stdout
    assert_conformant("--mlflow-uri", f"sqlite:///{workdir}/mlflow.db", "--experiment", "stream_metrics_plain_loop",
                      "--expect-samples", samples, "--expect-tokens", tokens, "--expect-epoch", 2.0)
    [folder] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", folder, "--expect-samples", samples, "--expect-tokens", tokens,
                      "--expect-epoch", 2.0)


def test_without_any_size_the_epoch_counts_passes_then_uses_the_measured_pass(workdir):
    # Interleaving two sources leaves no single shard position: nothing is known until the pass ends.
    import datasets

    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(30,))
    ds = datasets.interleave_datasets([stream(paths[:1]), stream(paths[1:])])
    with stream_metrics.init(backend="none") as run:
        first = epochs_during_a_pass(run, texts_loader(ds))
        assert {source for _, _, source in first} == {"none"} and {e for _, e, _ in first} == {0.0}
        assert (run.progress.epoch, run.progress.epoch_source) == (1.0, "pass")
        pass_size = run.progress.samples  # interleaving stops when the first source runs out
        second = epochs_during_a_pass(run, texts_loader(ds))
        assert [round(e, 6) for s, e, _ in second] == [round(s / pass_size, 6) for s, _, _ in second]
        assert run.progress.epoch == 2.0


def test_passes_of_different_sizes_end_on_whole_epochs_and_move_by_their_mean(workdir):
    """A shuffled interleave that stops at the first exhausted source: each pass (set_epoch) holds
    another number of examples. Each pass end is a whole epoch; within a pass the epoch is the samples
    over the mean of the passes ended so far (counted here by reading each pass on its own)."""
    import datasets

    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(40,))

    def mixed():
        a, b = stream(paths[:1]), stream(paths[1:])
        return datasets.interleave_datasets([a, b], probabilities=[0.5, 0.5], seed=3,
                                            stopping_strategy="first_exhausted").shuffle(seed=1, buffer_size=8)

    truth, sizes = mixed(), []
    for k in range(4):
        truth.set_epoch(k)
        sizes.append(sum(1 for _ in truth))
    assert len(set(sizes)) > 1, sizes  # the data must differ from pass to pass, or this tests nothing
    ds = mixed()
    with stream_metrics.init(backend="none") as run:
        for k in range(4):
            ds.set_epoch(k)
            during = epochs_during_a_pass(run, texts_loader(ds, batch_size=3))
            if k:
                mean = sum(sizes[:k]) / k
                assert [e for _, e, _ in during] == [
                    pytest.approx(min(s / mean, k + 1 - 1e-9)) for s, _, _ in during]
                assert all(k <= e < k + 1 for _, e, _ in during)
            assert (run.progress.samples, run.progress.epoch) == (sum(sizes[:k + 1]), k + 1)


def test_a_sized_loader_gives_progress_in_its_own_batches(workdir):
    data = [{"text": "x" * n} for n in range(1, 36)]  # 35 examples: 4 batches of 10, the last partial
    loader = texts_loader(data)
    with stream_metrics.init(backend="none") as run:
        for i, _ in enumerate(run.iterate(loader)):
            p = run.progress
            assert p.epoch_source == "sized" and p.epoch == pytest.approx((i + 1) / 4)
        assert (run.progress.epoch, run.progress.epoch_source) == (1.0, "pass")


def flattened_examples(count=22, seed=7):
    """``count`` examples of 3 to 11 token ids: 22 in batches of 4 end with a partial batch of 2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (count,), generator=g).tolist()
    return [{"input_ids": list(range(1, n + 1))} for n in lengths]


class ExamplesByIndex(torch.utils.data.Dataset):
    """A user's own map-style dataset: its __getitem__ is not called by stream_metrics."""

    def __init__(self, items):
        self.items, self.calls = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls += 1
        return self.items[i]


@pytest.mark.parametrize("kind", ["list", "datasets", "own"])
def test_a_sized_dataset_of_examples_packed_by_the_collator_counts_examples(workdir, kind):
    # DataCollatorWithFlattening packs each batch of examples into one row; the dataset's length counts
    # examples, so the 'sized' epoch is the examples trained on over it (not the packed rows).
    import datasets
    from transformers import DataCollatorWithFlattening

    examples = flattened_examples()
    data = {"list": examples, "datasets": datasets.Dataset.from_list(examples),
            "own": ExamplesByIndex(examples)}[kind]
    loader = DataLoader(data, batch_size=4, collate_fn=DataCollatorWithFlattening())
    seen, rows = 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stream_metrics.init(backend="none", dataset=data) as run:
            for batch in loader:
                examples_in_batch = sum(1 for p in batch["position_ids"].reshape(-1).tolist() if p == 0)
                seen += examples_in_batch
                rows += batch["input_ids"].shape[0]
                run.update(batch)
                p = run.progress
                assert (p.samples, p.epoch_source) == (seen, "sized")
                assert p.epoch == pytest.approx(seen / len(examples))
    assert (seen, rows) == (22, 6)  # the ground truth: every example once, in 6 packed rows
    unknown = [w for w in caught if "cannot tell whether its items" in str(w.message)]
    assert len(unknown) == (1 if kind == "own" else 0)
    if kind == "own":
        assert data.calls == len(examples)  # the loader's calls only


def flatten_rope_planes(items):
    """Qwen-VL's padding-free batch: the examples end to end in one row, positions (3 planes, 1, length)."""
    return {"input_ids": torch.tensor([t for item in items for t in item["input_ids"]]).unsqueeze(0),
            "position_ids": torch.cat([torch.as_tensor(item["position_ids"]) for item in items], dim=1).unsqueeze(1)}


@pytest.mark.parametrize("kind", ["list", "datasets"])
def test_a_sized_dataset_of_examples_with_rope_planes_counts_examples(workdir, kind):
    # Each item is one example whose position_ids are Qwen-VL's 3 rope planes, (3, length): every plane
    # starts at 0, which is not a restart inside the example. The collator packs 4 examples a row.
    import datasets

    examples = []
    for item in flattened_examples():
        n = len(item["input_ids"])
        text = list(range(n))
        image = [0, 1] + [2] * (n - 2)  # an image's tokens share one temporal position
        examples.append({"input_ids": item["input_ids"], "position_ids": [image, text, text]})
    data = examples if kind == "list" else datasets.Dataset.from_list(examples)
    loader = DataLoader(data, batch_size=4, collate_fn=flatten_rope_planes)
    seen = 0
    with stream_metrics.init(backend="none", dataset=data) as run:
        for batch in loader:
            seen += sum(1 for i in range(batch["input_ids"].shape[1])
                        if batch["position_ids"][0, 0, i] == 0 and (i == 0 or batch["position_ids"][0, 0, i - 1] != 0))
            run.update(batch)
            p = run.progress
            assert (p.samples, p.epoch_source) == (seen, "sized")
            assert p.epoch == pytest.approx(seen / len(examples))
    assert seen == 22


def test_a_sized_dataset_of_packed_rows_counts_rows(workdir):
    # Items already packed (position_ids restart inside each): the length counts rows, each holding 2 or 3
    # examples, so the epoch is the rows read over it while samples count every packed example.
    items = []
    for i in range(10):
        parts = [4, 6] if i % 2 else [3, 3, 4]
        items.append({"input_ids": torch.arange(1, 11), "position_ids": torch.cat([torch.arange(n) for n in parts])})
    for data in (items, __import__("datasets").Dataset.from_list(
            [{k: v.tolist() for k, v in item.items()} for item in items]).with_format("torch")):
        loader = DataLoader(data, batch_size=4)  # 4, 4, 2 rows
        rows = samples = 0
        with stream_metrics.init(backend="none", dataset=data) as run:
            for batch in loader:
                rows += batch["input_ids"].shape[0]
                samples += int((batch["position_ids"] == 0).sum())
                run.update(batch)
                p = run.progress
                assert (p.samples, p.epoch_source, p.epoch) == (samples, "sized", pytest.approx(rows / 10))
        assert (rows, samples) == (10, 25)


@pytest.mark.parametrize("fmt", ["torch", None])
def test_a_stream_of_single_examples_counts_one_sample_each_with_one_warning(workdir, mlflow_uri, fmt):
    # A loop over a dataset's examples, not batches: each example's input_ids are one sequence (a 1-D
    # tensor with format "torch", a list of ints without). Each is one sample; before, a 1-D tensor
    # counted a sample per token and a list stopped the loop with an error.
    import datasets

    path = workdir / "tokens.jsonl"
    examples = []
    for i in range(23):
        n = 3 + (i * 5) % 11
        real = n - i % 3  # the last i % 3 positions are padding
        examples.append({"input_ids": [7 + (i + j) % 50 for j in range(real)] + [0] * (n - real),
                         "attention_mask": [1] * real + [0] * (n - real),
                         "labels": [-100] * 2 + [7 + (i + j) % 50 for j in range(2, real)] + [-100] * (n - real)})
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tokens = sum(sum(e["attention_mask"]) for e in examples)  # ground truth, from the lists
    loss_tokens = sum(sum(1 for v in e["labels"] if v != -100) for e in examples)
    ds = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)
    if fmt:
        ds = ds.with_format(fmt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}, pad_token_id=0) as run:
            seen = 0
            for _ in run.iterate(ds):
                seen += 1
                assert (run.progress.samples, run.progress.epoch_source) == (seen, "none")
                run.log({"loss": 1.0})
            assert seen == 23
            p = run.progress
            assert (p.samples, p.tokens, p.loss_tokens, p.epoch, p.epoch_source) == (
                23, tokens, loss_tokens if fmt else None, 1.0, "pass")
            run_id = run.run_ids["mlflow"]
    said = [str(w.message) for w in caught if "one sequence (1-D)" in str(w.message)]
    assert len(said) == 1 and "position_ids" in said[0], said
    rows = mlflow_rows(mlflow_uri, run_id)
    assert [int(r["progress/samples"]) for r in rows][:23] == list(range(1, 24))
    assert int(rows[-1]["progress/tokens"]) == tokens


def test_one_flattened_sequence_with_position_ids_counts_each_example_in_it(workdir):
    # The same 1-D form holding three examples, with their positions: counted as three (padding-free).
    parts = [4, 2, 5]
    batch = {"input_ids": torch.arange(1, 12), "position_ids": torch.cat([torch.arange(n) for n in parts])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "one example" warning: the positions say how many
        with stream_metrics.init(backend="none", pad_token_id=0) as run:
            run.update(batch)
            assert (run.progress.samples, run.progress.tokens) == (3, 11)


def test_a_user_size_is_used_until_a_pass_is_measured(workdir):
    paths = tiny.write_corpus(str(workdir / "d"), files=1, lines_per_file=(40,))
    with stream_metrics.init(backend="none", dataset_size=50) as run:  # a wrong guess: the pass shows it
        during = epochs_during_a_pass(run, texts_loader(stream(paths)))
        assert all(src == "user" and e == pytest.approx(s / 50) for s, e, src in during)
        p = run.progress
        assert (p.epoch, p.epoch_source) == (1.0, "pass")


def test_parquet_footers_give_the_size(workdir):
    paths = tiny.write_corpus(str(workdir / "d"), files=3, lines_per_file=(20, 25, 30), fmt="parquet")
    ds = stream(paths)
    with stream_metrics.init(backend="none", dataset=ds) as run:
        during = epochs_during_a_pass(run, texts_loader(ds))
        assert all(src == "metadata" and e == pytest.approx(s / 75) for s, e, src in during)


# ------------------------------------------------------------------ a stream repeated inside datasets
def lines_in(paths):
    """The examples in one pass, counted from the files themselves (ground truth)."""
    total = 0
    for path in paths:
        with open(path) as f:
            total += sum(1 for line in f if line.strip())
    return total


def test_a_stream_repeated_n_times_ends_n_passes_and_estimates_inside_them(workdir):
    """``ds.repeat(3)`` is three passes: its end says 3.0, not 1.0. The repeated stream's 111
    examples (23 + 14 a pass) fall in batches of 10 that straddle each repetition's end and leave a
    last partial batch. Read again, the epoch is the samples over the mean pass measured (37),
    exact, and stays below 6 until the loader ends there."""
    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(23, 14))
    size = lines_in(paths)
    assert size == 37
    ds = stream(paths).repeat(3)
    with stream_metrics.init(backend="none") as run:
        first = epochs_during_a_pass(run, texts_loader(ds))
        # No size is known inside the first loader's run: the passes ended in it are not seen yet.
        assert {(e, src) for _, e, src in first} == {(0.0, "none")}
        p = run.progress
        assert (p.samples, p.epoch, p.epoch_source) == (3 * size, 3.0, "pass")
        second = epochs_during_a_pass(run, texts_loader(ds))
        assert [e for _, e, _ in second] == [pytest.approx(s / size) for s, _, _ in second]
        assert [src for _, _, src in second] == ["pass"] * len(second)
        assert any(e > 4 for _, e, _ in second)  # past whole passes inside the loader's run
        p = run.progress
        assert (p.samples, p.epoch) == (6 * size, 6.0)


def test_a_size_given_for_a_repeated_stream_is_not_held_below_one_pass(workdir):
    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(23, 14))
    size = lines_in(paths)
    with stream_metrics.init(backend="none", dataset_size=size) as run:
        during = epochs_during_a_pass(run, texts_loader(stream(paths).repeat(3)))
        assert all(src == "user" and e == pytest.approx(s / size) for s, e, src in during)
        assert max(e for _, e, _ in during) > 2.5
        p = run.progress
        assert (p.samples, p.epoch, p.epoch_source) == (3 * size, 3.0, "pass")


def test_parquet_footers_give_the_size_of_one_repetition(workdir):
    paths = tiny.write_corpus(str(workdir / "d"), files=3, lines_per_file=(20, 25, 30), fmt="parquet")
    ds = stream(paths).repeat(2)
    with stream_metrics.init(backend="none", dataset=ds) as run:
        during = epochs_during_a_pass(run, texts_loader(ds))
        assert all(src == "metadata" and e == pytest.approx(s / 75) for s, e, src in during)
        assert max(e for _, e, _ in during) > 1.5
        assert (run.progress.epoch, run.progress.epoch_source) == (2.0, "pass")


@pytest.mark.parametrize("steps, samples, passes", [
    (lambda ds: ds.take(20).repeat(2), 40, 2),             # two passes over the first 20
    (lambda ds: ds.repeat(2).repeat(3), 6 * 37, 6),        # repeats multiply
    (lambda ds: ds.repeat(3).filter(lambda x: len(x["text"]) > 20), None, 3),  # three passes of what is kept
    (lambda ds: ds.repeat(3).take(50), 50, 1),             # 50 of 111: what the loader reads is the pass
    (lambda ds: ds.repeat(3).skip(100), 11, 1),
])
def test_how_many_passes_a_repeated_stream_holds_follows_its_steps(workdir, steps, samples, passes):
    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(23, 14))
    if samples is None:  # the filter's ground truth, from the files
        samples = 3 * sum(1 for t in tiny.read_texts(paths) if len(t) > 20)
    with stream_metrics.init(backend="none") as run:
        for _ in run.iterate(texts_loader(steps(stream(paths)))):
            pass
        p = run.progress
        assert (p.samples, p.epoch, p.epoch_source) == (samples, float(passes), "pass")


def test_a_stream_repeated_without_end_is_estimated_past_one_pass(workdir):
    """``repeat(None)`` never ends: a given size is the only measure, and is not held below 1."""
    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(23, 14))
    with stream_metrics.init(backend="none", dataset_size=37) as run:
        for i, _ in enumerate(run.iterate(texts_loader(stream(paths).repeat(None)))):
            if i == 19:
                break
        p = run.progress
        assert (p.samples, p.epoch, p.epoch_source) == (200, pytest.approx(200 / 37), "user")


def test_a_repeated_stream_resumed_inside_a_repetition_ends_at_its_whole_passes(workdir):
    """A checkpoint 5 batches in (one repetition and 13 examples of the next); the stream is resumed
    from its own state (datasets' state_dict), which finishes the repetitions left: the end is 3
    passes and 111 samples in all, as in one session."""
    paths = tiny.write_corpus(str(workdir / "d"), files=2, lines_per_file=(23, 14))
    ds = stream(paths).repeat(3)
    with stream_metrics.init(backend="none") as run:
        for i, _ in enumerate(run.iterate(texts_loader(ds))):
            if i == 4:
                break
        state, data_state = run.state_dict(), ds.state_dict()
    assert state["progress"]["samples"] == 50
    resumed = stream(paths).repeat(3)
    resumed.load_state_dict(data_state)
    with stream_metrics.init(backend="none", resume=state) as run:
        for _ in run.iterate(texts_loader(resumed)):
            pass
        p = run.progress
        assert (p.samples, p.epoch, p.epoch_source) == (111, 3.0, "pass")
        for _ in run.iterate(texts_loader(stream(paths).repeat(3))):
            pass
        assert (run.progress.samples, run.progress.epoch) == (222, 6.0)


def numbered_parquet(folder, sizes, row_group_size=None):
    """Parquet files of rows numbered on from 0 across the files (``n``) beside a text; their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    paths, start = [], 0
    for i, size in enumerate(sizes):
        path = os.path.join(folder, f"part-{i:03d}.parquet")
        pq.write_table(pa.table({"n": list(range(start, start + size)),
                                 "text": [f"row {k}" for k in range(start, start + size)]}), path,
                       row_group_size=row_group_size)
        paths.append(path)
        start += size
    return paths


@pytest.mark.parametrize("declared", ["footers", "card"])
def test_parquet_read_with_filters_takes_no_size_from_the_metadata(workdir, declared):
    """load_dataset(..., filters=) yields only the rows that pass the filter; the footers (and a
    dataset card's split size) still count every row: they say nothing of a pass. The filter keeps
    part of the second file and none of the third."""
    import datasets

    paths = numbered_parquet(str(workdir / "d" / "data"), (40, 40, 40))
    if declared == "card":
        (workdir / "d" / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n"
            "dataset_info:\n  features:\n  - name: n\n    dtype: int64\n  - name: text\n    dtype: string\n"
            "  splits:\n  - name: train\n    num_examples: 120\n    num_bytes: 2000\n---\n")
        ds = datasets.load_dataset(str(workdir / "d"), split="train", streaming=True, filters=[("n", "<", 50)])
    else:
        ds = datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True,
                                   filters=[("n", "<", 50)])
    import pyarrow.parquet as pq

    truth = sum(1 for path in paths for n in pq.read_table(path).column("n").to_pylist() if n < 50)
    with stream_metrics.init(backend="none", dataset=ds) as run:
        during = epochs_during_a_pass(run, texts_loader(ds, batch_size=5))
        assert "metadata" not in {src for _, _, src in during}, during
        assert (run.progress.samples, run.progress.epoch, run.progress.epoch_source) == (truth, 1.0, "pass")


def test_one_process_reading_a_shard_of_a_split_with_a_card_counts_only_its_files(workdir):
    """IterableDataset.shard() in a process that is the whole job: the card's split size counts all 4
    files, the shard reads 1 (35 rows of 35+40+25+30), so the footers of its own file give the size."""
    import datasets

    numbered_parquet(str(workdir / "d" / "data"), (35, 40, 25, 30))
    (workdir / "d" / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n"
        "dataset_info:\n  features:\n  - name: n\n    dtype: int64\n  - name: text\n    dtype: string\n"
        "  splits:\n  - name: train\n    num_examples: 130\n    num_bytes: 2000\n---\n")
    whole = datasets.load_dataset(str(workdir / "d"), split="train", streaming=True)
    assert whole.info.splits["train"].num_examples == 130  # the card is read
    part = whole.shard(num_shards=4, index=0)
    truth = sum(1 for _ in part)
    assert truth == 35
    with stream_metrics.init(backend="none", dataset=part) as run:
        during = epochs_during_a_pass(run, texts_loader(part, batch_size=6))
        assert during and all(src == "metadata" and e == pytest.approx(s / truth) for s, e, src in during), during
        assert (run.progress.samples, run.progress.epoch) == (truth, 1.0)


def test_resharded_parquet_counts_each_row_group_once(workdir):
    """IterableDataset.reshard() makes a shard of each row group: the reader then lists each file once
    per row group (100 rows in 4 row groups, 70 in 3, 30 in 2, the last of each shorter)."""
    paths = numbered_parquet(str(workdir / "d"), (100, 70, 30), row_group_size=25)
    ds = stream(paths).reshard()
    assert ds.num_shards == 9
    truth = sum(1 for _ in ds)
    with stream_metrics.init(backend="none", dataset=ds) as run:
        during = epochs_during_a_pass(run, texts_loader(ds, batch_size=8))
        assert during and all(src == "metadata" and e == pytest.approx(s / truth) for s, e, src in during), during
        assert (run.progress.samples, run.progress.epoch) == (truth, 1.0)


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_given_row_groups_of_one_file_each_count_their_own(workdir, ranks):
    """reshard().shard() gives each rank its own row groups of the same file (4 of 25, 25, 25, 23
    rows): each rank's metadata counts the rows it reads, and names other data than the other ranks',
    so that the estimate adds up every rank's count; copies of the same share name the same data."""
    from stream_metrics.epoch import metadata_size

    paths = numbered_parquet(str(workdir / "d"), (98,), row_group_size=25)
    shares = [stream(paths).reshard().shard(num_shards=ranks, index=rank) for rank in range(ranks)]
    read = [sum(1 for _ in share) for share in shares]
    assert sum(read) == 98
    counted = [metadata_size(share) for share in shares]
    assert [rows for rows, _ in counted] == read
    assert len({name for _, name in counted}) == ranks, counted
    assert [metadata_size(stream(paths).reshard().shard(num_shards=ranks, index=rank))
            for rank in range(ranks)] == counted


def test_the_shard_position_estimates_the_epoch_while_the_first_pass_runs(workdir):
    """Small files are read a whole file ahead (datasets 4 and later hand examples on through a
    rebatching step): the position is where the examples handed on stand, so shards of one size
    give the exact epoch from the second shard on. The first row in a shard has none: the state there
    reads alike at the file's first example (after a shorter last table) and further in its first
    table, and no earlier row saw the reader in that shard."""
    paths = tiny.write_corpus(str(workdir / "d"), files=4, lines_per_file=(100,))
    with stream_metrics.init(backend="none") as run:
        during = epochs_during_a_pass(run, texts_loader(stream(paths)))
        estimated = [(s, e) for s, e, src in during if src == "shards"]
        assert [s for s, _ in estimated] == [200, 300, 400]  # the second row in each shard from the second on
        for samples, epoch in estimated:
            assert abs(epoch - samples / 400) <= 2e-9 and epoch < 1, (samples, epoch)
        assert run.progress.epoch_source == "pass"


def numbered_rows(shards, size):
    for shard in shards:
        for k in range(size):
            yield {"text": f"row {shard * size + k}"}


@pytest.mark.parametrize("source", ["files", "generator"])
def test_a_shuffle_buffer_over_one_input_shard_gives_no_position_ahead_of_the_examples(workdir, source):
    """shuffle(max_buffer_input_shards=1) is a buffer over the reader of the shards in turn: the reader
    stands up to a buffer ahead of the examples handed on (a whole 100-row shard ahead at first, with
    a buffer of 50), and the buffer's state does not say how many it holds. Any estimate must be the
    samples over the pass, counted here by reading the same stream."""
    import datasets

    if source == "files":
        paths = tiny.write_corpus(str(workdir / "d"), files=4, lines_per_file=(100,))
        plain = stream(paths)
    else:
        plain = datasets.IterableDataset.from_generator(numbered_rows, gen_kwargs={"shards": [0, 1, 2, 3],
                                                                                  "size": 100})
    ds = plain.shuffle(seed=0, buffer_size=50, max_buffer_input_shards=1)
    total = sum(1 for _ in ds)
    with stream_metrics.init(backend="none") as run:
        during = epochs_during_a_pass(run, texts_loader(ds, batch_size=5))
        wrong = [(s, e, src) for s, e, src in during if src != "none" and abs(e - s / total) > 2e-9]
        assert not wrong, wrong
        assert (run.progress.samples, run.progress.epoch, run.progress.epoch_source) == (total, 1.0, "pass")


@pytest.mark.parametrize("chunksize", [None, 700])
def test_after_each_example_the_position_is_the_files_examples_handed_on(workdir, chunksize):
    """Files of other sizes (1 and 5 examples among them), read whole or in several tables each
    (``chunksize`` in bytes): after each example, the position is its file and the examples of that
    file handed on up to it, the first example of a file after a shorter one or after a shorter last
    table included."""
    import datasets

    from stream_metrics.epoch import shard_position

    sizes = (37, 5, 120, 1, 64)
    paths = tiny.write_corpus(str(workdir / "d"), files=5, lines_per_file=sizes)
    ds = datasets.load_dataset("json", data_files=paths, split="train", streaming=True,
                               **({"chunksize": chunksize} if chunksize else {}))
    truth = [(shard, k + 1, 5) for shard, size in enumerate(sizes) for k in range(size)]
    assert [shard_position(ds) for _ in ds] == truth


def test_equal_files_read_in_several_tables_give_the_exact_epoch_or_none(workdir):
    """4 files of 200 examples, each read in tables of ~3000 bytes, the last one shorter: a row at
    every batch of 3, so rows fall on a file's first example. An estimate is the samples over the 800
    examples of a pass; where the state cannot tell the first example of a file from a later one of
    its first table (no row fell on the last table before), the row has none: at most one row a file."""
    import datasets

    paths = tiny.write_corpus(str(workdir / "d"), files=4, lines_per_file=(200,))
    total = len(tiny.read_texts(paths))
    ds = datasets.load_dataset("json", data_files=paths, split="train", streaming=True, chunksize=3000)
    rows = []
    with stream_metrics.init(backend="none") as run:
        for _ in run.iterate(texts_loader(ds, batch_size=3)):
            rows.append((run.progress.samples, run.progress.epoch, run.progress.epoch_source))
        assert (run.progress.samples, run.progress.epoch, run.progress.epoch_source) == (total, 1.0, "pass")
    wrong = [(s, e, src) for s, e, src in rows if src == "shards" and abs(e - s / total) > 2e-9]
    assert not wrong, wrong
    held = [s for s, _, src in rows if src == "none" and s > 200]  # the first file gives no estimate
    assert len(held) <= 3, held


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reading_one_example_in_two_is_positioned_in_its_own_examples(workdir, rank):
    """split_dataset_by_node with 3 files and 2 ranks: each rank reads every file and keeps the
    examples whose index in the whole stream is its rank modulo 2. Files of odd sizes shift which
    rank a file's first example belongs to. After each example, the position in its file counts that
    rank's examples of the file up to it (what the rank has read of the file), as the data says."""
    from datasets.distributed import split_dataset_by_node

    from stream_metrics.epoch import shard_position

    sizes = (31, 23, 17)
    paths = tiny.write_corpus(str(workdir / "d"), files=3, lines_per_file=sizes)
    share = split_dataset_by_node(stream(paths), rank=rank, world_size=2)
    if not hasattr(share, "state_dict"):
        pytest.skip("datasets before 2.20 has no IterableDataset.state_dict()")
    starts = [sum(sizes[:k]) for k in range(3)]
    mine = [index for index in range(sum(sizes)) if index % 2 == rank]
    texts = tiny.read_texts(paths)
    for example, index in zip(share, mine, strict=True):
        assert example["text"] == texts[index]
        shard = max(k for k in range(3) if starts[k] <= index)
        read = sum(1 for other in mine if starts[shard] <= other <= index)
        assert shard_position(share) == (shard, read, 3), (index, shard_position(share))


def test_a_rank_reading_one_example_in_two_gets_the_exact_shards_epoch_of_its_share(workdir):
    from datasets.distributed import split_dataset_by_node

    paths = tiny.write_corpus(str(workdir / "d"), files=3, lines_per_file=(40,))
    share = split_dataset_by_node(stream(paths), rank=1, world_size=2)  # 20 examples of each file, 60 in all
    if not hasattr(share, "state_dict"):
        pytest.skip("datasets before 2.20 has no IterableDataset.state_dict()")
    with stream_metrics.init(backend="none") as run:
        during = epochs_during_a_pass(run, texts_loader(share, batch_size=2))
        estimated = [(s, e) for s, e, src in during if src == "shards"]
        # A row every 10 examples: the second in each file from the second file on (the first has none).
        assert [s for s, _ in estimated] == [40, 60]
        assert all(abs(epoch - samples / 60) <= 2e-9 for samples, epoch in estimated), estimated
        assert (run.progress.samples, run.progress.epoch, run.progress.epoch_source) == (60, 1.0, "pass")


def test_the_epoch_source_tag_follows_the_best_source(workdir, mlflow_uri):
    paths = tiny.write_corpus(str(workdir / "d"), files=8, lines_per_file=(50,))
    with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
        for i, _ in enumerate(run.iterate(texts_loader(stream(paths)))):
            if i % 5 == 4:
                run.log({"loss": 1.0})
        run.log({"loss": 0.5})
        ids = run.run_ids
    tags = MlflowClient(mlflow_uri).get_run(ids["mlflow"]).data.tags
    assert tags["stream_metrics.epoch_source"] == "pass"
    sources = [r["progress/epoch"] for r in mlflow_rows(mlflow_uri, ids["mlflow"])]
    assert sources[0] == 0.0 and sources[-1] == 1.0
    [folder] = wandb_run_dirs(workdir)
    assert_conformant("--wandb-run", folder, "--no-tokens")


def test_a_state_dict_round_trip_continues_every_axis_exactly(workdir, mlflow_uri):
    ids = torch.randint(3, 50, (4, 16))
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with stream_metrics.init(backend="mlflow", gradient_accumulation_steps=2, dataset_size=100,
                             mlflow={"tracking_uri": mlflow_uri}) as run:
        for _ in range(6):
            run.update(batch)
        run.log({"loss": 1.0})
        saved = json.loads(json.dumps(run.state_dict()))  # plain JSON: a user's own checkpoint
        before = run.progress
    resumed = stream_metrics.init(backend="mlflow", gradient_accumulation_steps=2, dataset_size=100,
                                  mlflow={"tracking_uri": mlflow_uri}, resume=saved)
    with resumed as run:
        assert run.progress.samples == before.samples and run.progress.step == before.step
        for _ in range(2):
            run.update(batch)
        after = run.log({"loss": 0.5})
        assert run.run_ids == saved["run_ids"]
    assert (after.step, after.samples, after.tokens, after.loss_tokens) == (4, 32, 384, 384)
    assert after.epoch == pytest.approx(0.32) and after.wall_clock >= saved["progress"]["wall_clock"]
    assert_conformant("--mlflow-uri", mlflow_uri, "--run-id", saved["run_ids"]["mlflow"], "--expect-samples", 32)


def test_keys_are_sanitised_the_same_way_for_both_backends(workdir, mlflow_uri):
    odd = {"eval/ä acc": 1.0, "/lead": 2.0, "a//b": 3.0, "x@y": 4.0, "x#y": 5.0, "ok/key": 6.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
            run.update(samples=4, tokens=40)
            run.log(odd)
            ids = run.run_ids
    stored_mlflow = {k for k in MlflowClient(mlflow_uri).get_run(ids["mlflow"]).data.metrics
                     if not k.startswith(("progress/", "throughput/"))}
    [folder] = wandb_run_dirs(workdir)
    stored_wandb = {k for row in wandb_rows(folder) for k in row if k != "run"
                    and not k.startswith(("progress/", "throughput/"))}
    assert stored_mlflow == stored_wandb and len(stored_mlflow) == len(odd)
    assert "ok/key" in stored_mlflow


def test_a_backend_whose_library_is_missing_names_the_extra(workdir):
    code = ("import sys; sys.modules['mlflow'] = None; sys.modules['wandb'] = None\n"
            "sys.modules['transformers'] = None; sys.modules['datasets'] = None\n"
            "import stream_metrics\n"
            "with stream_metrics.init(backend='none') as run: run.update(samples=1)\n"
            "for name in ('mlflow', 'wandb'):\n"
            "    try:\n"
            "        stream_metrics.init(backend=name)\n"
            "    except ImportError as e:\n"
            "        print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert "pip install 'stream_metrics[mlflow]'" in done.stdout
    assert "pip install 'stream_metrics[wandb]'" in done.stdout


def test_bad_settings_fail_at_init_with_the_fix(workdir):
    with pytest.raises(ValueError, match="x_axis='batches' is not a progress axis"):
        stream_metrics.init(backend="none", x_axis="batches")
    with pytest.raises(ValueError, match="backend='tensorboard' is not known"):
        stream_metrics.init(backend="tensorboard")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0"):
        stream_metrics.init(backend="none", gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="mlflow_step='epoch'"):
        stream_metrics.init(backend="none", mlflow_step="epoch")


def test_a_run_that_ends_with_its_pass_stores_the_whole_epoch_and_its_source(workdir, mlflow_uri):
    """The README's loop over one pass, a row every 4 batches of a pass of 8: the pass ends after the last
    row, changing only the epoch (0 -> 1) and its source (none -> pass); finish() must store them."""
    texts = [{"text": f"text {i}"} for i in range(80)]
    with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
        for i, _ in enumerate(run.iterate(texts_loader(texts)), start=1):
            if i % 4 == 0:
                run.log({"loss": 1.0 / i})
        ids = run.run_ids
    rows = mlflow_rows(mlflow_uri, ids["mlflow"])
    assert [(r["progress/samples"], r["progress/epoch"]) for r in rows][-1] == (80, 1.0)
    assert MlflowClient(mlflow_uri).get_run(ids["mlflow"]).data.tags["stream_metrics.epoch_source"] == "pass"
    [folder] = wandb_run_dirs(workdir)
    assert [(r["progress/samples"], r["progress/epoch"]) for r in wandb_rows(folder)][-1] == (80, 1.0)
