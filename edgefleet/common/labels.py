"""Device labels: the key pattern and limits that the orchestrator enforces and the agent checks at start."""

from __future__ import annotations

import re
from collections.abc import Mapping

LABEL_KEY_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
LABEL_KEY_RULE = "keys must be 1-63 characters of a-z, 0-9, '.', '_', '/' or '-'"
MAX_LABELS = 32
MAX_LABEL_VALUE = 128


def label_problem(labels: Mapping[str, str]) -> str:
    """Return what the orchestrator would reject in labels, naming the key, or "" when it accepts them."""
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} labels; at most {MAX_LABELS} are allowed"
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key):
            return f"label key {key!r}: {LABEL_KEY_RULE}, starting and ending with a letter or digit"
        if len(value) > MAX_LABEL_VALUE:
            return f"label {key!r}: the value is {len(value)} characters long; at most {MAX_LABEL_VALUE} are allowed"
    return ""
