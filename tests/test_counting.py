"""Counting samples and tokens from every common batch shape, with no host sync between rows."""
from __future__ import annotations

import math
import os
import threading
import warnings

import pytest
import torch

import stream_metrics
from stream_metrics.counting import read_batch
from support import SyncCounter


def ids_and_mask(lengths, width=12, pad=0):
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(2, 2 + n)
        mask[i, :n] = 1
    return ids, mask


def totals(run):
    p = run.progress
    return p.samples, p.tokens, p.loss_tokens


def test_a_dict_batch_counts_samples_and_tokens_from_the_mask():
    ids, mask = ids_and_mask([3, 7, 12])
    with stream_metrics.init(backend="none") as run:
        run.update({"input_ids": ids, "attention_mask": mask})
        assert totals(run) == (3, 22, None)


def test_a_batch_encoding_counts_like_a_dict():
    from transformers import BatchEncoding

    ids, mask = ids_and_mask([5, 1])
    with stream_metrics.init(backend="none") as run:
        run.update(BatchEncoding({"input_ids": ids, "attention_mask": mask}))
        assert totals(run) == (2, 6, None)


def test_tokens_from_the_pad_id_when_there_is_no_mask():
    ids, _ = ids_and_mask([4, 9], pad=0)
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        run.update({"input_ids": ids})
        run.update((ids,))  # a tuple: its first element is the ids
        run.update(ids)     # a bare tensor
        assert totals(run) == (6, 39, None)


def test_without_mask_or_pad_id_every_token_counts_with_one_warning():
    ids, _ = ids_and_mask([4, 9])
    with stream_metrics.init(backend="none") as run:
        with pytest.warns(UserWarning, match="every token counts") as caught:
            run.update({"input_ids": ids})
            run.update({"input_ids": ids})
        assert len([w for w in caught if "every token" in str(w.message)]) == 1
        assert totals(run) == (4, 48, None)


def test_loss_tokens_count_labels_that_are_not_ignored():
    ids, mask = ids_and_mask([3, 5])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 0] = -100
    with stream_metrics.init(backend="none") as run:
        run.update({"input_ids": ids, "attention_mask": mask, "labels": labels})
        assert totals(run) == (2, 8, 7)


def test_packed_batches_count_every_packed_example():
    # Three examples of lengths 4, 2, 3 laid end to end in one row, as padding-free packing does.
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    batch = {"input_ids": torch.arange(9).unsqueeze(0), "position_ids": position_ids}
    flash = {"input_ids": torch.arange(9).unsqueeze(0), "cu_seq_lens_q": torch.tensor([0, 4, 6, 9])}
    with stream_metrics.init(backend="none") as run, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.update(batch)
        run.update(flash)
        assert totals(run)[:2] == (6, 18)


def test_ragged_lists_and_lists_of_examples_are_counted():
    with stream_metrics.init(backend="none") as run:
        run.update([[1, 2, 3], [4], [5, 6]])
        run.update([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}])
        assert totals(run)[:2] == (5, 11)


def test_explicit_counts_override_what_the_batch_says():
    ids, mask = ids_and_mask([3, 7])
    with stream_metrics.init(backend="none") as run:
        run.update({"input_ids": ids, "attention_mask": mask}, samples=5, tokens=50)
        run.update(samples=1, tokens=torch.tensor(4))
        assert totals(run)[:2] == (6, 54)


def test_gradient_accumulation_makes_one_step_of_n_updates():
    with stream_metrics.init(backend="none", gradient_accumulation_steps=4) as run:
        for _i in range(10):
            run.update(samples=2, tokens=10)
        p = run.progress
        assert (p.step, p.samples, p.tokens) == (2, 20, 100)


def test_a_batch_with_nothing_countable_warns_and_training_goes_on():
    with stream_metrics.init(backend="none") as run:
        with pytest.warns(UserWarning, match="cannot count an empty batch"):
            run.update({})
        with pytest.warns(UserWarning, match="cannot count"):
            run.update(object())
        run.update(samples=3)
        assert run.progress.samples == 3


def test_a_mask_of_the_wrong_shape_is_named_and_the_ids_are_used():
    ids, mask = ids_and_mask([3, 7])
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        with pytest.warns(UserWarning, match="does not match"):
            run.update({"input_ids": ids, "attention_mask": mask[:, :5]})
        assert totals(run)[:2] == (2, 10)


def test_read_batch_keeps_device_counts_as_tensors():
    ids, mask = ids_and_mask([3, 7])
    counts = read_batch({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert counts.samples == 2 and isinstance(counts.tokens, torch.Tensor)


@pytest.mark.parametrize("where", ["device", "host"])
def test_update_never_syncs_with_the_device_and_a_row_syncs_once(monkeypatch, where):
    """On a device, a row reads every count (and tensor metric) in one ``tolist``; in host memory,
    where a read waits for nothing, each is read with ``item`` (fewer ops). This machine has no GPU:
    the device's path is taken by saying the tensors are not on the host."""
    from stream_metrics import distributed

    if where == "device":
        monkeypatch.setattr(distributed, "_on_host", lambda tensors: False)
    ids, mask = ids_and_mask([3, 7, 12])
    batch = {"input_ids": ids.as_subclass(SyncCounter), "attention_mask": mask.as_subclass(SyncCounter),
             "labels": ids.as_subclass(SyncCounter),
             "position_ids": torch.arange(12).repeat(3, 1).as_subclass(SyncCounter)}
    SyncCounter.syncs = 0
    with stream_metrics.init(backend="none") as run:
        for _ in range(50):
            run.update(batch)
        assert SyncCounter.syncs == 0, "update() made the host wait for the device"
        waits = []
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu"):
                original = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                          (waits.append(_n), _f(self, *a, **k))[1])
            progress = run.log({"loss": torch.tensor(0.25)})
        if where == "device":
            assert waits == ["tolist"], f"a row should read every count in one host sync, saw {waits}"
        else:  # samples, tokens and loss tokens (with no backend, the loss is not read at all)
            assert waits == ["item"] * 3, f"host tensors are read one by one, with nothing else: saw {waits}"
    assert (progress.samples, progress.tokens, progress.loss_tokens) == (150, 1100, 1800)


# ---------------------------------------------------------------- packed (padding-free) batches from TRL's collator
def trl_packed(examples, pad, multiple=16):
    """TRL's own padding-free collator on token lists, as SFTTrainer(padding_free=True) uses it."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True, pad_to_multiple_of=multiple)
    return collator([{"input_ids": list(e)} for e in examples])


EOS = 1
# Four examples that end with eos, 14 tokens in all: the collator pads them to 16.
FOUR = [[5, 6, 7, EOS], [8, 9, EOS], [3, 4, 5, 6, EOS], [7, EOS]]


@pytest.mark.parametrize("pad", [EOS, 0], ids=["pad==eos", "pad!=eos"])
@pytest.mark.parametrize("drop", [None, "cu_seq_lens_q", "position_ids"])
def test_a_trl_padding_free_batch_counts_examples_and_tokens_not_its_pad_tail(pad, drop):
    pytest.importorskip("trl")
    batch = trl_packed(FOUR, pad)
    assert batch["input_ids"].shape == (1, 16)  # the collator added two pad tokens
    if drop:
        batch.pop(drop)
    samples, tokens = len(FOUR), sum(len(e) for e in FOUR)  # truth from the examples: 4, 14
    with stream_metrics.init(backend="none", pad_token_id=pad) as run:
        run.update(batch)
        run.update(batch)
        assert totals(run)[:2] == (2 * samples, 2 * tokens)


def test_a_padding_free_batch_without_a_known_pad_id_uses_the_labels():
    pytest.importorskip("trl")
    batch = trl_packed(FOUR, EOS)
    with stream_metrics.init(backend="none") as run:  # no pad_token_id: the pad tail's labels are -100
        run.update(batch)
        assert totals(run)[:2] == (4, 14)


# ---------------------------------------------------------------- multimodal rope, left padding
def test_mrope_positions_count_rows_not_planes():
    # Qwen-VL: (3, batch, length). Row 0 starts with an image of 4 tokens, which share temporal position 0;
    # row 1 is text only. Two examples, whatever the planes hold.
    temporal = torch.tensor([[0, 0, 0, 0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 0]])
    positions = torch.stack([temporal, temporal + 1, temporal + 2])
    positions[:, :, :4] = torch.tensor([0, 0, 0, 0])[None, None]  # the image's rows/cols, simplified
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    ids = torch.full((2, 8), 7)
    with stream_metrics.init(backend="none") as run:
        run.update({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        assert totals(run)[:2] == (2, 14)


def test_text_positions_first_in_four_planes_count_packed_examples():
    # (4, batch, length): the first plane holds text positions (transformers' packed Qwen-VL layout).
    text = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    positions = torch.cat([text[None], torch.zeros(3, 1, 9, dtype=torch.long)])
    with stream_metrics.init(backend="none") as run:
        run.update({"input_ids": torch.arange(2, 11)[None], "position_ids": positions})
        assert totals(run)[:2] == (3, 9)


@pytest.mark.parametrize("style", ["generate", "clamped"])
def test_left_padded_positions_without_a_mask_count_each_row_once(style):
    lengths = [3, 7, 5]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 8 - n:] = 1
    ids = torch.where(mask == 1, 9, 0)
    positions = mask.cumsum(-1) - 1
    # transformers' generate puts 1 on the padding; other code clamps at 0.
    positions = positions.masked_fill(mask == 0, 1) if style == "generate" else positions.clamp(min=0)
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        run.update({"input_ids": ids, "position_ids": positions})
        assert totals(run)[:2] == (len(lengths), sum(lengths))


# ---------------------------------------------------------------- other batch forms and explicit counts
def test_a_list_of_token_tensors_counts_like_the_dict_form():
    sequences = [torch.tensor([4, 5, 6]), torch.tensor([7, 8])]
    with stream_metrics.init(backend="none") as run:
        run.update(sequences)
        assert totals(run)[:2] == (2, 5)
        run.update({"input_ids": sequences})
        assert totals(run)[:2] == (4, 10)


def test_float_tensor_counts_are_rounded_on_the_device_with_one_warning():
    with stream_metrics.init(backend="none") as run:
        with pytest.warns(UserWarning, match="rounded on the device") as caught:
            run.update(samples=2, tokens=torch.tensor(5.0))
            run.update(samples=torch.tensor([1.0]), tokens=torch.tensor(4.9999, dtype=torch.float64))
        assert len([w for w in caught if "tokens=" in str(w.message)]) == 1
        assert totals(run)[:2] == (3, 10)


@pytest.mark.parametrize("bad", [-1, 2.5, "3", float("nan"), True, torch.ones(2)])
def test_a_bad_explicit_count_is_a_clear_error_at_once(bad):
    with stream_metrics.init(backend="none") as run:
        with pytest.raises(ValueError, match="a count must be"):
            run.update(samples=bad)
        assert run.progress.samples == 0


def test_int64_counts_are_read_exactly_beyond_float64_precision():
    big = 2 ** 53 + 1  # not a float64
    with stream_metrics.init(backend="none") as run:
        run.update(samples=torch.tensor(big), tokens=torch.tensor(big + 2))
        assert totals(run)[:2] == (big, big + 2)


class NoFloat64(torch.Tensor):
    """A device without float64, as Apple's MPS: any float64 result from it fails."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            raise TypeError("this device has no float64")
        return out


def test_a_row_never_makes_float64_tensors_of_device_counts():
    ids, mask = ids_and_mask([3, 7])
    batch = {"input_ids": ids.as_subclass(NoFloat64), "attention_mask": mask.as_subclass(NoFloat64)}
    with stream_metrics.init(backend="none") as run:
        run.update(batch)
        progress = run.log({"loss": torch.tensor(0.5).as_subclass(NoFloat64)})
    assert (progress.samples, progress.tokens) == (2, 10)


# ---------------------------------------------------------------- steps follow the optimizer
def test_a_window_cut_by_a_pass_end_still_makes_a_step():
    loader = [{"input_ids": torch.ones(2, 3, dtype=torch.long)} for _ in range(7)]
    with stream_metrics.init(backend="none", gradient_accumulation_steps=4) as run:
        for _ in range(2):
            for _ in run.iterate(loader):
                pass
        # Each pass of 7 micro-batches: a window of 4, then one of 3 that the pass end closes.
        assert run.progress.step == 2 * math.ceil(7 / 4)
        for _ in range(7):
            run.update(samples=2)
        run.end_pass()
        assert (run.progress.step, run.progress.samples) == (6, 42)


def test_a_batch_that_cannot_be_counted_still_moves_the_steps():
    with stream_metrics.init(backend="none", gradient_accumulation_steps=2) as run:
        run.update(samples=1)
        with pytest.warns(UserWarning, match="cannot count"):
            run.update(object())
        assert (run.progress.step, run.progress.samples) == (1, 1)


# ---------------------------------------------------------------- a row with tensor metrics: one sync
@pytest.mark.parametrize("where", ["device", "host"])
def test_a_row_with_five_tensor_metrics_syncs_once(monkeypatch, where):
    """One wait on a device; in host memory each value is read with ``item``, waiting for nothing
    (the device's path is taken here, with no GPU, by saying the tensors are not on the host)."""
    from stream_metrics import distributed

    if where == "device":
        monkeypatch.setattr(distributed, "_on_host", lambda tensors: False)
    ids, mask = ids_and_mask([3, 7, 12])
    batch = {"input_ids": ids.as_subclass(SyncCounter), "attention_mask": mask.as_subclass(SyncCounter),
             "labels": ids.as_subclass(SyncCounter)}
    values = [2.25, 0.001, 7.5, 1e-8, 3.0]
    metrics = {f"m{i}": torch.tensor(v).as_subclass(SyncCounter) for i, v in enumerate(values)}
    metrics["m4"] = metrics["m4"].to(torch.bfloat16)
    metrics["step_count"] = torch.tensor(11).as_subclass(SyncCounter)
    with stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": "sqlite:///mlflow.db"}) as run:
        run.update(batch)
        SyncCounter.syncs = 0
        # Every wait the training thread makes (backends have threads of their own); SyncCounter counts
        # every way a tensor can be read on the host.
        waits, training = [], threading.get_ident()
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu"):
                original = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                          (threading.get_ident() == training and waits.append(_n),
                           _f(self.as_subclass(torch.Tensor), *a, **k))[1])
            run.log(metrics)
        if where == "device":
            assert waits == ["tolist"], f"a row with five tensor metrics should wait once, saw {waits}"
        else:  # tokens, loss tokens and the six tensor metrics (the samples are the rows: a host int)
            assert waits == ["item"] * 8, f"host tensors are read one by one, with nothing else: saw {waits}"
        run_id = run.run_ids["mlflow"]
    from mlflow import MlflowClient

    # (MLflow keeps a store per URI text in a process: a relative one would be an earlier folder's.)
    stored = MlflowClient(f"sqlite:///{os.path.abspath('mlflow.db')}").get_run(run_id).data.metrics
    for i, v in enumerate(values):  # each read exactly as float32 holds it (bf16 for m4)
        dtype = torch.bfloat16 if i == 4 else torch.float32
        assert stored[f"m{i}"] == pytest.approx(float(torch.tensor(v, dtype=dtype)), rel=1e-7)
    assert stored["step_count"] == 11 and stored["progress/samples"] == 3 and stored["progress/tokens"] == 22


# ---------------------------------------------------------------- the epoch never comes from stale metadata
def parquet_stream(folder, rows_per_file=(100, 100, 100)):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    paths, start = [], 0
    for i, n in enumerate(rows_per_file):
        paths.append(str(folder / f"part-{i}.parquet"))
        pq.write_table(pa.table({"n": list(range(start, start + n))}), paths[-1])
        start += n
    return datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True)


def four_of_each(batch):
    return {"n": [n for n in batch["n"] for _ in range(4)]}


def read_rows(run, dataset, rows, batch_size=10):
    from torch.utils.data import DataLoader

    run.watch(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: {"n": [x["n"] for x in b]})
    seen = []
    for _i, batch in enumerate(loader):
        run.update(samples=len(batch["n"]))
        p = run.progress
        seen.append((p.samples, p.epoch, p.epoch_source))
        if p.samples >= rows:
            return seen
    raise AssertionError("the stream ended early")


@pytest.mark.parametrize("step", ["batched map", "batch", "filter"])
def test_a_resizing_step_makes_the_files_metadata_and_shard_position_unusable(workdir, step):
    datasets = pytest.importorskip("datasets")
    if step == "batch" and not hasattr(datasets.IterableDataset, "batch"):
        pytest.skip(f"datasets {datasets.__version__} has no IterableDataset.batch()")
    ds = parquet_stream(workdir / "data")  # 300 rows in three files: the footers say 300
    ds = {"batched map": lambda: ds.map(four_of_each, batched=True, batch_size=7),
          "batch": lambda: ds.batch(batch_size=3),
          "filter": lambda: ds.filter(lambda row: row["n"] % 3 == 0)}[step]()
    truth = {"batched map": 1200, "batch": 100, "filter": 100}[step]  # rows in one pass, from the data
    target = {"batched map": 600, "batch": 50, "filter": 50}[step]
    with stream_metrics.init(backend="none") as run:
        seen = read_rows(run, ds, target)
    for samples, epoch, source in seen:
        assert source == "none" and epoch == 0.0 or epoch == pytest.approx(samples / truth), (samples, epoch, source)
    assert seen[-1][0] == target and seen[-1][2] == "none"


def test_a_one_for_one_map_keeps_the_files_metadata(workdir):
    datasets = pytest.importorskip("datasets")
    ds = parquet_stream(workdir / "data").map(lambda row: {"n": row["n"] * 2})
    with stream_metrics.init(backend="none") as run:
        seen = read_rows(run, ds, 150)
    if int(datasets.__version__.split(".")[0]) < 3 and seen[-1] == (150, 0.0, "none"):
        # datasets 2.x's map iterable does not say that it is one-for-one: when in doubt, none (SCHEMA 2).
        return
    assert seen[-1] == (150, 0.5, "metadata")


def test_the_accelerate_tracker_steps_where_accelerate_steps_at_a_pass_end():
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from stream_metrics.accelerate import StreamMetricsTracker

    tracker = StreamMetricsTracker(backend="none", gradient_accumulation_steps=4)
    accelerator = Accelerator(log_with=tracker, gradient_accumulation_steps=4, cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(torch.ones(14, 3), batch_size=2)  # 7 micro-batches a pass
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    optimizer_steps = 0
    for _ in range(2):
        for batch in tracker.iterate(loader):
            with accelerator.accumulate(model):
                accelerator.backward(model(batch).sum())
                optimizer.step()
                optimizer.zero_grad()
            optimizer_steps += accelerator.sync_gradients  # accelerate's own word on when the optimizer stepped
    p = tracker.log({"loss": 0.0})
    accelerator.end_training()
    assert optimizer_steps == 4 and (p.step, p.samples) == (4, 28)


def test_counting_a_packed_batch_never_waits_for_the_device():
    pytest.importorskip("trl")
    batch = {k: v.as_subclass(SyncCounter) if isinstance(v, torch.Tensor) else v
             for k, v in trl_packed(FOUR, EOS).items()}
    no_cu = {k: v for k, v in batch.items() if k != "cu_seq_lens_q"}
    SyncCounter.syncs = 0
    with stream_metrics.init(backend="none", pad_token_id=EOS) as run:
        for _ in range(20):
            run.update(batch)
            run.update(no_cu)
        assert SyncCounter.syncs == 0, "counting a packed batch made the host wait for the device"
        assert totals(run)[:2] == (40 * 4, 40 * 14)
