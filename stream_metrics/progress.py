"""The progress record: how much training data a run has seen, as one immutable value; and the
progress file, where the wall-clock of the latest row is kept beside the checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import weakref
from dataclasses import dataclass

from . import schema
from ._checks import warn_once


@dataclass(frozen=True)
class Progress:
    """Where a run is, on every axis, summed over every rank.

    >>> p = Progress(step=3, samples=96, tokens=40_000)
    >>> p["samples"], p[schema.TOKENS]
    (96, 40000)
    """

    step: int = 0
    samples: int = 0
    tokens: int | None = None        # None: no batch has carried token information
    loss_tokens: int | None = None   # None: no batch has carried labels
    epoch: float = 0.0
    wall_clock: float = 0.0
    epoch_source: str = "none"
    flops: int | float | None = None  # None: FLOPs are not counted (no model= or flops_per_token=)

    @classmethod
    def _trusted(cls, fields: dict) -> "Progress":
        """A Progress from a dict of every field (``step``, ``samples``, ``tokens``, ``loss_tokens``,
        ``epoch``, ``wall_clock``, ``epoch_source``, ``flops``), each already of its type (a row's
        sync): made without the frozen dataclass's ``__init__``, which sets each field through
        ``object.__setattr__``, nor keyword arguments (right after a training step, half the cost)."""
        progress = object.__new__(cls)
        progress.__dict__.update(fields)
        return progress

    def __getitem__(self, name: str):
        """The value of an axis by the name users type (``"samples"``) or its key (``"progress/samples"``)."""
        if name in ("loss_tokens", schema.LOSS_TOKENS):  # a row's key, though not an x-axis
            return self.loss_tokens
        return getattr(self, schema.axis_key(name, allowed=tuple(schema.AXES) + ("loss_tokens",),
                                             what="axis")[len(schema.AXIS_PREFIX):])

    def axes(self) -> dict:
        """The row's progress keys and values; token keys only where tokens are known."""
        row = {schema.STEP: self.step, schema.SAMPLES: self.samples, schema.EPOCH: self.epoch,
               schema.WALL_CLOCK: self.wall_clock}
        if self.tokens is not None:
            row[schema.TOKENS] = self.tokens
        if self.loss_tokens is not None:
            row[schema.LOSS_TOKENS] = self.loss_tokens
        if self.flops is not None:
            row[schema.FLOPS] = float(self.flops)  # kept exact here; a float in the row (beyond int64)
        return row

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        """Read a saved record back, checking every field (a corrupt state dict gets a clear error)."""
        if not isinstance(d, dict):
            raise ValueError(f"progress must be a dict, not {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown progress fields {sorted(unknown)}")
        out = cls(**d)
        for name in ("step", "samples", "tokens", "loss_tokens"):
            v = getattr(out, name)
            if v is None and name in ("tokens", "loss_tokens"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"progress {name}={v!r} is not a non-negative integer")
        for name in ("epoch", "wall_clock"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"progress {name}={v!r} is not a non-negative number")
        if out.flops is not None and (isinstance(out.flops, bool) or not isinstance(out.flops, (int, float))
                                      or not math.isfinite(out.flops) or out.flops < 0):
            raise ValueError(f"progress flops={out.flops!r} is not a non-negative number")
        if out.epoch_source not in schema.EPOCH_SOURCES:
            raise ValueError(f"progress epoch_source={out.epoch_source!r} is not one of {schema.EPOCH_SOURCES}")
        return dataclasses.replace(out, epoch=float(out.epoch), wall_clock=float(out.wall_clock))


class ProgressFile:
    """The wall-clock of the latest row, beside the checkpoints (``progress_file=``): a run resumed
    from an older checkpoint (after a crash) goes on from here, so wall_clock never goes back.

    Written at every row, so it must be cheap: one ``os.pwrite`` at offset 0 into a file kept open,
    padded with spaces to a width that never shrinks, so the file always holds one whole JSON text
    (a write of a few hundred bytes to a regular file is not cut short by the process being killed).
    """

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None  # opened at the first write
        self.width = 0
        self._ids: dict | None = None
        self._head = b""

    def write(self, run_ids: dict, wall_clock: float) -> None:
        try:
            self._write(run_ids, wall_clock)
        except OSError as exc:
            warn_once("progress-file", f"cannot write {self.path} ({exc}); a resumed run's "
                                       "wall_clock goes on from its checkpoint")

    def _write(self, run_ids: dict, wall_clock: float) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            weakref.finalize(self, os.close, self.fd)
            self.width = os.fstat(self.fd).st_size  # cover whatever an earlier run left there
        if run_ids != self._ids:  # the ids change once or twice a run: encode them then only
            self._ids = dict(run_ids)
            self._head = b'{"run_ids": ' + json.dumps(run_ids).encode() + b', "wall_clock": '
        text = self._head + repr(float(wall_clock)).encode() + b"}"
        if len(text) > self.width:
            self.width = len(text) + 64
        os.pwrite(self.fd, text.ljust(self.width), 0)

    def wall_clock_at_last_row(self, run_ids: dict) -> float:
        """The wall-clock the file holds where it was written by the same runs (``run_ids``), else 0."""
        try:
            with open(self.path) as f:
                last = json.load(f)
        except (OSError, ValueError, TypeError):
            return 0.0
        same_run = run_ids and all(last.get("run_ids", {}).get(k) == v for k, v in run_ids.items())
        wall = last.get("wall_clock")
        return float(wall) if same_run and isinstance(wall, (int, float)) and math.isfinite(wall) else 0.0
