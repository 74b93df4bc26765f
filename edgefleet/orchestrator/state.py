"""What every request handler of the orchestrator works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgefleet.orchestrator.config import OrchestratorConfig
from edgefleet.orchestrator.fleet import FleetHub
from edgefleet.orchestrator.limits import OrchestratorLimits
from edgefleet.orchestrator.store.base import Store
from edgefleet.orchestrator.telemetry import Telemetry

if TYPE_CHECKING:
    from edgefleet.orchestrator.artifacts import ArtifactStore
    from edgefleet.orchestrator.costmodel.store import BenchmarkStore
    from edgefleet.orchestrator.jobs.runner import JobRunner
    from edgefleet.orchestrator.jobs.store import JobStore
    from edgefleet.orchestrator.rollouts.service import RolloutService
    from edgefleet.orchestrator.rollouts.store import RolloutStore
    from edgefleet.orchestrator.security.auth import Security


@dataclass
class OrchestratorState:
    config: OrchestratorConfig
    store: Store
    hub: FleetHub
    artifacts: ArtifactStore
    telemetry: Telemetry = field(default_factory=Telemetry)
    limits: OrchestratorLimits = field(default_factory=OrchestratorLimits.defaults)
    # On-device benchmark results; costmodel.store.benchmark_store() creates it on first use.
    benchmarks: BenchmarkStore | None = None
    # Rollouts and the loop that advances them; server.start_server sets both.
    rollouts: RolloutStore | None = None
    rollout_service: RolloutService | None = None
    # Compression jobs and the runner of their worker processes; server.start_server sets both.
    jobs: JobStore | None = None
    job_runner: JobRunner | None = None
    # Device and operator authentication and artifact signing; server.start_server sets it. None
    # disables signing and every check, for handler tests without a server.
    security: Security | None = None

    def revoked_device_ids(self) -> frozenset[str]:
        """Return the ids of the revoked devices; none without security."""
        return self.security.store.revoked_device_ids() if self.security is not None else frozenset()
