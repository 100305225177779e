"""The epoch estimate: samples seen / samples in one pass, from the best source in force.

Sources, best first (SCHEMA section 2): ``pass`` (a pass has ended and was measured), ``sized``
(the dataset or loader has a length), ``user`` (``dataset_size=``), ``metadata`` (split info or
Parquet footers), ``shards`` (position in a streaming dataset's shards), ``none`` (completed passes
only).

Each rank probes its own dataset (``DatasetProbe.local``); the numbers of every rank come together
in the row's one collective, and ``EpochEstimator.estimate`` turns them into the same epoch on
every rank. Where pass ends are watched, an estimate never claims a pass that has not ended
(it stays below the next whole number), so when a pass ends the integer part is exact.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import sys
import weakref
from dataclasses import dataclass, field

from .counting import warn_once
from .record import ProbeFields, RankRecord

# How close below the next whole epoch an estimate may go before that pass has really ended.
_BELOW_NEXT_PASS = 1e-9
# datasets iterables that change how many examples a pass holds, so a row count from metadata (and a
# position counted in the files' rows) no longer holds: take/skip/repeat, filter, and every source
# mixing several datasets (interleave, concatenate). A batched map (``map(batched=True)``, ``batch()``,
# packing) may return any number of rows per batch: it counts as resizing too (MappedExamplesIterable
# with ``batched``); a map without ``batched`` gives one row per row and keeps the count.
_RESIZING = ("TakeExamplesIterable", "SkipExamplesIterable", "FilteredExamplesIterable",
             "RepeatExamplesIterable", "CyclingMultiSourcesExamplesIterable",
             "RandomlyCyclingMultiSourcesExamplesIterable", "VerticallyConcatenatedMultiSourcesExamplesIterable",
             "HorizontallyConcatenatedMultiSourcesExamplesIterable")

# datasets iterables that, above a ``repeat(n)``, change which of the repeated examples a loader's run
# reads (take/skip) or mix them with others: its end is then no whole number of the repeated passes.
# Every resizing step but a filter (it keeps whole passes of what it filters) and a repeat itself.
_ENDS_ELSEWHERE = tuple(name for name in _RESIZING
                        if name not in ("FilteredExamplesIterable", "RepeatExamplesIterable"))

# datasets iterables that hold examples back between the files' reader and the examples handed on,
# with no count of them in their state: the reader's position is ahead of the examples by an amount
# unknown (a shuffle buffer over one input shard, ``shuffle(max_buffer_input_shards=1)``, holds up
# to its size; it yields half of it at once), so it gives no position.
_HOLDING = ("BufferShuffledExamplesIterable",)


def check_dataset_size(dataset_size):
    """``dataset_size`` as a positive int, or None; a clear error otherwise."""
    if dataset_size is None:
        return None
    bad = (isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Real)
           or not math.isfinite(dataset_size) or dataset_size <= 0 or math.floor(dataset_size) != dataset_size)
    if bad:
        raise ValueError(f"dataset_size={dataset_size!r} must be a positive whole number of training examples "
                         "(or None when unknown: stream_metrics then measures it when a pass ends)")
    return int(dataset_size)


def _ex_iterables(dataset):
    ex = getattr(dataset, "_ex_iterable", None)
    while ex is not None:
        yield ex
        ex = getattr(ex, "ex_iterable", None)


def resized(dataset, *, but_repeats: bool = False) -> bool:
    """True where a step of a ``datasets`` stream may have changed how many rows it holds (``_RESIZING``).

    ``but_repeats``: a ``repeat()`` does not count (it holds whole passes of what it repeats)."""
    for ex in _ex_iterables(dataset):
        name = type(ex).__name__
        if but_repeats and name == "RepeatExamplesIterable":
            continue
        if name in _RESIZING or (name == "MappedExamplesIterable" and getattr(ex, "batched", False)):
            return True
    return False


def repeats(dataset) -> int:
    """How many passes over its data one run of a ``datasets`` stream to its end holds: the product of
    its ``repeat(n)`` steps, counted from the top down to a step that takes some of the repeated
    examples or mixes them with others (``_ENDS_ELSEWHERE``; below such a step, the repeats make up
    what one pass is). 0 where a ``repeat(None)`` has no count (the run never ends); 1 without repeats.

    >>> repeats(None)
    1
    """
    passes = 1
    for ex in _ex_iterables(dataset):
        name = type(ex).__name__
        if name in _ENDS_ELSEWHERE:
            break
        if name == "RepeatExamplesIterable":
            times = getattr(ex, "num_times", None)
            if times is None:
                return 0
            if not isinstance(times, int) or times < 1:
                return 1  # no examples at all: its end closes the one (empty) pass it is
            passes *= times
    return passes


def holds_examples_back(dataset) -> bool:
    """True where a step of a ``datasets`` stream holds examples back from the reader (``_HOLDING``)."""
    return any(type(ex).__name__ in _HOLDING for ex in _ex_iterables(dataset))


def metadata_size(dataset) -> tuple[int | None, int]:
    """(examples the dataset says it has, a number naming the files they are in; -1: the whole split).

    Hugging Face split info where it is filled in, else the row counts in Parquet footers. Ranks
    that list the same files each count the whole dataset (split_dataset_by_node splits at
    iteration time); ranks given their own files (``IterableDataset.shard``, as accelerate does)
    each count their share: ``EpochEstimator`` adds up one count per distinct file list (a file's
    row groups named with it, where the ranks' shares are row groups: ``_parquet_rows``).
    """
    chain = list(_ex_iterables(dataset))
    if resized(dataset, but_repeats=True) or _filtered_on_reading(chain):
        return None, -1  # the metadata counts rows that the stream no longer yields one for one
    # (A repeat() yields the rows of whole passes: the metadata still counts one pass.)
    kwargs = chain[-1].kwargs if chain and isinstance(getattr(chain[-1], "kwargs", None), dict) else {}
    files = kwargs.get("files")
    info, split = getattr(dataset, "info", None), getattr(dataset, "split", None)
    splits = getattr(info, "splits", None)
    if splits and split is not None and not _part_of_the_split(files, chain, split):
        try:
            n = splits[str(split)].num_examples
        except (KeyError, AttributeError):
            n = None
        if n:
            return int(n), -1
    if files and all(str(f).endswith(".parquet") for f in files):
        try:
            rows, parts = _parquet_rows(files, kwargs.get("row_groups_list"))
        except Exception:  # a remote or unreadable file: no metadata, no failure
            return None, -1
        # 48 bits: exact in the float64 vector of the row's collective.
        return rows, int(hashlib.sha1("\n".join(sorted(parts)).encode()).hexdigest()[:12], 16)
    return None, -1


def _parquet_rows(files, row_groups_list) -> tuple[int, list[str]]:
    """(rows the Parquet reader's entries read, a name for each entry). An entry reads a whole file,
    or with ``row_groups_list`` (datasets' ``IterableDataset.reshard()``: one entry per row group, the
    file named again in each) only those row groups: each counts the rows of what it reads, and is
    named with its row groups, so that ranks given other row groups of the same files name other
    data. A file listed twice is read twice. An entry of a whole file keeps its plain path as name."""
    import pyarrow.parquet as pq

    if not isinstance(row_groups_list, (list, tuple)) or len(row_groups_list) != len(files):
        row_groups_list = [None] * len(files)
    footers: dict = {}
    rows, parts = 0, []
    for file, groups in zip(files, row_groups_list):
        if str(file) not in footers:
            footers[str(file)] = pq.read_metadata(file)
        footer = footers[str(file)]
        if groups is None:
            rows += footer.num_rows
            parts.append(str(file))
        else:
            rows += sum(footer.row_group(int(group)).num_rows for group in groups)
            parts.append(f"{file}#{','.join(str(int(group)) for group in groups)}")
    return rows, parts


def _filtered_on_reading(chain) -> bool:
    """Whether the builder reading the files drops rows as it reads them (``load_dataset(...,
    filters=)``: Parquet, and the folder-based, Iceberg and Vortex builders): its split info and the
    Parquet footers count every row, the stream only those that pass. The reader is the chain's last
    iterable; its function is a bound method of the builder, whose config holds the filters."""
    return getattr(getattr(_builder(chain), "config", None), "filters", None) is not None


def _builder(chain):
    """The builder whose bound function the chain's last iterable (the files' reader) calls, or None."""
    reader = chain[-1] if chain else None
    read = getattr(reader, "generate_tables_fn", None) or getattr(reader, "generate_examples_fn", None)
    return getattr(getattr(read, "func", read), "__self__", None)


def _part_of_the_split(files, chain, split) -> bool:
    """Whether a process that is the whole job reads only some of the split's files (the reader's
    ``files``; ``IterableDataset.shard``): the split's size then counts files it never reads. Ranks
    given their shares read the whole split together, so there the split's size is right."""
    from . import distributed

    data_files = getattr(getattr(_builder(chain), "config", None), "data_files", None)
    if distributed.world_size() > 1 or not files or data_files is None:
        return False
    try:
        return len({str(f) for f in files}) < len({str(f) for f in data_files[str(split)]})
    except (KeyError, TypeError, IndexError):
        return False


def shard_position(dataset):
    """(shard_idx, shard_example_idx, num_shards) of a streaming dataset in the main process, or None.

    Read only where ``DatasetProbe.positioned``: no step resized the rows, nor holds some back."""
    state_dict = getattr(dataset, "state_dict", None)
    num_shards = getattr(dataset, "num_shards", None) or getattr(dataset, "n_shards", None)
    if not callable(state_dict) or not num_shards:
        return None
    try:
        state = state_dict()
    except Exception:
        return None
    step = _stepping(dataset, state)
    if step is False:
        return None
    # Follow the chain of wrapped iterables (and the objects beside their states) down to the one
    # reading the files; several sources (interleave, shuffled sources) have no single position.
    node, iterable, stepped = state, dataset, 0
    while isinstance(node, dict) and "shard_idx" not in node:
        inner = node.get("examples_iterable")
        if "previous_state" in node and isinstance(inner, dict) and "shard_idx" in _files_reader(inner):
            return _rebatched_position(node, iterable, int(num_shards), step, dataset)
        if "stepped" in node:
            stepped = node["stepped"]
        node = inner
        iterable = getattr(iterable, "_ex_iterable", None) or getattr(iterable, "ex_iterable", None)
    if not isinstance(node, dict) or "shard_example_idx" not in node:
        return None
    shard_idx, num_shards = int(node["shard_idx"]), int(num_shards)
    if shard_idx >= num_shards:  # read ahead to the end of the last shard: the position says nothing
        return None
    return shard_idx, _mine(node, stepped, step), num_shards


def _files_reader(node: dict) -> dict:
    """The files' reader's state under a state node: the node's own, or the one a StepExamplesIterable wraps."""
    inner = node.get("examples_iterable") if "stepped" in node else node
    return inner if isinstance(inner, dict) else {}


def _stepping(dataset, state) -> "tuple[int, int] | None | bool":
    """(step, offset) where this rank reads one example in ``step`` of every shard (datasets'
    ``split_dataset_by_node`` with a shard count the world size does not divide: a
    StepExamplesIterable), None where it reads whole shards, False where it steps by an unknown rule."""
    node = state
    while isinstance(node, dict) and "stepped" not in node:
        node = node.get("examples_iterable")
    if not isinstance(node, dict):
        return None
    config = getattr(dataset, "_distributed", None)
    rank, world = getattr(config, "rank", None), getattr(config, "world_size", None)
    if not isinstance(rank, int) or not isinstance(world, int) or not 0 <= rank < world:
        return False
    return world, rank


def _mine(reader: dict, stepped, step) -> int:
    """The examples of the reader's current shard before its position that are this rank's: all of
    them, or with ``step`` = (world, rank), those whose index in the whole stream is rank modulo
    world. ``stepped`` is that index modulo world where the reader stands (the StepExamplesIterable's)."""
    before = int(reader["shard_example_idx"])
    if step is None:
        return before
    world, rank = step
    first = (int(stepped) - before) % world  # the shard's first example's index in the stream, modulo world
    return (first + before - rank - 1) // world - (first - rank - 1) // world


# What ``_rebatched_position`` saw of each dataset at its last two numbers of batches handed on: the
# iteration it was in (the dataset's state of that iteration, a new dict each pass, held so that it is
# never taken for another), the batches the rebatching step had handed on, and where the files'
# reader stood (shard, position).
_LAST_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rebatched_position(node: dict, iterable, num_shards: int, step, dataset=None):
    """The position of the examples handed on by a rebatching step over the files' reader (datasets'
    ``RebatchedArrowExamplesIterable``, 4.x and later), not the reader's own: the reader has read a
    whole table ahead (a small file at once). The step keeps the reader's state before that table
    (``previous_state``) and how many of its chunks it handed on since. With ``step`` (_stepping),
    the position counts this rank's examples only, as the chunks it hands on do. None where the
    state (and what the last call saw of the same iteration) cannot tell the position exactly."""
    # The step that iteration itself adds (examples one by one, as a DataLoader reads them) is in the
    # state only; one made by a step of the dataset (a batched map) is also in its chain of objects.
    size = getattr(iterable, "batch_size", None) if type(iterable).__name__ == type(node).__name__ or (
        type(iterable).__name__ == node.get("type")) else 1
    now, before = node["examples_iterable"], node.get("previous_state")
    before = before if isinstance(before, dict) else {}
    reader, earlier = _files_reader(now), _files_reader(before)
    if not isinstance(size, int) or size <= 0 or "shard_idx" not in earlier:
        return None  # one table of everything, or nothing read yet
    handed_on = int(node.get("num_chunks_since_previous_state") or 0) * size
    shard_idx = int(reader["shard_idx"])
    last = _last_seen(dataset, node, reader)
    if shard_idx >= num_shards:
        return None
    if int(earlier["shard_idx"]) == shard_idx:  # the table being handed on began where the reader stood
        return shard_idx, _mine(earlier, before.get("stepped", 0), step) + handed_on, num_shards
    # The table being handed on is the first of the reader's shard, or the second at its first example
    # (the step notes a table's start only after handing on its first example): the state before is
    # that of an earlier shard. Either it is where that shard ended (the reader had read some of it),
    # and the position is ``handed_on``; or, at the shard's very first example only, it is the state
    # before the last table read in an earlier shard, counting that table's examples and this one:
    # the position is 1. Past its first example, more are handed on than the reader has read of its
    # shard only in the second case; and a shard's end is never before its first example.
    earlier_at = (int(earlier["shard_idx"]), int(earlier["shard_example_idx"]))
    if handed_on > _mine(reader, now.get("stepped", 0), step) or earlier_at[1] == 0:
        return shard_idx, 1, num_shards
    # Otherwise the state reads alike both ways: where the earlier shard ended tells them apart, and
    # nothing in it says. The last call in the same iteration may: the reader was already in this
    # shard (so this is not its first example), or it stood past the state before, in a shard before
    # this one (so that state is not where the shard before ended).
    if last is not None and last[1] < int(node.get("batch_idx", 0)):
        if last[2] == shard_idx:
            return shard_idx, handed_on, num_shards
        if last[2] < shard_idx and (last[2], last[3]) > earlier_at:
            return shard_idx, 1, num_shards
    return None


def _last_seen(dataset, node: dict, reader: dict):
    """What a call saw of ``dataset`` in this same iteration before the examples handed on now (an
    earlier row; a row may look more than once), or None; notes what this call sees."""
    iteration = getattr(dataset, "_state_dict", None)
    if dataset is None or not isinstance(iteration, dict):
        return None
    seen = (iteration, int(node.get("batch_idx", 0)), int(reader["shard_idx"]), int(reader["shard_example_idx"]))
    try:
        before, latest = _LAST_SEEN.get(dataset, (None, None))
        if latest is None or latest[0] is not iteration or latest[1] != seen[1]:
            before, latest = latest, seen
            _LAST_SEEN[dataset] = (before, latest)
    except TypeError:  # a dataset that takes no weak reference: nothing remembered
        return None
    return before if before is not None and before[0] is iteration and before[1] < seen[1] else None


def items_are_examples(dataset) -> int:
    """Whether a sized dataset's items are single examples (1) or rows packed from several (0); -1 unknown.

    Read from its first item, without running any of the user's code (a ``__getitem__`` may draw
    from a random generator, or be slow): only for a list or tuple, and a ``datasets.Dataset`` (its
    first row as stored, with no format or transform). An item is packed where its ``position_ids``
    start more than one example (read as counting.py reads a batch's: a restart at 0, or in Qwen-VL's
    3-plane positions the start of a run of 0s), or where its ``cu_seq_lens_q`` mark more than one
    segment; anything else is one example.
    """
    try:
        if type(dataset) in (list, tuple):
            first = dataset[0]
        elif type(dataset).__name__ == "Dataset" and type(dataset).__module__.startswith("datasets."):
            if "position_ids" not in dataset.column_names and "cu_seq_lens_q" not in dataset.column_names:
                return 1
            first = dataset.with_format(None)[0]
        else:
            return -1
    except Exception:  # an empty or odd container: nothing to read
        return -1
    if not isinstance(first, dict):
        return 1
    try:
        return _item_is_one_example(first)
    except Exception:  # values that are not numbers: nothing to read
        return -1


def _item_is_one_example(item: dict) -> int:
    import torch

    from .counting import _plane, _samples

    cu = item.get("cu_seq_lens_q")
    if cu is not None:
        return 1 if torch.as_tensor(cu).numel() <= 2 else 0
    positions = item.get("position_ids")
    if positions is None:
        return 1
    positions = torch.as_tensor(positions)
    ids = item.get("input_ids")
    length = torch.as_tensor(ids).shape[-1] if ids is not None else positions.shape[-1]
    # Give an unbatched item its batch dimension of one row: (length) -> (1, length), and rope planes
    # (planes, length) -> (planes, 1, length). An item stored with its batch dimension stays as it is.
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    elif positions.dim() == 2 and positions.shape[0] in (3, 4) and positions.shape[1] == length:
        positions = positions.unsqueeze(1)
    plane, runs = _plane(positions, None)
    if plane is None:
        return -1
    mask = item.get("attention_mask")
    mask = torch.as_tensor(mask) if mask is not None else None
    mask = mask.reshape(plane.shape) if mask is not None and mask.numel() == plane.numel() else None
    return 1 if int(_samples(plane.shape[0], plane, runs, mask)) <= plane.shape[0] else 0


def _unknown_items(length: int) -> None:
    warn_once("sized-items", f"the dataset given as dataset= has a length ({length}) but stream_metrics cannot "
                             "tell whether its items are single examples or rows packed from several (only a "
                             "list, a tuple or a datasets.Dataset is read), and its batches count other samples "
                             "than rows (packed examples, or samples= given): the 'sized' epoch counts samples "
                             "over its length. If its items are packed rows, pass the DataLoader as dataset= "
                             "instead (its length counts batches)")


@dataclass
class DatasetProbe:
    """What one rank can tell about the dataset it reads: its length, metadata, shard position."""

    dataset: object = None
    length: int | None = None          # len() of the dataset (rows) or loader (batches)
    is_loader: bool = False
    metadata: int | None = None
    metadata_files: int = -1
    # A stream with no length whose steps keep its rows one for one, and hand them on as read: only
    # then is the shard position read at rows. Decided once, since a dataset's chain of steps never
    # changes (map() makes a new one).
    positioned: bool = False
    # A sized dataset's items: 1 each is one example (so the ``sized`` source counts samples, which a
    # collator that packs several into a row keeps apart), 0 each is a row already packed from several
    # (so it counts rows), -1 unknown (items_are_examples).
    examples: int = -1
    # Passes over the data that one run of it to its end holds (``repeats``: a ``datasets`` stream's
    # ``repeat(n)``); 0 where it never ends. A pass end reported (``end_pass``) closes that many.
    repeats: int = 1
    _fixed: "ProbeFields | None" = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, dataset, *, yields_batches: bool = False) -> "DatasetProbe":
        """``yields_batches``: each element of ``dataset`` is one micro-batch (``Run.iterate``'s), so its
        length counts batches, as a loader's does, whatever its type (a list of batches, say)."""
        if dataset is None:
            return cls()
        probe = cls(dataset=dataset)
        try:
            probe.length = len(dataset)
        except Exception:  # IterableDataset and friends have no length, or raise TypeError
            probe.length = None
        if probe.length == 0:
            probe.length = None
        is_loader_type = hasattr(dataset, "batch_size") and hasattr(dataset, "dataset")
        probe.is_loader = yields_batches or is_loader_type
        inner = getattr(dataset, "dataset", dataset) if is_loader_type else dataset
        probe.metadata, probe.metadata_files = metadata_size(inner)
        # Only a datasets IterableDataset can have a shard position (a map-style Dataset never has one).
        iterable_type = getattr(sys.modules.get("datasets"), "IterableDataset", ())
        if not hasattr(inner, "state_dict") and isinstance(inner, iterable_type):
            warn_once("datasets-state", "this version of datasets has no IterableDataset.state_dict(), so the "
                                        "'shards' epoch source is unavailable; upgrade datasets to 2.20 or newer")
        probe.dataset = inner
        probe.repeats = repeats(inner)
        if probe.length is not None and not probe.is_loader:
            probe.examples = items_are_examples(inner)
        # A position in the files' rows is not a position in the examples once a step resized them,
        # nor where a step holds some back (read, not handed on yet) without saying how many.
        probe.positioned = probe.length is None and not resized(inner) and not holds_examples_back(inner)
        return probe

    def local(self, rows: int, batches: int) -> ProbeFields:
        """This rank's numbers for the row's collective (-1 where unknown): a new dict each time."""
        if not self.positioned and not self.length:
            # Nothing here moves from row to row: a copy of the numbers made at the first row.
            fixed = self._fixed
            if fixed is None:
                fixed = self._fixed = self._read(rows, batches)
            return fixed.copy()  # type: ignore[return-value]
        return self._read(rows, batches)

    def _read(self, rows: int, batches: int) -> ProbeFields:
        pos = shard_position(self.dataset) if self.positioned else None
        return {
            "sized_units": (batches if self.is_loader else rows) if self.length else -1,
            "sized_length": self.length or -1,
            "sized_is_loader": int(self.is_loader),
            "sized_examples": self.examples,
            "metadata": self.metadata if self.metadata else -1,
            "metadata_files": self.metadata_files,
            "shard_idx": pos[0] if pos else -1,
            "shard_example_idx": pos[1] if pos else -1,
            "num_shards": pos[2] if pos else -1,
            "repeats": self.repeats,
        }


class EpochEstimator:
    """Turns the samples seen and every rank's probe into ``(epoch, source)``; restorable."""

    def __init__(self, dataset_size=None):
        self.user_size = check_dataset_size(dataset_size)
        self.watching = False      # pass ends will be reported (iterate(), end_pass(), the Trainer)
        self.sized_epoch = None    # an exact epoch given from outside (the Trainer's, for sized data)
        self.passes = 0            # passes completed on every rank, before this session
        self.passes_seen = 0       # ... and including this session's, as of the last estimate
        self.pass_size = None      # samples in one pass, measured when the first one ended
        # Passes may differ in size (a shuffled interleave, a filter that depends on the order): the
        # ``pass`` source divides by their mean, measured from the samples at the last pass end seen
        # (``pass_end``, after ``passes_measured`` passes), less the samples before the first pass
        # that it does not hold (``pass_offset``: a resume that read the data again from elsewhere).
        self.pass_end = None
        self.passes_measured = 0
        self.pass_offset = 0
        self.samples_at_start = 0  # samples restored from a checkpoint, as the first pass holds them
        self.restored_samples = 0  # ... and as they were counted
        self.last_epoch = 0.0

    def state_dict(self) -> dict:
        return {"passes": self.passes_seen, "pass_size": self.pass_size, "last_epoch": self.last_epoch,
                "watching": self.watching, "pass_end": self.pass_end, "passes_measured": self.passes_measured,
                "pass_offset": self.pass_offset}

    def load_state_dict(self, d: dict, samples: int) -> None:
        passes, pass_size = d.get("passes", 0), d.get("pass_size")
        end, measured, offset = d.get("pass_end"), d.get("passes_measured", 0), d.get("pass_offset", 0)
        if not isinstance(passes, int) or passes < 0 or (pass_size is not None and
                                                         (not isinstance(pass_size, int) or pass_size <= 0)):
            raise ValueError(f"epoch state {d!r} is not valid")
        if end is not None and not (isinstance(end, int) and isinstance(measured, int) and isinstance(offset, int)
                                    and 0 < measured <= passes and 0 <= offset < end):
            raise ValueError(f"epoch state {d!r} is not valid")
        self.passes = self.passes_seen = passes
        self.pass_size = pass_size
        # A checkpoint from before pass ends were kept: its passes were taken as of the first one's size.
        self.pass_end, self.passes_measured, self.pass_offset = (end, measured, offset) if end is not None else (
            (passes * pass_size, passes, 0) if pass_size and passes else (None, 0, 0))
        self.last_epoch = float(d.get("last_epoch", 0.0))
        self.watching = bool(d.get("watching", False)) or self.watching
        self.samples_at_start = self.restored_samples = samples

    def estimate(self, samples: int, ranks: list[RankRecord]) -> tuple[float, str]:
        """``ranks``: each rank's gathered numbers (passes, first_pass_samples, samples_in_pass, probe)."""
        session_passes = _least(ranks, "passes")
        passes = self.passes_seen = self.passes + session_passes
        # Passes a loader's end closes at once (a repeated stream's), 0 where it never ends.
        per_end = _least(ranks, "repeats")
        if self.pass_size is None and session_passes >= 1 and self.passes == 0:
            # Every sample before this session's start was before the first end, which closed
            # ``per_end`` passes (a repeat resumed inside a repetition finishes the ones it holds).
            at_end = self.samples_at_start + int(_total(ranks, "first_pass_samples"))
            self.pass_size = max(1, round(at_end / max(per_end, 1)))
            self.pass_offset = self.restored_samples - self.samples_at_start
        if passes > self.passes_measured and session_passes >= 1 and all(
                r["passes"] == session_passes for r in ranks):
            # Every rank is in the same pass: the samples before it are the samples at its start.
            self.pass_end = samples - int(_total(ranks, "samples_in_pass"))
            self.passes_measured = passes
        epoch, source = self._raw(samples, ranks, passes)
        if (self.watching or passes) and per_end:
            # A measured pass may reach the next whole number (training stopped exactly at a pass's
            # end, all passes alike); any other estimate, and a pass longer than the mean, stays below
            # it until the pass is seen to end. A repeated stream's end closes ``per_end`` passes at
            # once: the ones inside it are not seen, so the estimate may go up to its end.
            top = passes + per_end
            ceiling = top if source == "pass" and epoch == top else top - _BELOW_NEXT_PASS
            epoch = min(max(epoch, passes), ceiling)
        elif passes:
            epoch = max(epoch, passes)  # a stream repeated without end: no end to wait for
        if epoch < self.last_epoch:
            epoch = self.last_epoch
        self.last_epoch = epoch
        return epoch, source

    def _raw(self, samples, ranks, passes):
        if self.pass_size and passes >= 1:
            if self.pass_end is not None and self.pass_end > self.pass_offset:
                # samples / the mean pass: a product over a sum of whole numbers, exact where passes are alike
                return samples * self.passes_measured / (self.pass_end - self.pass_offset), "pass"
            return samples / self.pass_size, "pass"
        if self.sized_epoch is not None:
            return float(self.sized_epoch), "sized"
        if _least(ranks, "sized_length") > 0:
            if ranks[0]["sized_is_loader"]:
                return _total(ranks, "sized_units") / _total(ranks, "sized_length"), "sized"
            # A dataset (every rank's copy of it whole): the items read over its length. Items that are
            # examples were read as samples (a packing collator makes fewer rows of them); packed items
            # as rows (each holds several samples).
            rows = _total(ranks, "sized_units")
            if ranks[0]["sized_examples"] == 0:
                return rows / ranks[0]["sized_length"], "sized"
            if ranks[0]["sized_examples"] < 0 and samples != rows:
                _unknown_items(ranks[0]["sized_length"])
            return samples / ranks[0]["sized_length"], "sized"
        if self.user_size:
            return samples / self.user_size, "user"
        if _least(ranks, "metadata") > 0:
            size = sum({r["metadata_files"]: r["metadata"] for r in ranks}.values())  # one per file list
            return samples / size, "metadata"
        if passes == 0:
            known = 0.0
            for r in ranks:
                # A rank that has ended its share of the pass measured it; the others estimate theirs.
                size = r["first_pass_samples"] / max(r["repeats"], 1) if r["passes"] >= 1 and \
                    r["first_pass_samples"] > 0 else _shard_size(r)
                if size is None:
                    return float(passes), "none"
                known += size
            return samples / known, "shards"
        return float(passes), "none"


# Row-path helpers: loops, not min()/sum()/all() over a generator. Right after a training step
# (caches cold) each generator costs a few microseconds; the estimate took ~13 µs a row with
# them and ~4 µs without (benchmarks/README.md).
def _least(ranks: list[RankRecord], key: str):
    """The smallest of the ranks' ``key`` (``> 0`` here is ``all(r[key] > 0 ...)``)."""
    least = ranks[0][key]  # type: ignore[literal-required]
    for r in ranks:
        if r[key] < least:  # type: ignore[literal-required]
            least = r[key]  # type: ignore[literal-required]
    return least


def _total(ranks: list[RankRecord], key: str):
    """The sum of the ranks' ``key``."""
    total = 0
    for r in ranks:
        total += r[key]  # type: ignore[literal-required]
    return total


def _shard_size(r: RankRecord) -> float | None:
    # Examples per completed shard, times the shard count: this rank's share of one pass.
    done, within, shards = r["shard_idx"], r["shard_example_idx"], r["num_shards"]
    in_completed = r["samples_in_pass"] - within
    if done < 1 or shards < 1 or in_completed <= 0:
        return None
    return shards * in_completed / done
