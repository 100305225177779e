"""_checks.py: one way to say a bad argument, and one-time warnings that one call resets."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from stream_metrics import _checks, counting


def test_a_count_is_a_whole_number_and_anything_else_is_one_clear_error():
    assert _checks.whole_number("dataset_size", 8) == 8
    assert _checks.whole_number("dataset_size", 8.0) == 8 and _checks.whole_number("n", np.int64(5)) == 5
    assert _checks.whole_number("n", 10**20) == 10**20  # no detour through a float
    for bad in (True, -1, 1.5, float("nan"), float("inf"), "3", None):
        with pytest.raises(ValueError, match=r"^buffer_rows=.* must be a whole number >= 0$"):
            _checks.whole_number("buffer_rows", bad)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0 must be a whole number >= 1: the micro"):
        _checks.whole_number("gradient_accumulation_steps", 0, minimum=1, hint="the micro-batches of one step")
    assert _checks.non_negative("flush_timeout", 0) == 0.0
    with pytest.raises(ValueError, match=r"^flush_timeout=-1 must be a number of seconds >= 0$"):
        _checks.non_negative("flush_timeout", -1, unit="seconds")


def test_a_one_time_warning_comes_once_until_reset(recwarn):
    for _ in range(3):
        _checks.warn_once("test-kind", "said once")
        counting.warn_once("test-kind", "said once")  # the same function, by its old address
    assert [str(w.message) for w in recwarn] == ["stream_metrics: said once"]
    _checks.reset_warnings()
    with pytest.warns(UserWarning, match="said once"):
        _checks.warn_once("test-kind", "said once")


def test_a_value_warning_of_sanitize_is_reset_with_the_others():
    from stream_metrics.sanitize import to_number

    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            to_number("flag", True)
            to_number("flag", True)
        assert len(caught) == 1 and "the bool True is stored as 1" in str(caught[0].message)
        _checks.reset_warnings()


def test_a_missing_library_is_named_with_its_extra_and_anything_else_is_left_alone():
    missing = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    said = _checks.missing_extra(missing, "transformers", "hf", "stream_metrics.hf")
    assert str(said) == 'stream_metrics.hf needs transformers, which is not installed: pip install "stream_metrics[hf]"'
    inner = ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")
    assert _checks.missing_extra(inner, "transformers", "hf", "stream_metrics.hf") is inner
