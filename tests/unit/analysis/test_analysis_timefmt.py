"""Durations: seconds, HH:MM (the paper's Table II) and HH:MM:SS; bad input is a clear error."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teefl.analysis.timefmt import format_hm, format_hms, parse_duration
from teefl.errors import TeeflError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("01:00", 3600.0),
        ("01:05", 3900.0),
        ("00:53", 3180.0),
        ("1:05", 3900.0),
        ("125:30", 125 * 3600 + 30 * 60.0),
        ("01:05:07", 3907.0),
        ("00:00:01.5", 1.5),
        ("3900", 3900.0),
        ("3900.25", 3900.25),
        (" 42 ", 42.0),
        ("42s", 42.0),
        ("0", 0.0),
        (".5", 0.5),
    ],
)
def test_parse_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [3900, 3900.5, 0])
def test_parse_numbers(value: float) -> None:
    assert parse_duration(value) == float(value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "01:60",
        "01:05:60",
        "1:2:3:4",
        "-5",
        "-01:00",
        "01:",
        ":05",
        "1h",
        "01-05",
        "nan",
        "inf",
        "01:05:xx",
    ],
)
def test_parse_rejects_with_one_clear_line(text: str) -> None:
    with pytest.raises(TeeflError) as err:
        parse_duration(text, what="--baseline")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--baseline" in msg


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, True, None])
def test_parse_rejects_bad_numbers(value: object) -> None:
    with pytest.raises(TeeflError):
        parse_duration(value)  # type: ignore[arg-type]


def test_hm_means_hours_and_minutes_not_minutes_and_seconds() -> None:
    # the paper's "01:05" is 65 minutes; reading it as 1 min 5 s would be off by 60x
    assert parse_duration("01:05") == 65 * 60


def test_format() -> None:
    assert format_hms(3907.4) == "01:05:07"
    assert format_hms(3907.6) == "01:05:08"
    assert format_hms(400_000) == "111:06:40"
    assert format_hms(None) == "-"
    assert format_hm(3929) == "01:05"
    assert format_hm(3931) == "01:06"


@given(st.integers(min_value=0, max_value=10**7))
def test_round_trip(seconds: int) -> None:
    assert parse_duration(format_hms(seconds)) == seconds
