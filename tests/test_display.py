"""A user watches training in data seen: a bar on a terminal, a plain line now and then in a log file."""
from __future__ import annotations

import io
import re

from tqdm import tqdm

from stream_metrics import Progress
from stream_metrics.display import ProgressDisplay


def steady_run(seconds: int, *, samples_per_s=32, tokens_per_s=2000, steps_per_s=1, dataset=6400):
    """The progress of a run going at a steady rate, one update per second of its clock."""
    for t in range(seconds + 1):
        samples = samples_per_s * t
        yield Progress(step=steps_per_s * t, samples=samples, tokens=tokens_per_s * t, epoch=samples / dataset,
                       wall_clock=float(t), epoch_source="user")


def test_a_log_file_gets_plain_lines_at_a_modest_rate_with_samples_tokens_epoch_rate_and_eta():
    out = io.StringIO()
    display = ProgressDisplay(targets="1Mtok", file=out, every_seconds=30)  # StringIO is not a terminal
    for progress in steady_run(100):
        display.update(progress)
    display.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()  # no bar redraws in a log file
    # One line at the start, one at most every 30 s of the run's clock, and the last on close.
    assert len(lines) == 5
    assert lines[0] == "step 0 | 0 samples | 0 tokens | epoch 0.00 | 0% of 1M tokens"
    # At 60 s: 1,920 samples, 120k tokens, 0.3 epochs, 2,000 tokens/s, and 880k tokens left: 440 s.
    assert lines[2] == "step 60 | 1.92k samples | 120k tokens | epoch 0.30 | 2k tok/s | 12% of 1M tokens | ETA 0:07:20"
    assert lines[-1] == "step 100 | 3.2k samples | 200k tokens | epoch 0.50 | 2k tok/s | 20% of 1M tokens | ETA 0:06:40"


def test_max_steps_gives_an_eta_at_the_observed_step_rate_and_the_nearest_target_wins():
    out = io.StringIO()
    targets = {"max_steps": (400, "ba"), "stop_at": "10Mtok"}
    with ProgressDisplay(targets=targets, file=out, every_seconds=50) as display:
        for progress in steady_run(100, steps_per_s=2):
            display.update(progress)
    last = out.getvalue().splitlines()[-1]
    # 200 of 400 steps at 2 steps/s: 100 s to go (10M tokens would take 4,900 s).
    assert last.endswith("| 50% of 400 steps (max_steps) | ETA 0:01:40"), last


def test_a_wall_clock_target_counts_down_and_a_run_without_tokens_shows_samples_per_second():
    out = io.StringIO()
    display = ProgressDisplay(targets="2min", file=out, every_seconds=0)
    display.update(Progress(step=0, samples=0, wall_clock=0.0))
    display.update(Progress(step=5, samples=80, epoch=0.5, wall_clock=30.0))
    assert out.getvalue().splitlines()[-1] == ("step 5 | 80 samples | epoch 0.50 | 2.67 samples/s | 25% of 2 min "
                                               "| ETA 0:01:30")


def test_without_a_target_there_is_no_eta(capsys):
    display = ProgressDisplay()  # stderr, which pytest captures: not a terminal
    for progress in steady_run(3):
        display.update(progress)
    display.close()
    err = capsys.readouterr().err.splitlines()
    assert err == ["step 0 | 0 samples | 0 tokens | epoch 0.00",
                   "step 3 | 96 samples | 6k tokens | epoch 0.01 | 2k tok/s"]


FIELD = re.compile(r"^(step \d+(\.\d+)?[kMBT]?|[\d.]+[kMBT]? (samples|tokens)|epoch \d+\.\d\d"
                   r"|[\d.]+[kMBT]? (tok/s|samples/s)|\d+% of [\d.]+[kMBT]? (steps|tokens|samples|epochs|min|s|h)"
                   r"( \((stop_at|max_steps)\))?|ETA (\d+d )?\d+:\d\d:\d\d)$")


def test_every_field_of_the_line_is_a_number_and_its_unit_and_the_eta_names_its_target():
    display = ProgressDisplay(targets={"stop_at": "2Btok", "max_steps": (3000, "ba")})
    display.update(Progress(step=0, samples=0, tokens=0, epoch=0.0, wall_clock=0.0))
    text = display.describe(Progress(step=21, samples=332, tokens=13_600, epoch=2.34, wall_clock=18.5))
    assert text == ("step 21 | 332 samples | 13.6k tokens | epoch 2.34 | 735 tok/s | 1% of 3k steps (max_steps) "
                    "| ETA 0:43:44")
    fields = text.split(" | ")
    assert all(FIELD.match(f) for f in fields), [f for f in fields if not FIELD.match(f)]
    assert "ba" not in text.split()  # steps are called steps
    # Steps at 1.14/s reach max_steps in 44 min; 2B tokens at 735 tok/s would take a month: one ETA, the nearer.
    assert text.count("ETA") == 1


def test_on_a_terminal_our_fields_go_on_the_trainers_own_bar_one_bar_one_eta():
    out = io.StringIO()
    trainer_bar = tqdm(total=400, file=out, dynamic_ncols=True)  # as the Trainer's ProgressCallback makes it
    display = ProgressDisplay(targets={"max_steps": (400, "ba")}, file=out, interactive=True, bar=lambda: trainer_bar)
    for progress in steady_run(100, steps_per_s=2):
        display.update(progress)
        trainer_bar.update(progress.step - trainer_bar.n)  # the Trainer moves its bar by steps
    display.close()
    assert display._bar is None  # no second bar
    trainer_bar.close()
    last = re.split(r"[\r\n]", out.getvalue().rstrip())[-1]
    assert re.fullmatch(r" 50%\|\S+\s*\| 200/400 steps \[\d\d:\d\d, 3.2k samples \| 200k tokens \| epoch 0.50 "
                        r"\| 2k tok/s \| 50% of 400 steps \(max_steps\) \| ETA 0:01:40\]",
                        last.replace("\x1b[A", "")), last
    assert last.count("ETA") == 1 and "<" not in last  # tqdm's own time-left is not shown beside ours


def test_on_a_terminal_without_another_bar_it_draws_its_own_without_an_empty_field():
    out = io.StringIO()
    display = ProgressDisplay(targets="1Mtok", file=out, interactive=True)
    for progress in steady_run(100):
        display.update(progress)
    display.close()
    final = re.split(r"[\r\n]", out.getvalue().rstrip())
    drawn = [line for line in final if "data seen" in line]
    assert drawn and re.fullmatch(r" 20%\|\S+\s*\| data seen: step 100 \| 3.2k samples \| 200k tokens \| epoch 0.50 "
                                  r"\| 2k tok/s \| 20% of 1M tokens \| ETA 0:06:40", drawn[-1]), drawn[-1]


def test_only_the_main_process_shows_progress(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = io.StringIO()
    display = ProgressDisplay(file=out, every_seconds=0)
    display.update(Progress(samples=1))
    display.close()
    assert out.getvalue() == ""


def test_a_target_in_flops_is_shown_in_flops_as_every_unit_an_amount_takes_is():
    """stop_at="1e18flop" (docs/schedule.md) on the display: once a KeyError out of training."""
    from stream_metrics import amount, display as display_module

    assert set(display_module._UNIT_WORDS) == set(amount.UNITS)
    out = io.StringIO()
    display = ProgressDisplay(targets="1.5e18flop", file=out, every_seconds=0)
    for t in range(3):
        display.update(Progress(step=t, samples=32 * t, tokens=2000 * t, epoch=0.0, wall_clock=float(t),
                                epoch_source="none", flops=2.5e17 * t))
    display.close()
    last = out.getvalue().splitlines()[-1]
    assert last.endswith("| 33% of 1.5e+18 FLOPs | ETA 0:00:04"), last
