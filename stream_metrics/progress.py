"""The progress record: how much training data a run has seen, as one immutable value."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import schema


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

    def __getitem__(self, name: str):
        """The value of an axis by the name users type (``"samples"``) or its key (``"progress/samples"``)."""
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
