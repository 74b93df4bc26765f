"""argparse types for counts and durations, whose errors name the value and the allowed range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """Return an argparse type that parses a whole number of at least minimum (and at most maximum)."""
    allowed = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a whole number {allowed}")
        return number

    return parse


def seconds(maximum: float | None = None) -> Callable[[str], float]:
    """Return an argparse type that parses a finite number of seconds above 0 (and at most maximum)."""
    allowed = "above 0" + (f" and at most {maximum:g}" if maximum is not None else "")

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0 and (maximum is None or number <= maximum)):
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a number of seconds {allowed}")
        return number

    return parse
