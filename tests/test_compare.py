"""`stream-metrics compare` and `show`: runs with different batch sizes, put side by side by the data they saw.

The runs are real: written through stream_metrics to MLflow (SQLite) and W&B (offline), then read
back by the command from what those stores hold. Every run sees the same data, and its loss is a
known function of the samples seen, so runs that line up by samples must agree wherever they meet.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import wandb_rows, wandb_run_dirs

import stream_metrics
from stream_metrics import _checks
from stream_metrics import compare as sm_compare
from stream_metrics.cli import main

SAMPLES = 384            # one pass over the synthetic data
TOKENS_PER_SAMPLE = 12
EXPERIMENT = "batch-sizes"


def loss_at(samples: float) -> float:
    return 0.5 + 2.0 * math.exp(-samples / 150)


def train(batch_size, backend, uri, *, name=None, tokens=True):
    """A run over the same data with this batch size, logging the loss after every batch."""
    with stream_metrics.init(backend=backend, name=name or f"bs{batch_size}", dataset_size=SAMPLES,
                             mlflow={"tracking_uri": uri, "experiment": EXPERIMENT},
                             wandb={"project": EXPERIMENT, "mode": "offline"}) as run:
        seen = 0
        for _ in range(SAMPLES // batch_size):
            run.update(samples=batch_size, tokens=batch_size * TOKENS_PER_SAMPLE if tokens else None)
            seen += batch_size
            run.log({"train/loss": loss_at(seen)})
    return run.run_ids


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs in one MLflow experiment (bs16 also in W&B), and one run with no token counts."""
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root))
        env.setenv("WANDB_SILENT", "true")
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
            env.delenv(var, raising=False)
        ids = {bs: train(bs, "mlflow", uri) for bs in (8, 32)}
        ids[16] = train(16, ["mlflow", "wandb"], uri)
        _checks.reset_warnings()  # a test before this module may already have had the one-time warning
        with pytest.warns(UserWarning, match="token"):
            ids["no-tokens"] = train(24, "mlflow", uri, name="no-tokens", tokens=False)
    return {"uri": uri, "ids": ids, "wandb": wandb_run_dirs(root)[0], "root": root}


def compare(runs, *args):
    return main(["compare", *args, "--mlflow-uri", runs["uri"], "--out", "out"])


def stored_history(uri, run_id, metric, axis="progress/samples"):
    """(axis values, metric values) as MLflow stored them, paired by step."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    at = {m.step: m.value for m in client.get_metric_history(run_id, axis)}
    pairs = sorted((at[m.step], m.value) for m in client.get_metric_history(run_id, metric))
    return [x for x, _ in pairs], [y for _, y in pairs]


def test_runs_of_different_batch_sizes_line_up_by_samples(runs):
    assert compare(runs, "bs8", "bs32", runs["wandb"]) == 0
    page = sm_compare.read_html_data("out/compare.html")
    lines = {line["run"]: line for line in page["lines"]["train/loss"]}
    assert page["axis"] == "progress/samples"
    assert set(lines) == {"bs8", "bs32", "bs16"}
    for name, batch_size in (("bs8", 8), ("bs16", 16), ("bs32", 32)):
        line = lines[name]
        assert line["x"] == [float(s) for s in range(batch_size, SAMPLES + 1, batch_size)]
        # Every plotted point sits on the one curve: the same loss at the same amount of data.
        assert line["y"] == pytest.approx([loss_at(x) for x in line["x"]], rel=1e-12)
    # Where the runs meet (every 32 samples) they agree, whatever their batch size.
    for x in range(32, SAMPLES + 1, 32):
        values = {name: line["y"][line["x"].index(float(x))] for name, line in lines.items()}
        assert len(set(values.values())) == 1, values


def test_on_the_step_axis_the_same_runs_do_not_line_up(runs):
    read = sm_compare.read_runs(["bs8", "bs32"], runs["uri"])
    by_step = sm_compare.compare(read, axis="step")
    bs8, bs32 = by_step.lines["train/loss"]
    assert bs8.x[:12] == bs32.x  # steps 1..12 in both
    assert bs8.y[11] > bs32.y[11]  # at step 12 bs8 has seen 96 samples, bs32 384


def test_the_png_and_the_html_hold_every_run(runs):
    from PIL import Image

    assert compare(runs, "--experiment", EXPERIMENT, runs["wandb"], "--metric", "train/loss") == 0
    labels = ["bs8", "bs32", "bs16 (mlflow)", "bs16 (wandb)", "no-tokens"]
    page = open("out/compare.html", encoding="utf-8").read()
    data = sm_compare.read_html_data("out/compare.html")
    assert sorted(r["label"] for r in data["runs"]) == sorted(labels)
    assert sorted(line["run"] for line in data["lines"]["train/loss"]) == sorted(labels)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    for label in labels:
        assert f"<td>{label}</td>" in page  # the table on the page
    with Image.open("out/compare.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
        for label in labels:
            assert label in png.text["Description"]


def test_the_table_at_equal_samples_matches_the_stored_histories(runs, capsys):
    assert compare(runs, "bs8", "bs32", "bs16", "--at", "100", "--at", "0.25ksp") == 0
    printed = capsys.readouterr().out
    with open("out/table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {(row["amount"], row["reached_by_all"]) for row in table} == {
        ("100", "False"), ("250", "False"), (str(SAMPLES), "True")}
    markdown = open("out/table.md").read()
    for row in table:
        xs, ys = stored_history(runs["uri"], row["run_id"], "train/loss")
        amount = float(row["amount"])
        below = max(i for i, x in enumerate(xs) if x <= amount)
        if xs[below] == amount:
            expected = ys[below]
        else:  # linear between the two stored rows around the amount
            x0, x1, y0, y1 = xs[below], xs[below + 1], ys[below], ys[below + 1]
            expected = y0 + (y1 - y0) * (amount - x0) / (x1 - x0)
        assert float(row["value"]) == pytest.approx(expected, rel=1e-12)
        shown = sm_compare.number(float(row["value"]))
        assert shown in printed and shown in markdown
    # At the end of the data every run has the same loss, read straight from its last row.
    assert {row["value"] for row in table if row["reached_by_all"] == "True"} == {repr(loss_at(SAMPLES))}


def test_the_table_reads_w_and_b_runs_as_stored(runs):
    assert compare(runs, runs["wandb"], "--at", "100") == 0
    with open("out/table.csv", newline="") as f:
        (at_100, at_end) = list(csv.DictReader(f))
    stored = [row for row in wandb_rows(runs["wandb"]) if "train/loss" in row]
    xs, ys = [r["progress/samples"] for r in stored], [r["train/loss"] for r in stored]
    assert at_100["backend"] == "wandb" and float(at_100["value"]) == pytest.approx(
        ys[5] + (ys[6] - ys[5]) * (100 - xs[5]) / (xs[6] - xs[5]))
    assert float(at_end["value"]) == ys[-1] and float(at_end["amount"]) == xs[-1] == SAMPLES


def test_smoothing_and_log_scales_change_the_picture_not_the_table(runs):
    assert compare(runs, "bs8", "bs32", "--smooth", "40", "--log-x", "--log-y") == 0
    data = sm_compare.read_html_data("out/compare.html")
    assert data["smooth"] == 40 and data["log_x"] and data["log_y"]
    for line in data["lines"]["train/loss"]:
        assert len(line["smoothed"]) == len(line["y"])
        assert all(s >= y for s, y in zip(line["smoothed"], line["y"]))  # a falling loss, averaged with its past
    with open("out/table.csv", newline="") as f:
        assert {row["value"] for row in csv.DictReader(f)} == {repr(loss_at(SAMPLES))}


def test_show_gives_axes_epoch_source_throughput_and_final_metrics(runs, capsys):
    assert main(["show", "bs8", "--mlflow-uri", runs["uri"]]) == 0
    out = capsys.readouterr().out
    assert runs["ids"][8]["mlflow"] in out
    assert "epoch source: user" in out and "MLflow step: progress/samples" in out
    for key, value in (("progress/samples", SAMPLES), ("progress/tokens", SAMPLES * TOKENS_PER_SAMPLE),
                       ("progress/step", SAMPLES // 8), ("progress/epoch", 1)):
        assert any(line.split() == [key, str(value)] for line in out.splitlines()), (key, out)
    assert "samples/s" in out and "tokens/s" in out
    assert any(line.split() == ["train/loss", sm_compare.number(loss_at(SAMPLES))] for line in out.splitlines())
    assert main(["show", runs["wandb"]]) == 0
    assert f"wandb run {runs['ids'][16]['wandb']}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["bs8", "bs999"], "there is no run 'bs999'"),
    (["bs8", "--metric", "eval/accuracy"], "no run has the metric 'eval/accuracy' (they have: "),
    (["bs8", "no-tokens", "--axis", "tokens"], "run 'no-tokens' has no progress/tokens"),
    (["bs8", "--experiment", "nope"], "there is no MLflow experiment 'nope'"),
    (["bs8", "--at", "2Mtok"], "'2Mtok' is an amount of tokens, but the axis is samples"),
    (["bs8", "--at", "lots"], "'lots' is not an amount of samples"),
    (["bs8", "."], "the folder '.' holds no W&B run"),
], ids=["run", "metric", "axis", "experiment", "unit", "amount", "folder"])
def test_a_mistake_gets_one_clear_sentence(runs, capsys, args, message):
    assert compare(runs, *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-metrics: ") and message in err and "\n" not in err, err
    assert not os.path.exists("out")


def test_a_mistyped_store_is_not_created(capsys, workdir):
    assert main(["show", "bs8", "--mlflow-uri", f"sqlite:///{workdir}/typo.db"]) == 1
    assert "there is no MLflow store at" in capsys.readouterr().err
    assert not (workdir / "typo.db").exists()


def test_a_relative_store_is_read_from_the_folder_the_reader_is_in(workdir, monkeypatch):
    """MLflow keeps a store per URI text in a process: reading ``sqlite:///mlflow.db`` from one folder,
    then another (a notebook), reads each folder's own store, and each run's own rows."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for folder, batch_size in (("a", 8), ("b", 32)):
        (workdir / folder).mkdir()
        monkeypatch.chdir(workdir / folder)
        ids = train(batch_size, "mlflow", "sqlite:///mlflow.db", name="here")
        read = sm_compare.read_runs(["here"], "sqlite:///mlflow.db")
        assert [r.run_id for r in read] == [ids["mlflow"]]
        assert len(read[0].rows) == SAMPLES // batch_size
        assert read[0].where == f"sqlite:///{workdir / folder / 'mlflow.db'}"


def test_without_matplotlib_the_page_and_tables_are_still_written(runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert compare(runs, "bs8") == 1
    assert "pip install 'stream_metrics[plot]'" in capsys.readouterr().err
    assert sorted(os.listdir("out")) == ["compare.html", "table.csv", "table.md"]
    assert compare(runs, "bs8", "--no-png") == 0


def test_the_command_runs_as_a_program(runs):
    proc = subprocess.run([sys.executable, "-m", "stream_metrics", "compare", "bs8", "bs32", "--mlflow-uri",
                           runs["uri"], "--out", "out", "--no-png", "--axis", "epoch"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train/loss at equal progress/epoch" in proc.stdout
    assert sorted(os.listdir("out")) == ["compare.html", "table.csv", "table.md"]


def test_piped_into_a_reader_that_stops_early_the_command_stops_quietly(runs):
    """`stream-metrics show RUN | head -1`: the pipe closes before everything is printed."""
    # `true` has long ended (the reader gone) when the command, its imports done, first writes.
    shell = subprocess.run(f"'{sys.executable}' -m stream_metrics show bs8 --mlflow-uri '{runs['uri']}' "
                           "| true; echo \"status ${PIPESTATUS[0]}\"",
                           shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300)
    assert shell.stdout.strip() == "status 141" and "Traceback" not in shell.stderr, shell.stderr[-2000:]


def test_replay_sends_saved_rows_into_their_run(capsys, workdir, mlflow_uri):
    from mlflow import MlflowClient

    run_id = train(32, "mlflow", mlflow_uri)["mlflow"]
    spill = workdir / "spill.jsonl"
    # Each row holds its axes: MLflow's step is the row's progress/samples.
    rows = [{"metrics": {"eval/loss": 0.9 - i / 10, "progress/samples": 128 * (i + 1)}, "timestamp_ms": 1_000 + i}
            for i in range(3)]
    spill.write_text("\n".join(json.dumps(r) for r in [{"header": {"backend": "mlflow", "run_id": run_id}}, *rows]))
    assert main(["replay", str(spill), "--mlflow-uri", mlflow_uri]) == 0
    assert f"sent 3 row(s) from {spill}" in capsys.readouterr().out
    stored = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run_id, "eval/loss")
    assert sorted(m.step for m in stored) == [128, 256, 384]


def test_interpolation_and_smoothing_by_amount_of_data():
    x, y = [0, 10, 10, 20], [1.0, 2.0, 3.0, 5.0]
    assert sm_compare.interpolate(x, y, 5) == 1.5
    assert sm_compare.interpolate(x, y, 10) == 3.0  # the latest value at that amount
    assert sm_compare.interpolate(x, y, 15) == 4.0
    assert sm_compare.interpolate(x, y, 21) is None and sm_compare.interpolate(x, y, -1) is None
    # Half the weight per half-life of the axis, however densely the run logged.
    assert sm_compare.smoothed([0, 8], [0.0, 1.0], 8)[-1] == pytest.approx(1 / 1.5)
    assert sm_compare.smoothed([0, 4, 8], [0.0, 1.0, 1.0], 8)[-1] == pytest.approx(
        (1 + 2 ** -0.5) / (1 + 2 ** -0.5 + 0.5))


def test_replay_still_takes_the_old_option_name(capsys, workdir, mlflow_uri):
    from mlflow import MlflowClient

    run_id = train(32, "mlflow", mlflow_uri)["mlflow"]
    spill = workdir / "spill.jsonl"
    row = {"metrics": {"eval/loss": 0.5, "progress/samples": 384}, "timestamp_ms": 1_000, "seq": 1}
    spill.write_text("\n".join(json.dumps(r) for r in [{"header": {"backend": "mlflow", "run_id": run_id}}, row]))
    assert main(["replay", str(spill), "--tracking-uri", mlflow_uri]) == 0  # hidden, still accepted
    assert [m.step for m in MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run_id, "eval/loss")] == [384]
    assert main(["replay", "--help"]) == 0
    assert "--tracking-uri" not in capsys.readouterr().out


def test_every_command_says_in_one_line_what_it_does(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    commands = listing[listing.index("{") + 1:listing.index("}")].split(",")
    assert {"compare", "show", "check", "replay"} <= set(commands)
    for command in commands:
        [line] = [line for line in listing.splitlines() if line.strip().startswith(command + " ")]
        assert len(line.split(None, 1)[1]) > 20, line  # its own description, on its line
        assert main([command, "--help"]) == 0
        assert capsys.readouterr().out.count("\n\n") >= 2  # usage, description, options


def test_every_axis_in_the_schema_is_an_axis_to_compare_on(capsys):
    from stream_metrics import schema

    assert main(["compare", "--help"]) == 0
    # a new axis in schema.py (flops) needs no change to the command
    assert "--axis {" + ",".join(schema.AXES) + "}" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_a_run_logged_without_stream_metrics_is_left_out_of_an_experiment_with_a_note(workdir, mlflow_uri, capsys):
    from mlflow import MlflowClient

    train(8, "mlflow", mlflow_uri)
    train(32, "mlflow", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    baseline = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="baseline")
    for step in range(5):  # plain mlflow.log_metric: no progress axes
        client.log_metric(baseline.info.run_id, "train/loss", 2.0 - step / 10, step=step)
    assert main(["compare", "--experiment", EXPERIMENT, "--mlflow-uri", mlflow_uri, "--out", "out", "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "baseline has no progress/samples beside train/loss (no progress axes: not logged by stream_metrics): " \
           "left out" in printed
    with open("out/table.csv", newline="") as f:
        assert {row["run"] for row in csv.DictReader(f)} == {"bs8", "bs32"}


def test_a_run_whose_loss_diverged_reaches_as_far_as_its_rows_and_shows_nan_there(workdir, mlflow_uri):
    """Two runs of 8 rows, 2 samples a row; the second's loss is NaN from its sixth row on (it
    diverged, and went on). The most both reached is 16 samples, and the diverged run reads nan
    there and at 13, not a blank ("did not get that far") and not a table cut at 10."""
    from stream_metrics.compare import compare, read_runs

    for name in ("steady", "diverged"):
        with stream_metrics.init(backend="mlflow", name=name, mlflow={"tracking_uri": mlflow_uri}) as run:
            for i in range(1, 9):
                run.update(samples=2)
                run.log({"train/loss": math.nan if name == "diverged" and i >= 6 else 1.0 / i})
    comparison = compare(read_runs(["steady", "diverged"], mlflow_uri=mlflow_uri), ["train/loss"], at=[9, 13])
    cells = {(row["run"], row["amount"]): row["value"] for row in comparison.table}
    reached = {row["amount"] for row in comparison.table if row["reached_by_all"]}
    assert reached == {16.0}
    assert cells[("steady", 16.0)] == 1.0 / 8 and math.isnan(cells[("diverged", 16.0)])
    assert math.isnan(cells[("diverged", 13.0)]) and cells[("diverged", 9.0)] == pytest.approx((1 / 4 + 1 / 5) / 2)
    [line] = [line for line in comparison.lines["train/loss"] if line.run == "diverged"]
    assert line.x == [2, 4, 6, 8, 10]  # the chart draws the finite points only
    assert main(["compare", "steady", "diverged", "--mlflow-uri", mlflow_uri, "--out", "out", "--no-png"]) == 0
    with open("out/table.csv", newline="") as f:
        assert [row["value"] for row in csv.DictReader(f) if row["run"] == "diverged"] == ["nan"]


def test_the_page_data_is_strict_json_with_an_infinite_loss_and_draws_no_spread_of_points(workdir, mlflow_uri):
    """A browser's JSON.parse refuses NaN and Infinity, and Math.min(...xs) overflows past ~125k points."""
    with stream_metrics.init(backend="mlflow", name="spike", mlflow={"tracking_uri": mlflow_uri}) as run:
        for i in range(1, 9):
            run.update(samples=2)
            run.log({"train/loss": math.inf if i == 4 else 1.0 / i})
    assert main(["compare", "spike", "--mlflow-uri", mlflow_uri, "--out", "out", "--no-png", "--at", "7"]) == 0
    page = open("out/compare.html", encoding="utf-8").read()
    start = page.index('id="stream-metrics-data">') + len('id="stream-metrics-data">')
    text = page[start:page.index("</script>", start)].replace("<\\/", "</")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads(text, parse_constant=refuse)
    [line] = data["lines"]["train/loss"]
    assert line["x"] == [2, 4, 6, 10, 12, 14, 16] and all(math.isfinite(y) for y in line["y"])
    assert "Math.min(..." not in page and "Math.max(..." not in page
