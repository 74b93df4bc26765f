"""argparse types for counts and durations, whose errors name the value and the allowed range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# The largest value of a protobuf int32 field. A count without its own maximum is still capped here, because
# protobuf raises ValueError (a traceback in the CLI) when a request field is set to a larger number.
MAX_INT32 = 2**31 - 1


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """Return an argparse type that parses a whole number from minimum to maximum (default MAX_INT32)."""
    if maximum is None:
        allowed = f"of at least {minimum} (at most {MAX_INT32})"
        maximum = MAX_INT32
    else:
        allowed = f"from {minimum} to {maximum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or number > maximum:
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a whole number {allowed}")
        return number

    return parse


def seconds(maximum: float | None = None) -> Callable[[str], float]:
    """Return an argparse type that parses a finite number of seconds above 0 (and at most maximum)."""
    return _seconds_type(allow_zero=False, maximum=maximum)


def wait_seconds(maximum: float | None = None) -> Callable[[str], float]:
    """Return an argparse type that parses a finite number of seconds of 0 or more (and at most maximum)."""
    return _seconds_type(allow_zero=True, maximum=maximum)


def _seconds_type(*, allow_zero: bool, maximum: float | None) -> Callable[[str], float]:
    allowed = ("of 0 or more" if allow_zero else "above 0") + (
        f" and at most {maximum:g}" if maximum is not None else ""
    )

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        in_range = (number >= 0 if allow_zero else number > 0) and (maximum is None or number <= maximum)
        if not (math.isfinite(number) and in_range):
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: give a number of seconds {allowed}")
        return number

    return parse


def finite_number(minimum: float, maximum: float, unit: str) -> Callable[[str], float]:
    """Return an argparse type that parses a finite number from minimum to maximum, named by unit in errors."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and minimum <= number <= maximum):
            raise argparse.ArgumentTypeError(
                f"invalid value {value!r}: give a number of {unit} from {minimum:g} to {maximum:g}"
            )
        return number

    return parse
