"""tally.py on its own: the accumulation window, the pass bookkeeping across a resume, the call check.

Every expected figure is worked out here from the calls the test makes, not read from the library.
"""
import math

import pytest
import torch

import stream_metrics
from stream_metrics import distributed
from stream_metrics.epoch import EpochEstimator
from stream_metrics.progress import Progress
from stream_metrics.tally import CALLS, Tally, check_count, check_same_call


def expected_steps(passes: list[int], open_pass: int, accumulation: int) -> int:
    """Optimizer steps: every full window, plus one for each window a pass's end cut short."""
    return sum(math.ceil(n / accumulation) for n in passes) + open_pass // accumulation


@pytest.mark.parametrize("accumulation", [1, 3, 4])
def test_a_window_cut_by_a_pass_end_makes_a_step_and_the_next_pass_starts_a_new_one(accumulation):
    tally = Tally(gradient_accumulation_steps=accumulation)
    passes, open_pass = [6, 5], 7
    for n in passes:
        for _ in range(n):
            tally.update(samples=2)
        tally.end_pass()
    for _ in range(open_pass):
        tally.update(samples=2)
    progress = tally.sync()
    assert progress.step == expected_steps(passes, open_pass, accumulation)
    assert progress.samples == 2 * (sum(passes) + open_pass)
    assert tally.micro_batches == sum(passes) + open_pass
    assert tally.in_window == open_pass % accumulation


def test_a_pass_end_on_a_window_boundary_adds_no_step():
    tally = Tally(gradient_accumulation_steps=4)
    for _ in range(8):
        tally.update(samples=1)
    tally.end_pass()
    assert tally.sync().step == 2


def test_a_batch_that_cannot_be_read_still_moves_the_window(recwarn):
    tally = Tally(gradient_accumulation_steps=2)
    tally.update({"not": "a batch"})  # warned about, not counted: but trained on
    tally.update(samples=3)
    progress = tally.sync()
    assert (progress.samples, progress.step, tally.micro_batches) == (3, 1, 2)


def test_samples_in_the_pass_after_a_resume_include_the_restored_ones(monkeypatch):
    gathered = []  # the rank records the epoch estimate reads
    restored, first, second = 100, 20, 30
    estimator = EpochEstimator()
    estimator.load_state_dict({"passes": 0}, restored)
    estimate = estimator.estimate
    monkeypatch.setattr(estimator, "estimate", lambda samples, ranks: gathered.append(dict(ranks[0])) or
                        estimate(samples, ranks))
    tally = Tally(estimator=estimator)
    tally.reset(Progress(samples=restored, step=7), rows=restored, batches=10)
    tally.update(samples=first)
    assert tally.sync().samples == restored + first
    # Before any pass ends, the restored samples were all in the first pass (one data-parallel rank).
    assert gathered[-1]["samples_in_pass"] == restored + first
    tally.end_pass()
    tally.update(samples=second)
    progress = tally.sync()
    assert gathered[-1]["samples_in_pass"] == second
    assert gathered[-1]["first_pass_samples"] == first  # this session's part of the first pass
    assert progress.samples == restored + first + second
    assert progress.step == 7 + 2  # the restored step, and two micro-batches of this session
    assert progress.epoch == pytest.approx(1 + second / (restored + first))
    assert progress.epoch_source == "pass"
    assert (tally.rows_total, tally.batches_total) == (restored + first + second, 10 + 2)


def test_a_resumed_run_goes_on_from_the_saved_pass():
    with stream_metrics.init(backend="none") as run:
        for _ in range(4):
            run.update(samples=25)
        state = run.state_dict()
    with stream_metrics.init(backend="none", resume=state) as run:
        run.update(samples=20)
        run.end_pass()
        run.update(samples=60)
        progress = run.log()
    assert progress.samples == 4 * 25 + 20 + 60
    assert progress.epoch == pytest.approx(1 + 60 / (4 * 25 + 20))


def test_the_ranks_in_different_calls_get_one_error_naming_each_rank_and_its_call():
    ranks = [{"call": CALLS["log"], "call_seq": 5}, {"call": CALLS["state_dict"], "call_seq": 5},
             {"call": CALLS["progress"], "call_seq": 4}]
    with pytest.raises(RuntimeError) as error:
        check_same_call(ranks)
    text = str(error.value)
    assert "rank 0 in log() (its call 5), rank 1 in state_dict() (its call 5), " \
           "rank 2 in run.progress (or due()) (its call 4)" in text
    assert "These counts were not used." in text
    check_same_call([{"call": CALLS["summary"], "call_seq": 2}] * 3)  # the same call: no error


def test_every_sync_is_counted_and_one_process_sends_no_call_check(monkeypatch):
    read = []  # one process reads its own totals (read_totals), or its whole record (read_here): no gather
    monkeypatch.setattr(distributed, "gather", lambda *a: pytest.fail("one process gathered"))

    def noting(read_as):
        return lambda what, pending=(): read.append(what) or read_as(what, pending)

    for name in ("read_here", "read_totals"):
        monkeypatch.setattr(distributed, name, noting(getattr(distributed, name)))
    tally = Tally()
    for call in ("log", "progress", "state_dict", "summary"):
        tally.sync(call)
        tally.update(samples=2)
        if call == "progress":
            tally.end_pass()  # rows past a pass's end read their record whole
    # Every sync is counted; one process meets no other rank, so the call travels only where several
    # ranks gather (tests/dist/rank0_only.py checks that a call made on rank 0 alone stops every rank).
    assert tally.calls == 4 and len(read) == 4
    assert [type(what) for what in read] == [tuple, tuple, dict, dict]
    assert not any("call" in what for what in read if type(what) is dict)


def test_a_one_process_row_makes_a_progress_like_any_other():
    """A one-process sync builds its Progress without the dataclass __init__: it must be the same value."""
    import dataclasses

    tally = Tally(gradient_accumulation_steps=2)
    for n in (3, 5, 4):  # a pass of 12 samples in 3 micro-batches: a window of 2, then one its end cuts short
        tally.update(samples=n, tokens=torch.tensor(n + 1), loss_tokens=n - 1)
    tally.end_pass()
    tally.update(samples=7, tokens=8, loss_tokens=torch.tensor(6))
    progress = tally.sync()
    made = Progress(step=2, samples=19, tokens=23, loss_tokens=15, epoch=19 / 12, wall_clock=progress.wall_clock,
                    epoch_source="pass")
    assert progress == made and hash(progress) == hash(made) and type(progress) is Progress
    assert dataclasses.asdict(progress) == dataclasses.asdict(made) and repr(progress) == repr(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        progress.samples = 0  # type: ignore[misc]
    assert set(vars(progress)) == {f.name for f in dataclasses.fields(Progress)}
    # The first pass's rows (no pass ended: the commonest row, read_totals) make it the same way.
    first = Tally(gradient_accumulation_steps=2)
    first.update({"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0, 0]] * 3),
                  "labels": torch.tensor([[5, -100, -100, -100]] * 3)})
    first.update(samples=2, tokens=torch.tensor(9))
    progress = first.sync()
    made = Progress(step=1, samples=5, tokens=15, loss_tokens=3, wall_clock=progress.wall_clock)
    assert progress == made and repr(progress) == repr(made) and set(vars(progress)) == set(vars(made))


def test_whether_a_process_group_exists_is_asked_afresh_at_every_row(tmp_path):
    """A row reads torch's default group from its registry (cheaper than is_initialized()): before the
    group exists, while it does, and after it is destroyed, the answer is is_initialized()'s. In a child
    process, so no group outlives the test."""
    import subprocess
    import sys

    code = f"""
import torch.distributed as dist
import stream_metrics
from stream_metrics import distributed
assert distributed._WORLD is not None, "this torch has no registry: the check falls back to is_initialized()"
run = stream_metrics.init(backend="none")  # the run starts before the group, as it may under a launcher
seen = [(distributed._active(), dist.is_initialized())]
dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
seen.append((distributed._active(), dist.is_initialized()))
run.update(samples=3)
assert run.log().samples == 3
dist.destroy_process_group()
seen.append((distributed._active(), dist.is_initialized()))
run.update(samples=2)
assert run.log().samples == 5
run.finish()
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(False, False), (True, True), (False, False)]"


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), (0, 0)])
def test_an_explicit_count_is_a_whole_number(value, expected):
    assert check_count("samples", value) == expected


@pytest.mark.parametrize("value", [-1, 2.5, float("nan"), True, "3"])
def test_anything_else_is_one_clear_error(value):
    with pytest.raises(ValueError, match=r"^update\(samples="):
        check_count("samples", value)


def test_a_float_tensor_count_is_rounded_on_its_device():
    with pytest.warns(UserWarning, match="rounded on the device"):
        count = check_count("loss_tokens", torch.tensor([2.6]))
    assert count.dtype == torch.int64 and count.shape == () and int(count) == 3


def rank_record(passes=0, first_pass=-1, in_pass=0, units=-1, length=-1, loader=0, metadata=-1, files=-1,
                shard=-1, within=-1, shards=-1, examples=0, repeats=1) -> dict:
    """One rank's gathered numbers as the epoch estimate reads them (-1: unknown)."""
    return {"passes": passes, "first_pass_samples": first_pass, "samples_in_pass": in_pass,
            "sized_units": units, "sized_length": length, "sized_is_loader": loader, "sized_examples": examples,
            "metadata": metadata,
            "metadata_files": files, "shard_idx": shard, "shard_example_idx": within, "num_shards": shards,
            "repeats": repeats}


@pytest.mark.parametrize("ranks, samples, expected", [
    # Shard positions on both ranks: 8 shards x (45 - 5) / 2 done, and 8 x (30 - 10) / 1 done = 160 + 160.
    ([rank_record(in_pass=45, shard=2, within=5, shards=8), rank_record(in_pass=30, shard=1, within=10, shards=8)],
     75, (75 / 320, "shards")),
    # One rank's position unknown: no share of a pass can be told for it, so no estimate at all.
    ([rank_record(in_pass=45, shard=2, within=5, shards=8), rank_record(in_pass=30)], 75, (0.0, "none")),
    # A rank still in its first shard (none completed) tells nothing either.
    ([rank_record(in_pass=45, shard=2, within=5, shards=8), rank_record(in_pass=3, shard=0, within=3, shards=8)],
     48, (0.0, "none")),
    # Metadata: one size per file list, so two ranks reading the same files count it once ...
    ([rank_record(metadata=1000, files=7), rank_record(metadata=1000, files=7)], 250, (0.25, "metadata")),
    # ... and two different file lists add up.
    ([rank_record(metadata=1000, files=7), rank_record(metadata=600, files=9)], 400, (0.25, "metadata")),
    # Metadata on one rank only is not a size for both: the shard positions decide.
    ([rank_record(metadata=1000, files=7, in_pass=45, shard=2, within=5, shards=8),
      rank_record(in_pass=30, shard=1, within=10, shards=8)], 75, (75 / 320, "shards")),
    # Sized loaders: batches read over the loaders' lengths, summed over ranks.
    ([rank_record(units=30, length=100, loader=1), rank_record(units=20, length=100, loader=1)], 0, (0.25, "sized")),
    # A sized dataset of packed rows (not a loader): the rows read over one copy of its length ...
    ([rank_record(units=30, length=200), rank_record(units=20, length=200)], 400, (0.25, "sized")),
    # ... and of examples: the samples (a collator may pack them into fewer rows).
    ([rank_record(units=3, length=200, examples=1), rank_record(units=2, length=200, examples=1)], 50,
     (0.25, "sized")),
    # One rank without a length: not sized.
    ([rank_record(units=30, length=100, loader=1), rank_record(units=20)], 0, (0.0, "none")),
])
def test_the_epoch_estimate_from_several_ranks_records(ranks, samples, expected):
    epoch, source = EpochEstimator().estimate(samples, ranks)
    assert (source, epoch) == (expected[1], pytest.approx(expected[0]))


def test_the_pass_size_is_measured_once_every_rank_has_ended_a_pass():
    estimator = EpochEstimator()
    # Rank 1 has not ended its pass: the smallest count of passes is what every rank has done.
    epoch, source = estimator.estimate(150, [rank_record(passes=1, first_pass=80), rank_record(passes=0)])
    assert (epoch, source, estimator.pass_size) == (0.0, "none", None)
    # Both have: one pass is the samples both read in their first pass (80 + 70); 330 samples, 30 of
    # them into the third pass (two passes of 150), are 2.2 passes.
    ranks = [rank_record(passes=2, first_pass=80, in_pass=16), rank_record(passes=2, first_pass=70, in_pass=14)]
    epoch, source = estimator.estimate(330, ranks)
    assert (source, estimator.pass_size, epoch) == ("pass", 150, pytest.approx(2.2))


def test_passes_of_different_sizes_give_whole_epochs_at_their_ends_and_their_mean_between():
    """Passes of 181, 190, 192 and 179 samples (a shuffled interleave that stops at the first exhausted
    source): each pass end is a whole epoch, and within a pass the epoch moves by the mean pass so far."""
    sizes = [181, 190, 192, 179]
    estimator = EpochEstimator()
    estimator.watching = True
    seen = []
    for k, size in enumerate(sizes):
        first = sizes[0] if k else -1
        for within in range(0, size, 7):
            epoch, source = estimator.estimate(sum(sizes[:k]) + within,
                                               [rank_record(passes=k, first_pass=first, in_pass=within)])
            seen.append(epoch)
            if k:  # the mean of the passes ended so far (and below the next whole one while the pass goes on)
                assert (source, epoch) == ("pass", pytest.approx(min(k + within / (sum(sizes[:k]) / k), k + 1)))
                assert epoch < k + 1
        # The last sample of a pass longer than the mean: still below the next whole epoch.
        epoch, _ = estimator.estimate(sum(sizes[:k + 1]), [rank_record(passes=k, first_pass=first, in_pass=size)])
        assert epoch < k + 1
        epoch, _ = estimator.estimate(sum(sizes[:k + 1]), [rank_record(passes=k + 1, first_pass=sizes[0])])
        assert epoch == k + 1  # the pass ended: exactly whole
    assert seen == sorted(seen)
    # The measured passes go into the state, so a resumed run goes on with the same mean.
    resumed = EpochEstimator()
    resumed.load_state_dict(estimator.state_dict(), sum(sizes) + 50)
    epoch, source = resumed.estimate(sum(sizes) + 60, [rank_record(passes=0, in_pass=10)])
    assert (source, epoch) == ("pass", pytest.approx(4 + 60 / (sum(sizes) / 4)))


def test_a_checkpoint_from_before_pass_ends_were_kept_goes_on_with_the_first_pass_size():
    resumed = EpochEstimator()
    resumed.load_state_dict({"passes": 2, "pass_size": 150, "last_epoch": 2.1, "watching": True}, 315)
    assert resumed.estimate(330, [rank_record(passes=0, in_pass=15)]) == (pytest.approx(2.2), "pass")
    with pytest.raises(ValueError, match="not valid"):
        EpochEstimator().load_state_dict({"passes": 2, "pass_size": 150, "pass_end": 300, "passes_measured": 3}, 0)


def test_a_mark_reads_the_counts_as_of_then_once_and_leaves_the_counts_since_in_place():
    # The JIT checkpoint's case (hf.py): two micro-batches of a window counted after the mark; a sync at
    # the mark reads the counts before them, FLOPs included, and the next row reads them all.
    from stream_metrics import flops

    formula = flops.FlopFormula(per_token=6, per_pair=0, method="test")
    tally = Tally(gradient_accumulation_steps=2, pad_token_id=0, flop_formula=formula)
    ids = [torch.ones(3, 5, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)]
    tally.update({"input_ids": ids[0]})
    tally.update({"input_ids": ids[1]})
    tally.mark()
    assert not tally.counted_since_mark()
    tally.update({"input_ids": ids[2]})
    assert tally.counted_since_mark()
    with tally.as_at_mark():
        then = tally.sync("state_dict")
    now = tally.sync()
    assert (then.samples, then.tokens, then.step, then.flops) == (5, 15 + 14, 1, 6 * (15 + 14))
    assert (now.samples, now.tokens, now.step, now.flops) == (9, 15 + 14 + 16, 1, 6 * (15 + 14 + 16))
    assert tally.rows_total == 9 and tally.in_window == 1


# ------------------------------------------------------------------ update(): every form, one truth
def _padded(draw_lengths, width, labels="some", pad=0):
    """A right-padded batch of rows of the given lengths (tokens 2..), its mask, and labels (-100 on the
    padding, and at every third real token with labels="some"); the truth from the Python lists."""
    ids = [[2 + (i + j) % 50 for j in range(n)] + [pad] * (width - n) for i, n in enumerate(draw_lengths)]
    mask = [[1] * n + [0] * (width - n) for n in draw_lengths]
    lab = [[(-100 if (labels == "some" and j % 3 == 0) else t) if m else -100 for j, (t, m) in enumerate(zip(r, k))]
           for r, k in zip(ids, mask)]
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if labels is not None:
        batch["labels"] = torch.tensor(lab)
    truth = (len(draw_lengths), sum(draw_lengths),
             sum(1 for row in lab for v in row if v != -100) if labels is not None else None)
    return batch, truth


def _forms():
    """(name, batch, (samples, tokens, loss tokens), takes the one-call path)."""
    out = []
    for lengths, width in (([3, 7, 1], 7), ([5], 9), ([4, 4, 2, 8], 8)):
        for labels in ("some", "all", None):
            batch, truth = _padded(lengths, width, labels)
            out.append((f"padded-{len(lengths)}-{labels}", batch, truth, True))
    batch, (rows, tokens, loss) = _padded([3, 5], 6)
    packed = dict(batch, position_ids=torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]]))
    # Packed rows: an example starts at each position 0 inside the mask.
    starts = sum(1 for r, m in zip(packed["position_ids"].tolist(), batch["attention_mask"].tolist())
                 for p, k in zip(r, m) if p == 0 and k)
    out.append(("position_ids", packed, (starts, tokens, loss), False))
    encoding = type("Encoding", (dict,), {})(batch)
    out.append(("a BatchEncoding-like dict subclass", encoding, (rows, tokens, loss), False))
    out.append(("ids and a mask of other shapes", {"input_ids": batch["input_ids"],
                                                   "attention_mask": batch["attention_mask"][:, :4],
                                                   "labels": batch["labels"]},
                (rows, sum(1 for r in batch["input_ids"].tolist() for t in r if t != 0), loss), False))
    out.append(("labels as a list", dict(batch, labels=batch["labels"].tolist()), (rows, tokens, None), False))
    return out


@pytest.mark.parametrize("name, batch, truth, one_call", _forms(), ids=[f[0] for f in _forms()])
def test_every_batch_form_counts_its_truth_alone_and_after_others(name, batch, truth, one_call, recwarn):
    """The commonest batch takes update()'s one-call path (``_update_padded``), every other form the
    general one; either way the counts are the ones computed here from the Python lists, alone and in
    a window of accumulation after batches of the other path, and rows, micro-batches and steps move alike."""
    assert Tally(pad_token_id=0)._update_padded(batch) is one_call
    other, other_truth = _padded([2, 6], 6)
    for accumulation in (1, 2, 3):
        tally = Tally(pad_token_id=0, gradient_accumulation_steps=accumulation)
        for b in (batch, other, batch, other, batch):
            tally.update(b)
        p = tally.sync()
        samples, tokens, loss = (3 * t + 2 * o if t is not None and o is not None else None
                                 for t, o in zip(truth, other_truth))
        if truth[2] is None:  # labels in some batches only: those are counted
            loss = 2 * other_truth[2]
        assert (p.samples, p.tokens, p.loss_tokens) == (samples, tokens, loss), accumulation
        assert (tally.micro_batches, p.step, tally.rows) == (5, 5 // accumulation, 3 * batch_rows(batch) + 4)


def batch_rows(batch) -> int:
    ids = batch["input_ids"]
    return ids.shape[0]


def test_counts_added_on_another_device_are_kept_on_the_host_and_the_total_stays_exact():
    """Total.add: a count on another device than the counts before it brings those along on the host
    (the meta device stands in for an accelerator: its tensors hold no values, so only the device's
    change is seen here; the CPU counts before it are what the host keeps)."""
    from stream_metrics.counting import Total

    total = Total()
    total.add(torch.tensor(3), fresh=True)
    total.add(torch.tensor(4), fresh=True)
    assert total.device == torch.device("cpu")  # read from the first count when the second came
    total.add(torch.tensor(5))  # a caller's tensor: copied
    assert int(total.value()) == 12
    total.settle(12)
    assert (total.host, total.device, total.unread()) == (12, None, None)
    total.add(torch.tensor(1), fresh=True)
    total.add(torch.empty((), dtype=torch.long, device="meta"), fresh=True)
    assert (total.host, total.device) == (13, None)  # the CPU count is on the host; the device read anew
    assert [t.device.type for t in total._parts] == ["meta"]
