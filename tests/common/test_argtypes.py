"""argparse types for counts and durations."""

from __future__ import annotations

import argparse

import pytest

from edgefleet.common.argtypes import seconds, whole_number


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("7", 7), ("10", 10)])
def test_whole_number_accepts(text: str, expected: int) -> None:
    assert whole_number(1, 10)(text) == expected


@pytest.mark.parametrize("text", ["0", "11", "-1", "2.5", "ten", ""])
def test_whole_number_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid value {text!r}: give a whole number from 1 to 10"):
        whole_number(1, 10)(text)


def test_whole_number_open_range() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="of at least 0"):
        whole_number(0)("-3")


@pytest.mark.parametrize(("text", "expected"), [("0.5", 0.5), ("30", 30.0), ("600", 600.0)])
def test_seconds_accepts(text: str, expected: float) -> None:
    assert seconds(600)(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "601", "soon"])
def test_seconds_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="above 0 and at most 600"):
        seconds(600)(text)
