"""Ranks, and the one collective a row costs.

Works with ``torch.distributed`` alone (torchrun, accelerate launch and DeepSpeed all set it up).
Before the process group exists, the launcher's environment (RANK, WORLD_SIZE) tells the rank, so
that only the main process creates runs even when stream_metrics starts first.
"""
from __future__ import annotations

import numbers
import os
import struct
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from .counting import Total


_AVAILABLE = dist.is_available()
R = TypeVar("R", bound=Mapping[str, Any])  # a rank's record (record.RankRecord), or any dict of numbers


def _world_registry():
    """torch.distributed's registry of groups, whose ``_default_pg`` is what ``is_initialized()`` reads
    through three Python calls (about 10 µs of a row, run cold); None where a torch lacks it."""
    world = getattr(getattr(dist, "distributed_c10d", None), "_world", None) if _AVAILABLE else None
    return world if world is not None and hasattr(world, "_default_pg") else None


_WORLD = _world_registry()


def _active() -> bool:
    # Asked afresh each time: a cached reference to the process group would keep it alive past
    # destroy_process_group(), and a gloo group destroyed at interpreter exit aborts the process
    # ("terminate called without an active exception"). The registry is not a group: it lives as
    # long as torch.distributed does, and its default group is read each time.
    if _WORLD is not None:
        return _WORLD._default_pg is not None
    return _AVAILABLE and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _active() else launched_world_size()


def launched_world_size() -> int:
    """The processes a launcher started (its WORLD_SIZE; 1 without one), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process(launched: int) -> bool:
    """No other rank: ``launched`` is ``launched_world_size()`` read when the run began (a launcher
    sets it before the process starts; reading the environment at every row costs more than the rest
    of the check)."""
    return dist.get_world_size() == 1 if _active() else launched == 1


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# How a value travels in the row's one int64 vector (int64: every backend has it; MPS has no float64).
_INT, _FLOAT32, _FLOAT64 = 0, 1, 2


def _slot(value, device):
    """(``value`` as one int64, its kind): integers as they are, floats by their bits, so reads are exact.

    Device values are converted on their device (no wait); Python values stay on the host.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.requires_grad and value.device == device:
            # The common cases in fewest ops: a count as the counting made it, a float32 loss.
            if value.dtype is torch.int64:
                return value, _INT
            if value.dtype is torch.float32:
                return value.view(torch.int32).long(), _FLOAT32
        value = value.detach().reshape(())
        if value.is_floating_point():
            if value.dtype == torch.float64:  # never on MPS; reinterpreted before it moves
                return value.view(torch.int64).to(device), _FLOAT64
            return value.to(torch.float32).view(torch.int32).to(device=device, dtype=torch.int64), _FLOAT32
        return value.to(device=device, dtype=torch.int64), _INT
    if isinstance(value, numbers.Integral):
        return int(value), _INT
    return struct.unpack("<q", struct.pack("<d", float(value)))[0], _FLOAT64


def _read(bits: int, kind: int):
    if kind == _FLOAT64:
        return struct.unpack("<d", struct.pack("<q", bits))[0]
    if kind == _FLOAT32:
        return struct.unpack("<f", struct.pack("<i", bits))[0]
    return bits


def _vector(slots, device) -> torch.Tensor:
    # Host values in one tensor (one copy to the device), device values put in place there.
    vector = torch.tensor([0 if isinstance(s, torch.Tensor) else s for s in slots], dtype=torch.int64).to(device)
    on_device = [i for i, s in enumerate(slots) if isinstance(s, torch.Tensor)]
    if on_device:
        vector[on_device] = torch.stack([slots[i] for i in on_device])
    return vector


def gather(fields: R, pending=()) -> list[R]:
    """Every rank's ``fields`` (numbers or 0-d tensors), as host numbers, in rank order.

    This is the row's synchronisation point: one all_gather where several processes run, and the
    one wait for the device (``tolist``) everywhere. ``pending`` (``sanitize.Pending``: this rank's
    tensor metrics) are read in the same wait; each gets its ``value``. Everything travels as int64
    (floats by their bits), so counts are exact and no device needs float64.
    """
    if not _active() or world_size() == 1:
        return [read_here(fields, pending)]
    names, n = list(fields), len(fields)
    device = _collective_device()
    slots = [_slot(v, device) for v in fields.values()]
    # Each rank's kinds travel with its values: a count may be a float on one rank, an int on another.
    vector = _vector([s for s, _ in slots] + [k for _, k in slots], device)
    out = [torch.empty_like(vector) for _ in range(world_size())]
    dist.all_gather(out, vector)  # the row's one collective
    local = [_slot(p.tensor, device) for p in pending]
    flat = torch.cat([torch.stack(out).flatten(), _vector([s for s, _ in local], device)]).tolist()  # host sync
    rows = [flat[r * 2 * n:(r + 1) * 2 * n] for r in range(world_size())]
    ranks = [cast(R, dict(zip(names, (_read(b, k) for b, k in zip(row[:n], row[n:]))))) for row in rows]
    mine = [_read(b, kind) for b, (_, kind) in zip(flat[world_size() * 2 * n:], local)]
    for p, value in zip(pending, mine):
        p.value = value
    return ranks


def _on_host(tensors: list) -> bool:
    """Every tensor is in host memory (CPU): reading them one by one waits for nothing."""
    for t in tensors:  # a loop, not a generator: this runs at every row, right after a training step
        if not t.is_cpu:
            return False
    return True


def _read_tensors(tensors: list) -> list:
    """The values of 0-d ``tensors`` (ints, or floats read exactly), in one wait for the device."""
    if _on_host(tensors):
        # No device to wait for: each is read as it is (an int64 count as an int, a float exactly),
        # which costs fewer ops than converting them all for one stack.
        values = []
        for t in tensors:
            values.append(t.item())
        return values
    device = tensors[0].device
    slots = [_slot(t, device) for t in tensors]
    read = torch.stack([s for s, _ in slots]).tolist()  # host sync: the row's one wait
    return [bits if kind == _INT else _read(bits, kind) for bits, (_, kind) in zip(read, slots)]


def read_totals(totals: tuple, pending=()) -> list:
    """``read_here`` for ``counting.Total``s alone: each total's value (its host int plus its unread
    device counts), which it keeps as its host int from then on (``settle``), and ``pending``'s values,
    read in one wait. The commonest row of one process reads this way, with the fewest steps."""
    tensors = []
    for total in totals:
        part = total.unread()
        if part is not None:
            tensors.append(part)
    for p in pending:
        tensors.append(p.tensor)
    values = _read_tensors(tensors) if tensors else ()
    out, i = [], 0
    for total in totals:
        value = total.host
        if total._parts:
            value += values[i]
            i += 1
            total.settle(value)
        out.append(value)
    for p in pending:
        p.value = values[i]
        i += 1
    return out


def read_here(fields: R, pending=()) -> R:
    """One process's ``gather``: ``fields`` with its device values read, in one wait for the device.

    A value may be a tensor, a host number, or a ``counting.Total``, read as its host int plus its
    unread device counts (no device op for the sum). The tensors are read together, in one stack
    (floats by their bits, so reads are exact); host numbers stay as they are. ``fields`` is updated
    in place and returned.
    """
    out: dict = fields  # type: ignore[assignment]  # the caller's record, updated in place
    names, tensors, offsets = [], [], []
    for k, v in fields.items():
        if type(v) is Total:
            part = v.unread()
            if part is None:
                out[k] = v.host
                continue
            names.append(k)
            tensors.append(part)
            offsets.append(v.host)
        elif isinstance(v, torch.Tensor):
            names.append(k)
            tensors.append(v)
            offsets.append(0)
    for p in pending:
        tensors.append(p.tensor)
    if not tensors:
        return fields
    values = _read_tensors(tensors)
    for k, offset, v in zip(names, offsets, values):
        out[k] = v + offset if offset else v
    for p, v in zip(pending, values[len(names):]):
        p.value = v
    return fields
