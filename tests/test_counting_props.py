"""Property tests: random packed batches, built with TRL's own collator, count exactly what was generated.

The truth is the list of examples hypothesis draws (how many, how long), never the library's code.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("trl")
from hypothesis import given, settings, strategies as st  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from stream_metrics.counting import read_batch  # noqa: E402

PAD, EOS = 0, 1
WORD = st.integers(min_value=2, max_value=300)  # ordinary tokens: never the pad or eos id


@st.composite
def examples(draw, min_length=1):
    """Token lists of random lengths; some end with eos, as SFT data does."""
    count = draw(st.integers(min_value=1, max_value=8))
    out = []
    for _ in range(count):
        body = draw(st.lists(WORD, min_size=1, max_size=20))
        out.append(body + [EOS] if draw(st.booleans()) or len(body) < min_length else body)
    return out


def collate(batch_examples, pad, multiple, drop):
    collator = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True, pad_to_multiple_of=multiple)
    batch = collator([{"input_ids": e} for e in batch_examples])
    if drop:
        batch.pop(drop)
    return batch


def read(batch, pad):
    counts = read_batch(batch, pad)
    return int(counts.samples), int(counts.tokens)


MULTIPLE = st.one_of(st.none(), st.integers(min_value=1, max_value=40))
DROP = st.sampled_from([None, "cu_seq_lens_q", "position_ids"])


@settings(max_examples=150, deadline=None)
@given(batch_examples=examples(), pad=st.sampled_from([PAD, EOS]), multiple=MULTIPLE, drop=DROP)
def test_a_packed_batch_counts_its_examples_and_tokens(batch_examples, pad, multiple, drop):
    batch = collate(batch_examples, pad, multiple, drop)
    assert read(batch, pad) == (len(batch_examples), sum(map(len, batch_examples)))


@settings(max_examples=100, deadline=None)
@given(batch_examples=examples(min_length=2), pad=st.sampled_from([PAD, EOS]), multiple=MULTIPLE, drop=DROP)
def test_without_the_pad_id_the_labels_find_the_pad_tail(batch_examples, pad, multiple, drop):
    # Examples of two tokens or more: a one-token example at a row's edge is indistinguishable from padding
    # without the pad id (the module docstring says so).
    batch = collate(batch_examples, pad, multiple, drop)
    assert read(batch, None) == (len(batch_examples), sum(map(len, batch_examples)))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=6),
       extra=st.integers(min_value=0, max_value=5), style=st.sampled_from(["generate", "clamped"]))
def test_left_padded_rows_without_a_mask_count_once(lengths, extra, style):
    width = max(lengths) + extra
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    ids = torch.where(mask == 1, 7, PAD)
    positions = mask.cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1) if style == "generate" else positions.clamp(min=0)
    assert read({"input_ids": ids, "position_ids": positions}, PAD) == (len(lengths), sum(lengths))
