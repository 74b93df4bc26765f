"""argparse types for counts and durations."""

from __future__ import annotations

import argparse

import pytest

from edgefleet.common.argtypes import MAX_INT32, seconds, wait_seconds, whole_number


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("7", 7), ("10", 10)])
def test_whole_number_accepts(text: str, expected: int) -> None:
    assert whole_number(1, 10)(text) == expected


@pytest.mark.parametrize("text", ["0", "11", "-1", "2.5", "ten", ""])
def test_whole_number_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid value {text!r}: give a whole number from 1 to 10"):
        whole_number(1, 10)(text)


def test_whole_number_open_range() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=rf"of at least 0 \(at most {MAX_INT32}\)"):
        whole_number(0)("-3")


def test_whole_number_int32_cap() -> None:
    assert whole_number(0)(str(MAX_INT32)) == MAX_INT32
    with pytest.raises(argparse.ArgumentTypeError, match="invalid value '99999999999999999999'"):
        whole_number(0)("99999999999999999999")


@pytest.mark.parametrize(("text", "expected"), [("0.5", 0.5), ("30", 30.0), ("600", 600.0)])
def test_seconds_accepts(text: str, expected: float) -> None:
    assert seconds(600)(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "601", "soon"])
def test_seconds_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="above 0 and at most 600"):
        seconds(600)(text)


@pytest.mark.parametrize(("text", "expected"), [("0", 0.0), ("0.5", 0.5), ("60", 60.0)])
def test_wait_seconds_accepts(text: str, expected: float) -> None:
    assert wait_seconds(60)(text) == expected


@pytest.mark.parametrize("text", ["-5", "nan", "inf", "61", "soon"])
def test_wait_seconds_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid value {text!r}: .* of 0 or more and at most 60"):
        wait_seconds(60)(text)
