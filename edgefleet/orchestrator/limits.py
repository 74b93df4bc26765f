"""Rate and concurrency limits that protect the orchestrator from floods by one device or many."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgefleet.common.errors import ResourceExhausted
from edgefleet.orchestrator.config import OrchestratorConfig

# Token buckets idle this long are forgotten, so the table does not grow with every device ever seen.
IDLE_BUCKET_S = 600.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per key: rate_per_s tokens a second up to burst; each call takes one token.

    Thread-safe. clock returns seconds on a monotonic scale and exists for tests.
    """

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Create the limiter; raise ValueError unless rate_per_s > 0 and burst >= 1."""
        if rate_per_s <= 0:
            raise ValueError(f"rate must be positive, got {rate_per_s} per second")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = clock()

    def try_acquire(self, key: str) -> float:
        """Take one token for key; return 0.0 on success, else the seconds until a token is available."""
        now = self._clock()
        with self._lock:
            if now - self._last_sweep > IDLE_BUCKET_S:
                self._sweep(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_s

    def acquire(self, key: str, what: str) -> None:
        """Take one token for key; raise ResourceExhausted naming what and the wait when none is left."""
        wait_s = self.try_acquire(key)
        if wait_s > 0:
            raise ResourceExhausted(
                f"{what} exceeds {self.rate_per_s:g} per second (burst {self.burst}); retry in {wait_s:.1f} s"
            )

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for key in [k for k, b in self._buckets.items() if now - b.updated > IDLE_BUCKET_S]:
            del self._buckets[key]


class ConcurrencyLimiter:
    """At most limit holders at once; a caller past the limit gets ResourceExhausted instead of waiting."""

    def __init__(self, limit: int, what: str) -> None:
        """Create the limiter for limit holders of what ("artifact downloads"); raise ValueError for limit < 1."""
        if limit < 1:
            raise ValueError(f"concurrency limit of {what} must be at least 1, got {limit}")
        self.limit = limit
        self.what = what
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active(self) -> int:
        """Number of current holders."""
        return self._active

    def acquire(self) -> None:
        """Take a slot; raise ResourceExhausted when all limit slots are taken."""
        with self._lock:
            if self._active >= self.limit:
                raise ResourceExhausted(f"{self._active} {self.what} are in progress, the maximum; retry shortly")
            self._active += 1

    def release(self) -> None:
        """Give a slot back; raise RuntimeError when none is held."""
        with self._lock:
            if self._active <= 0:
                raise RuntimeError(f"release of {self.what} without a matching acquire")
            self._active -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the duration of a with block; raise ResourceExhausted when none is free."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


@dataclass
class OrchestratorLimits:
    """The limits one orchestrator process applies, built from its configuration."""

    metric_uploads: RateLimiter  # Keyed by device id.
    downloads: ConcurrencyLimiter

    @classmethod
    def from_config(cls, config: OrchestratorConfig) -> OrchestratorLimits:
        """Build the limits from config; raise ValueError for a non-positive rate, burst or limit."""
        return cls(
            metric_uploads=RateLimiter(config.metric_uploads_per_s, config.metric_upload_burst),
            downloads=ConcurrencyLimiter(config.max_concurrent_downloads, "artifact downloads"),
        )

    @classmethod
    def defaults(cls) -> OrchestratorLimits:
        """Build the limits of a default configuration."""
        return cls.from_config(OrchestratorConfig())
