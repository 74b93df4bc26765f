"""Durable on-device benchmark results: the BenchmarkStore interface and its SQL implementation."""

from __future__ import annotations

import abc
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from edgefleet.orchestrator.store.base import NotFoundError, StoreError
from edgefleet.orchestrator.store.engine import SqlTransactions
from edgefleet.orchestrator.store.tables import devices, variants
from edgefleet.orchestrator.store.tables_costmodel import benchmark_results

if TYPE_CHECKING:
    from edgefleet.orchestrator.state import OrchestratorState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkResult:
    """The latency of one variant on one device at one thread count, measured by the agent."""

    variant_id: str
    device_id: str
    hardware_class: str
    runtime: str
    threads: int
    p50_ms: float
    p95_ms: float
    runs: int
    measured_at: datetime  # Orchestrator clock when the report arrived.


class BenchmarkStore(abc.ABC):
    """Benchmark results by variant and hardware class. Methods are thread-safe; each is one transaction."""

    @abc.abstractmethod
    def add_results(self, results: Sequence[BenchmarkResult]) -> int:
        """Store results in one transaction and return how many were stored.

        Raises NotFoundError, storing nothing, when a variant or device is unknown, and StoreError
        for a thread count below 1, a latency that is not a positive number or a naive timestamp.
        """

    @abc.abstractmethod
    def list_results(
        self, *, variant_ids: Sequence[str] = (), hardware_class: str = "", device_id: str = ""
    ) -> list[BenchmarkResult]:
        """Return results matching every non-empty filter, oldest first."""


def _check(result: BenchmarkResult) -> None:
    if result.threads < 1:
        raise StoreError(f"benchmark of variant {result.variant_id!r} has threads={result.threads}; must be >= 1")
    for name in ("p50_ms", "p95_ms"):
        value = getattr(result, name)
        if not (math.isfinite(value) and value > 0):
            raise StoreError(f"benchmark of variant {result.variant_id!r} has {name}={value!r}; must be positive")
    if result.runs < 1:
        raise StoreError(f"benchmark of variant {result.variant_id!r} has runs={result.runs}; must be >= 1")
    if result.measured_at.tzinfo is None:
        raise StoreError(f"measured_at {result.measured_at.isoformat()} is naive; pass a timezone-aware time")


class SqlBenchmarkStore(SqlTransactions, BenchmarkStore):
    """A BenchmarkStore on the SQL store's engine (SqlStore.engine), with the schema at head."""

    def add_results(self, results: Sequence[BenchmarkResult]) -> int:
        for result in results:
            _check(result)
        if not results:
            return 0
        variant_ids = sorted({r.variant_id for r in results})
        device_ids = sorted({r.device_id for r in results})
        with self._write() as connection:
            known_variants = set(
                connection.execute(
                    sa.select(variants.c.variant_id).where(variants.c.variant_id.in_(variant_ids))
                ).scalars()
            )
            missing = [v for v in variant_ids if v not in known_variants]
            if missing:
                raise NotFoundError(f"variants {missing} not found; benchmark only variants the orchestrator stores")
            known_devices = set(
                connection.execute(sa.select(devices.c.device_id).where(devices.c.device_id.in_(device_ids))).scalars()
            )
            missing = [d for d in device_ids if d not in known_devices]
            if missing:
                raise NotFoundError(f"devices {missing} are not registered")
            connection.execute(
                sa.insert(benchmark_results),
                [
                    {
                        "variant_id": r.variant_id,
                        "device_id": r.device_id,
                        "hardware_class": r.hardware_class,
                        "runtime": r.runtime,
                        "threads": r.threads,
                        "p50_ms": r.p50_ms,
                        "p95_ms": r.p95_ms,
                        "runs": r.runs,
                        "measured_at": r.measured_at,
                    }
                    for r in results
                ],
            )
        return len(results)

    def list_results(
        self, *, variant_ids: Sequence[str] = (), hardware_class: str = "", device_id: str = ""
    ) -> list[BenchmarkResult]:
        query = sa.select(benchmark_results).order_by(benchmark_results.c.measured_at, benchmark_results.c.id)
        if variant_ids:
            query = query.where(benchmark_results.c.variant_id.in_(list(variant_ids)))
        if hardware_class:
            query = query.where(benchmark_results.c.hardware_class == hardware_class)
        if device_id:
            query = query.where(benchmark_results.c.device_id == device_id)
        with self._read() as connection:
            rows = connection.execute(query).all()
        return [
            BenchmarkResult(
                variant_id=row.variant_id,
                device_id=row.device_id,
                hardware_class=row.hardware_class,
                runtime=row.runtime,
                threads=row.threads,
                p50_ms=row.p50_ms,
                p95_ms=row.p95_ms,
                runs=row.runs,
                measured_at=row.measured_at,
            )
            for row in rows
        ]


_state_lock = threading.Lock()


def benchmark_store(state: OrchestratorState) -> BenchmarkStore:
    """Return the state's BenchmarkStore, creating it on the SQL store's engine at first use.

    Raises StoreError when the state has no BenchmarkStore and its store is not SQL-backed.
    """
    with _state_lock:
        if state.benchmarks is None:
            engine = getattr(state.store, "engine", None)
            if not isinstance(engine, Engine):
                raise StoreError(
                    f"{type(state.store).__name__} has no SQL engine; set OrchestratorState.benchmarks explicitly"
                )
            state.benchmarks = SqlBenchmarkStore(engine)
        return state.benchmarks
