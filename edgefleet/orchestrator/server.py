"""The orchestrator's gRPC server and its life cycle: start-up, serve, bounded graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from edgefleet.common.systemd import Notifier
from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.backfill import fill_min_runtime_versions
from edgefleet.orchestrator.config import OrchestratorConfig
from edgefleet.orchestrator.fleet import FleetHub
from edgefleet.orchestrator.jobs.runner import start_jobs
from edgefleet.orchestrator.limits import OrchestratorLimits
from edgefleet.orchestrator.outage import RetryLog
from edgefleet.orchestrator.retention import RetentionPolicy, retention_forever
from edgefleet.orchestrator.rollouts.service import sql_rollout_store, start_rollouts
from edgefleet.orchestrator.security.auth import AuthInterceptor
from edgefleet.orchestrator.security.serving import add_ports, check_listen_addresses, open_security, port_credentials
from edgefleet.orchestrator.servicer import AgentServicer, OperatorServicer, unavailable_calls
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store import Store, open_store
from edgefleet.orchestrator.store.engine import DatabaseUnavailable
from edgefleet.orchestrator.store.instance_lock import InstanceLock, InstanceLockLost, acquire_instance_lock
from edgefleet.orchestrator.telemetry import Telemetry
from edgefleet.orchestrator.validation import MalformedRequestInterceptor
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
)
# Last-seen times are written in one transaction per interval.
FLUSH_INTERVAL_S = 2.0
# How often the readiness of the gRPC services follows the database.
DATABASE_CHECK_INTERVAL_S = 5.0

# Largest request and response message. An UploadMetrics batch of MAX_WINDOWS_PER_BATCH windows
# with full sketches stays well below it; larger requests fail with RESOURCE_EXHAUSTED in gRPC itself.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


# The largest value HTTP/2 allows for SETTINGS_MAX_FRAME_SIZE (RFC 9113, section 6.5.2).
HTTP2_MAX_FRAME_SIZE = 2**24 - 1


def server_options(config: OrchestratorConfig) -> list[tuple[str, int]]:
    """Return the gRPC server options for config's keepalive settings.

    Keepalive: by default the server pings a connection after 60 s without reads and drops it when
    no ping acknowledgement arrives within 20 s, so a silently dropped agent link is noticed in about 80 s
    (tests/faults/test_keepalive.py checks the same rule with 1 s settings). It accepts
    client pings down to every 10 s; agents ping every 30 s (edgefleet.agent.agent.Keepalive), so
    neither side sends pings the other rejects. A rejected ping makes the server close the
    connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings").
    """
    return [
        ("grpc.keepalive_time_ms", round(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        # gRPC 1.85 closes a connection whose ping goes unanswered only after
        # grpc.http2.ping_timeout_ms (default 60 s), so it carries the keepalive timeout too.
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", round(config.keepalive_min_ping_interval_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # One process serves thousands of idle control streams, and each is an HTTP/2 stream.
        ("grpc.max_concurrent_streams", 100_000),
        # Largest HTTP/2 DATA frame a client may send, so that an upload chunk travels in one frame.
        ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_SIZE),
        # gRPC sets SO_REUSEPORT by default, so a second orchestrator could bind a port in use and the
        # kernel would split the connections between both. Without it, binding a used port fails.
        ("grpc.so_reuseport", 0),
    ]


SERVER_OPTIONS = server_options(OrchestratorConfig())


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: OrchestratorState
    health: health_aio.HealthServicer
    flusher: asyncio.Task[None]
    database_watch: asyncio.Task[None] | None = None
    retention: asyncio.Task[None] | None = None
    operator_port: int = 0  # The server-only TLS port for operators; 0 with --insecure, where port serves both.
    instance_lock: InstanceLock | None = None
    lock_watch: asyncio.Task[None] | None = None
    # Done with the InstanceLockLost when another orchestrator took over the database; serve() then stops.
    lock_lost: asyncio.Future[InstanceLockLost] | None = None

    async def stop(self, grace_s: float) -> None:
        """Flip health to NOT_SERVING, close streams, let calls finish for grace_s, then flush and close.

        It shuts down the event loop's default executor, so it is the last thing to run on its loop.
        """
        for watch in (self.database_watch, self.lock_watch):
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        for session in list(self.state.hub.sessions.values()):
            session.close("the orchestrator is stopping")
        await self.server.stop(grace_s)
        if self.state.job_runner is not None:
            # Ends a running worker and puts its job back in the queue for the next start.
            await asyncio.to_thread(self.state.job_runner.stop)
        if self.state.rollout_service is not None:
            await self.state.rollout_service.stop()
        self.flusher.cancel()
        await asyncio.gather(self.flusher, return_exceptions=True)
        if self.retention is not None:
            self.retention.cancel()
            await asyncio.gather(self.retention, return_exceptions=True)
        try:
            await asyncio.to_thread(self.state.hub.flush)
        except DatabaseUnavailable as error:
            log.warning("final flush of last-seen times failed: %s", error.message)
        except Exception:
            log.exception("final flush of last-seen times failed")
        await _drain_worker_threads(grace_s)
        self.state.telemetry.close()
        self.state.store.close()
        if self.instance_lock is not None:
            # The default executor is shut down by now; closing the lock's file or session is quick.
            self.instance_lock.release()
        log.info("orchestrator stopped")


async def _drain_worker_threads(timeout_s: float) -> None:
    """Wait for the event loop's worker threads, then shut down its default executor.

    A call cancelled when the grace period runs out leaves its asyncio.to_thread worker running, and
    a store closed under it leaks the worker's database connection. asyncio.run waits for these
    threads at exit anyway; this waits before the store closes. A thread still running after
    timeout_s is logged and left to finish on its own.
    """
    drained = asyncio.ensure_future(asyncio.get_running_loop().shutdown_default_executor())
    try:
        await asyncio.wait_for(asyncio.shield(drained), timeout=max(timeout_s, 1.0))
    except TimeoutError:
        log.warning("worker threads still running %.0f s after shutdown began; closing the store anyway", timeout_s)


async def _flush_forever(hub: FleetHub) -> None:
    retry_log = RetryLog(log, "writing last-seen times")
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        try:
            await asyncio.to_thread(hub.flush)
            retry_log.succeeded()
        except Exception as error:
            retry_log.failed(error, FLUSH_INTERVAL_S)


async def _watch_database(store: Store, health: health_aio.HealthServicer, interval_s: float) -> None:
    """Report the services NOT_SERVING while the database is unreachable or its disk is full, and SERVING after.

    The overall status (service "") stays SERVING, so a liveness probe does not restart an orchestrator
    that waits for its database, while a readiness probe on a service name takes it out of rotation.
    Any other failure of the check (such as a pool timeout under load) is logged, keeps the current
    status and does not end the watch.
    """
    ready = True
    retry_log = RetryLog(log, "checking the database for the health status")
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(store.ping)
        except DatabaseUnavailable as error:
            if ready:
                ready = False
                log.warning("reporting the gRPC services NOT_SERVING until the database works again: %s", error.message)
                for name in SERVICE_NAMES:
                    await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            continue
        except Exception as error:
            retry_log.failed(error, interval_s)
            continue
        if not ready:
            ready = True
            log.info("the database works again; reporting the gRPC services SERVING")
            unavailable_calls.recovered()
            for name in SERVICE_NAMES:
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def _hold_instance_lock(lock: InstanceLock, lost: asyncio.Future[InstanceLockLost], interval_s: float) -> None:
    """Check every interval_s that this process still holds the database's instance lock.

    A PostgreSQL session lost with the server takes the lock with it; the check takes it again on a new
    session. When another orchestrator took it first, lost gets the error and the watch ends. While the
    database is unreachable the check fails and is retried, as the store's own calls are.
    """
    retry_log = RetryLog(log, "checking the orchestrator's database lock")
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(lock.verify)
        except InstanceLockLost as error:
            lost.set_result(error)
            return
        except Exception as error:
            retry_log.failed(error, interval_s)
            continue
        retry_log.succeeded()


async def start_server(config: OrchestratorConfig) -> RunningServer:
    """Bind the listen addresses, take the database's instance lock, open the store and serve; return the server.

    Raises ValueError for an invalid retention or limit setting, OSError when the address cannot be bound,
    and InstanceLockHeld (a ConfigError) when another orchestrator serves the database.
    """
    retention_policy = RetentionPolicy.from_config(config)
    limits = OrchestratorLimits.from_config(config)
    check_listen_addresses(config)
    # Bad TLS files, like a port in use, end the start before anything is written in the data directory.
    credentials = port_credentials(config)
    # The ports are bound before anything is written, so a port taken since the probe above fails
    # here with nothing stored. Clients that connect before start() wait in the listen backlog.
    # The interceptor gets the security state once the store is open.
    auth = AuthInterceptor(None)
    server = grpc.aio.server(options=server_options(config), interceptors=[MalformedRequestInterceptor(), auth])
    try:
        port, operator_port = add_ports(server, config, credentials)
    except RuntimeError as error:
        # grpcio raises RuntimeError, not OSError, for an address that is in use or invalid.
        raise OSError(f"cannot listen: {error} (--listen {config.listen}); the address is in use or invalid") from None
    telemetry = Telemetry()
    try:
        if config.metrics_listen:
            telemetry.bind(config.metrics_listen)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        # The lock names the bound port, which differs from --listen's when that requests port 0.
        bound = f"{config.listen.rsplit(':', 1)[0]}:{port}"
        instance_lock = await asyncio.to_thread(acquire_instance_lock, config.db_url, bound)
    except BaseException:
        telemetry.close()
        await server.stop(None)
        raise
    try:
        return await _start_serving(
            config, server, auth, instance_lock, telemetry, retention_policy, limits, port, operator_port
        )
    except BaseException:
        instance_lock.release()
        telemetry.close()
        await server.stop(None)
        raise


async def _start_serving(
    config: OrchestratorConfig,
    server: grpc.aio.Server,
    auth: AuthInterceptor,
    instance_lock: InstanceLock,
    telemetry: Telemetry,
    retention_policy: RetentionPolicy,
    limits: OrchestratorLimits,
    port: int,
    operator_port: int,
) -> RunningServer:
    """Open the store and start serving on the bound server; the second half of start_server."""
    store = await asyncio.to_thread(open_store, config.db_url)
    # This process holds the database's instance lock, so no other orchestrator serves these devices:
    # a device stored as connected is left over from a process that ended, with all its streams.
    for device in await asyncio.to_thread(store.list_devices):
        if device.connected:
            await asyncio.to_thread(store.set_connected, device.device_id, False, device.registered_at)
    artifacts = FileArtifactStore(config.data_dir / "artifacts")
    # Before serving, so that selection checks the LiteRT version of variants stored by earlier releases.
    await asyncio.to_thread(fill_min_runtime_versions, store, artifacts)
    hub = FleetHub(
        store,
        stale_after_s=config.stale_after_s,
        offline_after_s=config.offline_after_s,
        max_clock_skew_s=config.max_clock_skew_s,
    )
    hub.loop = asyncio.get_running_loop()
    state = OrchestratorState(
        config=config, store=store, hub=hub, artifacts=artifacts, limits=limits, telemetry=telemetry
    )
    state.rollouts = sql_rollout_store(store)
    telemetry.attach(state, config.metrics_lookback_s)
    if config.metrics_listen:
        metrics_port = telemetry.serve()
        if config.metrics_port_file is not None:
            config.metrics_port_file.write_text(f"{metrics_port}\n")
        # An empty host (":9464") serves every IPv4 address, as Telemetry.bind binds it.
        metrics_host = config.metrics_listen.rpartition(":")[0] or "0.0.0.0"
        log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, metrics_port)

    state.security = await asyncio.to_thread(open_security, store, config)
    auth.security = state.security
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(state), server)
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(OperatorServicer(state), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await asyncio.to_thread(start_jobs, state)
    flusher = asyncio.create_task(_flush_forever(hub))
    database_watch = asyncio.create_task(_watch_database(store, health, DATABASE_CHECK_INTERVAL_S))
    lock_lost: asyncio.Future[InstanceLockLost] = asyncio.get_running_loop().create_future()
    lock_watch = asyncio.create_task(_hold_instance_lock(instance_lock, lock_lost, DATABASE_CHECK_INTERVAL_S))
    # Rollouts resume from the database: the engine continues every rollout where it was.
    state.rollout_service = start_rollouts(state)
    retention = None
    if config.retention_interval_s > 0:
        retention = asyncio.create_task(retention_forever(store, retention_policy, config.retention_interval_s))
    if config.port_file is not None:
        config.port_file.write_text(f"{port}\n")
    if config.operator_port_file is not None and operator_port:
        config.operator_port_file.write_text(f"{operator_port}\n")
    if operator_port:
        log.info("operators call on port %d (TLS with API tokens); agents on port %d (mutual TLS)", operator_port, port)
    host = config.listen.rsplit(":", 1)[0]
    log.info("orchestrator serving on %s:%d with database %s", host, port, redact_url(config.db_url))
    return RunningServer(
        server=server,
        port=port,
        state=state,
        health=health,
        flusher=flusher,
        database_watch=database_watch,
        retention=retention,
        operator_port=operator_port,
        instance_lock=instance_lock,
        lock_watch=lock_watch,
        lock_lost=lock_lost,
    )


def redact_url(url: str) -> str:
    """Hide a password in a database URL before logging it."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{rest.split('@', 1)[1]}"
    return url


async def serve(config: OrchestratorConfig, stop: asyncio.Event) -> None:
    """Run until stop is set or the database lock is lost, then shut down within the configured grace period.

    The caller installs the signal handlers (install_stop_signals) that set stop before it calls this,
    so a signal during the start, even right after the port file appears, gets the graceful stop once
    the start is done. A second SIGINT during shutdown exits at once.
    """
    running = await start_server(config)
    notifier = Notifier()
    notifier.ready(f"serving on port {running.port}")
    watchdog = None
    if notifier.watchdog_interval_s is not None:
        watchdog = asyncio.create_task(_watchdog_forever(notifier, notifier.watchdog_interval_s, running.state.hub))
    stopped = asyncio.create_task(stop.wait())
    assert running.lock_lost is not None
    waiters: list[asyncio.Future[Any]] = [stopped, running.lock_lost]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    notifier.stopping()
    if watchdog is not None:
        watchdog.cancel()
    await running.stop(config.shutdown_grace_s)
    notifier.close()
    if running.lock_lost.done():
        raise running.lock_lost.result()


async def _watchdog_forever(notifier: Notifier, interval_s: float, hub: FleetHub) -> None:
    while True:
        notifier.watchdog()
        notifier.status(f"{len(hub.sessions)} control streams open")
        await asyncio.sleep(interval_s)
