"""The progress tally: what this rank has counted, and the row's one gather that sums every rank's.

``Tally.update`` is the hot path (every micro-batch): counts are added on the device, no host sync.
``Tally.sync`` is the one collective and host sync of a row: each rank's fields are gathered, the
replicas' weighed out (layout.py), the epoch estimated (epoch.py), and one ``Progress`` made.

>>> tally = Tally()
>>> tally.update(samples=4, tokens=30); tally.update(samples=4, tokens=20)
>>> p = tally.sync()
>>> p.samples, p.tokens, p.step
(8, 50, 2)
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from . import distributed, flops, layout as layouts
from ._checks import warn_once, whole_number
from .counting import IGNORE_INDEX, BatchError, Count, Total, read_batch
from .record import RankRecord
from .epoch import DatasetProbe, EpochEstimator
from .progress import Progress

# The collectives a Run joins, as sent in the gather (run.progress and due() are the same call).
CALLS = {"log": 1, "progress": 2, "state_dict": 3, "summary": 4}
_CALL_TEXT = {1: "log()", 2: "run.progress (or due())", 3: "state_dict()", 4: "summary()"}


class Tally:
    """This rank's counts since the session began (``base``: the totals restored from a checkpoint).

    Samples, tokens and loss tokens are device-side totals (counting.Total); rows, micro-batches and
    optimizer steps are host ints. Every ``gradient_accumulation_steps`` micro-batches make one step;
    a pass's end (``end_pass``) closes a window it cut short. ``latest`` is the Progress of the
    latest sync, the same on every rank.
    """

    def __init__(self, layout: layouts.Layout | None = None, gradient_accumulation_steps: int = 1,
                 pad_token_id: int | None = None, flop_formula: flops.FlopFormula | None = None,
                 estimator: EpochEstimator | None = None, probe: DatasetProbe | None = None):
        self.layout = layout or layouts.Layout.every_rank()
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.pad_token_id = pad_token_id
        self.flop_formula = flop_formula
        self.estimator = estimator or EpochEstimator()
        self.probe = probe or DatasetProbe.of(None)
        self.step_override: int | None = None  # set_step(): the caller counts optimizer steps
        self.calls = 0  # collectives joined: each rank's count rides in the gather
        self.launched = distributed.launched_world_size()
        self.reset(Progress(), rows=0, batches=0)

    def reset(self, base: Progress, rows: int, batches: int) -> None:
        """Start a session from ``base`` (a checkpoint's totals; ``rows``, ``batches``: its data position)."""
        self.base, self.base_rows, self.base_batches = base, rows, batches
        self.samples, self.tokens, self.loss_tokens = Total(), Total(), Total()
        self.flops = flops.FlopCount(self.flop_formula) if self.flop_formula else None
        # A batch's rows are its samples here, and no FLOPs are counted: ``_update_padded`` may take it.
        self._plain = self.flops is None and len(self.layout.context_parallel) <= 1
        self.rows = self.micro_batches = self.steps = self.in_window = 0
        self.has_tokens = self.has_loss_tokens = False
        self.passes, self.pass_start = 0, Total()
        self.first_pass: Total | None = None  # the samples at the first pass's end
        self.t0 = time.monotonic()
        self.latest = base
        self._mark: dict[str, Any] | None = None

    # ------------------------------------------------------------------ a mark to go back to
    # What a micro-batch changes (update, micro_batch_done); a pass's end (end_pass) is never undone.
    _MARKED = ("rows", "micro_batches", "steps", "in_window", "has_tokens", "has_loss_tokens", "passes")

    def mark(self) -> None:
        """Remember the counts as of now (an optimizer step's start), without waiting for the device:
        a checkpoint written before the step's optimizer step (the Trainer's JIT checkpoint on
        SIGTERM) holds the counts as of here, since its resume trains the step's micro-batches again."""
        mark = {name: getattr(self, name) for name in self._MARKED}
        mark.update(samples=self.samples.snapshot(), tokens=self.tokens.snapshot(),
                    loss_tokens=self.loss_tokens.snapshot(),
                    flops=self.flops.snapshot() if self.flops is not None else None)
        self._mark = mark

    def counted_since_mark(self) -> bool:
        """Whether micro-batches were counted since ``mark()`` within the same pass."""
        mark = self._mark
        return mark is not None and mark["micro_batches"] != self.micro_batches and mark["passes"] == self.passes

    @contextmanager
    def as_at_mark(self) -> Iterator[None]:
        """Within this block the tally reads as it was at ``mark()`` (for one ``sync``); after it, as now."""
        mark = self._mark
        assert mark is not None
        now = {name: getattr(self, name) for name in mark}
        for name, value in mark.items():
            setattr(self, name, value)
        try:
            yield
        finally:
            for name, value in now.items():
                setattr(self, name, value)

    # ------------------------------------------------------------------ counting (hot path)
    def update(self, batch: Any = None, *, samples: Any = None, tokens: Any = None, loss_tokens: Any = None) -> None:
        """Account for one micro-batch (``Run.update``); explicit counts override what is read."""
        if self._plain and samples is None and tokens is None and loss_tokens is None and self._update_padded(batch):
            return
        # Explicit counts are checked first: a bad one is a clear error at once, not hours later.
        if samples is not None or tokens is not None or loss_tokens is not None:
            samples, tokens, loss_tokens = (None if value is None else check_count(name, value) for name, value in
                                            (("samples", samples), ("tokens", tokens), ("loss_tokens", loss_tokens)))
        counts = None
        if batch is not None:
            try:
                counts = read_batch(batch, self.pad_token_id, want_tokens=tokens is None)
            except BatchError as exc:
                if samples is None:
                    given = " and ".join(name for name, value in (("tokens", tokens), ("loss_tokens", loss_tokens))
                                         if value is not None)
                    warn_once("batch:" + exc.what, f"cannot count {exc.what}: {exc.fix}; " + (
                        f"its samples are not counted (the {given} passed are)" if given
                        else "this batch is not counted"))
                    if not given:
                        self.micro_batch_done()  # it was still trained on: the optimizer's steps go on
                        return
                    samples = 0
        elif samples is None:
            raise TypeError("update() needs a batch or samples=")
        if counts is not None:
            samples = counts.samples if samples is None else samples
            tokens = counts.tokens if tokens is None else tokens
            loss_tokens = counts.loss_tokens if loss_tokens is None else loss_tokens
        # Sliced context parallelism: every rank of the group holds the same rows (the group's first
        # rank counts them), while example starts read from position_ids are split between the ranks.
        from_starts = counts is not None and samples is counts.samples and isinstance(samples, torch.Tensor)
        # Counts read from the batch are fresh tensors, kept as they are; a caller's are copied.
        self.samples.add(samples if from_starts or not self.layout.rows_counted_elsewhere else 0,
                         fresh=counts is not None and samples is counts.samples)
        if self.flops is not None:
            self.flops.add(batch, tokens)
        self.rows += counts.rows if counts is not None else (samples if isinstance(samples, int) else 0)
        if tokens is not None:
            self.tokens.add(tokens, fresh=counts is not None and tokens is counts.tokens)
            self.has_tokens = True
        if loss_tokens is not None:
            self.loss_tokens.add(loss_tokens, fresh=counts is not None and loss_tokens is counts.loss_tokens)
            self.has_loss_tokens = True
        self.micro_batch_done()

    def _update_padded(self, batch: dict) -> bool:
        """``update(batch)`` for the commonest batch, in one call: a dict of 2-D ``input_ids`` and an
        ``attention_mask`` of their shape (plain tensors), ``labels`` a tensor or absent, and nothing
        that packs examples into rows (``position_ids``, ``cu_seq_lens_q``). Counted as read_batch
        counts it (a sample per row, the mask's tokens, the labels' loss tokens); False, with nothing
        counted, for any other batch. Right after a training step every call and check costs a few
        microseconds (caches cold), so this path makes as few as it can (benchmarks/README.md)."""
        if type(batch) is not dict:  # a Mapping of another type may hold anything: read_batch reads it
            return False
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        if type(ids) is not torch.Tensor or type(mask) is not torch.Tensor or "position_ids" in batch \
                or "cu_seq_lens_q" in batch:
            return False
        shape = ids.shape
        if len(shape) != 2 or mask.shape != shape:
            return False
        labels = batch.get("labels")
        if labels is not None and type(labels) is not torch.Tensor:
            return False
        self.tokens.add(torch.count_nonzero(mask), fresh=True)
        if labels is not None:
            self.loss_tokens.add(torch.count_nonzero(labels != IGNORE_INDEX), fresh=True)
            self.has_loss_tokens = True
        rows = shape[0]
        self.samples.host += rows
        self.rows += rows
        self.has_tokens = True
        self.micro_batch_done()
        return True

    def micro_batch_done(self) -> None:
        self.micro_batches += 1
        self.in_window += 1
        if self.in_window == self.gradient_accumulation_steps:
            self.steps += 1
            self.in_window = 0

    def end_pass(self) -> None:
        """A full pass over the data has ended: a window it cut short makes its step here."""
        if self.in_window:
            self.steps += 1
            self.in_window = 0
        self.passes += self.probe.repeats or 1  # a stream repeated n times (repeat(n)) held n passes
        if self.first_pass is None:
            self.first_pass = self.samples.snapshot()
        self.pass_start = self.samples.snapshot()

    @property
    def rows_total(self) -> int:
        """Rows read since the run began (this session's plus the checkpoint's): the data position."""
        return self.base_rows + self.rows

    @property
    def batches_total(self) -> int:
        return self.base_batches + self.micro_batches

    # ------------------------------------------------------------------ the row's one gather
    def sync(self, call: str = "log", pending: Any = ()) -> Progress:
        """Bring every rank's counts together: the one collective and host sync of a row.

        ``pending``: this rank's tensor metrics (``sanitize.Pending``), read in the same sync.

        ``call`` (``"log"``, ``"progress"``, ``"state_dict"``, ``"summary"``) and this rank's count of
        calls go with the gather, so a call that only some ranks make (``if rank == 0:
        run.state_dict()``) stops every rank with a clear error instead of pairing with another
        rank's next row and mixing up their counts.
        """
        now = time.monotonic()
        self.calls += 1
        if distributed.one_process(self.launched):
            return self._sync_alone(now, pending)
        base = self.base
        main = distributed.is_main()
        samples_now = self.samples.value()
        fields = cast(RankRecord, {
            "has_tokens": int(self.has_tokens),
            "has_loss_tokens": int(self.has_loss_tokens),
            "steps": self.steps,
            "wall_clock": base.wall_clock + (now - self.t0),
            "passes": self.passes,
            **self.probe.local(rows=self.rows + (self.base_rows if main else 0),
                               batches=self.micro_batches + (self.base_batches if main else 0)),
            "samples": samples_now, "tokens": self.tokens.value(), "loss_tokens": self.loss_tokens.value(),
            "first_pass_samples": self.first_pass.value() if self.first_pass is not None else -1,
            "samples_in_pass": self._in_pass(samples_now if self.passes == 0
                                             else samples_now - self.pass_start.value()),
            **(self.flops.local() if self.flops is not None else {}),
        })
        fields.update(self.layout.fields())
        fields["call"], fields["call_seq"] = CALLS[call], self.calls
        gathered = distributed.gather(fields, pending)
        ranks = [cast(RankRecord, {k: _whole(v) for k, v in r.items()}) for r in gathered]
        check_same_call(ranks)
        # Replicas (tensor-parallel peers, later pipeline stages, ranks sharing a batch) add nothing.
        weights = layouts.weights(ranks)
        reading = layouts.readers(ranks, weights)  # one per distinct batch: the epoch's ranks
        mine = ranks[distributed.rank()]
        samples = sum(w * r["samples"] for r, w in zip(ranks, weights))
        tokens = sum(w * r["tokens"] for r, w in zip(ranks, weights))
        loss_tokens = sum(w * r["loss_tokens"] for r, w in zip(ranks, weights))
        any_tokens = any(r["has_tokens"] for r in ranks)
        any_loss = any(r["has_loss_tokens"] for r in ranks)
        steps, wall_clock = max(r["steps"] for r in ranks), max(r["wall_clock"] for r in ranks)
        # What this rank's totals were read as: kept as host ints, so the next row reads only what follows.
        self.samples.settle(mine["samples"])
        self.tokens.settle(mine["tokens"])
        self.loss_tokens.settle(mine["loss_tokens"])
        if self.flops is not None:
            self.flops.settle(mine)
        return self._progress(samples, tokens, loss_tokens, any_tokens, any_loss, steps, wall_clock, reading,
                              ranks, weights)

    def _sync_alone(self, now: float, pending: Any) -> Progress:
        """``sync`` of a process with no other rank (the hot path of a plain loop): no rank to meet,
        weigh or check. Only the totals are read, in one wait: read_here adds their host ints to
        what it reads, so a row costs one read and no device op for the sums."""
        if self.passes or self.first_pass is not None or self.flops is not None:
            return self._sync_alone_in_full(now, pending)
        # The commonest row (the first pass, no FLOPs): three totals and the row's metrics, read in
        # one wait; each total a host int plus its unread counts (no device op for the sums).
        samples, tokens, loss_tokens = distributed.read_totals((self.samples, self.tokens, self.loss_tokens), pending)
        return self._row_alone(now, (), samples, tokens, loss_tokens, 0, -1)

    def _sync_alone_in_full(self, now: float, pending: Any) -> Progress:
        """``_sync_alone`` past a pass's end, or counting FLOPs: every total the row reads."""
        totals: dict = {"samples": self.samples, "tokens": self.tokens, "loss_tokens": self.loss_tokens}
        if self.passes:
            totals["pass_start"] = self.pass_start  # where this pass began
        if self.first_pass is not None:
            totals["first_pass"] = self.first_pass
        if self.flops is not None:
            totals.update(self.flops.totals())
        mine = distributed.read_here(totals, pending)
        samples, tokens, loss_tokens = mine["samples"], mine["tokens"], mine["loss_tokens"]
        self.samples.settle(samples)
        self.tokens.settle(tokens)
        self.loss_tokens.settle(loss_tokens)
        start = 0
        if self.passes:
            start = mine["pass_start"]
            self.pass_start.settle(start)
        first = -1
        if self.first_pass is not None:
            first = mine["first_pass"]
            self.first_pass.settle(first)
        if self.flops is not None:
            self.flops.settle(cast(RankRecord, mine))
        return self._row_alone(now, [mine], samples, tokens, loss_tokens, start, first)

    def _row_alone(self, now: float, ranks: Any, samples: int, tokens: int, loss_tokens: int, start: int,
                   first: int) -> Progress:
        """The Progress of a one-process row from the values read (``ranks``: [what was read], for
        the FLOPs; ``start``: the samples where this pass began; ``first``: at the first pass's end)."""
        # (No typing.cast on this path: a call each, a microsecond cold.)
        record: RankRecord = self.probe.local(rows=self.rows + self.base_rows,  # type: ignore[assignment]
                                              batches=self.micro_batches + self.base_batches)
        record["passes"] = self.passes
        record["first_pass_samples"] = first
        record["samples_in_pass"] = _whole(self._in_pass(samples - start))
        return self._progress(samples, tokens, loss_tokens, self.has_tokens, self.has_loss_tokens, self.steps,
                              self.base.wall_clock + (now - self.t0), [record], ranks, None)

    def _progress(self, samples: int, tokens: int, loss_tokens: int, any_tokens: Any, any_loss: Any, steps: int,
                  wall_clock: float, reading: list[RankRecord], ranks: list[RankRecord],
                  weights: list[int] | None) -> Progress:
        """The row's Progress (``latest``): this session's sums plus the checkpoint's, and the epoch estimate."""
        base = self.base
        samples += base.samples
        epoch, source = self.estimator.estimate(samples, reading)
        self.latest = Progress._trusted({
            "step": int(self.step_override if self.step_override is not None else base.step + steps),
            "samples": int(samples),
            "tokens": int((base.tokens or 0) + tokens) if base.tokens is not None or any_tokens else None,
            "loss_tokens": (int((base.loss_tokens or 0) + loss_tokens)
                            if base.loss_tokens is not None or any_loss else None),
            "epoch": float(epoch), "wall_clock": float(wall_clock), "epoch_source": source,
            # FLOPs are weighed like tokens: replicas (tensor-parallel peers) do not add their batch again.
            "flops": base.flops if self.flops is None else (base.flops or 0) + self.flops.total(ranks, weights)})
        return self.latest

    def _in_pass(self, in_pass: Any) -> Any:
        """This rank's samples in the current pass (``in_pass``: since the pass began, this session)."""
        if self.base.samples and self.passes == 0 and self.estimator.passes == 0 and \
                not self.layout.rows_counted_elsewhere:
            # The restored samples were all in the first pass, read by the data-parallel ranks.
            return in_pass + self.base.samples / self.layout.data_parallel_size
        return in_pass


def _whole(value: Any) -> Any:
    """A gathered number as an int where it is whole (floats travel by their bits)."""
    return value if type(value) is int else int(value) if float(value).is_integer() else value


def check_same_call(ranks: list[RankRecord]) -> None:
    """Every rank must be in the same call: otherwise raise, on every rank alike (they all see this)."""
    if len({(r["call"], r["call_seq"]) for r in ranks}) == 1:
        return
    where = ", ".join(f"rank {i} in {_CALL_TEXT.get(r['call'], '?')} (its call {r['call_seq']})"
                      for i, r in enumerate(ranks))
    raise RuntimeError(
        f"stream_metrics: the ranks met in different calls: {where}. state_dict() and progress bring the "
        "ranks together: call them on every rank, as log() (e.g. state = run.state_dict() on every rank, "
        "then save it on rank 0). These counts were not used.")


def check_count(name: str, value: Any) -> Count:
    """An explicit count as ``update`` adds it; a clear error for a Python value that is not a count.

    Tensors are taken on their device without reading them (that would wait for the device): a
    one-element tensor counts, a float or bool one is rounded to int64 there (one warning).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"update({name}=<tensor of shape {tuple(value.shape)}>): a count must be a number "
                             "or a one-element tensor; pass its sum (e.g. mask.sum())")
        value = value.reshape(())
        if value.dtype != torch.int64:
            if torch.is_floating_point(value) or value.is_complex():
                warn_once(f"float-count:{name}", f"update({name}=...) got a {value.dtype} tensor: counts are taken "
                                                 "as whole numbers, rounded on the device; pass an integer tensor "
                                                 "(e.g. mask.sum()) to silence this")
                value = torch.nan_to_num(value.real if value.is_complex() else value, nan=0.0).round()
            value = value.to(torch.int64)
        return value
    try:  # any number type: NumPy's floats and Fraction too must be whole (int() would cut 2.5 to 2)
        return whole_number(name, value)
    except ValueError:
        raise ValueError(f"update({name}={value!r}): a count must be a whole number >= 0 (or a 0-d tensor)") from None
