"""Wiring of rollouts into the orchestrator: the rollout store on the SQL engine and the background loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from edgefleet.orchestrator import serde
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.outage import RetryLog
from edgefleet.orchestrator.rollouts.engine import LEASE_NAME, TICK_S, RolloutEngine
from edgefleet.orchestrator.rollouts.reconcile import Reconciler
from edgefleet.orchestrator.rollouts.store import RolloutStore, SqlRolloutStore
from edgefleet.orchestrator.selection import Predictor
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import Store, StoreError
from edgefleet.orchestrator.store.engine import DatabaseUnavailable

log = logging.getLogger(__name__)


def sql_rollout_store(store: Store) -> RolloutStore:
    """Return a RolloutStore on the engine of a SQL store; raise StoreError for a store without one."""
    engine = getattr(store, "engine", None)
    if not isinstance(engine, Engine):
        raise StoreError(f"{type(store).__name__} has no SQL engine; set OrchestratorState.rollouts explicitly")
    return SqlRolloutStore(engine)


def push_desired_state(state: OrchestratorState, device_id: str) -> bool:
    """Send a device its current desired state if its control stream is open here; return whether it is."""
    generation, assignments = state.store.get_desired_state(device_id)
    return state.hub.push_threadsafe(device_id, serde.desired_state_message(generation, assignments))


@dataclass
class RolloutService:
    """The rollout engine and the reconciler, ticking together in one background task."""

    engine: RolloutEngine
    reconciler: Reconciler
    state: OrchestratorState
    interval_s: float = TICK_S
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _tick_log: RetryLog = field(default_factory=lambda: RetryLog(log, "rollout engine tick"))
    _reconcile_log: RetryLog = field(default_factory=lambda: RetryLog(log, "reconciling desired state"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def _run(self) -> None:
        log.info("rollout engine %s started, ticking every %.1f s", self.engine.holder, self.interval_s)
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.engine.tick)
                self._tick_log.succeeded()
            except Exception as error:
                self._tick_log.failed(error, self.interval_s)
            try:
                # Every process re-pushes to its own streams, whichever process holds the engine lease.
                await asyncio.to_thread(self.reconciler.tick, list(self.state.hub.sessions))
                self._reconcile_log.succeeded()
            except Exception as error:
                self._reconcile_log.failed(error, self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)

    async def stop(self) -> None:
        """Let the current tick finish, stop the loop and release the engine lease."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.to_thread(self.engine.rollouts.release_lease, LEASE_NAME, self.engine.holder)
        except DatabaseUnavailable as error:
            log.warning("releasing the rollout engine lease failed: %s; it expires by itself", error.message)
        except Exception:
            log.exception("releasing the rollout engine lease failed; it expires by itself")
        log.info("rollout engine %s stopped", self.engine.holder)


def start_rollouts(state: OrchestratorState) -> RolloutService:
    """Start the rollout engine and the reconciler on the running event loop; return the service.

    state.rollouts is created on the SQL store's engine when the caller did not set it.
    """
    if state.rollouts is None:
        state.rollouts = sql_rollout_store(state.store)

    def predictor(variants: Sequence[Variant], hardware_classes: Sequence[str]) -> Predictor:
        # The same calibration as ExplainSelection, so that it explains the engine's choices.
        # Imported here: the calibrated predictor pulls in numpy and the benchmark store.
        from edgefleet.orchestrator.handlers.explain import calibrated_predictor

        return calibrated_predictor(state, variants, hardware_classes)

    engine = RolloutEngine(
        state.store,
        state.rollouts,
        notify=lambda device_id: push_desired_state(state, device_id),
        predictor_factory=predictor,
        excluded_devices=state.revoked_device_ids,
    )
    reconciler = Reconciler(state.store, lambda device_id: push_desired_state(state, device_id))
    service = RolloutService(engine=engine, reconciler=reconciler, state=state)
    service.start()
    return service
