"""Odd values, keys, batches, settings and checkpoints: a clear error before training, or a documented
conversion with one warning, and never a crash in the middle of training.

What the backends stored is read back from MLflow's SQLite store and W&B's offline run file.
"""
from __future__ import annotations

import json
from fractions import Fraction
import math
import warnings

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import _validate_metric_name

import stream_metrics
from stream_metrics import schema
from stream_metrics.sanitize import sanitize_key
from conftest import wandb_rows, wandb_run_dirs

MLFLOW_MAX_FLOAT = 1.7976931348623157e308  # MLflow's SQL store keeps +/-inf as +/-this


def log_rows(mlflow_uri, metrics_per_row: list[dict]):
    """A plain loop writing ``metrics_per_row`` to both backends; returns (mlflow run id, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stream_metrics.init(backend=["mlflow", "wandb"], mlflow={"tracking_uri": mlflow_uri}) as run:
            for metrics in metrics_per_row:
                run.update(samples=2)
                run.log(metrics)
            run_id = run.run_ids["mlflow"]
    return run_id, [str(w.message) for w in caught if str(w.message).startswith("stream_metrics")]


def stored_mlflow(mlflow_uri, run_id) -> dict[str, list[float]]:
    client = MlflowClient(mlflow_uri)
    keys = client.get_run(run_id).data.metrics
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def stored_wandb(workdir) -> dict[str, list]:
    [run_dir] = wandb_run_dirs(workdir)
    stored: dict[str, list] = {}
    for row in wandb_rows(run_dir):
        for key, value in row.items():
            stored.setdefault(key, []).append(value)
    return stored


def user_keys(stored: dict) -> set[str]:
    return {k for k in stored if k not in ("run", "_step") and not k.startswith(("progress/", "throughput/"))}


def test_metric_values_are_stored_converted_or_skipped_with_one_warning_each(mlflow_uri, workdir):
    values = {
        # stored as numbers
        "int": 3, "float": 0.5, "np_float": np.float32(0.25), "np_int": np.int64(7), "np_0d": np.array(4.0),
        "tensor_0d": torch.tensor(2.5), "tensor_1": torch.tensor([3.5]), "tensor_int": torch.tensor(9),
        "nested": {"inner": 1.5, "deeper": {"x": 2}},
        # converted, with one warning each
        "flag": True, "numeric_text": "0.125", "nan": float("nan"), "pos_inf": float("inf"),
        "neg_inf": -math.inf,
        # skipped, with one warning each
        "none": None, "text": "fast", "multi": torch.ones(3), "array": np.zeros((2, 2)),
        "meta": torch.tensor(1.0, device="meta"), "a_list": [1, 2], "huge": 10 ** 400,
    }
    run_id, messages = log_rows(mlflow_uri, [values] * 3)

    expected = {"int": 3, "float": 0.5, "np_float": 0.25, "np_int": 7, "np_0d": 4.0, "tensor_0d": 2.5,
                "tensor_1": 3.5, "tensor_int": 9, "nested/inner": 1.5, "nested/deeper/x": 2, "flag": 1,
                "numeric_text": 0.125}
    mlflow = stored_mlflow(mlflow_uri, run_id)
    wandb = stored_wandb(workdir)
    for stored in (mlflow, wandb):
        assert user_keys(stored) == set(expected) | {"nan", "pos_inf", "neg_inf"}
        for key, value in expected.items():
            assert stored[key] == [value] * 3, key
        assert all(math.isnan(v) for v in stored["nan"])
    assert mlflow["pos_inf"] == [MLFLOW_MAX_FLOAT] * 3 and mlflow["neg_inf"] == [-MLFLOW_MAX_FLOAT] * 3
    assert wandb["pos_inf"] == [math.inf] * 3 and wandb["neg_inf"] == [-math.inf] * 3

    warned = {  # each names the key and says what happened, once for the three rows
        "flag": "the bool True is stored as 1",
        "numeric_text": "the string '0.125' is stored as the number 0.125",
        "nan": "the value nan is stored as it is",
        "pos_inf": "MLflow stores +/-inf as +/-1.8e308",
        "none": "value None is skipped; log a number",
        "text": "the string 'fast' is not a number and is skipped; log text as a config value instead",
        "multi": "an array of 3 elements is skipped; log a scalar such as value.mean()",
        "array": "an array of 4 elements is skipped",
        "meta": "cannot be read",
        "a_list": "a list is not a number and is skipped",
        "huge": "an int too large for a 64-bit float is skipped",
    }
    for key, text in warned.items():
        about_key = [m for m in messages if m.startswith(f"stream_metrics: metric {key!r}:")]
        assert len(about_key) == 1 and text in about_key[0], (key, about_key)
    for key in expected:
        if key not in ("flag", "numeric_text"):
            assert not [m for m in messages if f"metric {key!r}" in m], key


def test_odd_keys_get_one_valid_name_each_the_same_in_both_backends(mlflow_uri, workdir):
    long_key = "x" * 300
    renamed = {  # key -> the name stored, in the order logged
        "": "metric", "/leading": "leading", "a/../b": "a/__/b", "..": "metric_2", "at@sign": "at_sign",
        "naïve/lösś": "naive/loss", "ünï/日本": "uni", long_key: sanitize_key(long_key), "a@b": "a_b",
        "a#b": "a_b_2", "_step": "step", schema.SAMPLES: schema.SAMPLES + "_2", "ok/key": "ok/key",
    }
    assert renamed[long_key].startswith("x" * 241 + "_") and len(renamed[long_key]) == 250
    metrics = {key: float(i) for i, key in enumerate(renamed)}
    run_id, messages = log_rows(mlflow_uri, [metrics, metrics])

    for stored in (stored_mlflow(mlflow_uri, run_id), stored_wandb(workdir)):
        assert user_keys(stored) - {schema.SAMPLES + "_2"} == set(renamed.values()) - {schema.SAMPLES + "_2"}
        for i, (key, name) in enumerate(renamed.items()):
            assert stored[name] == [float(i)] * 2, key
        assert stored[schema.SAMPLES] == [2, 4]  # the user's own 'progress/samples' did not replace the axis
    for name in renamed.values():
        _validate_metric_name(name)  # MLflow's own check
    for key, name in renamed.items():
        about = [m for m in messages if m.startswith(f"stream_metrics: metric key {key!r} is stored as {name!r}")]
        assert len(about) == (0 if key == name else 1), key


def test_odd_batches_are_counted_or_skipped_with_a_warning_and_training_goes_on(mlflow_uri):
    ids = torch.ones(2, 4, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri}) as run:
            run.update({})                                        # empty: skipped
            run.update([])                                        # empty: skipped
            run.update({"note": "no data here"})                  # nothing countable: skipped
            run.update({"text": ["a b", "c", "d e f"]})           # no tensors: 3 samples, no tokens
            run.update({"input_ids": [[5, 6, 7], [8]]})           # ragged lists: 2 samples, 4 tokens
            run.update([[5, 6], [7, 8, 9]])                       # ragged lists: 2 samples, 5 tokens
            run.update({"input_ids": ids, "attention_mask": torch.ones(3, 4)})  # mask shape wrong: 2, 8
            run.update({}, samples=4, tokens=10)                  # explicit counts win
            progress = run.log({"loss": 1.0})
            run_id = run.run_ids["mlflow"]
    messages = [str(w.message) for w in caught]
    assert (progress.samples, progress.tokens) == (3 + 2 + 2 + 2 + 4, 4 + 5 + 8 + 10)
    stored = stored_mlflow(mlflow_uri, run_id)
    assert stored[schema.SAMPLES] == [13] and stored[schema.TOKENS] == [27]

    def once(text):
        return len([m for m in messages if text in m]) == 1

    assert once("cannot count an empty batch: skip empty batches, or pass samples=0")
    assert once("cannot count a batch with no tensors or lists in it: pass samples= (and tokens=) to update()")
    assert once("batches carry no input_ids, so progress/tokens is left out of every row")
    assert once("the attention mask's shape (3, 4) does not match the input ids' (2, 4)")


@pytest.mark.parametrize("options, error", [
    ({"x_axis": "batches"}, "x_axis='batches' is not a progress axis: use one of 'step', 'samples'"),
    ({"x_axis": None}, "x_axis=None is not a progress axis"),
    ({"backend": "neptune"}, "backend='neptune' is not known: use 'mlflow', 'wandb', a list of both, or 'none'"),
    ({"backend": ["mlflow", "tensorboard"]}, "backend='tensorboard' is not known"),
    ({"dataset_size": 0}, "dataset_size=0 must be a positive whole number of training examples"),
    ({"dataset_size": -100}, "dataset_size=-100 must be a positive whole number"),
    ({"dataset_size": 2.5}, "dataset_size=2.5 must be a positive whole number"),
    ({"dataset_size": float("nan")}, "dataset_size=nan must be a positive whole number"),
    ({"dataset_size": "1000"}, "dataset_size='1000' must be a positive whole number"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 must be a whole number >= 1"),
])
def test_bad_settings_fail_at_init_naming_the_problem_and_the_fix(options, error, mlflow_uri, workdir):
    with pytest.raises(ValueError) as raised:
        stream_metrics.init(**{"backend": "mlflow", "mlflow": {"tracking_uri": mlflow_uri}, **options})
    assert error in str(raised.value)
    assert not (workdir / "mlflow.db").exists()  # nothing was started


def test_a_whole_dataset_size_given_as_a_float_is_accepted():
    with stream_metrics.init(backend="none", dataset_size=1000.0) as run:
        run.update(samples=250)
        assert run.log().epoch == 0.25


def good_state() -> dict:
    with stream_metrics.init(backend="none") as run:
        run.update(samples=8, tokens=80)
        return json.loads(json.dumps(run.state_dict()))  # as a user's checkpoint keeps it


@pytest.mark.parametrize("spoil, error", [
    (lambda s: ["not", "a", "dict"], "not a stream_metrics state dict (no format 'stream_metrics.run'): pass the "
                                     "dict that Run.state_dict() returned"),
    (lambda s: {"state": {}, "param_groups": []}, "not a stream_metrics state dict"),  # an optimizer's
    (lambda s: {**s, "version": 99}, "stream_metrics state version 99 is not 1, the one this release"),
    (lambda s: {**s, "version": None}, "stream_metrics state version None is not 1"),
    (lambda s: {k: v for k, v in s.items() if k != "progress"}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "progress": {**s["progress"], "samples": -8}}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "progress": {**s["progress"], "samples": "eight"}}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "progress": {**s["progress"], "surprise": 1}}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "progress": "garbage"}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "rows": "many"}, "corrupt stream_metrics state dict"),
    (lambda s: {**s, "rows": -5}, "corrupt stream_metrics state dict: state rows=-5 must be a whole number >= 0"),
    (lambda s: {**s, "batches": 2.5}, "corrupt stream_metrics state dict: state batches=2.5 must be a whole number"),
])
def test_a_corrupt_or_foreign_state_dict_is_refused_with_a_clear_error(spoil, error):
    state = spoil(good_state())
    with stream_metrics.init(backend="none") as run:
        with pytest.raises(ValueError) as raised:
            run.load_state_dict(state)
        assert error in str(raised.value)
        run.update(samples=2)  # the run itself is unharmed
        assert run.log().samples == 2
    with pytest.raises(ValueError, match="stream_metrics state"):
        stream_metrics.init(backend="none", resume=state)


def test_a_good_state_dict_continues_the_axes():
    with stream_metrics.init(backend="none", resume=good_state()) as run:
        run.update(samples=2, tokens=20)
        progress = run.log()
    assert (progress.samples, progress.tokens) == (10, 100)


# ----------------------------------------------------------------------------- properties of key names
from hypothesis import given, settings, strategies as st  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH  # noqa: E402

from stream_metrics.sanitize import KeyMap, is_valid_key  # noqa: E402

AXIS_NAMES = (*schema.AXES.values(), schema.LOSS_TOKENS, schema.SAMPLES_PER_S, schema.TOKENS_PER_S)
# Any text at all, and text made mostly of the characters that make paths and names go wrong.
KEYS = (st.text(max_size=300)
        | st.text(alphabet="./_ -:@aé", max_size=40)
        | st.sampled_from(AXIS_NAMES + ("", ".", "..", "/", "_step", "a" * 251)))


def assert_valid_everywhere(name: str) -> None:
    _validate_metric_name(name)                                # MLflow's own check of characters and paths
    assert 0 < len(name) <= MAX_ENTITY_KEY_LENGTH              # MLflow's length limit
    assert isinstance(name, str) and not name.startswith("_")  # W&B: a str, not one of its own '_' keys
    assert is_valid_key(name)


@settings(max_examples=300, deadline=None)
@given(KEYS)
def test_sanitize_key_is_idempotent_and_valid_for_mlflow_and_wandb(key):
    name = sanitize_key(key)
    assert sanitize_key(name) == name
    assert_valid_everywhere(name)
    if is_valid_key(key):
        assert name == key  # a key both backends accept is never changed


@settings(max_examples=200, deadline=None)
@given(st.lists(KEYS, max_size=25))
def test_a_key_map_never_gives_two_keys_of_a_run_one_name(keys):
    key_map = KeyMap(reserved=AXIS_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {key: key_map(key) for key in keys}
        assert all(key_map(key) == name for key, name in names.items())  # stable within the run
    assert len(set(names.values())) == len(names)
    assert not set(names.values()) & set(AXIS_NAMES)
    for name in names.values():
        assert_valid_everywhere(name)


def test_keys_that_flatten_to_one_name_stay_two_metrics(mlflow_uri, workdir):
    """A nested key and a '/'-joined one, or the keys 7 and "7": neither overwrites the other."""
    metrics = {"a/b": 1.0, "a": {"b": 10.0}, 7: 3.0, "7": 4.0}
    run_id, messages = log_rows(mlflow_uri, [metrics, metrics])
    for stored in (stored_mlflow(mlflow_uri, run_id), stored_wandb(workdir)):
        assert user_keys(stored) == {"a/b", "a/b_2", "7", "7_2"}
        assert (stored["a/b"], stored["a/b_2"], stored["7"], stored["7_2"]) == ([1.0] * 2, [10.0] * 2, [3.0] * 2,
                                                                                [4.0] * 2)
    assert len([m for m in messages if "metric key 'a/b' is stored as 'a/b_2'" in m]) == 1
    assert len([m for m in messages if "metric key '7' is stored as '7_2'" in m]) == 1


def test_more_batch_forms_count_their_tokens_by_the_mask():
    """(inputs dict, targets) tuples, inputs_embeds with a mask, and a tokenizer's padded lists."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (4, 8), generator=gen)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    list_ids = [[1, 2, 0, 0], [4, 5, 6, 0], [7, 0, 0, 0]]
    list_mask = [[1 if t else 0 for t in row] for row in list_ids]
    batches = [
        ({"input_ids": ids, "attention_mask": mask}, torch.zeros(4)),      # (inputs, targets): 4 samples
        {"inputs_embeds": torch.randn(4, 8, 16, generator=gen), "attention_mask": mask},
        {"input_ids": list_ids, "attention_mask": list_mask},              # tokenizer(..., padding=True)
    ]
    truth_tokens = 2 * int(mask.sum()) + sum(sum(row) for row in list_mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = stream_metrics.init(backend="none")
        for batch in batches:
            run.update(batch)
        progress = run.progress
    assert (progress.samples, progress.tokens) == (4 + 4 + 3, truth_tokens) == (11, 2 * 24 + 6)
    assert not [w for w in caught if "stream_metrics" in str(w.message)], [str(w.message) for w in caught]


def test_numpy_batches_count_like_tensors_and_given_tokens_are_never_dropped():
    """A loader yielding NumPy arrays (read-only ones too, as Arrow gives them); tokens= with a batch that
    cannot be counted, or with one that would warn about how its tokens are read."""
    ids = np.array([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [9, 9, 9, 9, 9]])
    mask = (ids != 0).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    labels[:, 0] = -100  # the first token of each example is not predicted
    frozen = ids.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = stream_metrics.init(backend="none", pad_token_id=0)
        run.update({"input_ids": ids, "attention_mask": mask, "labels": labels})  # 3 samples, 10 tokens, 7 loss
        run.update(frozen)                                                         # 3 samples, 10 tokens
        quiet = [str(w.message) for w in caught if "stream_metrics" in str(w.message)]
        run.update({"input_ids": torch.ones(2, 4, dtype=torch.long)}, tokens=5)  # no mask, no pad id needed
        run.update("not a batch", tokens=6, loss_tokens=4)                          # the counts given are kept
        progress = run.progress
    said = [str(w.message) for w in caught if "stream_metrics" in str(w.message)]
    assert quiet == [] and ids.flags.writeable and not frozen.flags.writeable
    assert (progress.samples, progress.tokens, progress.loss_tokens) == (3 + 3 + 2, 10 + 10 + 5 + 6, 7 + 4)
    assert said == ["stream_metrics: cannot count a batch of type str: pass a dict, tuple, list or tensor, or "
                    "samples=; its samples are not counted (the tokens and loss_tokens passed are)"], said


@pytest.mark.parametrize("value", [np.float32(2.5), np.float64(0.5), Fraction(5, 2), np.float32("nan"),
                                   np.float16("inf")])
def test_a_fractional_count_of_any_number_type_is_refused(value):
    run = stream_metrics.init(backend="none")
    with pytest.raises(ValueError, match=r"a count must be a whole number >= 0"):
        run.update(samples=value)
    run.update(samples=np.float32(2.0), tokens=Fraction(8, 2))  # whole ones are taken
    assert (run.progress.samples, run.progress.tokens) == (2, 4)


def test_wrong_arguments_to_log_due_and_finish_are_clear_errors_and_the_run_goes_on(mlflow_uri):
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
    run.update(samples=4)
    for metrics in ("loss", [("loss", 1.0)], 5):
        with pytest.raises(TypeError, match=r"log\(\) takes a dict of metrics"):
            run.log(metrics)
    for progress in ({"samples": 10}, 10):
        with pytest.raises(TypeError, match=r"the second argument is the Progress that log\(\)"):
            run.due("5sp", progress)
    assert run.log({"loss": 1.0})["loss_tokens"] is None and run.progress["progress/samples"] == 4
    for status in ("finished", "DONE"):
        with pytest.raises(ValueError, match=r"the status is one of 'FINISHED', 'FAILED', 'KILLED'"):
            run.finish(status)
    run_id = run.run_ids["mlflow"]
    run.finish()
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.update(samples=4)
        run.update(samples=4)
    assert len([w for w in caught if "update() after finish()" in str(w.message)]) == 1


def test_a_state_of_other_runs_is_refused_once_rows_went_out(mlflow_uri):
    """Loading it would send this run's axes back (and mix two runs' counts in one)."""
    foreign = stream_metrics.init(backend="none").state_dict()  # no run ids
    run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": mlflow_uri})
    run.update(samples=10, tokens=100)
    run.log({"x": 1.0})
    with pytest.raises(ValueError, match=r"load_state_dict\(\) after the first log\(\) takes only a state of the runs"):
        run.load_state_dict(foreign)
    own = run.state_dict()
    run.update(samples=2)
    run.load_state_dict(own)  # its own state: the same runs go on from it
    assert run.log({"x": 2.0}).samples == 10
    run.finish()


def test_iterating_a_list_of_batches_estimates_the_epoch_in_batches():
    ids = torch.arange(1, 161).reshape(20, 8)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)  # 5 batches
    for batches in (loader, list(loader)):
        run = stream_metrics.init(backend="none")
        for i, _ in enumerate(run.iterate(batches)):
            if i == 2:
                break
        assert (run.progress.epoch, run.progress.epoch_source) == (pytest.approx(3 / 5), "sized")
