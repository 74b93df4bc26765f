"""Capped exponential backoff with full jitter, as used for every reconnect and retry."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for attempt n drawn uniformly from [0, min(cap, base * 2**n)].

    Full jitter spreads a fleet that lost the orchestrator at once across the whole window instead
    of letting every agent retry at the same instants.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
