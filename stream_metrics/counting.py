"""Counting what a batch holds, without waiting for the device.

``read_batch`` turns one batch into ``Counts``; each count is a Python int where the shape alone
tells it (free) or a 0-d tensor on the batch's device where the values must be looked at (a mask,
the labels, packed position ids). ``Totals`` adds those up in place on the device. Nothing here
calls ``.item()``, ``.tolist()`` or ``.cpu()``: the host reads the totals once, when a row is
written (``Totals.values``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Union

import torch

from ._checks import warn_once  # lives in _checks.py; modules that import it from here keep working

IGNORE_INDEX = -100
Count = Union[int, torch.Tensor]


class Counts(NamedTuple):
    samples: Count
    tokens: Count | None = None       # None: the batch carries no token information
    loss_tokens: Count | None = None  # None: the batch has no labels
    rows: int = 0                     # leading dimension: the loader's own unit (packed rows)


def _count_nonzero(tensor: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(tensor)


def _tokens_from_ids(ids: torch.Tensor, mask, pad_token_id) -> Count:
    if mask is not None:
        if mask.shape == ids.shape:
            return _count_nonzero(mask)
        warn_once("mask-shape", f"the attention mask's shape {tuple(mask.shape)} does not match the input ids' "
                                f"{tuple(ids.shape)}; tokens are counted without it. Pass a mask shaped like the "
                                "ids, or tokens= explicitly.")
    if pad_token_id is not None and not torch.is_floating_point(ids):
        return _count_nonzero(ids != pad_token_id)
    warn_once("no-mask", "batches have no attention mask and no pad token id is known, so every token counts as "
                         "non-padding. Pass pad_token_id= to init(), or tokens= to update().")
    return ids.numel() if ids.dim() < 3 else ids.shape[0] * ids.shape[1]


def _samples(rows: int, mapping: Mapping, mask) -> Count:
    # Packed (padding-free) batches hold several examples per row: count where each one starts.
    cu = mapping.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and cu.dim() == 1:
        return max(cu.shape[0] - 1, 0)
    positions = mapping.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() >= 1 and positions.numel() > 0:
        starts = positions == 0
        if mask is not None and mask.shape == positions.shape:
            starts = starts & (mask != 0)
        return _count_nonzero(starts)
    return rows


def _from_mapping(batch: Mapping, pad_token_id) -> Counts:
    ids = batch.get("input_ids")
    if not isinstance(ids, (torch.Tensor, list, tuple)):
        ids = batch.get("inputs_embeds")
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) else None
    labels = batch.get("labels")
    loss_tokens = None
    if isinstance(labels, torch.Tensor):
        loss_tokens = _count_nonzero(labels != IGNORE_INDEX)
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        rows = ids.shape[0]
        return Counts(_samples(rows, batch, mask), _tokens_from_ids(ids, mask, pad_token_id), loss_tokens, rows)
    if isinstance(ids, (list, tuple)) and ids:  # an uncollated batch: {"input_ids": [[...], [...]]}
        return _from_sequence(ids, pad_token_id)._replace(loss_tokens=loss_tokens)
    for value in batch.values():  # no ids: the leading dimension of the first array-like value
        rows = _length(value)
        if rows is not None:
            warn_once("no-token-info", "batches carry no input_ids, so progress/tokens is left out of every row. "
                                       "Pass tokens= to update() to count them.")
            return Counts(rows, None, loss_tokens, rows)
    raise BatchError("a batch with no tensors or lists in it", "pass samples= (and tokens=) to update()")


def _length(value):
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() >= 1 else None
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)  # NumPy and friends
    return shape[0] if shape else None


def _from_sequence(batch, pad_token_id) -> Counts:
    first = batch[0]
    if isinstance(first, torch.Tensor):
        counts = _from_tensor(first, pad_token_id)
        return counts
    if isinstance(first, Mapping):  # a list of examples, not collated
        tokens = 0
        for example in batch:
            seq = example.get("attention_mask", example.get("input_ids"))
            if seq is None:
                return Counts(len(batch), None, None, len(batch))
            tokens += sum(1 for v in seq if v) if "attention_mask" in example else len(seq)
        return Counts(len(batch), tokens, None, len(batch))
    if isinstance(first, (list, tuple)):  # ragged token lists: no padding, every token counts
        return Counts(len(batch), sum(len(seq) for seq in batch), None, len(batch))
    raise BatchError(f"a {type(batch).__name__} of {type(first).__name__}",
                     "pass a batch of sequences, a tensor, or samples= to update()")


def _from_tensor(batch: torch.Tensor, pad_token_id) -> Counts:
    if batch.dim() == 0:
        raise BatchError("a 0-d tensor", "pass a batch with a leading batch dimension, or samples=")
    rows = batch.shape[0]
    if batch.dim() >= 2 and not torch.is_floating_point(batch):  # token ids, (batch, sequence)
        return Counts(rows, _tokens_from_ids(batch, None, pad_token_id), None, rows)
    warn_once("no-token-info-tensor", "batches are tensors without token ids, so progress/tokens is left out of "
                                      "every row. Pass tokens= to update() to count them.")
    return Counts(rows, None, None, rows)


class BatchError(ValueError):
    def __init__(self, what: str, fix: str):
        super().__init__(f"stream_metrics cannot count {what}: {fix}")
        self.what = what


def read_batch(batch, pad_token_id: int | None = None) -> Counts:
    """Samples, tokens and loss tokens in one batch; see the module docstring.

    >>> import torch
    >>> c = read_batch({"input_ids": torch.ones(2, 4, dtype=torch.long),
    ...                 "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    >>> c.samples, int(c.tokens)
    (2, 5)
    """
    if isinstance(batch, Mapping):
        if not batch:
            raise BatchError("an empty batch", "skip empty batches, or pass samples=0")
        return _from_mapping(batch, pad_token_id)
    if isinstance(batch, torch.Tensor):
        return _from_tensor(batch, pad_token_id)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise BatchError("an empty batch", "skip empty batches, or pass samples=0")
        return _from_sequence(batch, pad_token_id)
    data = getattr(batch, "data", None)  # BatchEncoding-like objects that are not Mappings
    if isinstance(data, Mapping):
        return read_batch(data, pad_token_id)
    raise BatchError(f"a batch of type {type(batch).__name__}", "pass a dict, tuple, list or tensor, or samples=")


class Total:
    """One running count: a Python int plus an in-place sum on each device that fed it."""

    __slots__ = ("host", "device", "_device_total")

    def __init__(self):
        self.host = 0
        self.device = None
        self._device_total = None

    def add(self, value: Count) -> None:
        if isinstance(value, torch.Tensor):
            if self._device_total is None or value.device != self.device:
                self._fold()
                self.device = value.device
                self._device_total = torch.zeros((), dtype=torch.int64, device=value.device)
            self._device_total.add_(value)  # queued on the device: no wait here
        else:
            self.host += int(value)

    def _fold(self) -> None:
        if self._device_total is not None:
            # A batch moved to another device (rare): bring the old total along, on the host.
            self.host += int(self._device_total)  # host sync, once per device change
            self._device_total = None

    def value(self) -> Count:
        """The total: an int, or a 0-d device tensor still being computed (read it at a row only)."""
        return self.host if self._device_total is None else self._device_total + self.host

    def snapshot(self) -> "Total":
        """A copy taken without waiting for the device (used to mark where a pass ended)."""
        copy = Total()
        copy.host, copy.device = self.host, self.device
        copy._device_total = None if self._device_total is None else self._device_total.clone()
        return copy
