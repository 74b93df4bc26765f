"""Target selectors (labels and hardware class), wave sizes and the order in which devices join waves."""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from edgefleet.orchestrator.domain import Device
from edgefleet.orchestrator.rollouts.domain import Target

# The selector key that matches the hardware class instead of a label.
HARDWARE_CLASS_KEY = "hardware_class"
MAX_WAVES = 20


class SelectorError(ValueError):
    """A target selector or a wave list is malformed; the message names the bad part."""


def parse_selector(text: str) -> Target:
    """Parse "kind=camera,site=a,hardware_class=car-ecu-*" into a Target.

    Every KEY=VALUE term is a label that must match exactly, except hardware_class, whose value is an
    exact class or an fnmatch pattern. "" and "all" select every device. Raises SelectorError for a
    term without "=", an empty key or a key given twice.
    """
    text = text.strip()
    if text in ("", "all", "*"):
        return Target()
    labels: dict[str, str] = {}
    hardware_class = ""
    for term in text.split(","):
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise SelectorError(f"invalid selector term {term!r} in {text!r}: expected KEY=VALUE")
        if key == HARDWARE_CLASS_KEY:
            if hardware_class:
                raise SelectorError(f"selector {text!r} names {HARDWARE_CLASS_KEY} twice; give one pattern")
            hardware_class = value
            continue
        if key in labels:
            raise SelectorError(f"selector {text!r} names label {key!r} twice; a device has one value per label")
        labels[key] = value
    return Target(labels=labels, hardware_class=hardware_class)


def format_selector(target: Target) -> str:
    """Return the selector text that parse_selector turns back into target; "all" for an empty target."""
    terms = [f"{key}={value}" for key, value in sorted(target.labels.items())]
    if target.hardware_class:
        terms.append(f"{HARDWARE_CLASS_KEY}={target.hardware_class}")
    return ",".join(terms) or "all"


def matches(target: Target, device: Device) -> bool:
    """Return whether the device carries every label of the target and its class matches the pattern."""
    if any(device.labels.get(key) != value for key, value in target.labels.items()):
        return False
    if not target.hardware_class:
        return True
    return fnmatch.fnmatchcase(device.hardware.hardware_class, target.hardware_class)


def unmatched_reason(target: Target, devices: Iterable[Device]) -> str:
    """Return which term of the target no device satisfies, with the closest labels or classes the fleet has.

    Returns "" when every term alone matches some device (only their combination matches none).
    """
    devices = list(devices)
    for key, value in sorted(target.labels.items()):
        values = sorted({d.labels[key] for d in devices if key in d.labels})
        if not values:
            keys = sorted({k for d in devices for k in d.labels})
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"the labels are {', '.join(keys) or 'none'}"
            return f"no device has the label {key!r}; {hint}"
        if value not in values:
            return f"no device has {key}={value}; the values of {key} are {', '.join(values)}"
    if target.hardware_class:
        classes = sorted({d.hardware.hardware_class for d in devices})
        if not any(fnmatch.fnmatchcase(c, target.hardware_class) for c in classes):
            known = ", ".join(classes) or "none"
            return f"no hardware class matches {target.hardware_class!r}; the classes are {known}"
    return ""


def select(target: Target, devices: Iterable[Device]) -> list[Device]:
    """Return the devices that match the target, sorted by device id."""
    return sorted((d for d in devices if matches(target, d)), key=lambda d: d.device_id)


def check_wave_percents(percents: Sequence[int]) -> tuple[int, ...]:
    """Check cumulative wave percents (1, 10, 50, 100) and return them as a tuple.

    Raises SelectorError unless there are 1 to MAX_WAVES values, each in 1..100, strictly rising,
    and the last is 100.
    """
    if not 1 <= len(percents) <= MAX_WAVES:
        raise SelectorError(f"{len(percents)} waves given; use 1 to {MAX_WAVES}, for example 1,10,50,100")
    for previous, current in zip((0, *percents), percents, strict=False):
        if not 1 <= current <= 100:
            raise SelectorError(f"wave percent {current} is out of range; each wave covers 1 to 100 percent")
        if current <= previous:
            raise SelectorError(
                f"wave percents {list(percents)} must rise: each is the cumulative share after that wave"
            )
    if percents[-1] != 100:
        raise SelectorError(f"the last wave is {percents[-1]}%; it must be 100 so that the whole target is covered")
    return tuple(percents)


def cumulative_count(percent: int, total: int) -> int:
    """Return how many of total devices the waves up to percent cover: at least one when total > 0."""
    if total == 0:
        return 0
    return min(total, max(1, math.ceil(percent * total / 100)))


def plan_order(devices: Sequence[Device]) -> list[str]:
    """Order devices for the waves by taking one device of each hardware class in turn.

    The first wave (the canary) therefore spreads across hardware classes: it contains one device of
    each class as far as its size allows, and so does every later wave. Within a class, connected
    devices come first, so an early wave does not wait on a device that is offline. Classes are
    visited in name order and devices in id order, so the plan is the same for the same fleet state.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for device in sorted(devices, key=lambda d: (not d.connected, d.device_id)):
        by_class[device.hardware.hardware_class].append(device.device_id)
    queues = [by_class[name] for name in sorted(by_class)]
    order: list[str] = []
    for position in range(max((len(q) for q in queues), default=0)):
        order.extend(q[position] for q in queues if position < len(q))
    return order
