"""A user writes how much training they mean ("500ksp", "2.5Mtok", "30min"); it is read in one place."""
from __future__ import annotations

import string
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_metrics import Progress
from stream_metrics.amount import ALIASES, SUFFIXES, UNITS, Amount, as_amount, parse_amount


@pytest.mark.parametrize("text, value, unit", [
    ("500ksp", 500_000, "sp"),
    ("2.5Mtok", 2_500_000, "tok"),
    ("0.5ep", 0.5, "ep"),
    ("30min", 30, "min"),
    ("1000steps", 1000, "ba"),
    ("1000ba", 1000, "ba"),
    ("5e5sp", 500_000, "sp"),
    ("2B tok", 2_000_000_000, "tok"),
    ("2Gtok", 2_000_000_000, "tok"),
    ("3Ksp", 3000, "sp"),
    ("1.5Ttok", 1_500_000_000_000, "tok"),
    (" 1.5h ", 1.5, "h"),
    ("90s", 90, "s"),
    (".25ep", 0.25, "ep"),
    ("1E-3h", 0.001, "h"),
])
def test_the_forms_users_write(text, value, unit):
    amount = parse_amount(text)
    assert amount == Amount(value, unit)
    assert type(amount.value) is type(value)  # whole numbers are ints: "2.5M" is 2500000, exactly


@pytest.mark.parametrize("text", ["", "sp", "500", "500 samples", "-5sp", "5mtok", "5Xsp", "1.2.3sp", "5kksp",
                                  "5 e5sp", "ep5", "5SP", "1e5", "nan sp", "infsp", "5_000sp", "1e400sp"])
def test_a_bad_string_says_what_is_accepted(text):
    with pytest.raises(ValueError) as info:
        parse_amount(text)
    if text != "1e400sp":
        assert "500ksp" in str(info.value) and "tok" in str(info.value) and "steps" in str(info.value)


@pytest.mark.parametrize("text, error", [("1e309sp", "'1e309sp' is too large an amount of training"),
                                         ("1e400sp", "'1e400sp' is too large an amount of training"),
                                         ("1e-400sp", "'1e-400sp' is too small an amount of training")])
def test_an_amount_beyond_a_float_names_what_was_written(text, error):
    with pytest.raises(ValueError, match=error):
        parse_amount(text)


def test_str_is_short_and_reads_back():
    assert [str(parse_amount(t)) for t in ("500ksp", "2.5Mtok", "0.5ep", "30min", "1000steps", "12000sp",
                                           "1234567tok")] == \
        ["500ksp", "2.5Mtok", "0.5ep", "30min", "1000ba", "12ksp", "1234567tok"]


def test_an_amount_is_how_far_progress_is_in_its_unit():
    p = Progress(step=7, samples=250_000, tokens=9_000_000, epoch=0.75, wall_clock=5400.0)
    assert [as_amount(t).of(p) for t in ("1sp", "1tok", "1ep", "1ba", "1s", "1min", "1h")] == \
        [250_000, 9_000_000, 0.75, 7, 5400.0, 90.0, 1.5]
    assert as_amount("1Mtok").of(Progress(samples=5)) is None  # no token information


def test_an_amount_a_pair_or_text_where_an_amount_is_expected():
    assert as_amount(Amount(3, "ep")) == as_amount((3, "ep")) == as_amount("3ep") == as_amount((3.0, "ep"))
    assert as_amount((1e6, "steps")) == Amount(1_000_000, "ba")
    for bad in (5, (5, "parsecs"), (-1, "sp"), (float("nan"), "sp"), (True, "sp"), ("5", "sp"), [5, "sp"]):
        with pytest.raises(ValueError):
            as_amount(bad)


# ---------------------------------------------------------------- properties
units = st.sampled_from(sorted([*UNITS, *ALIASES]))
values = st.one_of(st.integers(min_value=0, max_value=10**30),
                   st.floats(min_value=0, max_value=1.7e308, allow_nan=False, allow_infinity=False))


@given(values, units)
def test_round_trip_of_any_amount(value, unit):
    amount = Amount(value, unit)
    assert parse_amount(str(amount)) == amount
    assert str(parse_amount(str(amount))) == str(amount)


numbers = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(str),
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)).map(lambda p: f"{p[0]}.{p[1]}"),
    st.tuples(st.integers(0, 999), st.integers(-20, 20)).map(lambda p: f"{p[0]}e{p[1]}"),
)


@given(numbers, st.sampled_from(["", *SUFFIXES]), st.sampled_from(["", " "]), units)
def test_written_amounts_are_read_exactly(number, suffix, space, unit):
    amount = parse_amount(f"{number}{suffix}{space}{unit}")
    exact = Fraction(number) * SUFFIXES.get(suffix, 1)
    assert amount.unit == ALIASES.get(unit, unit)
    assert amount.value == (exact if exact.denominator == 1 else float(exact))
    assert parse_amount(str(amount)) == amount


@settings(max_examples=300)
@given(st.text(alphabet=string.digits + ".eE+- kKMBGTmsptokbaehinx_", max_size=12))
def test_any_text_is_an_amount_that_reads_back_or_a_value_error(text):
    try:
        amount = parse_amount(text)
    except ValueError as exc:
        assert "amount of training" in str(exc)
        return
    assert parse_amount(str(amount)) == amount


@given(numbers, units, st.sampled_from(["-", "x", "m", "kk", "sps", "S", "%", "_"]), st.integers(0, 2))
def test_a_corrupted_amount_is_refused(number, unit, junk, where):
    good = f"{number}{unit}"
    bad = [junk + good, f"{number}{junk}{unit}", good + junk][where]
    with pytest.raises(ValueError, match="500ksp"):
        parse_amount(bad)
