"""Counting samples and tokens from every common batch shape, with no host sync between rows."""
from __future__ import annotations

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
        for i in range(10):
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


def test_update_never_syncs_with_the_device_and_a_row_syncs_once(monkeypatch):
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
        for name in ("item", "tolist", "cpu"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                                (waits.append(_n), _f(self, *a, **k))[1])
        progress = run.log({"loss": 1.0})
        monkeypatch.undo()
        assert waits == ["tolist"], f"a row should read every count in one host sync, saw {waits}"
    assert (progress.samples, progress.tokens, progress.loss_tokens) == (150, 1100, 1800)
