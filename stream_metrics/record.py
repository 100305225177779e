"""What each rank sends in a row's one gather: one typed record, read by tally, epoch, layout and flops.

The record travels as a plain dict of numbers (distributed.gather packs its values into one int64
vector), so these are ``TypedDict``s: the names and types are checked by mypy, and nothing is
converted at run time, on the hot path. Counts may be 0-d device tensors until the gather reads
them; after it, every value is a host number. ``-1`` means unknown.
"""
from __future__ import annotations

from typing import Any, TypedDict


class ProbeFields(TypedDict):
    """What a rank can tell about the data it reads (epoch.DatasetProbe.local)."""

    sized_units: int          # batches (a sized loader) or rows (a sized dataset) read so far
    sized_length: int         # the loader's or dataset's length
    sized_is_loader: int      # 1 when the length counts batches
    sized_examples: int       # a dataset's items: 1 single examples, 0 packed rows, -1 unknown
    metadata: int             # examples the dataset's metadata announces
    metadata_files: int       # which file list that metadata is about (one per list)
    shard_idx: int            # shards completed, in a streamed dataset
    shard_example_idx: int    # examples read in the current shard
    num_shards: int
    repeats: int              # passes one run of the data to its end holds (repeat(n)); 0: no end


class LayoutFields(TypedDict, total=False):
    """Which ranks read different data (layout.Layout.fields): replicas are weighed out."""

    dp_first: int   # the first rank of this rank's data-parallel group (0: rank 0's group)
    cp_first: int   # the first rank of its context-parallel group
    cp_sliced: int  # 1 when the group's ranks hold slices of one batch


class CallFields(TypedDict, total=False):
    """Which call the rank is in (tally.check_same_call): several ranks only."""

    call: int
    call_seq: int


class FlopFields(TypedDict, total=False):
    """The shapes counted for FLOPs (flops.FlopCount.local)."""

    flop_tokens: Any  # int, or a 0-d device tensor before the gather
    flop_pairs: Any


class RankRecord(ProbeFields, LayoutFields, CallFields, FlopFields, total=False):
    """One rank's numbers for a row (tally.Tally.sync); the layout, call and FLOP fields where they apply."""

    samples: Any            # int, or a 0-d device tensor before the gather
    tokens: Any
    loss_tokens: Any
    has_tokens: int
    has_loss_tokens: int
    steps: int
    wall_clock: float
    passes: int
    first_pass_samples: Any  # -1 before the first pass has ended
    samples_in_pass: Any
