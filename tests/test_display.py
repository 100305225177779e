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
    assert lines[0] == "step 0 | 0 samples | 0 tokens | epoch 0.00 | 0% of 1Mtok"
    # At 60 s: 1,920 samples, 120k tokens, 0.3 epochs, 2,000 tokens/s, and 880k tokens left: 440 s.
    assert lines[2] == "step 60 | 1.92k samples | 120k tokens | epoch 0.30 | 2k tok/s | 12% of 1Mtok | ETA 0:07:20"
    assert lines[-1] == "step 100 | 3.2k samples | 200k tokens | epoch 0.50 | 2k tok/s | 20% of 1Mtok | ETA 0:06:40"


def test_max_steps_gives_an_eta_at_the_observed_step_rate_and_the_nearest_target_wins():
    out = io.StringIO()
    with ProgressDisplay(targets=[(400, "ba"), "10Mtok"], file=out, every_seconds=50) as display:
        for progress in steady_run(100, steps_per_s=2):
            display.update(progress)
    last = out.getvalue().splitlines()[-1]
    # 200 of 400 steps at 2 steps/s: 100 s to go (10M tokens would take 4,900 s).
    assert last.endswith("| 50% of 400ba | ETA 0:01:40"), last


def test_a_wall_clock_target_counts_down_and_a_run_without_tokens_shows_samples_per_second():
    out = io.StringIO()
    display = ProgressDisplay(targets="2min", file=out, every_seconds=0)
    display.update(Progress(step=0, samples=0, wall_clock=0.0))
    display.update(Progress(step=5, samples=80, epoch=0.5, wall_clock=30.0))
    assert out.getvalue().splitlines()[-1] == "step 5 | 80 samples | epoch 0.50 | 2.67 samples/s | 25% of 2min | ETA 0:01:30"


def test_without_a_target_there_is_no_eta(capsys):
    display = ProgressDisplay()  # stderr, which pytest captures: not a terminal
    for progress in steady_run(3):
        display.update(progress)
    display.close()
    err = capsys.readouterr().err.splitlines()
    assert err == ["step 0 | 0 samples | 0 tokens | epoch 0.00",
                   "step 3 | 96 samples | 6k tokens | epoch 0.01 | 2k tok/s"]


def test_on_a_terminal_it_is_a_bar_beside_the_trainers_own_bar():
    out = io.StringIO()
    trainer_bar = tqdm(total=50, file=out, dynamic_ncols=True)  # as the Trainer's ProgressCallback makes it
    display = ProgressDisplay(targets="1Mtok", file=out, interactive=True)
    for progress in steady_run(100):
        display.update(progress)
        trainer_bar.update(0)
    bar = display._bar
    assert bar.pos != trainer_bar.pos  # its own line: neither bar overwrites the other
    display.close()
    trainer_bar.close()
    text = out.getvalue()
    final = re.split(r"[\r\n]", text.rstrip())
    drawn = [line for line in final if "data seen" in line]
    assert drawn and "20%|" in drawn[-1] and "200k tokens" in drawn[-1] and "ETA 0:06:40" in drawn[-1]


def test_only_the_main_process_shows_progress(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = io.StringIO()
    display = ProgressDisplay(file=out, every_seconds=0)
    display.update(Progress(samples=1))
    display.close()
    assert out.getvalue() == ""
