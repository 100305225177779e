"""Counting what a batch holds, without waiting for the device.

``read_batch`` turns one batch into ``Counts``; each count is a Python int where the shape alone
tells it (free) or a 0-d tensor on the batch's device where the values must be looked at (a mask,
the labels, packed position ids). ``Totals`` adds those up in place on the device. Nothing here
calls ``.item()``, ``.tolist()`` or ``.cpu()``: the host reads the totals once, when a row is
written (``Totals.values``).

Which rule counts a batch (SCHEMA section 1):

- An attention mask shaped like the ids: tokens are its non-zero entries; samples are the rows,
  or, where ``position_ids`` are given too, the places where they are 0 inside the mask (every
  packed example counts, left padding does not).
- Padding-free (packed) batches, with ``position_ids`` or ``cu_seq_lens_q`` and no mask, as TRL's
  ``DataCollatorForLanguageModeling(padding_free=True)``, HF's ``DataCollatorWithFlattening`` and
  packing frameworks make them. The row is cut into segments: a segment starts where
  ``cu_seq_lens_q`` says (on the flattened batch), or where a position is not the one before plus
  one. Padding is the row's leading and trailing run of *padding-like* positions: one-token
  segments whose token is the pad id (where the pad id is known) and whose label is -100 (where
  labels are given). That is what ``pad_to_multiple_of`` appends (positions restarting at 0, one
  token per ``cu_seq_lens_q`` entry, labels -100), and what left padding without a mask looks like
  (``[1, 1, 0, 1, 2]`` from ``generate``, or ``[0, 0, 0, 1, 2]``). Tokens are every position that
  is not padding, an end-of-sequence token included even where the pad id equals it; samples are
  the non-padding positions where ``position_ids`` are 0 (every ``cu_seq_lens_q`` segment where
  only those are given). A one-token example at the very edge of a row whose token is the pad id
  is taken for padding: no other reading of such a batch can tell them apart.
- Multimodal rope positions ``(3, batch, length)`` (Qwen-VL): samples are the runs of 0 in the
  first plane (image tokens share a temporal position); ``(4, batch, length)``, whose first plane
  holds the text positions, counts like 2-D ``position_ids``.
- No mask and no positions: tokens are ``input_ids != pad_token_id`` where the pad id is known,
  else all of them (one warning). A list of 1-D token tensors, or of token lists, is a batch of
  unpadded sequences: one sample each, every token counts.
- A mapping whose ``input_ids`` are one sequence (a 1-D tensor, or a list of ints): one example
  (one warning), unless ``position_ids`` or ``cu_seq_lens_q`` cut it into several (padding-free).
- NumPy arrays (a loader that yields them) count as the tensors they would become; they share the
  array's memory and are only read.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch

from ._checks import warn_once  # lives in _checks.py; modules that import it from here keep working

IGNORE_INDEX = -100
Count = Union[int, torch.Tensor]


class Counts(NamedTuple):
    samples: Count
    tokens: Count | None = None       # None: the batch carries no token information
    loss_tokens: Count | None = None  # None: the batch has no labels
    rows: int = 0                     # leading dimension: the loader's own unit (packed rows)


def _tokens_from_ids(ids: torch.Tensor, mask, pad_token_id) -> Count:
    if mask is not None:
        # Token ids are (batch, length); embeddings (inputs_embeds) are (batch, length, hidden).
        if mask.shape == ids.shape or (ids.dim() == 3 and mask.shape == ids.shape[:2]):
            return torch.count_nonzero(mask)
        warn_once("mask-shape", f"the attention mask's shape {tuple(mask.shape)} does not match the input ids' "
                                f"{tuple(ids.shape)}; tokens are counted without it. Pass a mask shaped like the "
                                "ids, or tokens= explicitly.")
    if pad_token_id is not None and not torch.is_floating_point(ids):
        return torch.count_nonzero(ids != pad_token_id)
    warn_once("no-mask", "batches have no attention mask and no pad token id is known, so every token counts as "
                         "non-padding. Pass pad_token_id= to init(), or tokens= to update().")
    return ids.numel() if ids.dim() < 3 else ids.shape[0] * ids.shape[1]


def _plane(positions, ids_grid) -> tuple[torch.Tensor | None, bool]:
    """(position ids as (rows, length), whether they are rope planes whose zeros come in runs)."""
    if not isinstance(positions, torch.Tensor) or positions.numel() == 0 or torch.is_floating_point(positions):
        return None, False
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    runs = False
    if positions.dim() == 3:
        # Qwen-VL rope: 4 planes put the text positions first (packed batches count them); with 3 the
        # first plane is the temporal one, where an image's tokens all share one position.
        runs = positions.shape[0] != 4
        positions = positions[0]
    if positions.dim() != 2 or (ids_grid is not None and tuple(positions.shape) != ids_grid):
        return None, False
    return positions, runs


def _run_starts(zeros: torch.Tensor) -> torch.Tensor:
    # The first 0 of every run of 0s along the row.
    previous = torch.cat([torch.zeros_like(zeros[:, :1]), zeros[:, :-1]], dim=1)
    return zeros & ~previous


def _samples(rows: int, positions, runs: bool, mask) -> Count:
    # Packed batches hold several examples per row: count where each one starts (inside the mask).
    if positions is None:
        return rows
    starts = _run_starts(positions == 0) if runs else positions == 0
    if mask is not None and mask.shape == positions.shape:
        starts = starts & (mask != 0)
    return torch.count_nonzero(starts)


def _edge_runs(like: torch.Tensor) -> torch.Tensor:
    """True on the leading and the trailing run of True along the last dimension (cumsum: every backend)."""
    unlike = (~like).to(torch.int32)
    leading = unlike.cumsum(-1) == 0
    trailing = unlike.flip(-1).cumsum(-1).flip(-1) == 0
    return leading | trailing


def _padding_free(ids, positions, cu, labels, pad_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, tokens) of a batch without a mask, from its segments; see the module docstring."""
    grid = tuple(ids.shape[:2]) if ids.dim() >= 2 else (1, ids.shape[0])
    token_ids = ids.reshape(grid) if ids.dim() <= 2 and not torch.is_floating_point(ids) else None
    if isinstance(labels, torch.Tensor) and labels.numel() == grid[0] * grid[1]:
        labels = labels.reshape(grid)
    else:
        labels = None
    if cu is not None:
        # cu_seq_lens_q index the flattened batch: one long row.
        length = grid[0] * grid[1]
        cu = cu.to(device=ids.device, dtype=torch.int64, non_blocking=True)
        starts = torch.zeros(length + 1, dtype=torch.bool, device=ids.device)
        starts.index_fill_(0, cu[:-1].clamp(0, length), True)  # a device index: no host sync
        starts = starts[:length].unsqueeze(0)
        outside = (torch.arange(length, device=ids.device) >= cu[-1]).unsqueeze(0)  # after the last segment
        token_ids = None if token_ids is None else token_ids.reshape(1, length)
        labels = None if labels is None else labels.reshape(1, length)
        sample_starts = starts
    else:
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        outside = None
        sample_starts = positions == 0
    ends = torch.cat([starts[:, 1:], torch.ones_like(starts[:, :1])], dim=1)
    like = starts & ends  # one-token segments
    if token_ids is not None and pad_token_id is not None:
        like = like & (token_ids == pad_token_id)
    if labels is not None:
        like = like & (labels == IGNORE_INDEX)
    if outside is not None:
        like = like | outside
    padding = _edge_runs(like)
    return torch.count_nonzero(sample_starts & ~padding), torch.count_nonzero(~padding)


def _tensor(value):
    """A NumPy array of numbers as a tensor sharing its memory (read here, never written); else ``value``."""
    if type(value).__module__ != "numpy" or not hasattr(value, "__array_interface__"):
        return value
    import warnings

    try:
        with warnings.catch_warnings():  # "not writable": these tensors are only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(value)
    except (TypeError, ValueError, RuntimeError):  # object or string arrays: not counted as numbers
        return value


def _from_mapping(batch: Mapping, pad_token_id, want_tokens: bool = True) -> Counts:
    ids = batch.get("input_ids")
    if not isinstance(ids, (torch.Tensor, list, tuple)):
        if "numpy" in (type(ids).__module__, type(batch.get("inputs_embeds")).__module__):
            batch = {key: _tensor(value) for key, value in batch.items()}  # a NumPy batch: read as tensors
            ids = batch.get("input_ids")
        if not isinstance(ids, (torch.Tensor, list, tuple)):
            ids = batch.get("inputs_embeds")
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) else None
    labels = batch.get("labels")
    loss_tokens = None
    if isinstance(labels, torch.Tensor):
        loss_tokens = torch.count_nonzero(labels != IGNORE_INDEX)
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        # 1-D ids are one row: an example not collated (a dataset with format "torch" yields them),
        # or several flattened into one, which position_ids or cu_seq_lens_q tell apart.
        grid = tuple(ids.shape[:2]) if ids.dim() >= 2 else (1, ids.shape[0])
        rows = grid[0]
        positions, runs = _plane(batch.get("position_ids"), grid)
        cu = batch.get("cu_seq_lens_q")
        cu = cu if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2 else None
        if mask is None and (cu is not None or (positions is not None and not runs)):
            samples, tokens = _padding_free(ids, positions, cu, labels, pad_token_id)
            return Counts(samples, tokens, loss_tokens, rows)
        if ids.dim() == 1 and positions is None:
            _one_example_warning()
        return Counts(_samples(rows, positions, runs, mask if ids.dim() > 1 or mask is None else mask.reshape(1, -1)),
                      _tokens_from_ids(ids, mask, pad_token_id) if want_tokens else None, loss_tokens, rows)
    if isinstance(ids, (list, tuple)) and ids and _is_token_id(ids[0]):  # one example: {"input_ids": [1, 2]}
        _one_example_warning()
        list_mask = batch.get("attention_mask")
        in_example = _nonzero(list_mask) if isinstance(list_mask, (list, tuple)) and len(list_mask) == len(ids) \
            else len(ids)  # a list is not padded: every token counts, as in a batch of lists
        return Counts(1, in_example if want_tokens else None, loss_tokens, 1)
    if isinstance(ids, (list, tuple)) and ids:  # an uncollated batch: {"input_ids": [[...], [...]]}
        counts = _from_sequence(ids, pad_token_id, want_tokens)._replace(loss_tokens=loss_tokens)
        list_mask = batch.get("attention_mask")
        if isinstance(list_mask, (list, tuple)) and len(list_mask) == len(ids):
            # A tokenizer's padded output without return_tensors: the mask says which tokens are padding.
            counts = counts._replace(tokens=sum(_nonzero(row) for row in list_mask))
        return counts
    for value in batch.values():  # no ids: the leading dimension of the first array-like value
        rows = _length(value)
        if rows is not None:
            if want_tokens:
                warn_once("no-token-info", "batches carry no input_ids, so progress/tokens is left out of every row. "
                                           "Pass tokens= to update() to count them.")
            return Counts(rows, None, loss_tokens, rows)
    raise BatchError("a batch with no tensors or lists in it", "pass samples= (and tokens=) to update()")


def _is_token_id(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # NumPy's integers too


def _one_example_warning() -> None:
    warn_once("one-example", "a batch whose input_ids are one sequence (1-D) is counted as one example, its tokens "
                             "as one row's; if it holds several examples flattened into one row, pass their "
                             "position_ids (or cu_seq_lens_q) with it, or samples= to update()")


def _nonzero(row) -> Count:
    """Non-zero entries of one mask row: a list, or a 1-D tensor (counted on its device, unread)."""
    if isinstance(row, torch.Tensor):
        return torch.count_nonzero(row)
    return sum(1 for v in row if v)


def _length(value):
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() >= 1 else None
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)  # NumPy and friends
    return shape[0] if shape else None


def sequence_form(batch) -> tuple[str, Any] | None:
    """How a non-empty tuple or list batch holds its data (the counts and the FLOPs read it alike):

    - ``("part", x)``: ``x`` holds the token ids: the inputs of ``(inputs, targets)`` (a dict or a
      tensor), the first of ``(ids, mask, labels)``;
    - ``("ragged", lengths)``: unpadded token sequences of their own lengths (1-D integer tensors,
      or token lists), every token real;
    - ``("examples", batch)``: example dicts, not collated;
    - None: none of these.
    """
    first = batch[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(seq, torch.Tensor) and seq.dim() == 1 and not torch.is_floating_point(seq)
               for seq in batch):
            return "ragged", [seq.shape[0] for seq in batch]
        return "part", first
    if isinstance(first, Mapping):
        return ("examples", batch) if all(isinstance(example, Mapping) for example in batch) else ("part", first)
    if isinstance(first, (list, tuple)):
        return "ragged", [len(seq) for seq in batch]
    return None


def _from_sequence(batch, pad_token_id, want_tokens: bool = True) -> Counts:
    form = sequence_form(batch)
    if form is None:
        raise BatchError(f"a {type(batch).__name__} of {type(batch[0]).__name__}",
                         "pass a batch of sequences, a tensor, or samples= to update()")
    kind, held = form
    if kind == "ragged":  # a sample each, every token counts (shapes only)
        return Counts(len(batch), sum(held), None, len(batch))
    if kind == "part":  # the part that is the batch
        if isinstance(held, torch.Tensor):
            return _from_tensor(held, pad_token_id, want_tokens)
        return read_batch(held, pad_token_id, want_tokens=want_tokens)
    tokens = 0  # a list of examples, not collated
    for example in batch:
        seq = example.get("attention_mask", example.get("input_ids"))
        if seq is None:
            return Counts(len(batch), None, None, len(batch))
        tokens += sum(1 for v in seq if v) if "attention_mask" in example else len(seq)
    return Counts(len(batch), tokens, None, len(batch))


def _from_tensor(batch: torch.Tensor, pad_token_id, want_tokens: bool = True) -> Counts:
    if batch.dim() == 0:
        raise BatchError("a 0-d tensor", "pass a batch with a leading batch dimension, or samples=")
    rows = batch.shape[0]
    if not want_tokens:
        return Counts(rows, None, None, rows)
    if batch.dim() >= 2 and not torch.is_floating_point(batch):  # token ids, (batch, sequence)
        return Counts(rows, _tokens_from_ids(batch, None, pad_token_id), None, rows)
    warn_once("no-token-info-tensor", "batches are tensors without token ids, so progress/tokens is left out of "
                                      "every row. Pass tokens= to update() to count them.")
    return Counts(rows, None, None, rows)


class BatchError(ValueError):
    def __init__(self, what: str, fix: str):
        super().__init__(f"stream_metrics cannot count {what}: {fix}")
        self.what, self.fix = what, fix


def read_batch(batch, pad_token_id: int | None = None, *, want_tokens: bool = True) -> Counts:
    """Samples, tokens and loss tokens in one batch; see the module docstring.

    ``want_tokens=False`` (the caller has the token count): tokens read from values are not
    counted, and nothing is said about how they would be.

    >>> import torch
    >>> c = read_batch({"input_ids": torch.ones(2, 4, dtype=torch.long),
    ...                 "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    >>> c.samples, int(c.tokens)
    (2, 5)
    """
    if isinstance(batch, Mapping):
        if not batch:
            raise BatchError("an empty batch", "skip empty batches, or pass samples=0")
        return _from_mapping(batch, pad_token_id, want_tokens)
    batch = _tensor(batch)
    if isinstance(batch, torch.Tensor):
        return _from_tensor(batch, pad_token_id, want_tokens)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise BatchError("an empty batch", "skip empty batches, or pass samples=0")
        return _from_sequence(batch, pad_token_id, want_tokens)
    data = getattr(batch, "data", None)  # BatchEncoding-like objects that are not Mappings
    if isinstance(data, Mapping):
        return read_batch(data, pad_token_id, want_tokens=want_tokens)
    raise BatchError(f"a batch of type {type(batch).__name__}", "pass a dict, tuple, list or tensor, or samples=")


class Total:
    """One running count: a Python int, plus the device counts added since the total was last read.

    Adding a device count costs no device op: the 0-d tensors are kept as they come and summed when
    the total is read, at a row (``value``), after which ``settle`` turns the total into a host int
    again. Past ``FOLD`` of them (no row for a long while) they are summed on the device into one.
    """

    __slots__ = ("host", "device", "_parts")
    FOLD = 64

    def __init__(self):
        self.host = 0
        self.device = None
        self._parts: list[torch.Tensor] = []

    def add(self, value: Count, fresh: bool = False) -> None:
        """Add ``value``; ``fresh``: a tensor nobody else holds (a count just computed), kept as it is."""
        if isinstance(value, torch.Tensor):
            parts = self._parts
            if parts:
                # ``device``: the parts' device, read from the first one when a second comes (a row
                # every micro-batch reads no device at all).
                device = self.device
                if device is None:
                    device = self.device = parts[0].device
                if value.device != device:
                    # A batch moved to another device (rare): bring the old counts along, on the host.
                    self.host += int(torch.stack(parts).sum())  # host sync, once per device change
                    parts = self._parts = []
                    self.device = None
            if type(value) is not torch.Tensor:  # a subclass's ops stay out of the row's sync
                value = value.as_subclass(torch.Tensor)
            parts.append(value if fresh else value.clone())  # a caller's tensor may change later
            if len(parts) >= self.FOLD:
                self._parts = [torch.stack(parts).sum()]  # queued on the device: no wait here
        else:
            self.host += int(value)

    def value(self) -> Count:
        """The total: an int, or a 0-d device tensor still being computed (read it at a row only).

        The tensor may be one of the counts added (no copy): read it before the next ``add``.
        """
        part = self.unread()
        if part is None:
            return self.host
        return part if self.host == 0 else part + self.host

    def unread(self) -> torch.Tensor | None:
        """The device counts added since the total was last settled, as one 0-d tensor (None: none).

        ``host + unread()`` is ``value()``; a row of one process reads this part and adds the host
        int itself, so a total costs the row no device op beyond the read.
        """
        parts = self._parts
        if not parts:
            return None
        if len(parts) > 1:
            self._parts = parts = [torch.stack(parts).sum()]
        return parts[0]

    def settle(self, value: int) -> None:
        """``value`` is what ``value()`` was just read as (the row's sync): keep it as a host int."""
        self.host, self._parts, self.device = int(value), [], None

    def snapshot(self) -> "Total":
        """A copy taken without waiting for the device (used to mark where a pass ended)."""
        copy = Total()
        copy.host, copy.device, copy._parts = self.host, self.device, list(self._parts)
        return copy
